"""n > 1, or a completion of several prompts: one engine request per choice, opened together and
relayed as one response (a request of one prompt and n = 1 is relayed directly, Ingress.open_choices
and Ingress.batches).

Choice i is the request `<id>-<i>`; with several prompts, choice i is prompt i // n's choice i % n
(OpenAI's order). A choice scheduled after another's prefill finds the prompt's
blocks in the prefix cache. A seeded request's choice i draws with seed + i: the sampler seeds each
draw from (seed, token index), so one seed would give every choice the same tokens. A choice refused
at admission aborts those already admitted; a client that leaves mid-stream closes every choice's
stream, which aborts its request (relay.RouterLink.chunks).
"""
from __future__ import annotations

import asyncio
from contextlib import aclosing

from aptray.sampling_params import choice_seed

MAX_CHOICES = 16  # a server's limit on n: each choice is a request of its own in the queue and the batch
MAX_PROMPTS = 32  # prompts in one completion request
MAX_REQUESTS = 64  # prompts times n: the engine requests one HTTP request may open


def choice_sampling(sampling: dict, index: int) -> dict:
    if index == 0 or sampling.get("seed") is None:
        return sampling
    return {**sampling, "seed": choice_seed(sampling["seed"], index)}


async def open_choices(ingress, rid: str, prompts: list[tuple[str | None, list[int]]], sampling: dict, owner: str,
                       prefix: str | None, n: int) -> list:
    """The calls of each prompt's n choices ((text, token ids) each), each admitted; if one is refused
    (or the caller is cancelled), every choice is aborted and it raises. The admissions run at once,
    so the RouterLink sends them in one Router.admit."""
    rids = [f"{rid}-{i}" for i in range(len(prompts) * n)]
    opening = [asyncio.ensure_future(ingress.open_stream(rids[p * n + i], ids, choice_sampling(sampling, i), text,
                                                         owner, prefix))
               for p, (text, ids) in enumerate(prompts) for i in range(n)]
    try:
        return list(await asyncio.gather(*opening))
    except BaseException:
        for task in opening:
            task.cancel()
        await asyncio.gather(*opening, return_exceptions=True)
        for r in rids:  # those admitted end; the others are not found
            await ingress.router.abort.remote(r)
        raise


async def merged(ingress, calls: list):
    """(choice index, batch of chunks) as each choice's batches arrive, until every choice finishes.
    Closing it (a client that leaves) closes every choice's stream."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, call) -> None:
        try:
            async with aclosing(ingress.chunks(call)) as batches:
                async for batch in batches:
                    await queue.put((index, batch))
        except Exception as e:  # a refusal or failure of this choice: the response's error
            await queue.put((index, e))
        finally:
            await queue.put((index, None))

    pumps = [asyncio.create_task(pump(i, call)) for i, call in enumerate(calls)]
    try:
        running = len(calls)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
