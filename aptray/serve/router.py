"""Router: one replica's engine in a Ray actor (TGI-style router; it owns queueing and batching).

Its ingress talks to it in two ways: admit() per request (validation, limits, the Redis record,
then an Add message to the engine thread) and one long stream() that carries the chunks of every
request of the replica, a step at a time (streams.py). The engine thread, and its fault paths, is
EngineLoop (engine_loop.py).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, replace

import ray

from aptray.sampling_params import InvalidRequest, SamplingParams
from aptray.serve.args import AppArgs
from aptray.serve.engine_loop import Add, Abort, EngineLoop, Reattach
from aptray.serve.grammar_sandbox import GrammarBusy, GrammarUnavailable, SandboxedCompiler
from aptray.serve.limits import RequestLimits
from aptray.serve.metrics import ServingMetrics
from aptray.serve.relay import Admission
from aptray.serve.store import RequestMeta, RequestStore, valid_request_id
from aptray.serve.store_writer import StoreUnavailable, StoreWriter
from aptray.serve.streams import ClientStream
from aptray.serve.ttft_estimate import predict_ttft
from aptray.structured_output import Grammars

MAX_RETRY_AFTER_S = 60

logger = logging.getLogger("aptray")


class Router:
    def __init__(self, args: dict, owner: str = "local"):
        from transformers import AutoTokenizer

        self.args = AppArgs.parse(args)
        self.owner = owner
        self.config = self.args.engine_config()
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.tokenizer)
        self.metrics = ServingMetrics()
        self.store = RequestStore.connect(self.args.redis_url, finished_ttl_s=self.args.finished_ttl_s,
                                          queue_owner=owner)
        self.writer = StoreWriter(self.store, self.metrics.store_write.observe)
        # structured outputs compile here, on threads of their own and first in a child process: a slow
        # schema holds up neither the event loop nor the engine thread, nor the grammar threads for long
        self.grammars = Grammars(self.tokenizer, self.config.spec.vocab_size)
        self.compiler = SandboxedCompiler(self.grammars, self.args.grammar_compile_timeout_s)
        self.loop = EngineLoop(self.args, self.config, self.tokenizer, self.metrics, self.writer, owner, self.grammars)
        self.limits = self._request_limits()
        self.draining = False
        self._being_admitted = 0  # accepted by the checks, not yet handed to the engine (Redis write pending)
        self._prompt_tokens = 0.0  # mean prompt length of recent requests: the typical request's TTFT
        try:
            closed = self.store.close_orphans()
            if closed:
                logger.warning("closed %d requests of departed replicas", closed)
        except Exception:
            logger.exception("could not look for orphaned requests")
        self.loop.resume_from_store(self.store)
        self.loop.start()

    def _request_limits(self) -> RequestLimits:
        """Limits from the args; SLO floors not set there are the engine's fastest step, measured now
        (before any request holds a block) and lowered as faster steps run (_lower_measured_floors)."""
        a, spec = self.args, self.config.spec
        fastest = None
        if a.min_ttft_slo_ms is None or a.min_tbt_slo_ms is None:
            fastest = self.loop.engine.fastest_step_seconds()  # the thread has not started
            logger.info("fastest step %.2f ms: the floor of accepted SLOs", fastest * 1e3)
        floor = lambda ms: fastest if ms is None else ms / 1000  # noqa: E731
        return RequestLimits(spec.max_model_len, spec.vocab_size, a.max_prompt_tokens, a.max_tokens_limit,
                             floor(a.min_ttft_slo_ms), floor(a.min_tbt_slo_ms))

    def _lower_measured_floors(self) -> None:
        """A measured SLO floor comes down to the fastest step the engine has run since: one measured on a
        busy machine would otherwise refuse, for the router's whole life, SLOs its engine meets."""
        fastest, limits = self.loop.fastest_step_s, self.limits
        lower_ttft = self.args.min_ttft_slo_ms is None and fastest < limits.min_ttft_slo
        lower_tbt = self.args.min_tbt_slo_ms is None and fastest < limits.min_tbt_slo
        if lower_ttft or lower_tbt:
            self.limits = replace(limits, min_ttft_slo=fastest if lower_ttft else limits.min_ttft_slo,
                                  min_tbt_slo=fastest if lower_tbt else limits.min_tbt_slo)

    # -- control plane ------------------------------------------------------------------------
    def ready(self) -> dict:
        return {"model": self.config.model, "max_model_len": self.config.spec.max_model_len,
                "vocab_size": self.config.spec.vocab_size, "num_blocks": self.loop.num_blocks,
                "store": self.store.url, "limits": self.limits}

    def health(self) -> dict:
        loop = self.loop
        waiting, running = loop.counts()
        return {"ok": loop.alive() and loop.broken is None, "waiting": waiting, "running": running,
                "draining": self.draining, "error": loop.broken, "store_ok": self.writer.healthy,
                "faults": dict(loop.faults), "executor": "ray" if self.args.on_shards else "local"}

    def load(self) -> dict:
        """Routing stats: this replica's load (ttft_estimate.ReplicaLoad) as a dict."""
        return self.loop.load(ok=not self.draining).to_stats()

    def autoscaling_stats(self, window_s: float) -> dict:
        """SLO attainment of the requests that ended in the last window_s (finished or refused),
        and the typical request's predicted TTFT over its SLO (autoscale.py reads both)."""
        attained, ended = self.metrics.recent_attainment(window_s)
        load = self.loop.load(ok=not self.draining, with_prefixes=False)
        ttft = predict_ttft(load, round(self._prompt_tokens), load.taken_at)
        pressure = min(ttft / self.config.ttft_slo, 100.0)
        return {"aptray_attained": float(attained), "aptray_ended": float(ended), "aptray_ttft_pressure": pressure}

    def metrics_text(self) -> bytes:
        self.metrics.observe_faults(self.loop.faults, self.writer.healthy, self.writer.outages)
        return self.metrics.text()

    @ray.method(enable_task_events=False)
    def abort(self, request_id: str) -> bool:
        """The client went away (disconnect, cancel) or asked: free the request's blocks."""
        found = request_id in self.loop.streams
        self.loop.submit(Abort(request_id))
        return found

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests, let in-flight ones finish; returns how many were left at the deadline."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.loop.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self.loop.streams)

    def shutdown(self) -> None:
        self.compiler.close()
        self.loop.stop()
        self.writer.flush()
        self.writer.close()
        self.store.close()

    # -- data plane ---------------------------------------------------------------------------
    @ray.method(num_returns="streaming", enable_task_events=False)
    async def stream(self):
        """The ingress's one stream: lists of chunks of all its requests, in order, as they come.
        A new call supersedes the previous one (an ingress that lost its stream opens another)."""
        outbox = self.loop.outbox
        outbox.bind(asyncio.get_running_loop())
        reader = outbox.new_reader()
        interval = self.args.stream_interval_ms / 1000
        while True:
            chunks = await outbox.get(reader)
            if chunks is None:
                return
            yield chunks
            if interval:  # what the steps meanwhile make goes in the next item, together
                await asyncio.sleep(interval)

    @ray.method(enable_task_events=False)  # the per-request path: no task events to record and ship
    async def admit(self, requests: list[Admission]) -> list[dict]:
        """Admission of requests that came together: for each {"accepted": True, ...} or {"error",
        "status"}. An accepted request's chunks come on stream(), tagged with its epoch.

        A request with seen_token_ids is a client re-attaching after a router restart, with the
        tokens (and text) it already has; its stream goes on after them. Its prefix, if any, the
        replica reports held once its blocks are cached. A structured request's grammar compiles
        before it is accepted (the ingress admits such a request in a call of its own, so no other
        request waits for it)."""
        self.loop.outbox.bind(asyncio.get_running_loop())
        self._lower_measured_floors()
        checked, batch_ids, counted = [], set(), 0
        load, booked = (self.loop.load(with_prefixes=False), 0) if self.args.shed_unmeetable else (None, 0)
        for r in requests:
            new = r.seen_token_ids is None
            checked.append(self._check(r.request_id, r.prompt_token_ids, r.sampling, reattach=not new,
                                       duplicate=r.request_id in batch_ids))
            if checked[-1][0] is None and new and load is not None:
                shed = self._unmeetable(len(r.prompt_token_ids), checked[-1][1], load, booked)
                checked[-1] = (shed, None) if shed else checked[-1]
                booked += 0 if shed else len(r.prompt_token_ids)
            if checked[-1][0] is None and new:
                self._prompt_tokens += (len(r.prompt_token_ids) - self._prompt_tokens) / 64
                batch_ids.add(r.request_id)
                self._being_admitted += 1  # counts against the queue limit from now on
                counted += 1
        try:
            grammars = await self._compile(requests, checked)
            new = [(r.request_id, r.prompt_token_ids, sp) for r, (refusal, sp) in zip(requests, checked)
                   if refusal is None and r.seen_token_ids is None]
            stored = await self._admit_to_store(new) if new else {}
        finally:
            self._being_admitted -= counted
        answers = []
        for r, (refusal, sp) in zip(requests, checked):
            rid, ids = r.request_id, list(r.prompt_token_ids)
            refusal = refusal or stored.get(rid)
            if refusal is not None:
                answers.append(refusal)
                continue
            stream = ClientStream(self.tokenizer, True, *self.config.slos_of(sp), list(sp.stop), len(ids),
                                  epoch=r.epoch, skip_special_tokens=sp.skip_special_tokens)
            if r.seen_token_ids is None:
                self.loop.submit(Add(rid, ids, sp, r.prompt, time.monotonic(), stream, r.prefix, grammars.get(rid)))
            else:
                self.loop.submit(Reattach(rid, ids, sp, r.prompt, list(r.seen_token_ids), r.seen_text, stream,
                                          grammars.get(rid)))
            answers.append({"accepted": True, "request_id": rid, "prompt_tokens": len(ids)})
        return answers

    async def _compile(self, requests: list[Admission], checked: list) -> dict[str, object]:
        """The compiled grammars of the accepted structured requests, by request id; one that does
        not compile in time is refused in checked (400; 429 while too many compile)."""
        compiled = {}
        for i, (refusal, sp) in enumerate(checked):
            if refusal is not None or sp.structured_output is None:
                continue
            start = time.monotonic()
            try:
                compiled[requests[i].request_id] = await self.compiler.compile(sp.structured_output,
                                                                               requests[i].caller)
            except InvalidRequest as e:
                checked[i] = ({"error": str(e), "status": 400, "param": e.param}, None)
            except GrammarBusy as e:
                self.metrics.observe_rejected("grammar_busy")
                checked[i] = ({"error": str(e), "status": 429}, None)
            except GrammarUnavailable as e:
                checked[i] = ({"error": str(e), "status": 503}, None)
            self.metrics.grammar_wait.observe(time.monotonic() - start)
        return compiled

    def _check(self, rid: str, ids: list[int], sampling: dict, reattach: bool, duplicate: bool
               ) -> tuple[dict | None, SamplingParams | None]:
        """(refusal or None, sampling params). A re-attach skips the queue checks, never the limits."""
        if not reattach:
            refusal = self._refuse(rid, duplicate)
            if refusal is not None:
                return refusal, None
        refusal, sp = self.limits.admit(ids, sampling)
        if refusal is None and not reattach:
            refusal = self._queue_full()
        return (refusal, None) if refusal is not None else (None, sp)

    def _refuse(self, request_id: str, duplicate: bool) -> dict | None:
        if self.draining or self.loop.broken:
            return {"error": self.loop.broken or "the server is draining", "status": 503}
        if not valid_request_id(request_id):  # ids are the server's own: this is a caller's bug
            return {"error": "malformed request id", "status": 400}
        if duplicate or request_id in self.loop.streams:
            return {"error": f"request id {request_id!r} is already in flight", "status": 400}
        return None

    def _queue_full(self) -> dict | None:
        queued = self.loop.queued() + self._being_admitted
        if queued >= self.args.max_queue:
            self.metrics.observe_rejected("queue_full")
            return {"error": f"{queued} requests are waiting (limit {self.args.max_queue})", "status": 429}
        return None

    def _unmeetable(self, prompt_tokens: int, sp: SamplingParams, load, booked: int) -> dict | None:
        """shed_unmeetable: refuse (429) a request whose predicted TTFT here is over its SLO. The
        request router sent it here because no replica had more headroom, so none would meet it
        either: it would only be accepted to miss, and delay the requests behind it."""
        ttft_slo = self.config.slos_of(sp)[0]
        predicted = predict_ttft(load, prompt_tokens, load.taken_at, booked)
        if predicted <= ttft_slo:
            return None
        self.metrics.observe_rejected("ttft_unmeetable")
        late = predicted - ttft_slo
        return {"error": f"no replica can meet this request's TTFT SLO of {ttft_slo * 1e3:.0f} ms now "
                         f"(predicted {predicted * 1e3:.0f} ms here)", "status": 429,
                "retry_after": max(self.args.retry_after_s, math.ceil(min(late, MAX_RETRY_AFTER_S)))}

    async def _admit_to_store(self, new: list[tuple[str, list[int], SamplingParams]]) -> dict[str, dict]:
        """Record new requests in Redis (one round trip); returns the refusals by request id.
        Accepted means recorded: a request Redis does not hold could not be resumed after a fault."""
        now, refusals = time.time(), {}
        futures = [(rid, self.writer.admit(RequestMeta(rid, now, *self.config.slos_of(sp), list(ids), asdict(sp))))
                   for rid, ids, sp in new]
        for rid, fut in futures:
            try:
                await asyncio.wrap_future(fut)
            except StoreUnavailable as e:
                self.metrics.observe_rejected("store_unavailable")
                refusals[rid] = {"error": str(e), "status": 503}
        return refusals
