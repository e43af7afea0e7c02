"""Engine: the one loop — scheduler -> executor -> postprocess — shared by every executor."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from aptray.cache.block_manager import BlockManager
from aptray.config import EngineConfig
from aptray.executor.base import Executor
from aptray.outputs import CompletionOutput, RequestMetrics, RequestOutput
from aptray.plan import NOTHING_ALLOWED, BatchPlan, SeqPlan, StepResult
from aptray.request import CacheKind, Request, RequestStatus, token_mask
from aptray.sampling_params import (InvalidRequest, SamplingParams, bad_words_token_ids, check_prompt,
                                    check_token_ids)
from aptray.scheduler import make_scheduler
from aptray.step_quarantine import MAX_FAILED_STEPS, StepQuarantine
from aptray.stop import StopChecker
from aptray.structured_output import MAX_GUIDE_REPLAY_SECONDS, MAX_GUIDE_SECONDS_PER_TOKEN, Grammars

logger = logging.getLogger("aptray")


def _slow_token(guide) -> str | None:
    """Why a request ends when its grammar took too long for its newest token, if it did."""
    if guide.last_token_seconds <= MAX_GUIDE_SECONDS_PER_TOKEN:
        return None
    return (f"the structured output took {guide.last_token_seconds * 1e3:.1f} ms to follow for one token, "
            f"over the limit of {MAX_GUIDE_SECONDS_PER_TOKEN * 1e3:g} ms (an ambiguous grammar)")


@dataclass
class EngineStep:
    """What one Engine.step did: the outputs of the requests that got a token (iterate it), and
    its own timings."""
    outputs: list[RequestOutput] = field(default_factory=list)
    schedule_s: float = 0.0  # the policy's decision
    execute_s: float = 0.0  # the executor's call as the engine waited for it (a shard's RPC included)
    result: StepResult | None = None  # the executor's answer (step_time, logits); None: nothing ran
    plan: BatchPlan | None = None  # what the step computed (its tokens and decodes: the step's speed)

    def __iter__(self):
        return iter(self.outputs)

    def __len__(self) -> int:
        return len(self.outputs)


class StepFailed(RuntimeError):
    """The executor failed a whole step (cause: its exception); plan is what it was running."""

    def __init__(self, plan, cause: BaseException):
        super().__init__(f"step {plan.iteration} failed: {cause!r}")
        self.plan, self.cause = plan, cause


class Engine:
    def __init__(self, config: EngineConfig, executor: Executor, tokenizer=None, clock=time.monotonic,
                 blocks: BlockManager | None = None, grammars: Grammars | None = None):
        """blocks: the scheduler's block accounting when it is not a pool of its own (a view of a pool
        shared by several in-flight micro-batches, aptray.cache.block_views). grammars: the compiler
        of structured outputs when it is shared (a router compiles at admission)."""
        self.config = config
        self.executor = executor
        self.tokenizer = tokenizer
        self.clock = clock
        hidden = config.hidden_block_size if config.cache_mode != "kv" else 0
        self.blocks = blocks if blocks is not None else BlockManager(executor.num_blocks, config.block_size, hidden,
                                                                     config.enable_prefix_caching)
        self.scheduler = make_scheduler(config, self.blocks)
        self._prompts: dict[str, str | None] = {}
        self._stops: dict[str, StopChecker] = {}
        self.quarantine = StepQuarantine()
        self.grammars = grammars if grammars is not None else Grammars(tokenizer, config.spec.vocab_size)

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                    arrival_time: float | None = None, prompt: str | None = None, grammar=None) -> Request:
        """grammar: the request's compiled structured output, where the caller compiled it (a router
        does, off this thread); else it is compiled here."""
        if sampling_params.n != 1:
            raise InvalidRequest("the engine runs one sequence per request: LLM.generate and the server run each "
                                 "of n as a request of its own", "n")
        n = len(prompt_token_ids)
        check_prompt(prompt_token_ids, self.config.spec.max_model_len, self.config.spec.vocab_size)
        check_token_ids(sampling_params, self.config.spec.vocab_size)
        if not self.scheduler.chunks_long_prompts and n > self.config.max_num_batched_tokens:
            raise InvalidRequest(f"the prompt has {n} tokens, over max_num_batched_tokens "
                                 f"({self.config.max_num_batched_tokens}); enable chunked prefill or raise it",
                                 "prompt")
        sp = sampling_params
        eos = getattr(self.tokenizer, "eos_token_id", None)
        guide = self.grammars.guide(sp.structured_output, grammar) if sp.structured_output is not None else None
        allowed = token_mask(sp.allowed_token_ids, self.config.spec.vocab_size) if sp.allowed_token_ids else b""
        req = Request(request_id, list(prompt_token_ids), sp,
                      self.clock() if arrival_time is None else arrival_time, *self.config.slos_of(sp), eos, guide,
                      allowed_mask=allowed, bad_words_ids=bad_words_token_ids(self.tokenizer, sp.bad_words))
        self.scheduler.add(req)
        self._prompts[request_id] = prompt
        self._stops[request_id] = self.stop_checker(sp)
        return req

    def stop_checker(self, sampling: SamplingParams, prior_output_ids: list[int] = ()) -> StopChecker:
        """The stop rules of a request of this engine (its EOS, context and tokenizer)."""
        return StopChecker(sampling, getattr(self.tokenizer, "eos_token_id", None), self.config.spec.max_model_len,
                           self.tokenizer, prior_output_ids)

    def resume_request(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                       output_token_ids: list[int], token_times: list[float], arrival_time: float,
                       prompt: str | None = None, num_preemptions: int = 0, grammar=None) -> Request:
        """Re-admit a request that already generated tokens elsewhere (a fault, a router restart):
        it queues as a recompute preemption, re-prefills prompt + outputs, and goes on sampling.
        grammar: as for add_request."""
        vocab = self.config.spec.vocab_size
        if any(not 0 <= t < vocab for t in output_token_ids):  # e.g. a tampered Redis record
            raise InvalidRequest(f"output token ids must be in [0, {vocab})", "prompt")
        req = self.add_request(request_id, prompt_token_ids, sampling_params, arrival_time, prompt, grammar)
        why = self._replay(req, output_token_ids) if req.guide is not None else None
        if why is not None:
            self.abort(request_id)
            raise InvalidRequest(why, "prompt")
        if output_token_ids:
            req.output_token_ids = list(output_token_ids)
            req.output_logprobs = [None] * len(output_token_ids)
            req.token_times = list(token_times)
            req.first_token_time = token_times[0] if token_times else None
            req.last_token_time = token_times[-1] if token_times else None
            req.num_preemptions = num_preemptions + 1
            self._stops[request_id] = self.stop_checker(sampling_params, output_token_ids)
        return req

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.abort(request_id)
        self._forget(request_id)
        return req is not None

    def fail(self, request_id: str, why: str, from_request: bool = False) -> RequestOutput | None:
        """End one request with an error (its output says why; from_request: the request's own doing);
        the others go on."""
        req = self.scheduler.requests.get(request_id)
        return None if req is None else self._end_with_error(req, why, from_request)

    def _end_with_error(self, req: Request, why: str, from_request: bool = False) -> RequestOutput:
        req.error = why
        if req.request_id in self.scheduler.requests:
            self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
        else:  # it broke after it had finished (its final text, say)
            req.status = RequestStatus.FINISHED_ERROR
        out = self._output(req, new=[])
        out.error_from_request = from_request
        self._forget(req.request_id)
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def fastest_step_seconds(self, repeats: int = 3) -> float:
        """The fastest of `repeats` one-token steps: no step of this engine can take less (the floor of
        the SLOs a server accepts). Call before any request holds blocks: it writes block 0."""
        plan = BatchPlan(0, (SeqPlan("aptray-probe", (0,), 0, CacheKind.KV, (0,), True),))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            self.executor.execute(plan)
            best = min(best, time.perf_counter() - start)
        return best

    # -- the loop ----------------------------------------------------------------------------
    def step(self, want_logits: bool = False) -> EngineStep:
        """One iteration. Raises StepFailed when the executor fails the whole step (then
        recover_failed_step, or a shard rebuild, decides what becomes of its requests)."""
        start = time.perf_counter()
        plan = self.scheduler.schedule(self.clock())
        if self.quarantine:
            plan = self._one_suspect(plan)
        step = EngineStep(schedule_s=time.perf_counter() - start, plan=plan)
        if plan.is_empty:
            return step
        if want_logits:
            plan = type(plan)(plan.iteration, plan.seqs, plan.conversions, True)
        start = time.perf_counter()
        try:
            result = step.result = self.executor.execute(plan)
        except Exception as e:
            raise StepFailed(plan, e) from e
        step.execute_s = time.perf_counter() - start
        if self.quarantine:
            self.quarantine.clear(result.sampled)
        outputs = step.outputs
        outputs += [out for rid, why in result.errors.items()
                    if (out := self.fail(rid, why, from_request=rid in result.client_errors)) is not None]
        for rid, (first, entries) in result.prompt_logprobs.items():
            if (req := self.scheduler.requests.get(rid)) is not None:
                req.prompt_logprobs[first:first + len(entries)] = entries
        for req in self.scheduler.update(plan, result, self.clock()):
            if req.guide is not None:
                why = self._guide_error(req)
                if why is not None:  # the request's grammar, or its filters with it
                    outputs.append(self._end_with_error(req, why, from_request=True))
                    continue
            try:
                if req.sampling.logprobs is not None:
                    req.output_logprobs.append(result.logprobs.get(req.request_id))
                outputs.append(self._postprocess(req))
            except Exception as e:  # a detokenizer or stop check that breaks on this request's tokens
                logger.exception("postprocessing request %s failed", req.request_id)
                outputs.append(self._end_with_error(req, f"postprocessing failed: {e!r}"))
        return step

    @staticmethod
    def _replay(req: Request, output_token_ids: list[int]) -> str | None:
        """Takes a resumed request's output tokens through its grammar; why it cannot go on, if so: a
        token the grammar does not allow, or a grammar that takes too long for one token or for the
        whole replay (the engine thread would stall every other request meanwhile)."""
        start = time.thread_time()
        for token in output_token_ids:
            if not req.guide.accept(token):
                return "the output tokens break the request's structured output"
            if (why := _slow_token(req.guide)) is not None:
                return why
            if time.thread_time() - start > MAX_GUIDE_REPLAY_SECONDS:
                return (f"the structured output took over {MAX_GUIDE_REPLAY_SECONDS:g} s to replay for "
                        f"{len(output_token_ids)} output tokens (an ambiguous grammar)")
        return None

    @staticmethod
    def _guide_error(req: Request) -> str | None:
        """Why req's newest token ends it through its grammar: a token the grammar does not allow, or
        a grammar that took too long for it (aptray.structured_output.Guide); None: it goes on."""
        token, guide = req.output_token_ids[-1], req.guide
        if not guide.accept(token):
            return f"token {token} breaks the request's structured output: {NOTHING_ALLOWED}"
        return _slow_token(guide)

    def _postprocess(self, req: Request) -> RequestOutput:
        status = self.check_stop(req)
        if status is not None:
            self.scheduler.finish(req, status)
        out = self._output(req, new=[req.output_token_ids[-1]])
        if status is not None:
            self._forget(req.request_id)
        return out

    def recover_failed_step(self, plan) -> list[RequestOutput]:
        """After a StepFailed: the step's requests become suspects and go back to the queue as
        recompute preemptions (what the step wrote may be partial); one in too many failed steps ends
        with an error. Returns the outputs of those that ended."""
        involved = [s.request_id for s in plan.seqs] + [c.request_id for c in plan.conversions]
        doomed = self.quarantine.blame(involved)
        outputs = []
        for rid in dict.fromkeys(involved):
            req = self.scheduler.requests.get(rid)
            if req is None:
                continue
            if rid in doomed:
                outputs.append(self.fail(rid, f"request failed {MAX_FAILED_STEPS} steps of the engine"))
            elif req.status is RequestStatus.RUNNING:
                self.scheduler.preempt(req)
        return outputs

    def _one_suspect(self, plan):
        """A plan with at most one quarantined request (StepQuarantine). The others wait: one with
        computed tokens is simply planned again next step; one the plan was to start, or whose
        conversion would not run (its blocks already moved), is sent back to the queue (a policy
        plans a running request's chunk only once it has started)."""
        later = set(self.quarantine.held_back(s.request_id for s in plan.seqs))
        if not later:
            return plan
        converting = {c.request_id for c in plan.conversions}
        for rid in later:
            req = self.scheduler.requests[rid]
            if req.num_computed_tokens == 0 or rid in converting:
                self.scheduler.preempt(req)
        return type(plan)(plan.iteration, tuple(s for s in plan.seqs if s.request_id not in later),
                          tuple(c for c in plan.conversions if c.request_id not in later), plan.want_logits)

    def check_stop(self, req: Request) -> RequestStatus | None:
        """The status that its newest token ends req with (aptray.stop), or None."""
        stops = self._stops[req.request_id]
        status = stops.check(req.output_token_ids[-1], len(req.output_token_ids), req.num_tokens)
        if status is not None:
            req.stop_reason = stops.stop_reason
        return status

    def _output(self, req: Request, new: list[int]) -> RequestOutput:
        finished = req.status.finished
        text = ""
        if req.status is RequestStatus.FINISHED_ERROR:
            pass  # its tokens may be what broke decoding: no text
        elif finished:
            text = self._stops[req.request_id].final_text(req.output_token_ids)
        reason = req.status.value if finished else None
        # a running request's output shares its growing token list: copying it every step costs O(n^2)
        tokens = list(req.output_token_ids) if finished else req.output_token_ids
        logprobs = None
        if req.sampling.logprobs is not None:
            logprobs = list(req.output_logprobs) if finished else req.output_logprobs
        completion = CompletionOutput(0, text, tokens, reason, req.stop_reason, logprobs)
        metrics = None
        if finished:
            metrics = RequestMetrics(req.arrival_time, req.first_token_time, list(req.token_times), req.num_preemptions)
        return RequestOutput(req.request_id, self._prompts.get(req.request_id), req.prompt_token_ids,
                             [completion], finished, metrics, new, req.error,
                             req.prompt_logprobs if req.sampling.prompt_logprobs is not None else None,
                             req.num_cached_tokens)

    def _forget(self, request_id: str) -> None:
        self.quarantine.forget(request_id)
        self._prompts.pop(request_id, None)
        self._stops.pop(request_id, None)
