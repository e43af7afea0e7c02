"""Engine: the one loop — scheduler -> executor -> postprocess — shared by every executor."""
from __future__ import annotations

import logging
import time

from aptray.cache.block_manager import BlockManager
from aptray.config import EngineConfig
from aptray.executor.base import Executor
from aptray.outputs import CompletionOutput, IncrementalDetokenizer, RequestMetrics, RequestOutput
from aptray.request import Request, RequestStatus
from aptray.sampling_params import SamplingParams
from aptray.scheduler import make_scheduler

logger = logging.getLogger("aptray")


class Engine:
    def __init__(self, config: EngineConfig, executor: Executor, tokenizer=None, clock=time.monotonic,
                 blocks: BlockManager | None = None):
        """blocks: the scheduler's block accounting when it is not a pool of its own (a view of a pool
        shared by several in-flight micro-batches, aptray.cache.block_views)."""
        self.config = config
        self.executor = executor
        self.tokenizer = tokenizer
        self.clock = clock
        hidden = config.hidden_block_size if config.cache_mode != "kv" else 0
        self.blocks = blocks if blocks is not None else BlockManager(executor.num_blocks, config.block_size, hidden)
        self.scheduler = make_scheduler(config, self.blocks)
        self._prompts: dict[str, str | None] = {}
        self._texts: dict[str, str] = {}
        self._stop_detoks: dict[str, IncrementalDetokenizer] = {}  # requests with stop strings
        self.last_result = None

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                    arrival_time: float | None = None, prompt: str | None = None) -> Request:
        n = len(prompt_token_ids)
        limit = self.config.spec.max_model_len
        if n == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if n >= limit:
            raise ValueError(f"the prompt has {n} tokens; the model context is {limit}, "
                             f"which leaves no room to generate")
        if any(not 0 <= t < self.config.spec.vocab_size for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.config.spec.vocab_size})")
        if not self.scheduler.chunks_long_prompts and n > self.config.max_num_batched_tokens:
            raise ValueError(f"the prompt has {n} tokens, over max_num_batched_tokens "
                             f"({self.config.max_num_batched_tokens}); enable chunked prefill or raise it")
        sp = sampling_params
        eos = getattr(self.tokenizer, "eos_token_id", None)
        req = Request(request_id, list(prompt_token_ids), sp,
                      self.clock() if arrival_time is None else arrival_time,
                      sp.ttft_slo or self.config.ttft_slo, sp.tbt_slo or self.config.tbt_slo, eos)
        self.scheduler.add(req)
        self._prompts[request_id] = prompt
        self._texts[request_id] = ""
        return req

    def resume_request(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                       output_token_ids: list[int], token_times: list[float], arrival_time: float,
                       prompt: str | None = None, num_preemptions: int = 0) -> Request:
        """Re-admit a request that already generated tokens elsewhere (a fault, a router restart):
        it queues as a recompute preemption, re-prefills prompt + outputs, and goes on sampling."""
        req = self.add_request(request_id, prompt_token_ids, sampling_params, arrival_time, prompt)
        if output_token_ids:
            req.output_token_ids = list(output_token_ids)
            req.token_times = list(token_times)
            req.first_token_time = token_times[0] if token_times else None
            req.last_token_time = token_times[-1] if token_times else None
            req.num_preemptions = num_preemptions + 1
        return req

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.abort(request_id)
        self._forget(request_id)
        return req is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop ----------------------------------------------------------------------------
    def step(self, want_logits: bool = False) -> list[RequestOutput]:
        plan = self.scheduler.schedule(self.clock())
        if plan.is_empty:
            return []
        if want_logits:
            plan = type(plan)(plan.iteration, plan.seqs, plan.conversions, True)
        result = self.executor.execute(plan)
        self.last_result = result
        outputs = []
        for req in self.scheduler.update(plan, result, self.clock()):
            status = self._check_stop(req)
            if status is not None:
                self.scheduler.finish(req, status)
            outputs.append(self._output(req, new=[req.output_token_ids[-1]]))
            if status is not None:
                self._forget(req.request_id)
        return outputs

    def _check_stop(self, req: Request) -> RequestStatus | None:
        sp, token = req.sampling, req.output_token_ids[-1]
        if not sp.ignore_eos and token == req.eos_token_id:
            req.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if token in sp.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if sp.stop and self.tokenizer is not None:
            # decode only the new token and search only the text it can complete: decoding the whole
            # output at every token cost O(n^2) over a request
            detok = self._stop_detoks.get(req.request_id)
            if detok is None:
                detok = self._stop_detoks[req.request_id] = IncrementalDetokenizer(
                    self.tokenizer, req.output_token_ids[:-1])
            delta = detok.add([token])
            text = detok.text
            for s in sp.stop:
                at = text.find(s, max(0, len(text) - len(delta) - len(s) + 1)) if delta else -1
                if at >= 0:
                    req.stop_reason = s
                    self._texts[req.request_id] = text[:at]
                    return RequestStatus.FINISHED_STOPPED
        if len(req.output_token_ids) >= sp.max_tokens or req.num_tokens >= self.config.spec.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _output(self, req: Request, new: list[int]) -> RequestOutput:
        finished = req.status.finished
        text = ""
        if finished and isinstance(req.stop_reason, str):
            text = self._texts[req.request_id]  # already cut at the stop string
        elif finished and self.tokenizer is not None:
            text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
        reason = req.status.value if finished else None
        # a running request's output shares its growing token list: copying it every step costs O(n^2)
        tokens = list(req.output_token_ids) if finished else req.output_token_ids
        completion = CompletionOutput(0, text, tokens, reason, req.stop_reason)
        metrics = None
        if finished:
            metrics = RequestMetrics(req.arrival_time, req.first_token_time, list(req.token_times), req.num_preemptions)
        return RequestOutput(req.request_id, self._prompts.get(req.request_id), req.prompt_token_ids,
                             [completion], finished, metrics, new)

    def _forget(self, request_id: str) -> None:
        self._prompts.pop(request_id, None)
        self._texts.pop(request_id, None)
        self._stop_detoks.pop(request_id, None)
