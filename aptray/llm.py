"""LLM: the offline API, shaped like vLLM's (LLM(model=...).generate(prompts, sampling_params))."""
from __future__ import annotations

import itertools
import logging
from dataclasses import replace

from transformers import AutoTokenizer

from aptray.chat_content import content_text
from aptray.config import EngineConfig
from aptray.engine import Engine, StepFailed
from aptray.executor.local import LocalExecutor
from aptray.outputs import RequestOutput
from aptray.sampling_params import SamplingParams, check_continuation, check_text, choice_seed
from aptray.startup_heap import freeze_startup_heap

logger = logging.getLogger("aptray")


class LLM:
    def __init__(self, model: str, tokenizer: str | None = None, **engine_args):
        self.config = EngineConfig(model=model, tokenizer=tokenizer, **engine_args)
        if self.config.pipeline_parallel_size != 1:
            raise ValueError("pipeline_parallel_size > 1 is simulated only (python -m loadgen sweep --sim --pp N): "
                             "the serving engine runs one stage")
        self.tokenizer = None if self.config.skip_tokenizer_init else AutoTokenizer.from_pretrained(
            self.config.tokenizer)
        self.engine = Engine(self.config, self._executor(), self.tokenizer)
        self._ids = itertools.count()
        freeze_startup_heap()  # the model and the modules live as long as the engine: out of the GC's sight

    def _executor(self):
        """One rank in this process; several in shard actors on the Ray cluster (started here, on this
        machine, when there is none), as vLLM's LLM does."""
        if self.config.tensor_parallel_size == 1:
            return LocalExecutor(self.config)
        try:
            import ray
        except ImportError as e:
            raise ValueError(f"tensor_parallel_size={self.config.tensor_parallel_size} runs shard actors on Ray: "
                             f"install aptray[serve] (ray[serve])") from e
        from aptray.executor.ray import RayExecutor
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        return RayExecutor(self.config)

    def shutdown(self) -> None:
        """Stop the executor's shard actors (a no-op with one rank in this process)."""
        self.engine.executor.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def get_tokenizer(self):
        """The tokenizer prompts are encoded with (vLLM's name)."""
        return self.tokenizer

    def _token_ids(self, prompt) -> tuple[str | None, list[int]]:
        """A prompt as vLLM takes it: text, {"prompt": text} or {"prompt_token_ids": [...]}."""
        if isinstance(prompt, dict) and set(prompt) == {"prompt"} and isinstance(prompt["prompt"], str):
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("skip_tokenizer_init=True: give prompts as {'prompt_token_ids': [...]}")
            return prompt, self.tokenizer.encode(check_text(prompt, param="prompt"))
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return None, list(prompt["prompt_token_ids"])
        raise TypeError("a prompt is a string, {'prompt': text} or {'prompt_token_ids': [...]}")

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        order = []  # each prompt's request ids, one per output sequence
        for prompt, sp in zip(prompts, params):
            text, ids = self._token_ids(prompt)
            rid = str(next(self._ids))
            choices = [rid] if sp.n == 1 else [f"{rid}-{i}" for i in range(sp.n)]
            for i, choice in enumerate(choices):
                choice_sp = sp if sp.n == 1 else replace(sp, n=1, seed=choice_seed(sp.seed, i))
                self.engine.add_request(choice, ids, choice_sp, prompt=text)
            order.append((rid, choices))
        done = self._run([c for _, choices in order for c in choices], use_tqdm)
        return [done[rid] if choices == [rid] else _merged(rid, [done[c] for c in choices]) for rid, choices in order]

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = False, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them, through the chat
        template (the model's, or chat_template), with vLLM's arguments: tools go to the template;
        continue_final_message goes on from the last (assistant) message instead of opening a new one;
        chat_template_kwargs: the template's own variables."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        conversations = [[_with_text_content(m, f"messages[{i}].content") for i, m in enumerate(c)]
                         for c in conversations]
        for message in (m for c in conversations for m in c if isinstance(m, dict)):
            for key, value in message.items():
                if isinstance(value, str):
                    check_text(value, param=key)
        check_continuation(continue_final_message, add_generation_prompt)
        prompts = [self.tokenizer.apply_chat_template(
            c, tokenize=False, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tools=tools, **(chat_template_kwargs or {}))
            for c in conversations]
        return self.generate([{"prompt_token_ids": self.tokenizer.encode(p, add_special_tokens=False)}
                              for p in prompts], sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> dict[str, RequestOutput]:
        """Steps until every request is done: their final outputs by request id."""
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(request_ids), desc="generate")
        while self.engine.has_unfinished():
            try:
                outputs = self.engine.step()
            except StepFailed as e:  # its requests are retried in isolation; one that keeps failing ends
                logger.warning("%s: retrying its requests one suspect at a time", e)
                outputs = self.engine.recover_failed_step(e.plan)
            for out in outputs:
                if out.finished:
                    done[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return done


def _merged(rid: str, choices: list[RequestOutput]) -> RequestOutput:
    """One output of a prompt's n sequences (vLLM's shape): sequence i is choice i's, index i; the
    first choice's metrics and prompt log-probabilities; the first error, if any."""
    first = choices[0]
    outputs = [replace(c.outputs[0], index=i) for i, c in enumerate(choices)]
    error = next((c.error for c in choices if c.error), None)
    return replace(first, request_id=rid, outputs=outputs, error=error)


def _with_text_content(message, param: str):
    """A message whose content is a list of text parts with their texts joined, as the server's chat
    renders it (chat_content); any other message as it is."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    return {**message, "content": content_text(message["content"], message.get("role"), param)}
