"""Hash chains of a request's full cache blocks, the keys of the prefix cache (torch-free).

Block j of a request, of a given kind, holds its tokens [j·n, (j+1)·n) (n tokens per block of that
kind: block_size for KV, hidden_block_size for hidden). Its key digests the key of block j - 1, the
kind, n and those token ids, so two blocks share a key only when their whole prefixes from position 0
are the same tokens: a cached block is valid only at the position it was computed at (OPT's learned
positions, Llama's rotary), and the chain guarantees it. BLAKE2b of 16 bytes: a deliberately crafted
collision would hand one user's cache to another, which the built-in tuple hash would not resist.
A request's cache_salt (SamplingParams) goes into the root of its chains: requests of other salts
never share its blocks.
"""
from __future__ import annotations

from array import array
from hashlib import blake2b

from aptray.request import CacheKind, Request


def root_key(kind: CacheKind, tokens_per_block: int, salt: str | None = None) -> bytes:
    """The parent of block 0: chains of different kinds, block sizes or salts never meet."""
    salted = f"|salt|{salt}" if salt is not None else ""
    return blake2b(f"aptray-prefix|{kind.value}|{tokens_per_block}{salted}".encode(), digest_size=16).digest()


def block_key(parent: bytes, token_ids) -> bytes:
    return blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


def block_keys(req: Request, kind: CacheKind, tokens_per_block: int, num_blocks: int) -> list[bytes]:
    """Keys of req's first num_blocks full blocks of that kind (at least that many tokens must exist).

    Kept on the request (Request.block_keys) and only extended: its tokens only ever grow at the end."""
    chain = req.block_keys.setdefault(kind, [])
    if len(chain) < num_blocks:
        prompt, outputs = req.prompt_token_ids, req.output_token_ids
        n_prompt, n = len(prompt), tokens_per_block
        parent = chain[-1] if chain else root_key(kind, n, req.sampling.cache_salt)
        for j in range(len(chain), num_blocks):
            a, b = j * n, (j + 1) * n
            if b <= n_prompt:
                tokens = prompt[a:b]
            elif a >= n_prompt:
                tokens = outputs[a - n_prompt:b - n_prompt]
            else:
                tokens = prompt[a:] + outputs[:b - n_prompt]
            parent = block_key(parent, tokens)
            chain.append(parent)
    return chain
