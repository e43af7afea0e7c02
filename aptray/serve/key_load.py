"""An API key's requests in flight across the ingress replicas that share one Redis, so that
max_requests_per_key holds for the app, not per replica.

Each replica counts its own (RouterLink) and writes the count here, in a hash per key with one
field per replica. A field counts while its replica's liveness key lives (written every
REFRESH_S, expiring after ALIVE_TTL_S): a replica that dies stops counting within that, and a
restarted one writes under a new token. With the embedded Redis, one per replica, the cap is per
replica. Across replicas it holds within one Redis round trip (requests that reach two replicas at
the same moment may both be admitted). Where Redis does not answer, each replica counts its own.
"""
from __future__ import annotations

import asyncio
import logging
import uuid

import redis
import redis.asyncio as aioredis

from aptray.serve.store import SOCKET_TIMEOUT_S, redis_password

logger = logging.getLogger("aptray")
ALIVE_TTL_S = 30
REFRESH_S = 10.0
READ_TIMEOUT_S = 0.25  # a slow Redis must not hold up admissions: past this, this replica counts alone
RETRY_S = 1.0  # after a failed write: the counts are written again, newest first
HASH_TTL_S = 24 * 3600  # a key's hash outlives its last write by this (its fields are checked anyway)

# the other live replicas' counts of KEYS[1]'s key; the fields of replicas no longer alive are dropped
_OTHERS = """
local total = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local field = entries[i]
  if field ~= ARGV[1] then
    if redis.call('EXISTS', ARGV[2] .. field) == 1 then
      total = total + tonumber(entries[i + 1])
    else
      redis.call('HDEL', KEYS[1], field)
    end
  end
end
return total
"""


class KeyLoad:
    def __init__(self, client: aioredis.Redis, replica: str, prefix: str = "aptray:"):
        self.r, self.prefix = client, prefix
        self.token = f"{replica}:{uuid.uuid4().hex[:12]}"
        self._others = client.register_script(_OTHERS)
        self._pending: dict[str, int] = {}  # counts not yet written, by key
        self._writer: asyncio.Task | None = None
        self._heartbeat: asyncio.Task | None = None
        self._warned = False

    @classmethod
    def connect(cls, url: str, replica: str) -> "KeyLoad":
        """Over the Redis at url (the store's: $REDIS_PASSWORD fills in a password the URL lacks)."""
        password = redis_password()
        extra = {"password": password} if password and "@" not in url else {}
        client = aioredis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S,
                                         socket_connect_timeout=SOCKET_TIMEOUT_S, **extra)
        return cls(client, replica)

    async def others(self, key: str) -> int:
        """Requests of key in flight at the other live replicas (0 where Redis does not answer in time)."""
        self._ensure_heartbeat()
        try:
            total = int(await asyncio.wait_for(self._others(keys=[self._hash(key)],
                                                            args=[self.token, self._alive_prefix]), READ_TIMEOUT_S))
        except (redis.RedisError, OSError, asyncio.TimeoutError) as e:
            self._warn(e)
            return 0
        self._warned = False
        return total

    def publish(self, key: str, count: int) -> None:
        """This replica now has count requests of key: written in the background, in order."""
        self._pending[key] = count
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def close(self) -> None:
        """Stop writing; this replica's counts stop counting at once (its liveness key is deleted)."""
        for task in (self._writer, self._heartbeat):
            if task is not None:
                task.cancel()
        try:
            await self.r.delete(self._alive_prefix + self.token)
        except (redis.RedisError, OSError):
            pass
        await self.r.aclose()

    @property
    def _alive_prefix(self) -> str:
        return f"{self.prefix}keyload-alive:"

    def _hash(self, key: str) -> str:
        return f"{self.prefix}keyload:{key}"

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            try:
                async with self.r.pipeline(transaction=False) as p:
                    p.set(self._alive_prefix + self.token, 1, ex=ALIVE_TTL_S)
                    for key, count in batch.items():
                        if count:
                            p.hset(self._hash(key), self.token, count)
                            p.expire(self._hash(key), HASH_TTL_S)
                        else:
                            p.hdel(self._hash(key), self.token)
                    await p.execute()
            except (redis.RedisError, OSError) as e:
                self._warn(e)
                self._pending = {**batch, **self._pending}  # what came meanwhile is newer
                await asyncio.sleep(RETRY_S)

    def _ensure_heartbeat(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            try:
                await self.r.set(self._alive_prefix + self.token, 1, ex=ALIVE_TTL_S)
            except (redis.RedisError, OSError) as e:
                self._warn(e)
            await asyncio.sleep(REFRESH_S)

    def _warn(self, e: Exception) -> None:
        if not self._warned:  # once: Redis being away is the store's alarm to raise
            logger.warning("per-key counts unavailable in Redis (%s): each replica counts its own", e)
            self._warned = True
