"""Which of aptray's source files run for one request, traced rather than read from the code.

  python -m loadgen.trace_request_path [--requests 3] [--app-args JSON] [--out DIR]

Serves the default app (`serve run aptray.app`'s arguments, with Serve's routing-stats pull made rare:
it would run the replica's load path in every window; --app-args adds build_app arguments, such as
{"scheduler": "apt"} or {"executor": "ray"}) on a Ray instance whose every worker process profiles
its Python calls (`install`, Ray's worker_process_setup_hook): each call into a file of aptray/ or
kernels/aptray_kernels/ is kept as (file, process, thread, 50 ms bucket). After one warm-up request
it times windows: idle ones, and ones in which a streamed POST /v1/completions is sent and read to
its end. A file counts for the request where it runs in every request window; the files that run in
an idle window are printed apart (background work). The driver's own calls (the client) are not
traced. Prints the files in order of first call, with the processes and threads they ran in, and
writes request_path_trace.json under --out when given.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

BUCKET_S = 0.05
ROOTS = ("aptray", os.path.join("kernels", "aptray_kernels"))
TRACE_DIR_ENV = "APTRAY_TRACE_DIR"
PROMPT = {"model": "tiny-opt-v1", "prompt": "Hello", "max_tokens": 16, "stream": True}


def _repo_file(path: str, root: str) -> str | None:
    """path relative to the repository root where it is one of aptray's source files, else None."""
    if not path.startswith(root):
        return None
    rel = os.path.relpath(path, root)
    return rel if rel.startswith(ROOTS) and rel.endswith(".py") else None


def install() -> None:
    """Ray's worker_process_setup_hook: profile every Python call of this process's threads (those
    started from now on too) into aptray's files, and write them to $APTRAY_TRACE_DIR/<pid>.json
    every BUCKET_S * 5 seconds."""
    out_dir = os.environ.get(TRACE_DIR_ENV)
    if not out_dir:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours: dict[str, str | None] = {}
    calls: dict[tuple[str, int], set[int]] = {}

    def profile(frame, event, arg):
        if event != "call":
            return
        path = frame.f_code.co_filename
        rel = ours.get(path, False)
        if rel is False:
            rel = ours[path] = _repo_file(path, root)
        if rel is not None:
            calls.setdefault((rel, threading.get_ident()), set()).add(int(time.time() / BUCKET_S))

    def dump() -> None:
        names: dict[int, str] = {}
        while True:
            time.sleep(BUCKET_S * 5)
            names.update({t.ident: t.name for t in threading.enumerate()})
            with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
            record = {"pid": os.getpid(), "title": title,
                      "calls": [[rel, names.get(ident, str(ident)), sorted(buckets)]
                                for (rel, ident), buckets in list(calls.items())]}
            path = os.path.join(out_dir, f"{os.getpid()}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(record, f)
            os.replace(path + ".tmp", path)

    threading.Thread(target=dump, name="aptray-trace-dump", daemon=True).start()
    threading.setprofile(profile)
    sys.setprofile(profile)


def read_traces(trace_dir: str) -> list[dict]:
    out = []
    for name in os.listdir(trace_dir):
        if name.endswith(".json"):
            with open(os.path.join(trace_dir, name)) as f:
                out.append(json.load(f))
    return out


def files_in(traces: list[dict], start: float, end: float) -> dict[str, dict]:
    """file -> its first bucket in [start, end] and the (process title, thread) pairs it ran in there."""
    lo, hi = int(start / BUCKET_S), int(end / BUCKET_S)
    seen: dict[str, dict] = {}
    for trace in traces:
        for rel, thread, buckets in trace["calls"]:
            inside = [b for b in buckets if lo <= b <= hi]
            if inside:
                entry = seen.setdefault(rel, {"first": inside[0], "where": set()})
                entry["first"] = min(entry["first"], inside[0])
                entry["where"].add((trace["title"], thread))
    return seen


def streamed_completion(url: str) -> int:
    """One streamed completion through Serve's HTTP proxy, read to its end; its token chunks."""
    import httpx
    chunks = 0
    with httpx.stream("POST", url + "/v1/completions", json=PROMPT, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            chunks += line.startswith("data: {")
    return chunks


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=3, help="request windows (and as many idle ones)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds after a request's last chunk in its window")
    p.add_argument("--app-args", default="{}", help="JSON of build_app arguments beyond the defaults")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from aptray.app import build_app
    from aptray.worker.shard import free_port

    trace_dir = tempfile.mkdtemp(prefix="aptray-trace-")
    ray.init(include_dashboard=False, num_cpus=4, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "loadgen.trace_request_path.install",
                          "env_vars": {TRACE_DIR_ENV: trace_dir}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app_args = {"routing_stats_period_s": 3600.0, **json.loads(args.app_args)}
        serve.run(build_app(app_args), name="aptray", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        streamed_completion(url)  # first calls: the tokenizer's, the model's warm-up
        time.sleep(2.0)
        windows = []
        for _ in range(args.requests):
            start = time.time()
            chunks = streamed_completion(url)
            time.sleep(args.settle)
            request = (start, time.time())
            time.sleep(0.5)  # windows apart by more than a bucket
            start = time.time()
            time.sleep(request[1] - request[0])
            windows.append({"request": request, "idle": (start, time.time()), "chunks": chunks})
            time.sleep(0.5)
        time.sleep(BUCKET_S * 10)  # the processes' last dumps
        traces = read_traces(trace_dir)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(trace_dir, ignore_errors=True)

    per_request = [files_in(traces, *w["request"]) for w in windows]
    idle = set().union(*(files_in(traces, *w["idle"]) for w in windows))
    every = set.intersection(*(set(seen) for seen in per_request))
    first = per_request[0]
    ordered = sorted(every, key=lambda rel: (first[rel]["first"], rel))
    spans = ", ".join(f"{w['request'][1] - w['request'][0]:.2f} s, {w['chunks']} chunks" for w in windows)
    print(f"{len(ordered)} files run in each of {len(windows)} request windows ({spans}); "
          f"{len(idle)} in the idle windows")
    for n, rel in enumerate(ordered, 1):
        where = sorted({f"{title} / {thread}" for title, thread in first[rel]["where"]})
        print(f"{n:3d} {rel:50s} {'; '.join(where)}{'   (also idle)' if rel in idle else ''}")
    some = sorted(set().union(*per_request) - every)
    if some:
        print("in some request windows only:", ", ".join(some))
    if idle:
        print("in an idle window:", ", ".join(sorted(idle)))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        record = {"files": ordered, "idle": sorted(idle), "some_windows": some,
                  "where": {rel: sorted(map(list, first[rel]["where"])) for rel in ordered},
                  "windows": windows, "date": time.strftime("%Y-%m-%d %H:%M")}
        with open(os.path.join(args.out, "request_path_trace.json"), "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
