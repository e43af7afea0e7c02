"""Router: one replica's engine loop in a Ray actor (TGI-style router; it owns queueing and batching).

The engine is single-threaded and runs in a background thread; the actor's asyncio side only
validates, admits and streams. The two sides meet in an inbox (requests, aborts, re-attaches)
and per-request asyncio queues (token chunks), so a slow step never blocks admission or
streaming. Redis writes go through a StoreWriter thread, so Redis never blocks the engine either.

Faults it survives (docs/RELIABILITY.md): a shard group that dies mid-step is rebuilt and its
requests resumed from their generated tokens; a router that dies is recreated by its ingress and
resumes the requests Redis lists for its owner; clients re-attach with the tokens they have seen.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field

import grpc

from aptray.config import EngineConfig
from aptray.engine import Engine
from aptray.metrics import ServingMetrics
from aptray.sampling_params import SamplingParams
from aptray.serve.args import AppArgs
from aptray.serve.limits import request_error
from aptray.serve.resume import Resumable, finished_reason, from_meta, from_request, readmit
from aptray.serve.store_writer import StoreUnavailable, StoreWriter
from aptray.store import RequestMeta, RequestStore

logger = logging.getLogger("aptray")

MAX_UNCLAIMED = 1024  # finished resumed requests kept for a client that re-attaches late


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop | None  # None: resumed from Redis, no client attached (yet)
    chunks: asyncio.Queue | None
    ttft_slo: float
    tbt_slo: float
    stop: list[str]
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    sent_text: str = ""

    @property
    def attached(self) -> bool:
        return self.loop is not None

    def put(self, chunk: dict) -> None:
        if self.loop is not None:
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
    def __init__(self, args: dict, owner: str = "local"):
        from transformers import AutoTokenizer

        self.args = AppArgs.parse(args)
        self.owner = owner
        model, self._model_is_default = resolve_model(self.args)
        self.config = engine_config(self.args, model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.tokenizer)
        self.metrics = ServingMetrics()
        self._start_engine()
        self.store = RequestStore.connect(self.args.redis_url, finished_ttl_s=self.args.finished_ttl_s,
                                          queue_owner=owner)
        self.writer = StoreWriter(self.store)
        self._streams: dict[str, _Stream] = {}
        self._unclaimed: OrderedDict[str, tuple[list[int], str, str]] = OrderedDict()
        self._resumes: Counter = Counter()  # request id -> times resumed after a shard fault
        self._rebuilds_in_a_row = 0
        self.faults = Counter()  # shard_rebuilds, resumed_shards, resumed_store, resumed_client
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._broken: str | None = None  # shards could not be rebuilt: report unhealthy, Serve replaces us
        self.draining = False
        self._close_orphans()
        self._resume_from_store()
        self._thread = threading.Thread(target=self._loop, name="aptray-engine", daemon=True)
        self._thread.start()

    def _start_engine(self) -> None:
        from aptray.executor.ray import RayExecutor
        self.executor = RayExecutor(self.config, self.args.use_gpu, model_is_default=self._model_is_default,
                                    pg_name=f"aptray-shards-{self.owner}")
        self.engine = Engine(self.config, self.executor, self.tokenizer)
        self.metrics.forget_scheduler()  # the new scheduler's counters start at zero
        self._time_scheduler()

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

    # -- restart: what the previous router (or replica) left in Redis -------------------------
    def _close_orphans(self) -> None:
        # requests of replicas that are gone for good (no heartbeat): nobody can resume them
        try:
            for owner in self.store.orphaned_owners():
                other = self.store.for_owner(owner)
                left = other.unfinished()
                for m in left:
                    other.finish(m.request_id, "abort")
                logger.warning("closed %d requests of the departed replica %s", len(left), owner)
        except Exception:
            logger.exception("could not look for orphaned requests")

    def _resume_from_store(self) -> None:
        # the previous router of this replica died: its requests go on from the tokens Redis has;
        # clients that re-attach get the rest of their stream (see generate(seen_token_ids=...))
        try:
            left = self.store.unfinished()
        except Exception:  # Redis away: clients re-attaching bring their own state
            logger.exception("could not read in-flight requests from the store")
            return
        for m in left:
            try:
                sp = SamplingParams(**m.sampling)
            except (TypeError, ValueError):
                self.writer.finish(m.request_id, "error")
                continue
            self._streams[m.request_id] = _Stream(None, None, m.ttft_slo, m.tbt_slo, list(sp.stop),
                                                  m.prompt_len, list(m.output_token_ids))
            self.writer.track(m)
            self._resume(from_meta(m, sp), "store")
        if left:
            logger.warning("router restart: resumed %d requests from the store", len(left))

    # -- control plane ------------------------------------------------------------------------
    def ready(self) -> dict:
        return {"model": self.config.model, "max_model_len": self.config.spec.max_model_len,
                "vocab_size": self.config.spec.vocab_size, "num_blocks": self.executor.num_blocks,
                "store": self.store.url}

    def health(self) -> dict:
        s = self.engine.scheduler
        return {"ok": self._thread.is_alive() and self._broken is None, "waiting": len(s.waiting),
                "running": len(s.running), "draining": self.draining, "error": self._broken,
                "store_ok": self.writer.healthy, "faults": dict(self.faults)}

    def metrics_text(self) -> bytes:
        self.metrics.observe_faults(self.faults, self.writer.healthy, self.writer.outages)
        return self.metrics.text()

    def abort(self, request_id: str) -> bool:
        found = request_id in self._streams
        self._inbox.put(("abort", request_id, None))
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
        self.writer.flush()
        self.writer.close()
        self.executor.shutdown()
        self.store.close()

    # -- data plane ---------------------------------------------------------------------------
    def _refuse(self, request_id: str, ids: list[int], sampling: dict) -> dict | None:
        if self.draining or self._broken:
            return {"error": self._broken or "the server is draining", "status": 503}
        if request_id in self._streams:
            return {"error": f"request id {request_id!r} is already in flight", "status": 400}
        refusal = self._limits(ids, sampling)
        if refusal is not None:
            return refusal
        queued = len(self.engine.scheduler.waiting) + self._inbox.qsize()
        if queued >= self.args.max_queue:
            self.metrics.observe_rejected("queue_full")
            return {"error": f"{queued} requests are waiting (limit {self.args.max_queue})", "status": 429}
        return None

    def _limits(self, ids: list[int], sampling: dict) -> dict | None:
        spec = self.config.spec
        return request_error(ids, sampling, spec.max_model_len, spec.vocab_size, self.args.max_prompt_tokens,
                             self.args.max_tokens_limit)

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: dict, prompt: str | None = None,
                       seen_token_ids: list[int] | None = None, seen_text: str = ""):
        """Yields an admission chunk ({"accepted"} or {"error", "status"}), then token chunks until finished.

        seen_token_ids: a client re-attaching after a router restart, with the tokens it already has;
        the stream goes on after them."""
        if seen_token_ids is None:
            refusal = self._refuse(request_id, prompt_token_ids, sampling)
        else:  # a re-attach skips the queue checks but never the limits
            refusal = self._limits(prompt_token_ids, sampling)
        if refusal is None:
            try:
                sp = SamplingParams(**sampling)
            except (TypeError, ValueError) as e:
                refusal = {"error": str(e), "status": 400}
        if refusal is None and seen_token_ids is None:
            refusal = await self._admit_to_store(request_id, prompt_token_ids, sp)
        if refusal is not None:
            yield refusal
            return
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), sp.ttft_slo or self.config.ttft_slo,
                         sp.tbt_slo or self.config.tbt_slo, list(sp.stop), len(prompt_token_ids))
        if seen_token_ids is None:
            self._streams[request_id] = stream
            self._inbox.put(("add", request_id, list(prompt_token_ids), sp, prompt, time.monotonic()))
        else:
            self._inbox.put(("attach", request_id, list(prompt_token_ids), sp, prompt, list(seen_token_ids),
                             seen_text, stream))
        self._wake.set()
        finished = False
        try:
            yield {"accepted": True, "request_id": request_id, "prompt_tokens": len(prompt_token_ids)}
            while not finished:
                chunk = await stream.chunks.get()
                finished = chunk.get("finished", False) or "error" in chunk
                yield chunk
        finally:
            if not finished:  # the caller went away (disconnect, cancel): free the request's blocks
                self._inbox.put(("abort", request_id, stream))
                self._wake.set()

    async def _admit_to_store(self, rid: str, ids: list[int], sp: SamplingParams) -> dict | None:
        # accepted means recorded: a request Redis does not hold could not be resumed after a fault
        meta = RequestMeta(rid, time.time(), sp.ttft_slo or self.config.ttft_slo, sp.tbt_slo or self.config.tbt_slo,
                           list(ids), asdict(sp))
        try:
            await asyncio.wrap_future(self.writer.admit(meta))
        except StoreUnavailable as e:
            self.metrics.observe_rejected("store_unavailable")
            return {"error": str(e), "status": 503}
        return None

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
            except Exception as e:
                if self._shards_lost(e):
                    self._rebuild_shards(repr(e))
                else:  # a plan the shards refused fails its requests, not the replica
                    logger.exception("engine step failed")
                    self._fail_all(repr(e))
                continue
            self._rebuilds_in_a_row = 0
            self._publish(outputs)
            result = self.engine.last_result
            self.metrics.observe_iteration(self.engine.scheduler, self._last_schedule_s,
                                           result.step_time if result is not None else None)

    def _shards_lost(self, e: Exception) -> bool:
        # a transport error, or a rank whose collective broke because a peer died
        return isinstance(e, grpc.RpcError) or not self.executor.alive()

    def _rebuild_shards(self, why: str) -> None:
        """New shard actors and a new engine; every request goes on from the tokens it has."""
        self._rebuilds_in_a_row += 1
        if self._rebuilds_in_a_row > self.args.max_shard_rebuilds:
            self._broken = f"shard group lost {self._rebuilds_in_a_row} times in a row: {why}"
            logger.error(self._broken)
            self._fail_all(self._broken)
            return
        logger.warning("shard group lost (%s): rebuilding, %d requests to resume", why,
                       len(self.engine.scheduler.requests))
        snapshot = sorted((from_request(r) for r in self.engine.scheduler.requests.values()),
                          key=lambda r: r.arrival_time)
        self.executor.shutdown(graceful=False)
        try:
            self._start_engine()
        except Exception as e:
            logger.exception("shard group rebuild failed")
            self._broken = f"shard group could not be rebuilt: {e!r}"
            self._fail_all(self._broken)
            return
        self.faults["shard_rebuilds"] += 1
        for r in snapshot:
            self._resumes[r.request_id] += 1
            if self._resumes[r.request_id] > self.args.max_resumes_per_request:
                self._fail(r.request_id, f"request lost its shards {self._resumes[r.request_id]} times")
            else:
                self._resume(r, "shards")

    def _resume(self, r: Resumable, source: str) -> None:
        reason = finished_reason(r, self.engine)
        if reason is not None:  # its last token was generated, the finish was lost with the fault
            self._finish_resumed(r, reason)
            return
        try:
            readmit(self.engine, r)
        except ValueError as e:  # e.g. a restart with a smaller context
            self._fail(r.request_id, f"could not resume: {e}", status=400)
            return
        self.faults[f"resumed_{source}"] += 1

    def _finish_resumed(self, r: Resumable, reason: str) -> None:
        text = self.tokenizer.decode(r.output_token_ids, skip_special_tokens=True)
        for s in r.sampling.stop:
            at = text.find(s)
            if at >= 0:
                text = text[:at]
        self.writer.finish(r.request_id, reason)
        stream = self._streams.pop(r.request_id, None)
        if stream is None or not stream.attached:
            self._unclaim(r.request_id, r.output_token_ids, text, reason)
            return
        self._send_final(stream, r.request_id, r.output_token_ids, text, reason)

    def _send_final(self, stream: _Stream, rid: str, token_ids: list[int], text: str, reason: str) -> None:
        new = token_ids[len(stream.token_ids):]
        stream.token_ids = list(token_ids)
        delta = text[len(stream.sent_text):] if text.startswith(stream.sent_text) else ""
        stream.put({"request_id": rid, "token_ids": new, "text": delta, "finished": True, "finish_reason": reason,
                    "usage": {"prompt_tokens": stream.prompt_tokens, "completion_tokens": len(token_ids)}})

    def _unclaim(self, rid: str, token_ids: list[int], text: str, reason: str) -> None:
        self._unclaimed[rid] = (list(token_ids), text, reason)
        while len(self._unclaimed) > MAX_UNCLAIMED:
            self._unclaimed.popitem(last=False)

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
            elif item[0] == "attach":
                self._attach(*item[1:])
            else:
                self._abort_now(*item[1:])
        if changed:
            self.metrics.observe_iteration(self.engine.scheduler, None, None)

    def _add(self, rid: str, ids: list[int], sp: SamplingParams, prompt: str | None, arrival: float) -> None:
        stream = self._streams.get(rid)
        if stream is None:  # aborted before it reached the engine
            return
        try:
            self.engine.add_request(rid, ids, sp, arrival_time=arrival, prompt=prompt)
        except ValueError as e:
            self._streams.pop(rid, None)
            self.writer.finish(rid, "rejected")
            stream.put({"error": str(e), "status": 400})

    def _attach(self, rid: str, ids: list[int], sp: SamplingParams, prompt: str | None, seen: list[int],
                seen_text: str, stream: _Stream) -> None:
        """A client re-attaches after a router restart: it gets what it has not seen, then the rest."""
        stream.token_ids, stream.sent_text = list(seen), seen_text
        self._streams[rid] = stream
        if rid in self._unclaimed:
            token_ids, text, reason = self._unclaimed.pop(rid)
            if token_ids[:len(seen)] == seen:
                self._streams.pop(rid)
                self._send_final(stream, rid, token_ids, text, reason)
                return
        req = self.engine.scheduler.requests.get(rid)
        if req is not None and req.output_token_ids[:len(seen)] == seen:
            if len(req.output_token_ids) > len(seen):  # generated while the client was away
                new = req.output_token_ids[len(seen):]
                stream.token_ids = list(req.output_token_ids)
                stream.put({"request_id": rid, "token_ids": list(new), "text": self._text_delta(stream),
                            "finished": False, "finish_reason": None,
                            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(stream.token_ids)}})
            return
        if req is not None:  # Redis was behind what the client saw (an outage): the client is right
            self.engine.abort(rid)
        now = time.monotonic()
        r = Resumable(rid, list(ids), sp, now, list(seen), [now] * len(seen), prompt=prompt)
        self.writer.track(RequestMeta(rid, time.time(), stream.ttft_slo, stream.tbt_slo, list(ids), asdict(sp),
                                      output_token_ids=list(seen)), write=True)
        self._resume(r, "client")

    def _abort_now(self, rid: str, stream: _Stream | None = None) -> None:
        if stream is not None and self._streams.get(rid) is not stream:
            return  # that stream was replaced by a re-attach: the request lives on
        req = self.engine.scheduler.requests.get(rid)
        self.engine.abort(rid)
        stream = self._streams.pop(rid, None)
        self._resumes.pop(rid, None)
        if req is not None:
            self.metrics.observe_finished(req.arrival_time, req.token_times, req.ttft_slo, req.tbt_slo, "abort")
            self.writer.finish(rid, "abort")
        if stream is not None:
            stream.put({"request_id": rid, "token_ids": [], "text": "", "finished": True, "finish_reason": "abort",
                        "usage": {"prompt_tokens": stream.prompt_tokens, "completion_tokens": len(stream.token_ids)}})

    def _publish(self, outputs) -> None:
        # tokens first, then finishes: a finish shortens the keys' TTL and must be the last write
        self.writer.tokens({o.request_id: list(o.new_token_ids) for o in outputs})
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if out.finished:
                m, reason = out.metrics, out.outputs[0].finish_reason
                self.metrics.observe_finished(m.arrival_time, m.token_times, *self._slos(stream), reason)
                self.writer.finish(out.request_id, reason)
                self._streams.pop(out.request_id, None)
                self._resumes.pop(out.request_id, None)
                if stream is not None and not stream.attached:
                    self._unclaim(out.request_id, out.outputs[0].token_ids, out.outputs[0].text, reason)
            if stream is None or not stream.attached:
                continue
            stream.token_ids.extend(out.new_token_ids)
            text = out.outputs[0].text if out.finished else None  # the engine's final text is cut at a stop
            stream.put({"request_id": out.request_id, "token_ids": list(out.new_token_ids),
                        "text": self._text_delta(stream, text), "finished": out.finished,
                        "finish_reason": out.outputs[0].finish_reason,
                        "usage": {"prompt_tokens": stream.prompt_tokens,
                                  "completion_tokens": len(stream.token_ids)}})

    def _slos(self, stream: _Stream | None) -> tuple[float, float]:
        return (stream.ttft_slo, stream.tbt_slo) if stream else (self.config.ttft_slo, self.config.tbt_slo)

    def _text_delta(self, stream: _Stream, final_text: str | None = None) -> str:
        if final_text is not None:
            text = final_text
        else:
            text = self.tokenizer.decode(stream.token_ids, skip_special_tokens=True)
            text = text.rstrip("\ufffd")  # half a multi-byte character: wait for the rest
            if stream.stop:  # hold back what could still become a stop string
                text = text[:max(0, len(text) - max(len(s) for s in stream.stop) + 1)]
        if not text.startswith(stream.sent_text):
            return ""
        delta, stream.sent_text = text[len(stream.sent_text):], text
        return delta

    def _fail(self, rid: str, why: str, status: int = 500) -> None:
        self.engine.abort(rid)
        self._resumes.pop(rid, None)
        self.writer.finish(rid, "error")
        stream = self._streams.pop(rid, None)
        if stream is not None:
            stream.put({"error": why, "status": status})
        self.metrics.slo_missed.labels("error").inc()

    def _fail_all(self, why: str) -> None:
        for rid in list(self._streams):
            self._fail(rid, f"engine failure: {why}")
