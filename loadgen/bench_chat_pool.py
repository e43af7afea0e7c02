"""How much the cache pool's size decides what prefix caching gains on multi-turn chat (CPU engine).

    python -m loadgen.bench_chat_pool --blocks 192,384,768 --policies fcfs,apt-kv,apt-hybrid [--seeds 0,1,2]

The results page's chat part (loadgen.results_chat, CPU_SETUP: the tiny OPT at a 2,048-token
context, the serving thread's CPU time as the clock) at its own pool (768 blocks) and at others: for each
pool size every policy runs with and without prefix caching, the two in lockstep
(results_chat.off_beside_on), on the same requests over the same rate grid (scaled to the decode
step each pool's run measures), and the script prints, per pool and policy, effective throughput
(the 90% crossing) off and on, their ratio, TTFT p50 off and on at the highest rate where the policy
without caching keeps 90%, and the token hit rate at each rate. Between conversation turns (a think time) a conversation's
blocks wait, unheld, for its next turn; a pool that cannot keep them while others run evicts them,
and the follow-up prefills its whole history again.

Writes the rows as JSON to --out (default: none).
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from loadgen import results_chat, results_cpu
from loadgen.conversations import MULTITURN
from loadgen.sweep import at_least, bounded_ratio, crossing_rate, kept_at_every_rate


def run_pool(num_blocks: int, policies: list[str], mode: str, workers: int, log=print, seed: int = 0) -> dict:
    setup = dataclasses.replace(results_chat.CPU_SETUP, num_blocks=num_blocks, policies=results_chat.with_and_without(
        {k: results_cpu.POLICIES[k] for k in policies}))
    return results_cpu.run([MULTITURN], [1.0], mode=mode, workers=workers, log=log, setup=setup, seed=seed)


def summary_rows(num_blocks: int, result: dict) -> list[dict]:
    """Per base policy: effective throughput off and on, TTFT p50 of both where the policy without
    caching last keeps 90%, and the token hit rate with caching per rate."""
    by = {(r["policy"], r["rate"]): r for r in result["runs"]}
    rates = sorted({r["rate"] for r in result["runs"]})
    rows = []
    for label in results_chat.pairs(dict.fromkeys(r["policy"] for r in result["runs"])):
        on_label = label + results_chat.PREFIX
        off = {x: by[(label, x)]["attainment"] for x in rates}
        on = {x: by[(on_label, x)]["attainment"] for x in rates}
        at = results_chat.kept_rate(off)
        rows.append({"num_blocks": num_blocks, "policy": label, "effective_off_rps": crossing_rate(off),
                     "effective_on_rps": crossing_rate(on), "at_rate": at,
                     "ttft_p50_off_s": by[(label, at)]["ttft_s"]["p50"], "ttft_p50_on_s": by[(on_label, at)]["ttft_s"]["p50"],
                     "hit_rate_tokens": {x: results_chat.token_hit_rate(by[(on_label, x)]) for x in rates},
                     "attainment_off": off, "attainment_on": on})
    return rows


def table(rows: list[dict]) -> list[str]:
    """Rows of one pool's run (one rate grid)."""
    rates = sorted(rows[0]["hit_rate_tokens"])
    lines = ["| blocks | policy | effective off (req/s) | on | on / off | TTFT p50 off / on (ms) | token hit rate at "
             + " / ".join(f"{x:.3g}" for x in rates) + " req/s |", "|" + " --- |" * 7]
    for r in rows:
        off, on = r["effective_off_rps"], r["effective_on_rps"]
        # kept 90% at every rate: the effective throughput is at least the highest rate tried
        off_top, on_top = kept_at_every_rate(r["attainment_off"]), kept_at_every_rate(r["attainment_on"])
        hits = " / ".join(f"{r['hit_rate_tokens'][x]:.2f}" for x in rates)
        lines.append(f"| {r['num_blocks']} | {r['policy']} | {at_least(off, off_top)} | {at_least(on, on_top)} | "
                     f"{bounded_ratio(on, off, on_top, off_top)} | "
                     f"{1e3 * r['ttft_p50_off_s']:.0f} / {1e3 * r['ttft_p50_on_s']:.0f} | {hits} |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", default="192,384,768", help="pool sizes, in blocks of 16 tokens")
    ap.add_argument("--policies", default="fcfs,apt-kv,apt-hybrid")
    ap.add_argument("--mode", choices=("quick", "full"), default="full", help="results_chat's grid and requests")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", default="0", help="trace seeds (conversations, lengths, arrivals): a run per pool each")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for seed in map(int, args.seeds.split(",")):
        for num_blocks in map(int, args.blocks.split(",")):
            # each run measures this machine's decode step again, and its rates follow it
            result = run_pool(num_blocks, args.policies.split(","), args.mode, args.workers, log=lambda _: None,
                              seed=seed)
            mine = [{**row, "seed": seed} for row in summary_rows(num_blocks, result)]
            rows += mine
            print(f"seed {seed}\n" + "\n".join(table(mine)), flush=True)
            if args.out:  # after each run: a later one may fail
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
