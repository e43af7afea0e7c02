"""A request's prefix key: the client's name for the prompt prefix it shares with other requests.

The request router in Serve's proxy reads no HTTP body, so a client names the shareable part of
its prompt itself: an opaque key such as a conversation id or a system prompt's name, in the
header `x-aptray-prefix-key` (HTTP) or GenerateRequest.prefix_key (gRPC). A key is 1 to
MAX_KEY_BYTES bytes of visible ASCII; anything else is ignored (the request routes as if it named
none). Past the edge only the key's tag travels: a short digest, the same wherever it is taken,
so the router can compare a request's tag to those a replica reports (ReplicaLoad.prefixes) and
the stats stay small.
"""
from __future__ import annotations

from hashlib import blake2b

PREFIX_KEY_HEADER = "x-aptray-prefix-key"
MAX_KEY_BYTES = 128
TAG_BYTES = 8  # 16 hex characters: a collision only sends a request to a replica without its prefix


def prefix_tag(raw) -> str | None:
    """The tag of a valid key (str or bytes), else None."""
    if isinstance(raw, str):
        try:
            raw = raw.encode("ascii")
        except UnicodeEncodeError:
            return None
    if not isinstance(raw, (bytes, bytearray)) or not 0 < len(raw) <= MAX_KEY_BYTES:
        return None
    if any(not 0x21 <= c <= 0x7e for c in raw):
        return None
    return blake2b(bytes(raw), digest_size=TAG_BYTES).hexdigest()
