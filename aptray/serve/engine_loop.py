"""EngineLoop: a router's engine thread (scheduler -> executor -> chunks for the ingress).

The engine is single-threaded. The router's asyncio side meets this thread in an inbox
(requests, aborts, re-attaches) and in the Outbox (chunks, one hand-off per iteration), so a slow
step never blocks admission or streaming. Redis writes go to the StoreWriter thread, so Redis
never blocks the engine either. Fault paths (shard rebuild, resumption) are in recovery.py.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import asdict

from aptray.config import EngineConfig
from aptray.engine import StepFailed
from aptray.metrics import ServingMetrics
from aptray.sampling_params import SamplingParams
from aptray.serve.args import AppArgs
from aptray.serve.recovery import RecoveryMixin
from aptray.serve.replica_engine import SchedulerTimer, build_engine
from aptray.serve.resume import Resumable
from aptray.serve.store_writer import StoreWriter
from aptray.serve.streams import ClientStream, Outbox
from aptray.store import RequestMeta

logger = logging.getLogger("aptray")

MAX_UNCLAIMED = 1024  # finished resumed requests kept for a client that re-attaches late


class EngineLoop(RecoveryMixin):
    def __init__(self, args: AppArgs, config: EngineConfig, tokenizer, metrics: ServingMetrics, owner: str,
                 model_is_default: bool):
        self.args, self.config, self.tokenizer, self.metrics = args, config, tokenizer, metrics
        self.owner, self.model_is_default = owner, model_is_default
        self.writer: StoreWriter | None = None  # set by the router once Redis is connected
        self.streams: dict[str, ClientStream] = {}
        self.unclaimed: OrderedDict[str, tuple[list[int], str, str]] = OrderedDict()
        self.outbox = Outbox()
        self.resumes: Counter = Counter()  # request id -> times resumed after a shard fault
        self.rebuilds_in_a_row = 0
        self.faults = Counter()  # shard_rebuilds, resumed_shards, resumed_store, resumed_client
        self.broken: str | None = None  # shards could not be rebuilt: report unhealthy, Serve replaces us
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._out: list[dict] = []  # chunks of this iteration, handed to the outbox together
        self.start_engine()
        self._thread = threading.Thread(target=self._run, name="aptray-engine", daemon=True)

    def start_engine(self) -> None:
        self.engine = build_engine(self.config, self.args, self.tokenizer, self.owner, self.model_is_default)
        self.executor = self.engine.executor
        self.metrics.forget_scheduler()  # the new scheduler's counters start at zero
        self.timer = SchedulerTimer(self.engine)

    def start(self) -> None:
        self._thread.start()

    # -- the router's side (its event loop thread) ---------------------------------------------
    def submit(self, item: tuple) -> None:
        self._inbox.put(item)
        self._wake.set()

    def queued(self) -> int:
        """Requests waiting for the engine, counting those not yet taken from the inbox."""
        return len(self.engine.scheduler.waiting) + self._inbox.qsize()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    # -- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._hand_off()
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except StepFailed as e:
                if self._on_shards():  # their collectives may be half-way: a new group, then resume
                    self.rebuild_shards(repr(e.cause), failed_plan=e.plan)
                else:  # retried one suspect at a time (StepQuarantine); the others go on
                    logger.exception("engine step failed")
                    self._publish(self.engine.recover_failed_step(e.plan))
                self._hand_off()
                continue
            except Exception as e:  # the scheduler itself broke: nothing can be trusted to go on
                logger.exception("engine loop failed")
                self.fail_all(repr(e))
                self._hand_off()
                continue
            self.rebuilds_in_a_row = 0
            self._publish(outputs)
            self._hand_off()
            result = self.engine.last_result
            self.metrics.observe_iteration(self.engine.scheduler, self.timer.last_s,
                                           result.step_time if result is not None else None)

    def _hand_off(self) -> None:
        if self._out:
            chunks, self._out = self._out, []
            self.outbox.put(chunks)

    def _on_shards(self) -> bool:
        """The model runs in shard actors (not in this process): a failed step may have left their
        collectives half-way, so the group is rebuilt."""
        return hasattr(self.executor, "alive")

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
        stream = self.streams.get(rid)
        if stream is None:  # aborted before it reached the engine
            return
        try:
            self.engine.add_request(rid, ids, sp, arrival_time=arrival, prompt=prompt)
        except ValueError as e:
            self.streams.pop(rid, None)
            self.writer.finish(rid, "rejected")
            self._out.append(stream.error(rid, str(e), 400))

    def _attach(self, rid: str, ids: list[int], sp: SamplingParams, prompt: str | None, seen: list[int],
                seen_text: str, stream: ClientStream) -> None:
        """A client re-attaches after a router restart: it gets what it has not seen, then the rest."""
        stream.resume_at(list(seen), seen_text)
        self.streams[rid] = stream
        if rid in self.unclaimed:
            token_ids, text, reason = self.unclaimed.pop(rid)
            if token_ids[:len(seen)] == seen:
                self.streams.pop(rid)
                self.send_final(stream, rid, token_ids, text, reason)
                return
        req = self.engine.scheduler.requests.get(rid)
        if req is not None and req.output_token_ids[:len(seen)] == seen:
            if len(req.output_token_ids) > len(seen):  # generated while the client was away
                new = list(req.output_token_ids[len(seen):])
                self._out.append(stream.chunk(rid, new, stream.advance(new)))
            return
        if req is not None:  # Redis was behind what the client saw (an outage): the client is right
            self.engine.abort(rid)
        now = time.monotonic()
        r = Resumable(rid, list(ids), sp, now, list(seen), [now] * len(seen), prompt=prompt)
        self.writer.track(RequestMeta(rid, time.time(), stream.ttft_slo, stream.tbt_slo, list(ids), asdict(sp),
                                      output_token_ids=list(seen)), write=True)
        self.resume(r, "client")

    def _abort_now(self, rid: str) -> None:
        req = self.engine.scheduler.requests.get(rid)
        self.engine.abort(rid)
        stream = self.streams.pop(rid, None)
        self.resumes.pop(rid, None)
        if req is not None:
            self.metrics.observe_finished(req.arrival_time, req.token_times, req.ttft_slo, req.tbt_slo, "abort")
            self.writer.finish(rid, "abort")
        if stream is not None and stream.attached:
            self._out.append(stream.chunk(rid, [], "", "abort"))

    def _publish(self, outputs) -> None:
        # tokens first, then finishes: a finish shortens the keys' TTL and must be the last write
        self.writer.tokens({o.request_id: list(o.new_token_ids) for o in outputs})
        for out in outputs:
            try:
                self._publish_one(out)
            except Exception as e:  # e.g. its tokens broke the detokenizer: that request alone ends
                logger.exception("relaying request %s failed", out.request_id)
                self.fail(out.request_id, f"relaying the output failed: {e!r}")

    def _publish_one(self, out) -> None:
        rid, completion = out.request_id, out.outputs[0]
        stream = self.streams.get(rid)
        if completion.finish_reason == "error":
            self.fail(rid, out.error or "the request failed", ended=True)
            return
        if out.finished:
            m, reason = out.metrics, completion.finish_reason
            self.metrics.observe_finished(m.arrival_time, m.token_times, *self._slos(stream), reason)
            self.writer.finish(rid, reason)
            self.streams.pop(rid, None)
            self.resumes.pop(rid, None)
            if stream is not None and not stream.attached:
                self.unclaim(rid, completion.token_ids, completion.text, reason)
        if stream is None or not stream.attached:
            return
        if out.finished:  # the engine's final text is cut at a stop string
            new, text = stream.finish(completion.token_ids, completion.text)
            self._out.append(stream.chunk(rid, new, text, completion.finish_reason))
        else:
            new = list(out.new_token_ids)
            self._out.append(stream.chunk(rid, new, stream.advance(new)))

    def _slos(self, stream: ClientStream | None) -> tuple[float, float]:
        return (stream.ttft_slo, stream.tbt_slo) if stream else (self.config.ttft_slo, self.config.tbt_slo)

    def send_final(self, stream: ClientStream, rid: str, token_ids: list[int], text: str, reason: str) -> None:
        if stream.attached:
            new, delta = stream.finish(token_ids, text)
            self._out.append(stream.chunk(rid, new, delta, reason))

    def unclaim(self, rid: str, token_ids: list[int], text: str, reason: str) -> None:
        self.unclaimed[rid] = (list(token_ids), text, reason)
        while len(self.unclaimed) > MAX_UNCLAIMED:
            self.unclaimed.popitem(last=False)

    def fail(self, rid: str, why: str, status: int = 500, ended: bool = False) -> None:
        """End one request with an error (ended: the engine has ended it already)."""
        if not ended:
            self.engine.abort(rid)
        self.resumes.pop(rid, None)
        self.writer.finish(rid, "error")
        stream = self.streams.pop(rid, None)
        if stream is not None and stream.attached:
            self._out.append(stream.error(rid, why, status))
        self.metrics.slo_missed.labels("error").inc()

    def fail_all(self, why: str) -> None:
        for rid in list(self.streams):
            self.fail(rid, f"engine failure: {why}")
