"""A router's fault paths (docs/RELIABILITY.md), as part of its EngineLoop.

A shard group that dies mid-step is rebuilt and its requests resumed from their generated tokens;
a router that dies is recreated by its ingress and resumes the requests Redis lists for its owner
(requests of owners gone for good are closed); clients re-attach with the tokens they have seen.
"""
from __future__ import annotations

import logging

from aptray.sampling_params import SamplingParams
from aptray.serve.resume import Resumable, finished_reason, from_meta, from_request, readmit
from aptray.serve.streams import ClientStream
from aptray.store import RequestStore

logger = logging.getLogger("aptray")


def close_orphans(store: RequestStore) -> None:
    """Requests of replicas that are gone for good (no heartbeat): nobody can resume them."""
    try:
        for owner in store.orphaned_owners():
            other = store.for_owner(owner)
            left = other.unfinished()
            for m in left:
                other.finish(m.request_id, "abort")
            logger.warning("closed %d requests of the departed replica %s", len(left), owner)
    except Exception:
        logger.exception("could not look for orphaned requests")


class RecoveryMixin:
    """EngineLoop's fault handling (it provides engine, streams, writer, faults, resumes, ...)."""

    def resume_from_store(self, store: RequestStore) -> None:
        """The previous router of this replica died: its requests go on from the tokens Redis has;
        clients that re-attach get the rest of their stream (Router.admit with seen_token_ids)."""
        try:
            left = store.unfinished()
        except Exception:  # Redis away: clients re-attaching bring their own state
            logger.exception("could not read in-flight requests from the store")
            return
        for m in left:
            try:
                sp = SamplingParams(**m.sampling)
            except (TypeError, ValueError):
                self.writer.finish(m.request_id, "error")
                continue
            self.streams[m.request_id] = ClientStream(self.tokenizer, False, m.ttft_slo, m.tbt_slo, list(sp.stop),
                                                      m.prompt_len, list(m.output_token_ids))
            self.writer.track(m)
            self.resume(from_meta(m, sp), "store")
        if left:
            logger.warning("router restart: resumed %d requests from the store", len(left))

    def rebuild_shards(self, why: str, failed_plan=None) -> None:
        """New shard actors and a new engine; every request goes on from the tokens it has.
        failed_plan: the step that failed, whose requests become suspects (StepQuarantine)."""
        if failed_plan is not None:
            self._publish(self.engine.recover_failed_step(failed_plan))
        self.rebuilds_in_a_row += 1
        if self.rebuilds_in_a_row > self.args.max_shard_rebuilds:
            self.broken = f"shard group lost {self.rebuilds_in_a_row} times in a row: {why}"
            logger.error(self.broken)
            self.fail_all(self.broken)
            return
        logger.warning("shard group lost (%s): rebuilding, %d requests to resume", why,
                       len(self.engine.scheduler.requests))
        snapshot = sorted((from_request(r) for r in self.engine.scheduler.requests.values()),
                          key=lambda r: r.arrival_time)
        self.executor.shutdown(graceful=False)
        quarantine = self.engine.quarantine
        try:
            self.start_engine()
            self.engine.quarantine = quarantine
        except Exception as e:
            logger.exception("shard group rebuild failed")
            self.broken = f"shard group could not be rebuilt: {e!r}"
            self.fail_all(self.broken)
            return
        self.faults["shard_rebuilds"] += 1
        for r in snapshot:
            self.resumes[r.request_id] += 1
            if self.resumes[r.request_id] > self.args.max_resumes_per_request:
                self.fail(r.request_id, f"request lost its shards {self.resumes[r.request_id]} times")
            else:
                self.resume(r, "shards")

    def resume(self, r: Resumable, source: str) -> None:
        reason = finished_reason(r, self.engine)
        if reason is not None:  # its last token was generated, the finish was lost with the fault
            self._finish_resumed(r, reason)
            return
        try:
            readmit(self.engine, r)
        except ValueError as e:  # e.g. a restart with a smaller context
            self.fail(r.request_id, f"could not resume: {e}", status=400)
            return
        self.faults[f"resumed_{source}"] += 1

    def _finish_resumed(self, r: Resumable, reason: str) -> None:
        text = self.tokenizer.decode(r.output_token_ids, skip_special_tokens=True)
        for s in r.sampling.stop:
            at = text.find(s)
            if at >= 0:
                text = text[:at]
        self.writer.finish(r.request_id, reason)
        stream = self.streams.pop(r.request_id, None)
        if stream is None or not stream.attached:
            self.unclaim(r.request_id, r.output_token_ids, text, reason)
            return
        self.send_final(stream, r.request_id, r.output_token_ids, text, reason)
