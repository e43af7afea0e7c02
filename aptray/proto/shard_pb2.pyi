from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SeqPlan(_message.Message):
    __slots__ = ("request_id", "token_ids", "start_pos", "cache_kind", "block_table", "sample", "temperature", "top_p", "top_k", "seed", "sample_index", "min_p", "bias_ids", "bias_values", "logprobs", "prompt_logprobs", "prompt_targets", "presence_penalty", "frequency_penalty", "count_ids", "count_values", "allowed_tokens", "repetition_penalty", "seen_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    CACHE_KIND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    BIAS_IDS_FIELD_NUMBER: _ClassVar[int]
    BIAS_VALUES_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TARGETS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    COUNT_IDS_FIELD_NUMBER: _ClassVar[int]
    COUNT_VALUES_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEEN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    start_pos: int
    cache_kind: str
    block_table: _containers.RepeatedScalarFieldContainer[int]
    sample: bool
    temperature: float
    top_p: float
    top_k: int
    seed: int
    sample_index: int
    min_p: float
    bias_ids: _containers.RepeatedScalarFieldContainer[int]
    bias_values: _containers.RepeatedScalarFieldContainer[float]
    logprobs: int
    prompt_logprobs: int
    prompt_targets: _containers.RepeatedScalarFieldContainer[int]
    presence_penalty: float
    frequency_penalty: float
    count_ids: _containers.RepeatedScalarFieldContainer[int]
    count_values: _containers.RepeatedScalarFieldContainer[int]
    allowed_tokens: bytes
    repetition_penalty: float
    seen_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., start_pos: _Optional[int] = ..., cache_kind: _Optional[str] = ..., block_table: _Optional[_Iterable[int]] = ..., sample: _Optional[bool] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., sample_index: _Optional[int] = ..., min_p: _Optional[float] = ..., bias_ids: _Optional[_Iterable[int]] = ..., bias_values: _Optional[_Iterable[float]] = ..., logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[int] = ..., prompt_targets: _Optional[_Iterable[int]] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., count_ids: _Optional[_Iterable[int]] = ..., count_values: _Optional[_Iterable[int]] = ..., allowed_tokens: _Optional[bytes] = ..., repetition_penalty: _Optional[float] = ..., seen_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ConversionPlan(_message.Message):
    __slots__ = ("request_id", "num_tokens", "to_kind", "src_blocks", "dst_blocks")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TO_KIND_FIELD_NUMBER: _ClassVar[int]
    SRC_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_tokens: int
    to_kind: str
    src_blocks: _containers.RepeatedScalarFieldContainer[int]
    dst_blocks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., to_kind: _Optional[str] = ..., src_blocks: _Optional[_Iterable[int]] = ..., dst_blocks: _Optional[_Iterable[int]] = ...) -> None: ...

class BatchPlan(_message.Message):
    __slots__ = ("version", "iteration", "seqs", "conversions", "want_logits")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    CONVERSIONS_FIELD_NUMBER: _ClassVar[int]
    WANT_LOGITS_FIELD_NUMBER: _ClassVar[int]
    version: int
    iteration: int
    seqs: _containers.RepeatedCompositeFieldContainer[SeqPlan]
    conversions: _containers.RepeatedCompositeFieldContainer[ConversionPlan]
    want_logits: bool
    def __init__(self, version: _Optional[int] = ..., iteration: _Optional[int] = ..., seqs: _Optional[_Iterable[_Union[SeqPlan, _Mapping]]] = ..., conversions: _Optional[_Iterable[_Union[ConversionPlan, _Mapping]]] = ..., want_logits: _Optional[bool] = ...) -> None: ...

class LogitsRow(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class TokenLogprobs(_message.Message):
    __slots__ = ("logprob", "top_ids", "top_logprobs", "rank")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    rank: int
    def __init__(self, logprob: _Optional[float] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., rank: _Optional[int] = ...) -> None: ...

class PromptLogprobs(_message.Message):
    __slots__ = ("first_position", "tokens")
    FIRST_POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    first_position: int
    tokens: _containers.RepeatedCompositeFieldContainer[TokenLogprobs]
    def __init__(self, first_position: _Optional[int] = ..., tokens: _Optional[_Iterable[_Union[TokenLogprobs, _Mapping]]] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("version", "sampled", "step_time", "has_logits", "logits", "error", "request_errors", "logprobs", "prompt_logprobs", "client_errors")
    class SampledEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class LogitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: LogitsRow
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[LogitsRow, _Mapping]] = ...) -> None: ...
    class RequestErrorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LogprobsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TokenLogprobs
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TokenLogprobs, _Mapping]] = ...) -> None: ...
    class PromptLogprobsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: PromptLogprobs
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[PromptLogprobs, _Mapping]] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_FIELD_NUMBER: _ClassVar[int]
    HAS_LOGITS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ERRORS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ERRORS_FIELD_NUMBER: _ClassVar[int]
    version: int
    sampled: _containers.ScalarMap[str, int]
    step_time: float
    has_logits: bool
    logits: _containers.MessageMap[str, LogitsRow]
    error: str
    request_errors: _containers.ScalarMap[str, str]
    logprobs: _containers.MessageMap[str, TokenLogprobs]
    prompt_logprobs: _containers.MessageMap[str, PromptLogprobs]
    client_errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., sampled: _Optional[_Mapping[str, int]] = ..., step_time: _Optional[float] = ..., has_logits: _Optional[bool] = ..., logits: _Optional[_Mapping[str, LogitsRow]] = ..., error: _Optional[str] = ..., request_errors: _Optional[_Mapping[str, str]] = ..., logprobs: _Optional[_Mapping[str, TokenLogprobs]] = ..., prompt_logprobs: _Optional[_Mapping[str, PromptLogprobs]] = ..., client_errors: _Optional[_Iterable[str]] = ...) -> None: ...

class ShardInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("version", "rank", "world_size", "num_blocks")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    version: int
    rank: int
    world_size: int
    num_blocks: int
    def __init__(self, version: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., num_blocks: _Optional[int] = ...) -> None: ...
