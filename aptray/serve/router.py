"""Router: one replica's engine loop in a Ray actor (TGI-style router; it owns queueing and batching).

The engine is single-threaded and runs in a background thread; the actor's asyncio side only
validates, admits and streams. The two sides meet in an inbox (requests, aborts) and per-request
asyncio queues (token chunks), so a slow step never blocks admission or streaming.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field

import grpc

from aptray.config import EngineConfig
from aptray.engine import Engine
from aptray.metrics import ServingMetrics
from aptray.sampling_params import SamplingParams
from aptray.serve.args import AppArgs
from aptray.store import RequestMeta, RequestStore

logger = logging.getLogger("aptray")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    chunks: asyncio.Queue
    ttft_slo: float
    tbt_slo: float
    stop: list[str]
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    sent_text: str = ""

    def put(self, chunk: dict) -> None:
        self.loop.call_soon_threadsafe(self.chunks.put_nowait, chunk)


def resolve_model(args: AppArgs) -> tuple[str, bool]:
    """(model path, whether it is the embedded tiny default)."""
    if args.model:
        return args.model, False
    from aptray.worker.shard import default_model_path, ensure_tiny_model
    return ensure_tiny_model(default_model_path()), True


def engine_config(args: AppArgs, model: str) -> EngineConfig:
    return EngineConfig(model=model, tokenizer=args.tokenizer, dtype=args.dtype,
                        tensor_parallel_size=args.tensor_parallel_size, cache_mode=args.cache_mode,
                        block_size=args.block_size, num_cache_blocks=args.num_cache_blocks,
                        cache_memory_gb=args.cache_memory_gb, scheduler=args.scheduler,
                        max_num_seqs=args.max_num_seqs, ttft_slo=args.ttft_slo_ms / 1000,
                        tbt_slo=args.tbt_slo_ms / 1000)


class Router:
    def __init__(self, args: dict):
        from transformers import AutoTokenizer

        from aptray.executor.ray import RayExecutor

        self.args = AppArgs.parse(args)
        model, is_default = resolve_model(self.args)
        self.config = engine_config(self.args, model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.tokenizer)
        self.executor = RayExecutor(self.config, self.args.use_gpu, model_is_default=is_default)
        self.engine = Engine(self.config, self.executor, self.tokenizer)
        self.store = RequestStore.connect(self.args.redis_url, finished_ttl_s=self.args.finished_ttl_s)
        self.metrics = ServingMetrics()
        self._time_scheduler()
        self._forget_previous_run()
        self._streams: dict[str, _Stream] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._broken: str | None = None  # a shard is unreachable: report unhealthy, Serve replaces us
        self.draining = False
        self._thread = threading.Thread(target=self._loop, name="aptray-engine", daemon=True)
        self._thread.start()

    def _time_scheduler(self) -> None:
        # the engine has no hook for scheduler time; wrap the policy's schedule() to measure it
        sched = self.engine.scheduler
        inner = sched.schedule
        self._last_schedule_s = None

        def timed(now):
            t = time.perf_counter()
            plan = inner(now)
            self._last_schedule_s = time.perf_counter() - t
            return plan
        sched.schedule = timed

    def _forget_previous_run(self) -> None:
        # A new router has no client streams for requests a dead one left in flight: close them
        # in the store (their clients saw the stream break). store.unfinished() is the queue to
        # rebuild if resumable requests are ever wanted.
        left = self.store.unfinished()
        for m in left:
            self.store.finish(m.request_id, "abort")
        if left:
            logger.warning("router restart: closed %d requests left in flight by the previous router", len(left))

    # -- control plane ------------------------------------------------------------------------
    def ready(self) -> dict:
        return {"model": self.config.model, "max_model_len": self.config.spec.max_model_len,
                "num_blocks": self.executor.num_blocks, "store": self.store.url}

    def health(self) -> dict:
        s = self.engine.scheduler
        return {"ok": self._thread.is_alive() and self._broken is None, "waiting": len(s.waiting),
                "running": len(s.running), "draining": self.draining, "error": self._broken}

    def metrics_text(self) -> bytes:
        return self.metrics.text()

    def abort(self, request_id: str) -> bool:
        found = request_id in self._streams
        self._inbox.put(("abort", request_id))
        self._wake.set()
        return found

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests, let in-flight ones finish; returns how many were left at the deadline."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self._streams)

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.executor.shutdown()
        self.store.close()

    # -- data plane ---------------------------------------------------------------------------
    def _refuse(self, request_id: str, n: int, sampling: dict) -> dict | None:
        if self.draining or self._broken:
            return {"error": self._broken or "the server is draining", "status": 503}
        if request_id in self._streams:
            return {"error": f"request id {request_id!r} is already in flight", "status": 400}
        limit = self.config.spec.max_model_len
        want = n + int(sampling.get("max_tokens", 16))
        if n == 0:
            return {"error": "the prompt is empty", "status": 400, "param": "prompt"}
        if want > limit:
            return {"error": f"This model's maximum context length is {limit} tokens. However, you requested "
                             f"{want} tokens ({n} in the prompt, {want - n} for max_tokens). Please reduce "
                             f"the prompt or max_tokens.", "status": 400, "param": "max_tokens"}
        queued = len(self.engine.scheduler.waiting) + self._inbox.qsize()
        if queued >= self.args.max_queue:
            self.metrics.observe_rejected("queue_full")
            return {"error": f"{queued} requests are waiting (limit {self.args.max_queue})", "status": 429}
        return None

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: dict, prompt: str | None = None):
        """Yields an admission chunk ({"accepted"} or {"error", "status"}), then token chunks until finished."""
        refusal = self._refuse(request_id, len(prompt_token_ids), sampling)
        if refusal is None:
            try:
                sp = SamplingParams(**sampling)
            except (TypeError, ValueError) as e:
                refusal = {"error": str(e), "status": 400}
        if refusal is not None:
            yield refusal
            return
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), sp.ttft_slo or self.config.ttft_slo,
                         sp.tbt_slo or self.config.tbt_slo, list(sp.stop), len(prompt_token_ids))
        self._streams[request_id] = stream
        finished = False
        try:
            self._inbox.put(("add", request_id, list(prompt_token_ids), sp, prompt, time.time()))
            self._wake.set()
            yield {"accepted": True, "request_id": request_id, "prompt_tokens": len(prompt_token_ids)}
            while not finished:
                chunk = await stream.chunks.get()
                finished = chunk.get("finished", False) or "error" in chunk
                yield chunk
        finally:
            if not finished:  # the caller went away (disconnect, cancel): free the request's blocks
                self.abort(request_id)

    # -- engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed step fails its requests, not the replica
                logger.exception("engine step failed")
                if isinstance(e, grpc.RpcError):  # transport, not plan: the shard group is gone
                    self._broken = f"shard unreachable: {e.code()}"
                self._fail_all(repr(e))
                continue
            self._publish(outputs)
            result = self.engine.last_result
            self.metrics.observe_iteration(self.engine.scheduler, self._last_schedule_s,
                                           result.step_time if result is not None else None)

    def _drain_inbox(self) -> None:
        changed = False
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            changed = True
            if item[0] == "add":
                self._add(*item[1:])
            else:
                self._abort_now(item[1])
        if changed:
            self.metrics.observe_iteration(self.engine.scheduler, None, None)

    def _add(self, rid: str, ids: list[int], sp: SamplingParams, prompt: str | None, wall: float) -> None:
        stream = self._streams.get(rid)
        if stream is None:  # aborted before it reached the engine
            return
        try:
            self.engine.add_request(rid, ids, sp, prompt=prompt)
        except ValueError as e:
            self._streams.pop(rid, None)
            stream.put({"error": str(e), "status": 400})
            return
        self._store(lambda: self.store.add(RequestMeta(rid, wall, stream.ttft_slo, stream.tbt_slo, ids,
                                                       asdict(sp))))

    def _abort_now(self, rid: str) -> None:
        req = self.engine.scheduler.requests.get(rid)
        self.engine.abort(rid)
        stream = self._streams.pop(rid, None)
        if req is not None:
            self.metrics.observe_finished(req.arrival_time, req.token_times, req.ttft_slo, req.tbt_slo, "abort")
            self._store(lambda: self.store.finish(rid, "abort"))
        if stream is not None:
            stream.put({"request_id": rid, "token_ids": [], "text": "", "finished": True, "finish_reason": "abort",
                        "usage": {"prompt_tokens": stream.prompt_tokens, "completion_tokens": len(stream.token_ids)}})

    def _publish(self, outputs) -> None:
        # tokens first, then finishes: a finish shortens the keys' TTL and must be the last write
        self._store(lambda: self.store.record_step({o.request_id: list(o.new_token_ids) for o in outputs}))
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if out.finished:
                m, reason = out.metrics, out.outputs[0].finish_reason
                self.metrics.observe_finished(m.arrival_time, m.token_times, *self._slos(stream), reason)
                self._store(lambda rid=out.request_id, r=reason: self.store.finish(rid, r))
                self._streams.pop(out.request_id, None)
            if stream is None:
                continue
            stream.token_ids.extend(out.new_token_ids)
            stream.put({"request_id": out.request_id, "token_ids": list(out.new_token_ids),
                        "text": self._text_delta(stream, out), "finished": out.finished,
                        "finish_reason": out.outputs[0].finish_reason,
                        "usage": {"prompt_tokens": stream.prompt_tokens,
                                  "completion_tokens": len(stream.token_ids)}})

    def _slos(self, stream: _Stream | None) -> tuple[float, float]:
        return (stream.ttft_slo, stream.tbt_slo) if stream else (self.config.ttft_slo, self.config.tbt_slo)

    def _text_delta(self, stream: _Stream, out) -> str:
        if out.finished:  # the engine's final text is already cut at a stop string
            text = out.outputs[0].text
        else:
            text = self.tokenizer.decode(stream.token_ids, skip_special_tokens=True)
            text = text.rstrip("\ufffd")  # half a multi-byte character: wait for the rest
            if stream.stop:  # hold back what could still become a stop string
                text = text[:max(0, len(text) - max(len(s) for s in stream.stop) + 1)]
        if not text.startswith(stream.sent_text):
            return ""
        delta, stream.sent_text = text[len(stream.sent_text):], text
        return delta

    def _fail_all(self, why: str) -> None:
        for rid in list(self._streams):
            self.engine.abort(rid)
            self._store(lambda rid=rid: self.store.finish(rid, "error"))
            self._streams.pop(rid).put({"error": f"engine failure: {why}", "status": 500})

    def _store(self, write) -> None:
        # metadata is best effort: a Redis hiccup must not stop token generation
        try:
            write()
        except Exception:
            logger.exception("request store write failed")
