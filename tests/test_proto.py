"""Round trips of the shard contract: BatchPlan / StepResult -> proto -> bytes -> back."""
import math
import struct

import pytest

from aptray.plan import BatchPlan, ConversionPlan, SeqPlan, StepResult, TokenLogprobs
from aptray.proto import generate_pb2, shard_pb2
from aptray.proto.convert import (PLAN_VERSION, PlanVersionError, plan_from_proto, plan_to_proto,
                                  result_from_proto, result_to_proto)


def _wire(msg, cls):
    return cls.FromString(msg.SerializeToString())


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def test_batch_plan_round_trip_keeps_every_field():
    plan = BatchPlan(
        iteration=41,
        seqs=(SeqPlan("a", (1, 2, 3), 0, "kv", (4, 5), True, temperature=0.7, top_p=0.9, top_k=7,
                      seed=2**40, sample_index=3, min_p=0.05, logit_bias=((50271, 2.5), (7, -math.inf), (0, -1e-300)),
                      logprobs=20),
              SeqPlan("b", (9,), 17, "hidden", (0,), False),
              SeqPlan("p", (5, 6, 7), 0, "kv", (1,), False, prompt_logprobs=0, prompt_targets=(6, 7, 8),
                      presence_penalty=-2.0, frequency_penalty=0.25, output_counts=((50271, 0), (3, 1)),
                      repetition_penalty=1.25, seen_tokens=(5, 6, 7, 50271)),
              SeqPlan("c", (8,), 5, "kv", (), True, seed=0, logprobs=0, allowed_tokens=b"\x00\xff" * 4)),
        conversions=(ConversionPlan("b", 17, "kv", (0,), (6, 7)),),
        want_logits=True)
    back = plan_from_proto(_wire(plan_to_proto(plan), shard_pb2.BatchPlan))
    assert back == plan
    assert back.seqs[1].seed is None and back.seqs[3].seed == 0  # unset vs zero survive
    assert back.seqs[1].logprobs is None and back.seqs[3].logprobs == 0
    assert back.seqs[1].prompt_logprobs is None and back.seqs[2].prompt_logprobs == 0
    assert back.seqs[3].allowed_tokens == b"\x00\xff" * 4 and back.seqs[0].allowed_tokens == b""
    assert back.seqs[0].repetition_penalty == 1.0 and back.seqs[2].repetition_penalty == 1.25  # unset is off


def test_empty_plan_round_trip():
    plan = BatchPlan(iteration=0)
    assert plan_from_proto(_wire(plan_to_proto(plan), shard_pb2.BatchPlan)) == plan


def test_step_result_round_trip():
    r = StepResult(sampled={"a": 5, "b": 50271}, step_time=0.0123)
    back = result_from_proto(_wire(result_to_proto(r), shard_pb2.StepResult))
    assert back == r and back.logits is None


def test_step_result_errors_round_trip():
    """Failed rows keep their reasons, and which of them are the request's own doing (a 400)."""
    r = StepResult(sampled={"a": 5}, errors={"b": "sampling failed: x", "c": "sampling failed: y"},
                   client_errors={"c"})
    back = result_from_proto(_wire(result_to_proto(r), shard_pb2.StepResult))
    assert back == r and back.client_errors == {"c"}


def test_step_result_logprobs_round_trip():
    lp = {"a": TokenLogprobs(_f32(-0.25), ((3, _f32(-0.25)), (50271, _f32(-1.5))), 1), "b": TokenLogprobs(-9999.0)}
    prompt = {"a": (1, [None, TokenLogprobs(_f32(-3.75), ((9, _f32(-0.5)),), 50272)]), "c": (40, [])}
    r = StepResult(sampled={"a": 3, "b": 7}, step_time=0.01, logprobs=lp, prompt_logprobs=prompt)
    back = result_from_proto(_wire(result_to_proto(r), shard_pb2.StepResult))
    assert back == r and back.logprobs["b"].top == () and back.logprobs["b"].rank is None  # rank unknown
    assert back.prompt_logprobs["a"][1][0] is None  # a row whose logits were not finite


def test_step_result_logits_round_trip():
    import torch
    row = torch.randn(11)
    r = StepResult(sampled={"a": 1}, step_time=0.5, logits={"a": row, "empty": []})
    back = result_from_proto(_wire(result_to_proto(r), shard_pb2.StepResult))
    assert back.logits["a"] == [_f32(x) for x in row.tolist()]
    assert back.logits["empty"] == []


def test_version_mismatch_rejected():
    msg = plan_to_proto(BatchPlan(iteration=1))
    msg.version = PLAN_VERSION + 1
    with pytest.raises(PlanVersionError):
        plan_from_proto(msg)


def test_shard_error_raises():
    with pytest.raises(RuntimeError, match="boom"):
        result_from_proto(result_to_proto(StepResult(), error="boom"))


def test_generate_request_oneof_and_optional_fields():
    req = generate_pb2.GenerateRequest(prompt_token_ids=generate_pb2.TokenIds(ids=[1, 2]),
                                       sampling=generate_pb2.Sampling(temperature=0.0, max_tokens=4),
                                       slo=generate_pb2.Slo(ttft_ms=250))
    back = _wire(req, generate_pb2.GenerateRequest)
    assert back.WhichOneof("input") == "prompt_token_ids"
    assert back.sampling.HasField("temperature") and back.sampling.temperature == 0.0
    assert not back.sampling.HasField("top_p") and not back.slo.HasField("tbt_ms")


def test_structured_output_request_fields():
    """The client sets one structure and version 4; the server reads it back as StructuredOutput's fields."""
    from aptray.client import build_request
    from aptray.serve.grpc_api import sampling_from_proto
    from aptray.structured_output import StructuredOutput

    cases = [(dict(json_schema={"type": "object"}), StructuredOutput("json", '{"type": "object"}')),
             (dict(json_schema='{"type": "array"}'), StructuredOutput("json", '{"type": "array"}')),
             (dict(json_object=True), StructuredOutput("json_object")),
             (dict(regex="[a-z]+"), StructuredOutput("regex", "[a-z]+")),
             (dict(choice=["yes", "no"]), StructuredOutput("choice", ("yes", "no"))),
             (dict(grammar='root ::= "a"'), StructuredOutput("grammar", 'root ::= "a"'))]
    for kwargs, want in cases:
        req = _wire(build_request("hi", **kwargs), generate_pb2.GenerateRequest)
        assert req.version == 4
        assert StructuredOutput(**sampling_from_proto(req)["structured_output"]) == want
    plain = _wire(build_request("hi", logprobs=1), generate_pb2.GenerateRequest)
    assert plain.version == 3 and sampling_from_proto(plain)["structured_output"] is None
    with pytest.raises(ValueError, match="at most one structure"):
        build_request("hi", regex="a", choice=["a"])
    off = generate_pb2.GenerateRequest(prompt="hi", sampling=generate_pb2.Sampling(
        structured_output=generate_pb2.StructuredOutput(json_object=False)))
    assert sampling_from_proto(_wire(off, generate_pb2.GenerateRequest))["structured_output"] is None  # no structure
    empty = generate_pb2.GenerateRequest(prompt="hi", sampling=generate_pb2.Sampling(
        structured_output=generate_pb2.StructuredOutput()))
    assert sampling_from_proto(_wire(empty, generate_pb2.GenerateRequest))["structured_output"] == {"kind": "",
                                                                                                    "spec": ""}


def test_float_fields_read_as_the_client_wrote_them():
    """A float32 field holds 0.01 as 0.0099999998: read back as 0.01, repetition_penalty's floor is
    accepted over gRPC as over HTTP; NaN stays NaN (refused at admission)."""
    from aptray.client import build_request
    from aptray.sampling_params import SamplingParams
    from aptray.serve.grpc_api import sampling_from_proto

    req = _wire(build_request("hi", repetition_penalty=0.01, temperature=0.7, top_p=0.95, min_p=0.05,
                              presence_penalty=-2.0, frequency_penalty=1.1), generate_pb2.GenerateRequest)
    sampling = sampling_from_proto(req)
    assert (sampling["repetition_penalty"], sampling["temperature"], sampling["top_p"], sampling["min_p"],
            sampling["presence_penalty"], sampling["frequency_penalty"]) == (0.01, 0.7, 0.95, 0.05, -2.0, 1.1)
    SamplingParams(**sampling)  # within every range
    nan = _wire(build_request("hi", temperature=math.nan), generate_pb2.GenerateRequest)
    assert math.isnan(sampling_from_proto(nan)["temperature"])
