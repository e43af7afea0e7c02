"""/tokenize and /detokenize's own thread (aptray.serve.tokenize_api): while it is busy, calls wait
there up to MAX_PENDING, half of them one key's; past that, 429 at once, and the waiting calls are
answered exactly once the thread frees. (Served: tests/test_serve.py, tests/test_fuzz.py.)"""
from __future__ import annotations

import asyncio
import threading

import pytest
from transformers import AutoTokenizer

from aptray.model.demo import demo_model_dir, ensure_demo_model
from aptray.serve.limits import RequestLimits
from aptray.serve.openai_api import TokenizeCompletionRequest
from aptray.serve.relay import Rejected
from aptray.serve.tokenize_api import Tokenizing


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ensure_demo_model(demo_model_dir()))


def test_a_busy_tokenizer_queues_a_bounded_share_per_key(tokenizer):
    service = Tokenizing(tokenizer, RequestLimits(context=512, vocab_size=len(tokenizer)), 512, max_pending=8)
    gate = threading.Event()
    service._pool.submit(gate.wait)  # the thread is busy until the gate opens

    async def scenario():
        def call(caller: str, text: str):
            return asyncio.ensure_future(service.tokenize(TokenizeCompletionRequest(prompt=text), caller))

        mallory = [call("mallory", f"mallory {i}") for i in range(5)]
        alice = [call("alice", f"alice {i}") for i in range(4)]
        bob = call("bob", "bob")
        await asyncio.sleep(0.1)
        refused = [t for t in mallory + alice + [bob] if t.done()]
        assert refused == [mallory[4], bob]  # mallory past her share of 4; bob past the total of 8
        messages = sorted(str(t.exception()) for t in refused)
        assert messages == ["8 tokenize calls are waiting (limit 8)",
                            "this API key has 4 tokenize calls waiting (limit 4)"]
        assert all(isinstance(t.exception(), Rejected) and t.exception().status == 429 for t in refused)
        with pytest.raises(Rejected, match="over the context of 512"):
            await service.detokenize([5] * 513, "bob")  # sizes are checked before the queue
        gate.set()
        for i, task in enumerate(mallory[:4]):
            assert (await task).tokens == tokenizer.encode(f"mallory {i}")
        for i, task in enumerate(alice):
            assert (await task).tokens == tokenizer.encode(f"alice {i}")
        # the queue is empty again: the key is served
        assert (await service.detokenize(tokenizer.encode("mallory"), "mallory")).prompt == tokenizer.decode(
            tokenizer.encode("mallory"))

    try:
        asyncio.run(scenario())
    finally:
        gate.set()
        service.close()
