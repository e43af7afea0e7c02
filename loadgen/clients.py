"""Clients replay a trace against a server and return one RequestRecord per request.

Client is the pluggable interface. InProcessEngineClient drives an Engine in this process on real
time; SimClient drives the same Engine on virtual time through aptray.sim; HttpStreamClient sends
the trace to an OpenAI-compatible server as streamed completions; GrpcStreamClient to aptray's gRPC
API (generate.proto) as streamed Generate calls.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from urllib.parse import urlsplit
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import numpy as np

from aptray.sim.prompt_ids import follow_up_ids
from loadgen.metrics import FINISHED, RequestRecord
from loadgen.traces import TraceRequest

REPLICA_HEADER = "x-aptray-replica:"  # aptray.serve.ingress names the replica that answered (read lowercased)


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration: float  # seconds on the run's clock, first arrival to the end
    info: dict = field(default_factory=dict)  # scheduler counters, steps, ...


class Client(ABC):
    """Replays trace (arrival times relative to the start) with SLO defaults for requests that set none."""

    def __init__(self, ttft_slo: float = 1.0, tbt_slo: float = 1.0):
        self.ttft_slo = ttft_slo
        self.tbt_slo = tbt_slo

    def slos(self, r: TraceRequest) -> tuple[float, float]:
        return r.ttft_slo or self.ttft_slo, r.tbt_slo or self.tbt_slo

    @abstractmethod
    def run(self, trace: list[TraceRequest], progress=None) -> RunResult:
        """progress: optional callable(n) called as requests end (a tqdm's update)."""


def prompt_ids(r: TraceRequest, tokenizer, vocab_size: int, rng: np.random.Generator,
               add_special_tokens: bool = False) -> list[int]:
    """A conversation's turn: its synthetic ids (loadgen.conversations). Else the trace's prompt text when
    it has one and a tokenizer is given (cut to its length), else random ids.
    add_special_tokens: as a server tokenizes a text prompt (e.g. OPT's leading </s>)."""
    if r.conversation is not None:
        return conversation_ids(r)
    if r.prompt is not None and tokenizer is not None:
        ids = tokenizer(r.prompt, add_special_tokens=add_special_tokens)["input_ids"][:r.num_prefill_tokens]
        if ids:
            return ids
    return rng.integers(4, vocab_size, size=r.num_prefill_tokens).tolist()


class InProcessEngineClient(Client):
    """Drives an aptray Engine built by engine_factory() on real time, replaying arrival times."""

    def __init__(self, engine_factory, tokenizer=None, ttft_slo: float = 1.0, tbt_slo: float = 1.0, seed: int = 0,
                 timeout: float | None = None, add_special_tokens: bool = False):
        super().__init__(ttft_slo, tbt_slo)
        self.engine_factory = engine_factory
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens  # tokenize prompt texts as a server does
        self.seed = seed
        self.timeout = timeout  # abort whatever is left this many seconds after the last arrival

    def run(self, trace: list[TraceRequest], progress=None) -> RunResult:
        from loadgen.engine_replay import replay_on_engine

        engine = self.engine_factory()
        clock = engine.clock
        vocab = engine.config.spec.vocab_size
        rng = np.random.default_rng(self.seed)
        trace = sorted(trace, key=lambda r: r.arrived_at)
        prompts = {r.request_id: prompt_ids(r, self.tokenizer, vocab, rng, self.add_special_tokens)  # before the clock
                   for r in trace}
        records, duration = replay_on_engine(engine, trace, prompts, self.slos,
                                             lambda t: time.sleep(max(0.0, t - clock())), self.timeout, progress)
        engine.executor.shutdown()
        return RunResult(records, duration, {"scheduler_stats": dict(engine.scheduler.stats)})


class SimClient(Client):
    """Replays a trace through aptray.sim: the real Engine and scheduler, a cost-model executor, virtual time."""

    def __init__(self, config_factory, gpu: str = "a100-40gb", step_overhead: float = 1e-3,
                 ttft_slo: float = 1.0, tbt_slo: float = 1.0, max_sim_time: float | None = None,
                 stop_when_decided: bool = True, calibration: str | None = None, decision_scale: float | None = 1.0,
                 replicas: int = 1, routing: str = "slo", shed_unmeetable: bool = False, stats_period_s: float = 0.1,
                 stats_lag_s: float = 0.05, hardware=None):
        """replicas > 1 (or shed_unmeetable): aptray.sim.cluster, `routing` p2c or slo across them, the
        slo router seeing loads every stats_period_s, stats_lag_s late. hardware: a HardwareFit to price
        steps with (with step_overhead) where no calibration is given."""
        super().__init__(ttft_slo, tbt_slo)
        self.decision_scale = decision_scale  # the policy's measured decision time x this per step; None: not charged
        self.replicas, self.routing, self.shed_unmeetable = replicas, routing, shed_unmeetable
        self.stats = {"stats_period_s": stats_period_s, "stats_lag_s": stats_lag_s}
        self.calibration = calibration  # a CPU calibration JSON (aptray.sim.calibrate) replacing gpu's costs
        self.hardware = hardware
        self.stop_when_decided = stop_when_decided  # exact attainment, less simulated drain
        self.config_factory = config_factory  # () -> EngineConfig, fresh per run
        self.gpu = gpu
        self.step_overhead = step_overhead
        self.max_sim_time = max_sim_time

    def run(self, trace: list[TraceRequest], progress=None) -> RunResult:
        from aptray.sim.outcomes import SimRequest
        from aptray.sim.runner import simulate

        hardware, overhead = self.hardware, self.step_overhead
        if self.calibration:
            from aptray.sim.calibrate import Calibration
            cal = Calibration.load(self.calibration)
            hardware, overhead = cal.hardware, cal.step_overhead

        reqs = [SimRequest(r.request_id, r.arrived_at, r.num_prefill_tokens, r.num_decode_tokens, *self.slos(r),
                           r.conversation, r.shared_prefix, r.after, r.think_time or 0.0)
                for r in trace]
        on_finish = (lambda _: progress(1)) if progress is not None else None
        if self.replicas > 1 or self.shed_unmeetable:
            from aptray.sim.cluster import simulate_cluster
            run = simulate_cluster(self.config_factory(), reqs, self.replicas, self.routing, self.gpu, overhead,
                                   hardware, shed_unmeetable=self.shed_unmeetable, **self.stats,
                                   stop_when_decided=self.stop_when_decided, max_sim_time=self.max_sim_time,
                                   decision_scale=self.decision_scale,
                                   on_finish=on_finish)
        else:
            run = simulate(self.config_factory(), reqs, self.gpu, overhead, self.max_sim_time, on_finish=on_finish,
                           stop_when_decided=self.stop_when_decided, hardware=hardware,
                           decision_scale=self.decision_scale)
        if run.stalled:  # a scheduler fault: its attainment would be a number about nothing
            raise RuntimeError(f"simulated run stalled: {run.steps} steps, the last "
                               "aptray.sim.runner.MAX_STEPS_WITHOUT_TOKEN of them without a token")
        by_id = {r.request_id: r for r in trace}
        records = []
        for o in run.outcomes:  # a follow-up arrived when the simulation sent it
            r = by_id[o.request_id]
            records.append(RequestRecord.from_token_times(r.request_id, o.arrival_time, r.num_prefill_tokens,
                                                          r.num_decode_tokens, *self.slos(r), o.token_times,
                                                          o.status, o.num_preemptions))
        info = {"steps": run.steps, "stopped_early": run.stopped_early, "busy_time_s": run.busy_time, "num_blocks": run.num_blocks,
                "decision_time_s": run.decision_time, "scheduler_stats": run.scheduler_stats,
                "routed": getattr(run, "routed", None)}
        if getattr(run, "pipeline", None) is not None:
            info["pipeline"] = run.pipeline
        return RunResult(records, run.sim_time, info)


def conversation_ids(r: TraceRequest, salt: str = "") -> list[int]:
    """A turn's synthetic ids: its conversation's stream (after the shared system prompt). salt: a key
    of the run, so that runs against one server do not hit each other's cache (the system prompt's
    stays shared)."""
    from aptray.sim.prompt_ids import prompt_ids as stream_prompt_ids
    return stream_prompt_ids(salt + r.conversation, r.num_prefill_tokens, r.shared_prefix)


def error_message(body: bytes) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}), else the body's text."""
    try:
        err = json.loads(body).get("error")
        return str(err.get("message", err) if isinstance(err, dict) else err)
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace")


def remote_prompt(r: TraceRequest, salt: str = "") -> str | list[int]:
    """What a remote client sends: the trace's text, or (a conversation, or a trace of lengths only)
    synthetic token ids, small ones every vocabulary has, of the request's own stream (prompts that
    were all the same ids all hit the prefix cache)."""
    from aptray.sim.prompt_ids import stream_ids
    if r.conversation is not None:
        return conversation_ids(r, salt)
    return r.prompt if r.prompt is not None else stream_ids(salt + r.request_id, r.num_prefill_tokens)


def prefix_key(r: TraceRequest, salt: str = "") -> str | None:
    """The prefix key a remote client names (x-aptray-prefix-key, GenerateRequest.prefix_key): a
    conversation's turns share its stream, so its key is the conversation's (with the run's salt,
    as the stream's), the same for every turn; other requests share no prefix worth naming."""
    return salt + r.conversation if r.conversation is not None else None


async def replay_at_arrivals(trace: list[TraceRequest], send, max_in_flight: int, progress) -> tuple[list, float]:
    """Start send(r, t0) for each request at its arrival time, a follow-up think_time after the request
    it follows ends (at most max_in_flight at once); returns the records in trace order and t0, the
    run's start on time.perf_counter(). A follow-up is sent with arrived_at set to when it came."""
    sem = asyncio.Semaphore(max_in_flight)
    t0 = time.perf_counter()
    followers: dict[str, list[TraceRequest]] = {}
    for r in trace:
        if r.after is not None:
            followers.setdefault(r.after, []).append(r)
    tasks: dict[str, asyncio.Task] = {}

    async def one(r, when):
        delay = t0 + when - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with sem:
            rec = await send(replace(r, arrived_at=when) if r.after is not None else r, t0)
        if progress is not None:
            progress(1)
        for f in followers.pop(r.request_id, ()):
            tasks[f.request_id] = asyncio.create_task(one(f, time.perf_counter() - t0 + (f.think_time or 0.0)))
        return rec
    for r in trace:
        if r.after is None:
            delay = t0 + r.arrived_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks[r.request_id] = asyncio.create_task(one(r, r.arrived_at))
    while not all(t.done() for t in tasks.values()):  # follow-ups join as their turns end
        await asyncio.gather(*tasks.values())
    return [tasks[r.request_id].result() for r in trace], t0


def read_prefix_counters(url: str, headers: dict | None = None) -> dict[str, float]:
    """The server's prefix-cache counters from its Prometheus text (/metrics), as scheduler-stat keys
    (prefix_hit_tokens, ...); {} when it has none or cannot be reached."""
    import urllib.request
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("aptray_prefix_cache_") and "_total " in line:
            name, value = line.split(" ", 1)
            key = "prefix_" + name.removeprefix("aptray_prefix_cache_").removesuffix("_total")
            out[key] = out.get(key, 0.0) + float(value)
    return out


class RemoteClient(Client):
    """A client of a running server: each run's prompts are its own (a fresh salt of their synthetic
    ids), and its prefix-cache hits are read off the server's /metrics (metrics_url) before and after,
    as RunResult.info["scheduler_stats"] (what an in-process run reports from its scheduler). A
    conversation's follow-up resends the previous turn's prompt and the reply's token ids the server
    gave (follow_up_ids), as a chat client does."""

    metrics_url: str | None = None
    metrics_headers: dict | None = None
    salt = ""

    def run(self, trace: list[TraceRequest], progress=None) -> RunResult:
        self.salt = uuid.uuid4().hex[:12] + "-"
        self._followed = {r.after for r in trace if r.after is not None}
        self._said: dict[str, list[int]] = {}  # a finished turn a follow-up waits on -> its prompt and reply
        before = read_prefix_counters(self.metrics_url, self.metrics_headers) if self.metrics_url else {}
        result = asyncio.run(self._run(sorted(trace, key=lambda r: r.arrived_at), progress))
        after = read_prefix_counters(self.metrics_url, self.metrics_headers) if self.metrics_url else {}
        if after:
            result.info["scheduler_stats"] = {k: v - before.get(k, 0.0) for k, v in after.items()}
        return result

    @abstractmethod
    async def _run(self, trace: list[TraceRequest], progress) -> RunResult:
        ...

    def _prompt(self, r: TraceRequest) -> str | list[int]:
        """What r sends: remote_prompt, extended by what was said before where r follows a turn."""
        prompt = remote_prompt(r, self.salt)
        if r.after is not None and isinstance(prompt, list):
            prompt = follow_up_ids(prompt, self._said.pop(r.after, None))
        return prompt

    def _is_followed(self, r: TraceRequest, prompt) -> bool:
        """Whether a follow-up will resend r's prompt and reply (so its reply's ids are kept)."""
        return r.request_id in self._followed and isinstance(prompt, list)

    def _said_in(self, r: TraceRequest, prompt: list[int], reply_ids: list[int]) -> None:
        """r finished with reply_ids: what its follow-up resends."""
        self._said[r.request_id] = prompt + reply_ids


class HttpStreamClient(RemoteClient):
    """Replays a trace as streamed /v1/completions (greedy, ignore_eos, the request's SLOs as
    aptray_slo, and its TTFT SLO as the x-aptray-ttft-ms header aptray's request router reads, with
    a conversation's turns naming it in x-aptray-prefix-key) over HTTP/1.1 keep-alive connections,
    at the trace's arrival times. A url path (an app's route prefix) goes before /v1/completions. A
    turn that a follow-up will resend asks for its reply's token ids (return_token_ids, vLLM's name).

    Lean on purpose, so that the client's own CPU is not counted against the server: no HTTP
    library, SSE events are split on blank lines and only events without `"finish_reason":null`
    are parsed as JSON (a token event's ids are cut out of its bytes). A token's time is when the
    bytes of its event were read. Each SSE event counts as one token (the server sends one event
    per token); the records' status is finished, failed (an error event or an unexpected status),
    rejected (429/503) or unfinished (lost)."""

    def __init__(self, url: str, ttft_slo: float = 1.0, tbt_slo: float = 1.0, headers: dict | None = None,
                 model: str | None = None, max_in_flight: int = 1024, timeout: float = 300.0):
        super().__init__(ttft_slo, tbt_slo)
        u = urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.path = u.path.rstrip("/")  # an app under a route prefix: http://host:port/PREFIX
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.model = model
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.metrics_url, self.metrics_headers = f"http://{self.host}:{self.port}/metrics", headers

    async def _run(self, trace: list[TraceRequest], progress) -> RunResult:
        idle: list = []  # keep-alive connections (reader, writer)
        try:  # an unreachable server is no run: every request would read as lost
            idle.append(await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 10.0))
        except (OSError, TimeoutError) as e:
            raise ConnectionError(f"no HTTP server at {self.host}:{self.port} ({e})") from None
        records, t0 = await replay_at_arrivals(trace, lambda r, t0: self._one(r, t0, idle), self.max_in_flight,
                                               progress)
        for _, w in idle:
            w.close()
        return RunResult(records, time.perf_counter() - t0)

    def _request(self, r: TraceRequest, prompt=None, token_ids: bool = False) -> bytes:
        """r's HTTP request: prompt (remote_prompt's by default), asking for token ids where token_ids."""
        ttft, tbt = self.slos(r)
        prompt = remote_prompt(r, self.salt) if prompt is None else prompt
        body = {"prompt": prompt, "max_tokens": r.num_decode_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "aptray_slo": {"ttft_ms": ttft * 1000, "tbt_ms": tbt * 1000}}
        if token_ids:
            body["return_token_ids"] = True
        if self.model:
            body["model"] = self.model
        data = json.dumps(body).encode()
        # what aptray's request router reads before the body is sent on (aptray/serve/route_hints.py)
        hints = f"x-aptray-ttft-ms: {ttft * 1000:g}\r\n"
        if isinstance(prompt, list):
            hints += f"x-aptray-prompt-tokens: {len(prompt)}\r\n"
        key = prefix_key(r, self.salt)
        if key is not None:
            hints += f"x-aptray-prefix-key: {key}\r\n"
        head = (f"POST {self.path}/v1/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n{hints}{self.headers}\r\n")
        return head.encode() + data

    async def _one(self, r: TraceRequest, t0: float, idle: list) -> RequestRecord:
        times, status, conn, error, replica = [], "unfinished", None, "", ""
        prompt = self._prompt(r)
        reply_ids = [] if self._is_followed(r, prompt) else None
        try:
            async with asyncio.timeout(self.timeout):
                conn = idle.pop() if idle else await asyncio.open_connection(self.host, self.port)
                reader, writer = conn
                writer.write(self._request(r, prompt, reply_ids is not None))
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
                code = int(head.split(" ", 2)[1])
                if REPLICA_HEADER in head:
                    replica = head.split(REPLICA_HEADER, 1)[1].split("\r\n", 1)[0].strip()
                keep = "connection: close" not in head
                if "transfer-encoding: chunked" not in head:  # an error answer with a length
                    length = head.split("content-length:", 1)[1].split("\r\n", 1)[0] if "content-length:" in head else 0
                    error = f"HTTP {code}: " + error_message(await reader.readexactly(int(length)))
                    status = "rejected" if code in (429, 503) else "failed"
                elif code == 200:
                    status, error = await self._events(reader, times, reply_ids)
                else:  # a streamed error answer: its body is not read, so the connection is not reused
                    status, error, keep = "failed", f"HTTP {code}", False
                if keep and status != "unfinished":
                    idle.append(conn)
                    conn = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError):
            pass  # a broken stream or a hang with no explicit error: stays "unfinished" (lost)
        finally:
            if conn is not None:
                conn[1].close()
        if status == FINISHED and reply_ids:  # a server that gives no ids: the follow-up resends the stream
            self._said_in(r, prompt, reply_ids)
        ttft, tbt = self.slos(r)
        return RequestRecord.from_token_times(r.request_id, r.arrived_at, r.num_prefill_tokens, r.num_decode_tokens,
                                              ttft, tbt, [t - t0 for t in times], status, error=error, replica=replica)

    @staticmethod
    async def _events(reader: asyncio.StreamReader, times: list[float], ids: list[int] | None) -> tuple[str, str]:
        """Reads a chunked SSE body to its end; appends one time per token event (and its token ids
        to ids, where asked); returns the status and an error event's message."""
        status, buf, error = "unfinished", b"", ""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            data = (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                return status, error
            now = time.perf_counter()
            buf += data
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                if not ev.startswith(b"data:") or status != "unfinished":
                    continue
                if b'"finish_reason":null' in ev:
                    times.append(now)
                    start = ev.find(b'"token_ids":') if ids is not None else -1
                    if start >= 0:  # the text before them is JSON-escaped: no bare quote in it
                        ids.extend(json.loads(ev[start + 12:ev.index(b"]", start) + 1]))
                    continue
                payload = ev[5:].strip()
                if payload == b"[DONE]":
                    continue
                obj = json.loads(payload)
                if "error" in obj:
                    status, error = "failed", error_message(payload)
                elif obj.get("choices"):
                    times.append(now)
                    if ids is not None:
                        ids.extend(obj["choices"][0].get("token_ids") or ())
                    if obj["choices"][0].get("finish_reason"):
                        status = FINISHED


class GrpcStreamClient(RemoteClient):
    """Replays a trace as streamed Generate calls (greedy, ignore_eos, the request's SLOs, a
    conversation's turns naming it in prefix_key) on one grpc.aio channel through Serve's gRPC
    proxy, at the trace's arrival times. A token's time is when the message carrying it arrived.
    Status: finished (a final message with reason stop or length), rejected (RESOURCE_EXHAUSTED or
    UNAVAILABLE: queue full, store away), failed (any other status, or an abort), unfinished (the
    stream ended without a final message: lost). A conversation's follow-up resends the previous
    turn's prompt and the reply's token ids the server streamed (RemoteClient).
    metrics_url: the server's HTTP /metrics, for its prefix-cache hits (the gRPC API has none)."""

    def __init__(self, target: str, ttft_slo: float = 1.0, tbt_slo: float = 1.0, api_key: str | None = None,
                 application: str = "aptray", max_in_flight: int = 1024, timeout: float = 300.0,
                 metrics_url: str | None = None):
        super().__init__(ttft_slo, tbt_slo)
        self.target, self.api_key, self.application = target, api_key, application
        self.connect_timeout = 10.0
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.metrics_url = metrics_url
        self.metrics_headers = {"Authorization": f"Bearer {api_key}"} if api_key else None

    async def _run(self, trace: list[TraceRequest], progress) -> RunResult:
        from aptray.client import AsyncClient

        async with AsyncClient(self.target, self.application, self.api_key) as client:
            try:  # an unreachable server is no run: UNAVAILABLE per request would read as rejections
                await asyncio.wait_for(client.channel.channel_ready(), self.connect_timeout)
            except TimeoutError:
                raise ConnectionError(f"no gRPC server at {self.target} (`serve run aptray.app` serves HTTP only; "
                                      "`serve deploy deploy/serve_config.yaml` also starts the gRPC proxy on 9000)") from None
            records, t0 = await replay_at_arrivals(trace, lambda r, t0: self._one(client, r, t0),
                                                   self.max_in_flight, progress)
        return RunResult(records, time.perf_counter() - t0)

    async def _one(self, client, r: TraceRequest, t0: float) -> RequestRecord:
        import grpc

        ttft, tbt = self.slos(r)
        times, status, error, reply_ids = [], "unfinished", "", []
        prompt = self._prompt(r)
        try:
            async with asyncio.timeout(self.timeout):
                async for reply in client.generate(prompt, client_request_id=r.request_id,
                                                   max_tokens=r.num_decode_tokens, temperature=0.0, ignore_eos=True,
                                                   ttft_ms=ttft * 1000, tbt_ms=tbt * 1000,
                                                   prefix_key=prefix_key(r, self.salt) or ""):
                    now = time.perf_counter()
                    times.extend([now] * len(reply.token_ids))
                    reply_ids.extend(reply.token_ids)
                    if reply.finished:
                        status = FINISHED if reply.finish_reason in ("stop", "length") else "failed"
            if status == FINISHED and self._is_followed(r, prompt):
                self._said_in(r, prompt, reply_ids)
        except grpc.aio.AioRpcError as e:
            busy = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
            status = "rejected" if e.code() in busy and not times else "failed"
            error = f"{e.code().name}: {e.details()}"
        except TimeoutError:
            pass  # a hang with no explicit error: stays "unfinished" (lost)
        return RequestRecord.from_token_times(r.request_id, r.arrived_at, r.num_prefill_tokens, r.num_decode_tokens,
                                              ttft, tbt, [t - t0 for t in times], status, error=error)
