"""OpenAI-compatible request/response models (the subset aptray serves) plus aptray_slo."""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from aptray.chat_content import content_text
from aptray.sampling_params import (MAX_CACHE_SALT, MAX_LOGPROBS, MAX_PENALTY, MAX_REPETITION_PENALTY,
                                    MIN_REPETITION_PENALTY, InvalidRequest, check_text)


Text = Annotated[str, AfterValidator(check_text)]  # a string field the server reads


class ClientModel(BaseModel):
    """A model of what a client sends: each field in its JSON type, as OpenAI's API takes it (a float
    field takes a number, an int field an integer, a bool field true or false: never "0.5", true for
    a number or 2.0 for a count), and no NaN or infinity."""
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


def _if_asked():
    """A field the client asks for (return_token_ids): left out of the JSON unless it has a value."""
    return Field(None, exclude_if=lambda v: v is None)


class AptraySlo(ClientModel):
    ttft_ms: float | None = Field(None, gt=0)
    tbt_ms: float | None = Field(None, gt=0)


class StreamOptions(ClientModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every event carries the usage so far

    def continuous(self) -> bool:
        return self.include_usage and self.continuous_usage_stats


# OpenAI and vLLM fields that change what is generated, which aptray does not implement, with their
# no-op values: a request may send those (clients and benchmark tools send defaults), any other value
# is refused rather than silently ignored
UNSUPPORTED = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []), "tool_choice": (None, "none", "auto"),  # a completion's (chat declares them)
    "functions": (None, []), "function_call": (None, "none", "auto"), "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    # vLLM's, which would change the output if they were ignored
    "prompt_embeds": (None,), "logits_processors": (None,), "return_tokens_as_token_ids": (None, False),
    "spaces_between_special_tokens": (None, True),
    "echo": (None, False),  # a chat's (a completion declares it)
    "chat_template": (None,), "documents": (None,), "mm_processor_kwargs": (None,), "kv_transfer_params": (None,),
    "structural_tag": (None,), "guided_whitespace_pattern": (None,), "vllm_xargs": (None,),
    "priority": (None, 0),  # vLLM's with its priority scheduler; aptray's schedulers order by SLOs
    # OpenAI's: outputs other than text, and a predicted output to edit
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
}


class JsonSchemaFormat(ClientModel):
    """response_format's json_schema (OpenAI's shape): the schema holds the output; name, description
    and strict are taken and not used (the output always follows the schema)."""
    name: Text = "response"
    description: Text | None = None
    schema_: dict = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(ClientModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(ClientModel):
    """vLLM's structured_outputs: one of a JSON schema (an object, or its JSON text), any JSON
    object, a regex, a list of choices, or an EBNF grammar."""
    model_config = ConfigDict(extra="forbid")
    json_: dict | Text | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None


def _json_text(schema: dict, param: str) -> str:
    try:
        return json.dumps(schema)
    except (ValueError, RecursionError):
        raise InvalidRequest("the JSON schema cannot be written as JSON (nested too deep)", param) from None


def structured_output(response_format: ResponseFormat | None, outputs: StructuredOutputs | None,
                      guided: StructuredOutputs | None = None) -> dict | None:
    """The request's structure as aptray.structured_output.StructuredOutput's fields, or None (free
    text). guided: vLLM's older guided_json, guided_regex, guided_choice and guided_grammar fields, as
    structured_outputs. Raises InvalidRequest where the fields ask for two things or for nothing."""
    asked = []
    if response_format is not None and response_format.type == "json_object":
        asked.append(("response_format", {"kind": "json_object"}))
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None:
            raise InvalidRequest("response_format of type json_schema needs its json_schema", "response_format")
        asked.append(("response_format", {"kind": "json", "spec": _json_text(response_format.json_schema.schema_,
                                                                               "response_format")}))
    for fields in (outputs, guided):
        if fields is None:
            continue
        kinds = [(name, value) for name, value in (("json", fields.json_), ("json_object", fields.json_object),
                                                   ("regex", fields.regex), ("choice", fields.choice),
                                                   ("grammar", fields.grammar)) if value not in (None, False)]
        if fields is guided and len(kinds) > 1:
            raise InvalidRequest("send one of guided_json, guided_regex, guided_choice and guided_grammar",
                                 f"guided_{kinds[-1][0]}")
        if len(kinds) != 1:
            raise InvalidRequest("structured_outputs takes exactly one of json, json_object, regex, choice and "
                                 "grammar", "structured_outputs")
        kind, spec = kinds[0]
        param = "structured_outputs" if fields is outputs else f"guided_{kind}"
        if kind == "json" and not isinstance(spec, str):
            spec = _json_text(spec, param)
        elif kind in ("json_object", "choice"):
            spec = "" if kind == "json_object" else tuple(spec)
        asked.append((param, {"kind": kind, "spec": spec}))
    if len(asked) > 1:
        raise InvalidRequest(f"{' and '.join(p for p, _ in asked)} each ask for a structure: send one", asked[-1][0])
    return asked[0][1] if asked else None


class _SamplingRequest(ClientModel):
    # other fields (user, metadata...) are accepted and ignored, UNSUPPORTED ones only at their no-op
    # values (unsupported_field); NaN and infinities in no field the server reads
    model_config = ConfigDict(extra="allow")
    model: Text | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1  # vLLM extension
    min_p: float = Field(0.0, ge=0, le=1)  # vLLM extension
    min_tokens: int = Field(0, ge=0)  # vLLM extension
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> bias in [-100, 100]
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)  # vLLM extension
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # vLLM extension
    include_stop_str_in_output: bool = False  # vLLM extension
    # vLLM extension: cached prefixes are shared only among requests of the same salt
    cache_salt: Text | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT)
    allowed_token_ids: list[int] | None = None  # vLLM extension: the only tokens it may sample
    bad_words: list[Text] | None = None  # vLLM extension: words the reply never has
    # vLLM extension: keep the prompt's last k tokens (-1: as many as the server takes); None: all
    truncate_prompt_tokens: int | None = None
    aptray_slo: AptraySlo | None = None
    return_token_ids: bool = False  # vLLM extension: the prompt's and the reply's token ids beside the text
    # vLLM extension: each prompt token's log-probability, rank and this many most likely tokens' (not streamed)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM extension
    # vLLM's older names of structured_outputs' fields
    guided_json: dict | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None

    def sampling(self, max_tokens: int) -> dict:
        """The request's SamplingParams fields (checked at admission); InvalidRequest where its
        structured output is malformed."""
        slo = self.aptray_slo
        if self.prompt_logprobs is not None and self.stream:
            raise InvalidRequest("prompt_logprobs are not available with stream: true", "prompt_logprobs")
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                "max_tokens": max_tokens, "min_tokens": self.min_tokens, "stop": self.stop,
                "stop_token_ids": self.stop_token_ids or [], "logit_bias": self.logit_bias or {},
                "logprobs": self.logprobs_asked(), "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty,
                "seed": self.seed, "ignore_eos": self.ignore_eos, "structured_output": self.structured_output(),
                "skip_special_tokens": self.skip_special_tokens,
                "include_stop_str_in_output": self.include_stop_str_in_output, "cache_salt": self.cache_salt,
                "allowed_token_ids": self.allowed_token_ids, "bad_words": self.bad_words or [],
                "prompt_logprobs": self.prompt_logprobs,
                "ttft_slo": slo.ttft_ms / 1000 if slo and slo.ttft_ms else None,
                "tbt_slo": slo.tbt_ms / 1000 if slo and slo.tbt_ms else None}

    def structured_output(self) -> dict | None:
        guided = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                  "grammar": self.guided_grammar}
        guided = {k: v for k, v in guided.items() if v is not None}
        return structured_output(self.response_format, self.structured_outputs,
                                 StructuredOutputs(**guided) if guided else None)


def unsupported_field(req: BaseModel, unsupported: dict = UNSUPPORTED) -> str | None:
    """The first field the request sets to a value aptray cannot honour (a name in unsupported, at
    none of its no-op values), if any."""
    for name, value in (req.model_extra or {}).items():
        if name in unsupported and not any(_same(value, v) for v in unsupported[name]):
            return name
    return None


def _same(value, noop) -> bool:
    # False == 0 in Python: a bool matches a bool only
    return value is noop or (value == noop and isinstance(value, bool) == isinstance(noop, bool))


class CompletionRequest(_SamplingRequest):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    add_special_tokens: bool = True  # vLLM's: the tokenizer's own (BOS...) before a text prompt
    # each output token's log-probability and this many of the most likely tokens' (OpenAI allows 5)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def logprobs_asked(self) -> int | None:
        return self.logprobs


class ChatMessage(ClientModel):
    """A message as the chat template gets it: an assistant's may carry tool_calls (and no content),
    a tool's the tool_call_id it answers. content may be a list of text parts, which the template
    gets joined (text()); they are checked there, where a part that is not text is a 400 naming it."""
    role: Text
    content: Text | list[dict] | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: Text | None = None
    name: Text | None = None

    def text(self, param: str = "content") -> str | None:
        """Its content as the chat template gets it (chat_content.content_text); InvalidRequest naming
        param where a part is not text."""
        return content_text(self.content, self.role, param)

    def chars(self, param: str = "content") -> int:
        """Its size before tokenizing (limits.size_error): its parts' text joined."""
        calls = len(json.dumps(self.tool_calls)) if self.tool_calls else 0
        return len(self.role) + len(self.text(param) or "") + calls


class ToolFunction(ClientModel):
    name: Text
    description: Text | None = None
    parameters: dict | None = None  # a JSON schema of its arguments; None: none
    strict: bool | None = None


class Tool(ClientModel):
    type: Literal["function"]
    function: ToolFunction


class ToolName(ClientModel):
    name: Text


class NamedToolChoice(ClientModel):
    type: Literal["function"]
    function: ToolName


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    # "none": text; "required": one call or more; a named function: a call of it ("auto" needs a
    # parser of the model's own tool-call format: refused, aptray.serve.tools)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: one call at most; None: OpenAI's default, true
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False  # each output token's log-probability
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # with logprobs: this many most likely tokens'
    # vLLM's: the chat template's own options (tools.template_kwargs checks them)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # go on from the last (assistant) message instead of opening one
    chat_template_kwargs: dict | None = None
    add_special_tokens: bool = False  # the tokenizer's own (BOS...) besides the template's

    def logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens found in the prefix cache: not computed again


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = _if_asked()  # OpenAI's; where known


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: per token its text, log-probability, the top tokens' and its offset in
    the text. null where unknown (a token sampled before the request was resumed)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class PromptLogprob(BaseModel):
    """vLLM's Logprob, as its prompt_logprobs show each token: by token id (a JSON key: a string)."""
    logprob: float
    rank: int | None  # 1: the most likely token; None: not known
    decoded_token: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float | None  # None: unknown (a token sampled before the request was resumed)
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class LogprobsRenderer:
    """Tokens' log-probabilities (aptray.plan.TokenLogprobs, or None where unknown) in OpenAI's shapes.
    token_text: a token id's text; token_bytes: its bytes (chat's `bytes`; None: its text's UTF-8);
    offset: where the next token's text starts (completions)."""

    def __init__(self, token_text, token_bytes=None, offset: int = 0):
        self.token_text, self.token_bytes, self.offset = token_text, token_bytes, offset

    def completion(self, token_ids: list[int], logprobs: list) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for t, lp in zip(token_ids, logprobs):
            text = self.token_text(t)
            out.tokens.append(text)
            out.token_logprobs.append(None if lp is None else lp.logprob)
            out.top_logprobs.append(None if lp is None else {self.token_text(i): v for i, v in lp.top})
            out.text_offset.append(self.offset)
            self.offset += len(text)
        return out

    def chat(self, token_ids: list[int], logprobs: list) -> ChatLogprobs:
        content = []
        for t, lp in zip(token_ids, logprobs):
            if lp is None:
                content.append(ChatTokenLogprob(**self._chat_token(t, None), top_logprobs=[]))
                continue
            top = [TopLogprob(**self._chat_token(i, v)) for i, v in lp.top]
            content.append(ChatTokenLogprob(**self._chat_token(t, lp.logprob), top_logprobs=top))
        return ChatLogprobs(content=content)

    def prompt(self, token_ids: list[int], logprobs: list) -> list[dict[str, PromptLogprob] | None]:
        """vLLM's prompt_logprobs: for each prompt token (None for the first) its own entry and the most
        likely tokens', by token id; the most likely token is rank 1."""
        out = []
        for t, lp in zip(token_ids, logprobs):
            if lp is None:
                out.append(None)
                continue
            entries = {str(i): PromptLogprob(logprob=v, rank=r, decoded_token=self.token_text(i))
                       for r, (i, v) in enumerate(lp.top, 1)}
            entries.setdefault(str(t), PromptLogprob(logprob=lp.logprob, rank=lp.rank,
                                                     decoded_token=self.token_text(t)))
            out.append(entries)
        return out

    def _chat_token(self, token_id: int, logprob: float | None) -> dict:
        text = self.token_text(token_id)
        raw = self.token_bytes(token_id) if self.token_bytes is not None else text.encode()
        return {"token": text, "logprob": logprob, "bytes": list(raw)}


def top_of(logprobs: list, k: int) -> list:
    """logprobs with at most k most likely tokens each (a prompt scored for two asks of different k)."""
    return [lp if lp is None or len(lp.top) <= k else lp._replace(top=lp.top[:k]) for lp in logprobs]


def chunk_logprobs(chunk: dict) -> list:
    """A chunk's tokens' log-probabilities; None for each where the chunk has none (relayed after a resume)."""
    return chunk.get("logprobs") or [None] * len(chunk["token_ids"])


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    token_ids: list[int] | None = _if_asked()  # a stream's: this event's tokens
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = _if_asked()  # a stream's: in its first event only
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = _if_asked()


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatChoiceMessage(BaseModel):
    role: str = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = _if_asked()


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    token_ids: list[int] | None = _if_asked()
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = _if_asked()
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = _if_asked()


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None
    # streamed tool calls: {index, and in a call's first delta id, type and function.name;
    # function.arguments: the next piece of its JSON}
    tool_calls: list[dict] | None = _if_asked()


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    token_ids: list[int] | None = _if_asked()
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = _if_asked()  # in the first event (the role's) only


class TokenizeCompletionRequest(ClientModel):
    """vLLM's /tokenize of a prompt."""
    model: Text | None = None
    prompt: Text
    add_special_tokens: bool = True
    return_token_strs: bool = False  # each token's string (the tokenizer's own, convert_ids_to_tokens)


class TokenizeChatRequest(ClientModel):
    """vLLM's /tokenize of a conversation, through the chat template as a chat request's."""
    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None
    add_special_tokens: bool = False
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = _if_asked()


class DetokenizeRequest(ClientModel):
    model: Text | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "aptray"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
            503: "service_unavailable"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(reason: str | None) -> str | None:
    """Engine reasons to OpenAI's: stop/length pass through; an abort reads as a stop."""
    return None if reason is None else ("length" if reason == "length" else "stop")
