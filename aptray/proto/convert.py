"""BatchPlan / StepResult <-> shard.proto messages: the only way plans cross the network (no pickle)."""
from __future__ import annotations

from aptray.plan import BatchPlan, ConversionPlan, SeqPlan, StepResult, TokenLogprobs
from aptray.proto import shard_pb2
from aptray.request import CacheKind

PLAN_VERSION = 6  # bump with any incompatible change to shard.proto
# a cache kind travels as its value (dict lookups: CacheKind(x) is slow on this path)
_WIRE = {kind: kind.value for kind in CacheKind}
_KIND = {kind.value: kind for kind in CacheKind}


class PlanVersionError(ValueError):
    pass


def _check_version(version: int, what: str) -> None:
    if version != PLAN_VERSION:
        raise PlanVersionError(f"{what} has contract version {version}, this side speaks {PLAN_VERSION}")


def seq_to_proto(s: SeqPlan) -> shard_pb2.SeqPlan:
    msg = shard_pb2.SeqPlan(request_id=s.request_id, token_ids=s.token_ids, start_pos=s.start_pos,
                            cache_kind=_WIRE[s.cache_kind], block_table=s.block_table, sample=s.sample,
                            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                            sample_index=s.sample_index, min_p=s.min_p, presence_penalty=s.presence_penalty,
                            frequency_penalty=s.frequency_penalty, allowed_tokens=s.allowed_tokens,
                            repetition_penalty=s.repetition_penalty, seen_tokens=s.seen_tokens)
    if s.logit_bias:
        ids, values = zip(*s.logit_bias)
        msg.bias_ids.extend(ids)
        msg.bias_values.extend(values)
    if s.seed is not None:
        msg.seed = s.seed
    if s.logprobs is not None:
        msg.logprobs = s.logprobs
    if s.prompt_logprobs is not None:
        msg.prompt_logprobs = s.prompt_logprobs
        msg.prompt_targets.extend(s.prompt_targets)
    if s.output_counts:
        msg.count_ids.extend(s.output_counts[0])
        msg.count_values.extend(s.output_counts[1])
    return msg


def seq_from_proto(m: shard_pb2.SeqPlan) -> SeqPlan:
    return SeqPlan(request_id=m.request_id, token_ids=tuple(m.token_ids), start_pos=m.start_pos,
                   cache_kind=_KIND[m.cache_kind], block_table=tuple(m.block_table), sample=m.sample,
                   temperature=m.temperature, top_p=m.top_p, top_k=m.top_k,
                   seed=m.seed if m.HasField("seed") else None, sample_index=m.sample_index, min_p=m.min_p,
                   logit_bias=tuple(zip(m.bias_ids, m.bias_values)),
                   logprobs=m.logprobs if m.HasField("logprobs") else None,
                   prompt_logprobs=m.prompt_logprobs if m.HasField("prompt_logprobs") else None,
                   prompt_targets=tuple(m.prompt_targets), presence_penalty=m.presence_penalty,
                   frequency_penalty=m.frequency_penalty,
                   output_counts=(tuple(m.count_ids), tuple(m.count_values)) if m.count_ids else (),
                   allowed_tokens=m.allowed_tokens, repetition_penalty=m.repetition_penalty or 1.0,
                   seen_tokens=tuple(m.seen_tokens))


def plan_to_proto(plan: BatchPlan) -> shard_pb2.BatchPlan:
    return shard_pb2.BatchPlan(
        version=PLAN_VERSION, iteration=plan.iteration, want_logits=plan.want_logits,
        seqs=[seq_to_proto(s) for s in plan.seqs],
        conversions=[shard_pb2.ConversionPlan(request_id=c.request_id, num_tokens=c.num_tokens,
                                              to_kind=_WIRE[c.to_kind], src_blocks=c.src_blocks,
                                              dst_blocks=c.dst_blocks) for c in plan.conversions])


def plan_from_proto(m: shard_pb2.BatchPlan) -> BatchPlan:
    _check_version(m.version, "BatchPlan")
    return BatchPlan(
        iteration=m.iteration, want_logits=m.want_logits,
        seqs=tuple(seq_from_proto(s) for s in m.seqs),
        conversions=tuple(ConversionPlan(request_id=c.request_id, num_tokens=c.num_tokens, to_kind=_KIND[c.to_kind],
                                         src_blocks=tuple(c.src_blocks), dst_blocks=tuple(c.dst_blocks))
                          for c in m.conversions))


def _row_to_floats(row) -> list[float]:
    # logits rows arrive as torch tensors from the model runner; keep this module torch-free
    return row.tolist() if hasattr(row, "tolist") else list(row)


def result_to_proto(r: StepResult, error: str = "") -> shard_pb2.StepResult:
    msg = shard_pb2.StepResult(version=PLAN_VERSION, step_time=r.step_time, error=error)
    msg.sampled.update({k: int(v) for k, v in r.sampled.items()})
    msg.request_errors.update(r.errors)
    msg.client_errors.extend(sorted(r.client_errors))
    for rid, lp in r.logprobs.items():
        logprobs_to_proto(lp, msg.logprobs[rid])
    for rid, (first, entries) in r.prompt_logprobs.items():
        scored = msg.prompt_logprobs[rid]
        scored.first_position = first
        for lp in entries:
            logprobs_to_proto(lp, scored.tokens.add())
    if r.logits is not None:
        msg.has_logits = True
        for rid, row in r.logits.items():
            msg.logits[rid].values.extend(_row_to_floats(row))
    return msg


def result_from_proto(m: shard_pb2.StepResult) -> StepResult:
    """Logits rows come back as lists of float32-rounded Python floats."""
    _check_version(m.version, "StepResult")
    if m.error:
        raise RuntimeError(f"shard step failed: {m.error}")
    logits = {rid: list(row.values) for rid, row in m.logits.items()} if m.has_logits else None
    return StepResult(sampled=dict(m.sampled), step_time=m.step_time, logits=logits, errors=dict(m.request_errors),
                      client_errors=set(m.client_errors),
                      logprobs={rid: logprobs_from_proto(lp) for rid, lp in m.logprobs.items()},
                      prompt_logprobs={rid: (p.first_position, [logprobs_from_proto(lp) for lp in p.tokens])
                                       for rid, p in m.prompt_logprobs.items()})


def logprobs_to_proto(lp: TokenLogprobs | None, msg) -> None:
    """Into a TokenLogprobs message of shard.proto or generate.proto (their fields are the same)."""
    if lp is None:
        return
    msg.logprob = lp.logprob
    if lp.top:
        ids, values = zip(*lp.top)
        msg.top_ids.extend(ids)
        msg.top_logprobs.extend(values)
    if lp.rank is not None:
        msg.rank = lp.rank


def logprobs_from_proto(msg) -> TokenLogprobs | None:
    if not msg.HasField("logprob"):
        return None
    return TokenLogprobs(msg.logprob, tuple(zip(msg.top_ids, msg.top_logprobs)),
                         msg.rank if msg.HasField("rank") else None)
