"""EngineLoop: a router's engine thread, and its fault paths.

The engine is single-threaded. The router's asyncio side meets this thread in an inbox of typed
messages (Add, Reattach, Abort) and in the Outbox (chunks, one hand-off per iteration), so a slow
step never blocks admission or streaming. Redis writes go to the StoreWriter thread, so Redis
never blocks the engine either.

Faults (docs/RELIABILITY.md): a shard group that fails a step is rebuilt and its requests resumed
from their generated tokens; a router that restarts resumes the requests Redis lists for its
owner; a client that re-attaches gets what it has not seen, then the rest.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass

from aptray.config import EngineConfig
from aptray.engine import Engine, StepFailed
from aptray.sampling_params import SamplingParams
from aptray.serve.args import CPUS_PER_RANK, AppArgs
from aptray.serve.metrics import ServingMetrics
from aptray.serve.resume import Resumable, finished, from_meta, from_request
from aptray.serve.store import RequestMeta, RequestStore
from aptray.serve.store_writer import StoreWriter
from aptray.serve.streams import ClientStream, Outbox
from aptray.startup_heap import freeze_startup_heap
from aptray.structured_output import Grammars
from aptray.serve.ttft_estimate import LoadTracker, ReplicaLoad

logger = logging.getLogger("aptray")

MAX_UNCLAIMED = 1024  # finished resumed requests kept for a client that re-attaches late


@dataclass(frozen=True)
class Add:
    """A new request, accepted and recorded in Redis; stream is how its client sees it."""
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prompt: str | None
    arrival_time: float  # monotonic
    stream: ClientStream
    prefix: str | None = None  # the tag of the prompt prefix the client named (prefix_key.py)
    grammar: object = None  # its structured output, compiled at admission (off the engine thread)


@dataclass(frozen=True)
class Reattach:
    """A client back after a router restart, with the tokens (and text) it has already relayed."""
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prompt: str | None
    seen_token_ids: list[int]
    seen_text: str
    stream: ClientStream
    grammar: object = None  # as Add's


@dataclass(frozen=True)
class Abort:
    request_id: str


def build_engine(config: EngineConfig, args: AppArgs, tokenizer, owner: str,
                 grammars: Grammars | None = None) -> Engine:
    """The router's engine: the model in this process (one rank), or shard actors over gRPC."""
    if args.on_shards:
        from aptray.executor.ray import RayExecutor
        executor = RayExecutor(config, args.use_gpu, cpus_per_shard=CPUS_PER_RANK, pg_name=f"aptray-shards-{owner}")
    else:
        import torch

        from aptray.executor.local import LocalExecutor
        if not torch.cuda.is_available():
            # as a shard rank does: one BLAS thread per CPU the rank holds (oversubscribed cores ran 10x slower)
            torch.set_num_threads(max(1, int(CPUS_PER_RANK)))
        executor = LocalExecutor(config)
    return Engine(config, executor, tokenizer, grammars=grammars)


class EngineLoop:
    def __init__(self, args: AppArgs, config: EngineConfig, tokenizer, metrics: ServingMetrics,
                 writer: StoreWriter, owner: str, grammars: Grammars | None = None):
        """grammars: the router's compiler of structured outputs, which every engine it builds shares."""
        self.args, self.config, self.tokenizer, self.metrics = args, config, tokenizer, metrics
        self.grammars = grammars
        self.writer, self.owner = writer, owner
        self.streams: dict[str, ClientStream] = {}
        self.unclaimed: OrderedDict[str, tuple[list[int], str, str]] = OrderedDict()
        self.outbox = Outbox()
        self.resumes: Counter = Counter()  # request id -> times resumed after a shard fault
        self.rebuilds_in_a_row = 0
        self.faults = Counter()  # shard_rebuilds, resumed_shards, resumed_store, resumed_client
        self.broken: str | None = None  # shards could not be rebuilt: report unhealthy, Serve replaces us
        self.fastest_step_s = math.inf  # the fastest step executed: written by the engine thread alone
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._out: list[dict] = []  # chunks of this iteration, handed to the outbox together
        self.tracker = LoadTracker(config)  # step speed and blocks freed: the load this replica reports
        # prompt tokens (and requests) submitted and taken by the engine thread: the inbox's share of
        # the queue. Each counter has one writer thread, so neither needs a lock.
        self._inbox_tokens_in = self._inbox_tokens_out = self._inbox_in = self._inbox_out = 0
        self._start_engine()
        self._thread = threading.Thread(target=self._run, name="aptray-engine", daemon=True)

    def _start_engine(self) -> None:
        self.engine = build_engine(self.config, self.args, self.tokenizer, self.owner, self.grammars)
        self.metrics.forget_scheduler()  # the new scheduler's counters start at zero

    # -- the router's side (its event loop thread) ---------------------------------------------
    def start(self) -> None:
        freeze_startup_heap()  # what start-up made lives as long as the process: out of the GC's sight
        self._thread.start()

    def submit(self, msg: Add | Reattach | Abort) -> None:
        if isinstance(msg, Add):  # registered now: an Abort that follows finds it
            self.streams[msg.request_id] = msg.stream
            self._inbox_tokens_in += len(msg.prompt_token_ids)
            self._inbox_in += 1
        self._inbox.put(msg)
        self._wake.set()

    def queued(self) -> int:
        """Requests waiting for the engine, counting those not yet taken from the inbox."""
        return len(self.engine.scheduler.waiting) + self._inbox.qsize()

    def counts(self) -> tuple[int, int]:
        """(waiting, running) requests of the engine."""
        s = self.engine.scheduler
        return len(s.waiting), len(s.running)

    @property
    def num_blocks(self) -> int:
        return self.engine.executor.num_blocks

    def load(self, ok: bool = True, with_prefixes: bool = True) -> ReplicaLoad:
        """This replica's load now (ttft_estimate.ReplicaLoad): what the request router ranks it by
        and what admission predicts a new request's TTFT from. with_prefixes: look up the prefixes
        it holds (the routing stats need them, a TTFT prediction does not). Safe from the router's
        event loop."""
        return self.tracker.snapshot(self.engine.scheduler, time.time(), time.monotonic(),
                                     self._inbox_tokens_in - self._inbox_tokens_out, self._inbox_in - self._inbox_out,
                                     ok and self.broken is None and self.alive(), with_prefixes)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.executor.shutdown()

    # -- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._hand_off()
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            started = time.perf_counter()
            try:
                step = self.engine.step()
            except StepFailed as e:
                if self.args.on_shards:  # their collectives may be half-way: a new group, then resume
                    self._rebuild_shards(repr(e.cause), failed_plan=e.plan)
                else:  # retried one suspect at a time (StepQuarantine); the others go on
                    logger.exception("engine step failed")
                    self._publish(self.engine.recover_failed_step(e.plan))
                self._hand_off()
                continue
            except Exception as e:  # the scheduler itself broke: nothing can be trusted to go on
                logger.exception("engine loop failed")
                self._fail_all(repr(e))
                self._hand_off()
                continue
            self.rebuilds_in_a_row = 0
            if step.result is not None:
                self.tracker.on_step(step.plan, time.perf_counter() - started)
                self.fastest_step_s = min(self.fastest_step_s, step.execute_s)
            self._publish(step.outputs)
            self._hand_off()
            self.metrics.observe_iteration(self.engine.scheduler, step.schedule_s,
                                           step.result.step_time if step.result is not None else None)

    def _hand_off(self) -> None:
        if self._out:
            chunks, self._out = self._out, []
            self.outbox.put(chunks)

    def _drain_inbox(self) -> None:
        changed = False
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            changed = True
            if isinstance(msg, Add):
                self._inbox_tokens_out += len(msg.prompt_token_ids)
                self._inbox_out += 1
                self._add(msg)
            elif isinstance(msg, Reattach):
                self._reattach(msg)
            else:
                self._abort(msg.request_id)
        if changed:
            self.metrics.observe_iteration(self.engine.scheduler, None, None)

    def _add(self, msg: Add) -> None:
        rid = msg.request_id
        if rid not in self.streams:  # aborted before it reached the engine
            return
        try:
            req = self.engine.add_request(rid, msg.prompt_token_ids, msg.sampling, arrival_time=msg.arrival_time,
                                          prompt=msg.prompt, grammar=msg.grammar)
        except ValueError as e:
            self.streams.pop(rid, None)
            self.writer.finish(rid, "rejected")
            self._out.append(msg.stream.error(rid, str(e), 400))
            return
        self.tracker.on_add(req, msg.prefix)

    def _reattach(self, msg: Reattach) -> None:
        """What the client has not seen, then the rest."""
        rid, stream, seen = msg.request_id, msg.stream, list(msg.seen_token_ids)
        stream.resume_at(seen, msg.seen_text)
        self.streams[rid] = stream
        if rid in self.unclaimed:
            token_ids, text, reason = self.unclaimed.pop(rid)
            if token_ids[:len(seen)] == seen:
                self.streams.pop(rid)
                self._send_final(stream, rid, token_ids, text, reason)
                return
        req = self.engine.scheduler.requests.get(rid)
        if req is not None and req.output_token_ids[:len(seen)] == seen:
            if len(req.output_token_ids) > len(seen):  # generated while the client was away
                new = list(req.output_token_ids[len(seen):])
                chunk = stream.chunk(rid, new, stream.advance(new))
                if req.sampling.logprobs is not None:
                    chunk["logprobs"] = req.output_logprobs[len(seen):]
                self._out.append(chunk)
            return
        if req is not None:  # Redis was behind what the client saw (an outage): the client is right
            self.engine.abort(rid)
        now = time.monotonic()
        r = Resumable(rid, list(msg.prompt_token_ids), msg.sampling, now, seen, [now] * len(seen), prompt=msg.prompt,
                      grammar=msg.grammar)
        self.writer.track(RequestMeta(rid, time.time(), stream.ttft_slo, stream.tbt_slo, list(msg.prompt_token_ids),
                                      asdict(msg.sampling), output_token_ids=seen), write=True)
        self._resume(r, "client")

    def _abort(self, rid: str) -> None:
        req = self.engine.scheduler.requests.get(rid)
        self.engine.abort(rid)
        stream = self.streams.pop(rid, None)
        self.resumes.pop(rid, None)
        if req is not None:
            self.metrics.observe_finished(req.arrival_time, req.token_times, req.ttft_slo, req.tbt_slo, "abort")
            self.writer.finish(rid, "abort")
        if stream is not None and stream.attached:
            self._out.append(stream.chunk(rid, [], "", "abort"))

    # -- outputs to chunks --------------------------------------------------------------------
    def _publish(self, outputs) -> None:
        # tokens first, then finishes: a finish shortens the keys' TTL and must be the last write
        self.writer.tokens({o.request_id: list(o.new_token_ids) for o in outputs})
        for out in outputs:
            try:
                self._publish_one(out)
            except Exception as e:  # e.g. its tokens broke the detokenizer: that request alone ends
                logger.exception("relaying request %s failed", out.request_id)
                self._fail(out.request_id, f"relaying the output failed: {e!r}")

    def _publish_one(self, out) -> None:
        rid, completion = out.request_id, out.outputs[0]
        stream = self.streams.get(rid)
        if completion.finish_reason == "error":
            self._fail(rid, out.error or "the request failed", 400 if out.error_from_request else 500, ended=True)
            return
        if out.finished:
            m, reason = out.metrics, completion.finish_reason
            self.tracker.on_finish(len(out.prompt_token_ids) + len(completion.token_ids))
            self.metrics.observe_finished(m.arrival_time, m.token_times, *self._slos(stream), reason)
            self.writer.finish(rid, reason)
            self.streams.pop(rid, None)
            self.resumes.pop(rid, None)
            if stream is not None and not stream.attached:
                self._unclaim(rid, completion.token_ids, completion.text, reason)
        if stream is None or not stream.attached:
            return
        if out.num_cached_tokens is not None:
            stream.cached_tokens = out.num_cached_tokens
        if out.finished:  # the engine's final text is cut at a stop string
            new, text = stream.finish(completion.token_ids, completion.text)
            chunk = stream.chunk(rid, new, text, completion.finish_reason)
        else:
            new = list(out.new_token_ids)
            chunk = stream.chunk(rid, new, stream.advance(new))
        end = len(stream.token_ids)
        if completion.logprobs is not None:  # the new tokens' (they end the stream's tokens)
            chunk["logprobs"] = completion.logprobs[end - len(new):end]
        if out.prompt_logprobs is not None and end == len(new):  # the first chunk: the prompt's
            chunk["prompt_logprobs"] = list(out.prompt_logprobs)
        self._out.append(chunk)

    def _slos(self, stream: ClientStream | None) -> tuple[float, float]:
        return (stream.ttft_slo, stream.tbt_slo) if stream else (self.config.ttft_slo, self.config.tbt_slo)

    def _send_final(self, stream: ClientStream, rid: str, token_ids: list[int], text: str, reason: str) -> None:
        if stream.attached:
            new, delta = stream.finish(token_ids, text)
            self._out.append(stream.chunk(rid, new, delta, reason))

    def _unclaim(self, rid: str, token_ids: list[int], text: str, reason: str) -> None:
        self.unclaimed[rid] = (list(token_ids), text, reason)
        while len(self.unclaimed) > MAX_UNCLAIMED:
            self.unclaimed.popitem(last=False)

    def _fail(self, rid: str, why: str, status: int = 500, ended: bool = False) -> None:
        """End one request with an error (ended: the engine has ended it already)."""
        if not ended:
            self.engine.abort(rid)
        self.resumes.pop(rid, None)
        self.writer.finish(rid, "error")
        stream = self.streams.pop(rid, None)
        if stream is not None and stream.attached:
            self._out.append(stream.error(rid, why, status))
        self.metrics.slo_missed.labels("error").inc()

    def _fail_all(self, why: str) -> None:
        for rid in list(self.streams):
            self._fail(rid, f"engine failure: {why}")

    # -- faults -------------------------------------------------------------------------------
    def resume_from_store(self, store: RequestStore) -> None:
        """The previous router of this replica died: its requests go on from the tokens Redis has;
        clients that re-attach get the rest of their stream. Called before the thread starts."""
        try:
            left = store.unfinished()
        except Exception:  # Redis away: clients re-attaching bring their own state
            logger.exception("could not read in-flight requests from the store")
            return
        for m in left:
            try:
                sp = SamplingParams(**m.sampling)
            except (TypeError, ValueError):
                self.writer.finish(m.request_id, "error")
                continue
            self.streams[m.request_id] = ClientStream(self.tokenizer, False, m.ttft_slo, m.tbt_slo, list(sp.stop),
                                                      m.prompt_len, list(m.output_token_ids),
                                                      skip_special_tokens=sp.skip_special_tokens)
            self.writer.track(m)
            self._resume(from_meta(m, sp), "store")
        if left:
            logger.warning("router restart: resumed %d requests from the store", len(left))

    def _rebuild_shards(self, why: str, failed_plan) -> None:
        """New shard actors and a new engine; every request goes on from the tokens it has. The
        failed step's requests are counted as suspects first (StepQuarantine)."""
        self._publish(self.engine.recover_failed_step(failed_plan))
        self.rebuilds_in_a_row += 1
        if self.rebuilds_in_a_row > self.args.max_shard_rebuilds:
            self.broken = f"shard group lost {self.rebuilds_in_a_row} times in a row: {why}"
            logger.error(self.broken)
            self._fail_all(self.broken)
            return
        logger.warning("shard group lost (%s): rebuilding, %d requests to resume", why,
                       len(self.engine.scheduler.requests))
        snapshot = sorted((from_request(r) for r in self.engine.scheduler.requests.values()),
                          key=lambda r: r.arrival_time)
        self.engine.executor.shutdown(graceful=False)
        quarantine = self.engine.quarantine
        try:
            self._start_engine()
            self.engine.quarantine = quarantine
        except Exception as e:
            logger.exception("shard group rebuild failed")
            self.broken = f"shard group could not be rebuilt: {e!r}"
            self._fail_all(self.broken)
            return
        self.faults["shard_rebuilds"] += 1
        for r in snapshot:
            self.resumes[r.request_id] += 1
            if self.resumes[r.request_id] > self.args.max_resumes_per_request:
                self._fail(r.request_id, f"request lost its shards {self.resumes[r.request_id]} times")
            else:
                self._resume(r, "shards")

    def _resume(self, r: Resumable, source: str) -> None:
        """Re-admit r as a recompute preemption, or finish it if the tokens it has already end it
        (its finish was lost with the fault)."""
        done = finished(r, self.engine)
        if done is not None:
            reason, text = done
            self.writer.finish(r.request_id, reason)
            stream = self.streams.pop(r.request_id, None)
            if stream is None or not stream.attached:
                self._unclaim(r.request_id, r.output_token_ids, text, reason)
            else:
                self._send_final(stream, r.request_id, r.output_token_ids, text, reason)
            return
        try:
            self.engine.resume_request(r.request_id, r.prompt_token_ids, r.sampling, r.output_token_ids,
                                       r.token_times, r.arrival_time, r.prompt, r.num_preemptions, r.grammar)
        except ValueError as e:  # e.g. a restart with a smaller context
            self._fail(r.request_id, f"could not resume: {e}", status=400)
            return
        self.faults[f"resumed_{source}"] += 1
