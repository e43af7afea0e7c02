"""vLLM's /tokenize and /detokenize, on a thread and a tokenizer copy of their own.

Generation requests tokenize on the ingress's tokenizer thread; these calls never queue there, so
a flood of them cannot delay anyone's prompt. At most MAX_PENDING of them wait or run at once, and
at most half of those are one API key's (429 beyond), so that one key cannot keep other keys'
calls waiting either.
"""
from __future__ import annotations

import asyncio
import copy
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from aptray.sampling_params import check_continuation
from aptray.serve import tools
from aptray.serve.limits import RequestLimits
from aptray.serve.openai_api import DetokenizeResponse, TokenizeChatRequest, TokenizeResponse
from aptray.serve.relay import Rejected, counted, invalid_as_400

MAX_PENDING = 16


class Tokenizing:
    def __init__(self, tokenizer, limits: RequestLimits, max_model_len: int, max_pending: int = MAX_PENDING):
        self.limits, self.max_model_len = limits, max_model_len
        self.max_pending, self.max_per_caller = max_pending, max(1, max_pending // 2)
        # its own copy, made before any request comes: a tokenizer is not shared across threads safely
        self._tokenizer = copy.deepcopy(tokenizer)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="aptray-tokenize-api")
        self._pending: Counter[str] = Counter()  # calls waiting or running, by caller ("": no API keys)

    async def tokenize(self, req, caller: str) -> TokenizeResponse:
        """A prompt's token ids, or a conversation's through the chat template. Rejected: too big (a
        text may be as long as a prompt to truncate), a template that refuses it, or busy (429)."""
        if isinstance(req, TokenizeChatRequest):
            invalid_as_400(check_continuation, req.continue_final_message, req.add_generation_prompt)
            specs = tools.tool_specs(req.tools)
            self._check_size(num_messages=len(req.messages),
                             prompt_chars=invalid_as_400(tools.chat_chars, req.messages, specs))

            def ids_of(tokenizer):
                return invalid_as_400(tools.chat_prompt, tokenizer, req, specs)[1]
        else:
            self._check_size(prompt_chars=len(req.prompt))

            def ids_of(tokenizer):
                return tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)

        def answer(tokenizer):
            ids = ids_of(tokenizer)
            return ids, tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None

        with self._slot(caller):
            ids, strs = await self._run(answer)
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(self, tokens: list[int], caller: str) -> DetokenizeResponse:
        """The text of token ids (special tokens kept): at most a context's worth, each in the vocabulary."""
        if len(tokens) > self.max_model_len:
            raise Rejected(f"{len(tokens)} tokens, over the context of {self.max_model_len}", 400, "tokens")
        vocab = self.limits.vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise Rejected(f"token id {bad} is not in the vocabulary [0, {vocab})", 400, "tokens")
        with self._slot(caller):
            return DetokenizeResponse(prompt=await self._run(lambda tokenizer: tokenizer.decode(tokens)))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _check_size(self, **sizes) -> None:
        refusal = self.limits.size_error({}, truncated=True, **sizes)
        if refusal is not None:
            raise Rejected.of(refusal)

    @contextmanager
    def _slot(self, caller: str):
        total = sum(self._pending.values())
        if total >= self.max_pending:
            raise Rejected(f"{total} tokenize calls are waiting (limit {self.max_pending})", 429)
        if caller and self._pending[caller] >= self.max_per_caller:
            raise Rejected(f"this API key has {self._pending[caller]} tokenize calls waiting "
                           f"(limit {self.max_per_caller})", 429)
        with counted(self._pending, caller):
            yield

    async def _run(self, fn):
        """fn(this thread's tokenizer), on the thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, self._tokenizer)
