"""Recompute scratch is bounded per chunk of rows and exact; the worst-case profile step runs."""
from __future__ import annotations

import torch

from aptray import LLM, SamplingParams
from aptray.model.attention import _chunks_within
from aptray.worker.memory_profile import recompute_scratch_bytes, run_worst_case_step
from tiny_models import prompts, tiny_model


def test_chunks_cover_rows_within_budget():
    lens = (5, 30, 7, 7, 40, 2, 2, 2)
    chunks = _chunks_within(lens, 64)
    assert [i for c in chunks for i in range(c.start, c.stop)] == list(range(8))
    for c in chunks:
        part = lens[c]
        assert len(part) == 1 or max(part) * len(part) <= 64


def test_decode_groups_know_their_lengths_on_the_host():
    """Each decode path's group carries its rows' context lengths as host ints beside the device tensor:
    the kernels size their grids by max_len without reading the tensor back (a device sync per layer)."""
    from aptray.model.step_context import build_step_context
    from aptray.plan import BatchPlan, SeqPlan
    seqs = (SeqPlan("a", (1,), 6, "kv", (0, 1), True), SeqPlan("b", (2,), 17, "hidden", (2, 3), True),
            SeqPlan("c", (3, 4, 5), 0, "kv", (4,), True), SeqPlan("d", (6,), 30, "kv", (5, 6, 7, 8), True),
            SeqPlan("e", (7,), 3, "hidden", (9,), True))
    _, ctx = build_step_context(BatchPlan(0, seqs), block_size=8, hidden_block_size=16, hidden_attention="absorbed",
                                device="cpu")
    assert set(ctx.decodes) == {"kv", "absorbed"}
    for g, lens in ((ctx.decodes["kv"], (7, 31)), (ctx.decodes["absorbed"], (18, 4))):
        assert g.lens == lens and g.context_lens.tolist() == list(lens) and g.max_len == max(lens)


def test_small_scratch_gives_the_same_tokens():
    path = tiny_model("llama-48x3")
    batch = prompts(6, seed=11)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(path, cache_mode="hidden").generate(
        [{"prompt_token_ids": p} for p in batch], sp)]
    small = LLM(path, cache_mode="hidden", recompute_scratch_tokens=40)
    got = [o.outputs[0].token_ids for o in small.generate([{"prompt_token_ids": p} for p in batch], sp)]
    assert got == want


def test_worst_case_profile_step_and_scratch_accounting():
    llm = LLM(tiny_model("opt-60x3"), max_num_batched_tokens=200)
    runner = llm.engine.executor.runner
    run_worst_case_step(runner.model, llm.config, 3, torch.float32, runner.device)
    # x (60) + K and V (2 * 60) fp32, doubled for the gather copy, per scratch token
    assert recompute_scratch_bytes(llm.config, 3, torch.float32) == llm.config.recompute_scratch_tokens * 180 * 4 * 2
