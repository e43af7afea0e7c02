"""Which named prompt prefixes a replica holds in its prefix cache: ReplicaLoad.prefixes (torch-free).

When a request that names its prefix (prefix_key.py: the key's tag) is admitted, the replica
remembers the tag with the cache key (aptray.cache.block_hash) of the request's last full prompt
block, one per cache kind the replica has: a request's kind is chosen only when it is scheduled,
and a KV request can start from a cached hidden prefix too. The last block, not the first: a
request lets go of its table's tail first, so the cache evicts a prompt's blocks from the back,
and while the last one is cached the whole prompt before it is; the first alone outlives the rest
and would promise a prefix the replica mostly recomputes. A later request with the same tag
replaces the keys: a conversation's newest turn is what its next turn extends.

A snapshot reports the tags whose block is still cached (published and not evicted), newest first,
at most MAX_REPORTED of the MAX_KEYS remembered. The engine thread notes; snapshots run on another
thread and only read: a copy taken in one step under the GIL, then one dict lookup per key, so a
block evicted meanwhile reads as either cached or not.
"""
from __future__ import annotations

from collections import OrderedDict

from aptray.cache.block_hash import block_keys
from aptray.request import CacheKind, Request

MAX_KEYS = 4096  # tags remembered (least recently admitted forgotten first)
MAX_REPORTED = 256  # tags a snapshot reports: 16 hex characters each in the routing stats


class PrefixHolders:
    def __init__(self, block_tokens: dict, max_keys: int = MAX_KEYS, max_reported: int = MAX_REPORTED):
        """block_tokens: cache kind ("kv", "hidden") -> tokens per block, the kinds this replica has."""
        self.kinds = [(CacheKind(kind), n) for kind, n in block_tokens.items()]
        self.max_keys, self.max_reported = max_keys, max_reported
        self._keys: OrderedDict[str, tuple[bytes, ...]] = OrderedDict()  # tag -> block keys, oldest first

    def note(self, tag: str, req: Request) -> None:
        """req, naming its prefix by tag, was admitted (engine thread). Its chain stays on the request
        (Request.block_keys): in its own kind the cache reuses it instead of hashing again."""
        n_prompt = len(req.prompt_token_ids)
        keys = tuple(block_keys(req, kind, n, n_prompt // n)[n_prompt // n - 1]
                     for kind, n in self.kinds if n_prompt >= n)
        if not keys:  # shorter than a block: none of it is ever cached
            return
        self._keys[tag] = keys
        self._keys.move_to_end(tag)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)

    def held(self, blocks) -> tuple[str, ...]:
        """Tags whose block `blocks` (a BlockManager) has cached, newest first (any thread)."""
        try:
            entries = list(self._keys.items())
        except RuntimeError:  # changed while copied: report none this time
            return ()
        out = []
        for tag, keys in reversed(entries):
            if any(map(blocks.is_cached, keys)):
                out.append(tag)
                if len(out) == self.max_reported:
                    break
        return tuple(out)
