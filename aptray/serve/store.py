"""RequestStore: per-request metadata in Redis, enough to rebuild the router's queue after a restart.

Layout (prefix "aptray:"):
  req:<id>          hash: arrival, SLOs, prompt length, sampling JSON, status, timestamps
  req:<id>:prompt   list of prompt token ids
  req:<id>:tokens   list of output token ids so far
  inflight[:<owner>] sorted set of unfinished ids scored by arrival time (queue order), one per
                    owner (an ingress replica) so a restarted router resumes its own requests only
  owner:<owner>     heartbeat key with a short TTL: an owner without one is gone
Every key carries a TTL: in-flight ones a long one (a crashed router leaves nothing forever),
finished ones a short one (clients may still read the result for a while).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import weakref
from dataclasses import dataclass, field

import redis

from aptray.serve.redis_server import RedisServer

logger = logging.getLogger("aptray")

FINISHED = ("stop", "length", "abort", "error", "rejected")
# a dead or hung Redis must surface as an error within seconds, never as a hang
SOCKET_TIMEOUT_S = 2.0
# ids the server makes (openai_api.new_id): no ':' or '*', so no key of one request can be another's
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
# Append tokens only where the list holds exactly ARGV[1] of them; returns -1, or the length it found.
# A transaction whose reply timed out can still run once Redis answers again, after the writer's
# resync rewrote the list from its mirror: a plain RPUSH would then add its tokens a second time.
_APPEND_AT = """
local n = redis.call('LLEN', KEYS[1])
if n ~= tonumber(ARGV[1]) then return n end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
return -1
"""
APPEND_CHUNK = 1000  # tokens per guarded append (Lua's unpack takes a few thousand at most)


# the owner's host and pid, then mkdtemp's letters: a /tmp shared across hosts or containers (pid
# namespaces) holds other hosts' directories, whose pids mean nothing here
EMBEDDED_DIR = re.compile(r"aptray-redis-(.+)-(\d+)-[a-z0-9_]+")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "_"


class EmbeddedServer:
    """A redis-server child process (redis_server.py) on a unix socket, keeping nothing on disk while
    it runs. Its files go in a temporary directory of its own, named by this host and pid, which
    goes with it: at shutdown, or when it is collected or the process exits (a router started every
    few minutes would otherwise leave a directory each time). An owner killed outright runs none of
    that (Ray ends a replica's worker so), so each new server first removes the directories of
    owners that are gone (remove_abandoned)."""

    def __init__(self):
        try:
            remove_abandoned(tempfile.gettempdir())
        except OSError:  # the sweep is housekeeping: never what stops a store from starting
            logger.warning("could not sweep abandoned embedded Redis directories", exc_info=True)
        self.dir = tempfile.mkdtemp(prefix=f"aptray-redis-{_host()}-{os.getpid()}-")
        self.server = RedisServer(self.dir, unix_socket=os.path.join(self.dir, "redis.sock"))
        try:
            self.server.start()
        except Exception:
            self.server.close()
            raise
        self.socket_file = self.server.unix_socket
        self._stop = weakref.finalize(self, self.server.close)

    def shutdown(self) -> None:
        self._stop()


def remove_abandoned(parent: str) -> list[str]:
    """Remove this user's embedded-server directories in parent whose owner process, on this host,
    is gone; a server still answering in one (an orphan: its owner was killed outside Ray, which
    would have ended it) is shut down first. Returns the directories removed."""
    removed, host = [], _host()
    for name in os.listdir(parent):
        m = EMBEDDED_DIR.fullmatch(name)
        path = os.path.join(parent, name)
        if m is None or m.group(1) != host or _alive(int(m.group(2))):
            continue
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
        except OSError:
            continue
        _shut_down_orphan(RedisServer(path, unix_socket=os.path.join(path, "redis.sock")))
        shutil.rmtree(path, True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process holds that pid; no pid at all
        return True
    return True


def _shut_down_orphan(server: RedisServer) -> None:
    if not os.path.exists(server.unix_socket):
        return
    client = server.client(timeout_s=1.0)
    try:
        client.shutdown(nosave=True)
    except redis.RedisError:  # nothing listens any more, or it went while shutting down
        pass
    finally:
        client.close()


def valid_request_id(rid: str) -> bool:
    return isinstance(rid, str) and _REQUEST_ID.fullmatch(rid) is not None


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
                 finished_ttl_s: int = 300, owner=None, queue_owner: str | None = None):
        self.r = client
        # the script is sent by its sha (EVALSHA) and loaded once per server: a pipeline that ran it
        # through redis-py's Script would ask SCRIPT EXISTS, one more round trip, on every batch
        self._append_at_sha = client.register_script(_APPEND_AT).sha
        self._append_at_loaded = False  # on this server: a restarted one has none (resync says so)
        self.prefix = prefix
        self.inflight_ttl_s = inflight_ttl_s
        self.finished_ttl_s = finished_ttl_s
        self._owner = owner  # keeps an embedded server alive as long as the store
        self.queue_owner = queue_owner  # whose in-flight set this store reads and writes

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def connect(cls, redis_url: str | None = None, **kw) -> "RequestStore":
        """redis_url (or $APTRAY_REDIS_URL) for an external server; neither: an embedded one.

        When the URL carries no password, $REDIS_PASSWORD or the file named by
        $REDIS_PASSWORD_FILE (a Kubernetes Secret as env var or mounted file) fills it in."""
        url = redis_url or os.environ.get("APTRAY_REDIS_URL")
        if not url or url == "embedded":
            return cls.embedded(**kw)
        password = redis_password()
        extra = {"password": password} if password and "@" not in url else {}
        client = redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S,
                                      socket_connect_timeout=SOCKET_TIMEOUT_S, **extra)
        return cls(client, **kw)

    @classmethod
    def embedded(cls, **kw) -> "RequestStore":
        """Start a real Redis server, a child of this process, on a unix socket."""
        server = EmbeddedServer()
        return cls(server.server.client(SOCKET_TIMEOUT_S), owner=server, **kw)

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
        if not valid_request_id(rid):
            raise ValueError(f"malformed request id {rid[:40]!r}")
        return f"{self.prefix}req:{rid}{':' + part if part else ''}"

    @property
    def _inflight(self) -> str:
        return f"{self.prefix}inflight" + (f":{self.queue_owner}" if self.queue_owner else "")

    def heartbeat(self, ttl_s: int = 30) -> None:
        """Say this owner is alive (see orphaned_owners)."""
        if self.queue_owner:
            self.r.set(f"{self.prefix}owner:{self.queue_owner}", "1", ex=ttl_s)

    def owners(self) -> list[str]:
        """Owners that have requests in flight."""
        return [key.decode().removeprefix(f"{self.prefix}inflight:")
                for key in self.r.scan_iter(match=f"{self.prefix}inflight:*", count=100)]

    def orphaned_owners(self) -> list[str]:
        """Owners with an in-flight set but no heartbeat: replicas that are gone for good."""
        return [o for o in self.owners()
                if o != self.queue_owner and not self.r.exists(f"{self.prefix}owner:{o}")]

    def close_orphans(self) -> int:
        """Abort the requests of owners gone for good (orphaned_owners): nobody can resume them.
        Returns how many were closed."""
        closed = 0
        for owner in self.orphaned_owners():
            other = self.for_owner(owner)
            for m in other.unfinished():
                other.finish(m.request_id, "abort")
                closed += 1
        return closed

    def unfinished_everywhere(self) -> list[RequestMeta]:
        """In-flight requests of every owner (tests, operators)."""
        return [m for o in self.owners() for m in self.for_owner(o).unfinished()]

    def for_owner(self, owner: str) -> "RequestStore":
        """The same server seen as another owner (to close an orphaned owner's requests)."""
        return RequestStore(self.r, self.prefix, self.inflight_ttl_s, self.finished_ttl_s, queue_owner=owner)

    # -- writes -------------------------------------------------------------------------------
    def add(self, m: RequestMeta) -> None:
        p = self.r.pipeline()
        self._add(p, m)
        p.execute()

    def _add(self, p, m: RequestMeta) -> None:
        fields = {"arrival_time": m.arrival_time, "ttft_slo": m.ttft_slo, "tbt_slo": m.tbt_slo,
                  "prompt_len": m.prompt_len, "sampling": json.dumps(m.sampling), "status": m.status}
        for name in ("first_token_time", "last_token_time"):
            if getattr(m, name) is not None:
                fields[name] = getattr(m, name)
        p.hset(self._k(m.request_id), mapping=fields)
        p.delete(self._k(m.request_id, "prompt"), self._k(m.request_id, "tokens"))
        if m.prompt_token_ids:
            p.rpush(self._k(m.request_id, "prompt"), *m.prompt_token_ids)
        if m.output_token_ids:
            p.rpush(self._k(m.request_id, "tokens"), *m.output_token_ids)
        for part in ("", "prompt", "tokens"):
            p.expire(self._k(m.request_id, part), self.inflight_ttl_s)
        p.zadd(self._inflight, {m.request_id: m.arrival_time})

    def resync(self, in_flight: list[RequestMeta], finished: dict[str, str]) -> None:
        """Rewrite everything a writer knows, in one transaction: after Redis was away (and may
        have restarted empty), the store again mirrors the router. An id in this owner's in-flight
        set that the writer does not hold is closed as an error: an admission refused because its
        write timed out, whose transaction Redis ran late (a restarted router would resume it for
        a client that was told it failed)."""
        self._append_at_loaded = False  # Redis may have restarted: its scripts are gone
        held = {m.request_id for m in in_flight}
        ghosts = [rid for rid in (raw.decode() for raw in self.r.zrange(self._inflight, 0, -1))
                  if rid not in held and rid not in finished]
        p = self.r.pipeline()
        for m in in_flight:
            self._add(p, m)
        now = time.time()
        for rid, status in finished.items():
            self._finish(p, rid, status, now)
        for rid in ghosts:
            self._finish(p, rid, "error", now)
        p.execute()

    def load_scripts(self) -> None:
        """Load the guarded append's script unless this server has it already."""
        if not self._append_at_loaded:
            self.r.script_load(_APPEND_AT)
            self._append_at_loaded = True

    def record_step(self, new_tokens: dict[str, list[int]], now: float | None = None) -> None:
        """Append one iteration's tokens for many requests in one round trip."""
        if not new_tokens:
            return
        now = time.time() if now is None else now
        p = self.r.pipeline(transaction=False)
        for rid, toks in new_tokens.items():
            self._tokens(p, rid, toks, now)
        p.execute()

    def _tokens(self, p, rid: str, toks: list[int], now: float, first: bool | None = None,
                first_time: float | None = None, start: int | None = None) -> list[int]:
        """now: when the last of toks came. first: whether toks are the request's first tokens (None:
        not known), the first of them at first_time (default now). Later tokens need only the
        append and the last token time: the key's TTL and the status were set with the first.
        start: the tokens the list holds before these; given, the append happens only at that length
        (_APPEND_AT), and the indices of the guarded appends in p are returned."""
        if not toks:
            return []
        guarded = []
        if start is None:
            p.rpush(self._k(rid, "tokens"), *toks)
        else:
            for i in range(0, len(toks), APPEND_CHUNK):
                guarded.append(len(p))
                p.evalsha(self._append_at_sha, 1, self._k(rid, "tokens"), start + i, *toks[i:i + APPEND_CHUNK])
        if first is False:
            p.hset(self._k(rid), "last_token_time", now)
            return guarded
        p.expire(self._k(rid, "tokens"), self.inflight_ttl_s)
        if first:
            p.hset(self._k(rid), mapping={"first_token_time": now if first_time is None else first_time,
                                          "last_token_time": now, "status": "running"})
        else:
            p.hsetnx(self._k(rid), "first_token_time", now)
            p.hset(self._k(rid), mapping={"last_token_time": now, "status": "running"})
        return guarded

    def batch(self) -> "StoreBatch":
        """Many writes (admissions, tokens, finishes) in one transaction, applied in the order given."""
        return StoreBatch(self)

    def finish(self, rid: str, status: str, now: float | None = None) -> None:
        """Mark finished, leave the in-flight set, and let the keys expire soon."""
        p = self.r.pipeline()
        self._finish(p, rid, status, time.time() if now is None else now)
        p.execute()

    def _finish(self, p, rid: str, status: str, now: float) -> None:
        p.hset(self._k(rid), mapping={"status": status, "finish_time": now})
        for part in ("", "prompt", "tokens"):
            p.expire(self._k(rid, part), self.finished_ttl_s)
        p.zrem(self._inflight, rid)

    # -- reads --------------------------------------------------------------------------------
    def get(self, rid: str) -> RequestMeta | None:
        p = self.r.pipeline(transaction=False)
        p.hgetall(self._k(rid))
        p.lrange(self._k(rid, "prompt"), 0, -1)
        p.lrange(self._k(rid, "tokens"), 0, -1)
        h, prompt, toks = p.execute()
        if not h or b"arrival_time" not in h:  # absent, or only a finish written while Redis had lost the rest
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


class StoreBatch:
    """Writes queued on one MULTI/EXEC pipeline: one round trip however many requests they touch."""

    def __init__(self, store: RequestStore):
        self.store = store
        self.p = store.r.pipeline(transaction=True)
        self.size = 0  # writes queued
        self.guarded: list[int] = []  # indices in p of guarded token appends

    def add(self, m: RequestMeta) -> None:
        self.store._add(self.p, m)
        self.size += 1

    def tokens(self, rid: str, toks: list[int], now: float, first: bool | None = None,
               first_time: float | None = None, start: int | None = None) -> None:
        """start: the tokens the request's list holds before these (the append is skipped at any other
        length, and execute reports it); None: a plain append."""
        self.guarded += self.store._tokens(self.p, rid, toks, now, first, first_time, start)
        self.size += 1

    def finish(self, rid: str, status: str, now: float) -> None:
        self.store._finish(self.p, rid, status, now)
        self.size += 1

    def execute(self) -> int:
        """Writes everything; returns how many guarded appends found their list at another length
        (the store no longer mirrors the writer there: it should resync)."""
        if not self.size:
            return 0
        if self.guarded:
            self.store.load_scripts()
        results = self.p.execute()
        return sum(1 for i in self.guarded if results[i] != -1)


def redis_password() -> str | None:
    """$REDIS_PASSWORD, else the contents of $REDIS_PASSWORD_FILE (a mounted Secret)."""
    password = os.environ.get("REDIS_PASSWORD")
    path = os.environ.get("REDIS_PASSWORD_FILE")
    if not password and path:
        with open(path) as f:
            password = f.read().strip()
    return password or None
