"""RayExecutor: shard actors in a STRICT_PACK placement group, one gRPC Plan() per rank per step."""
from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import uuid

import grpc

from aptray.config import EngineConfig
from aptray.executor.base import Executor
from aptray.plan import BatchPlan, StepResult
from aptray.proto import shard_pb2
from aptray.proto.convert import plan_to_proto, result_from_proto
from aptray.worker.shard_auth import SECRET_METADATA

logger = logging.getLogger("aptray")

PLAN_METHOD = "/aptray.shard.v1.Shard/Plan"
STEP_TIMEOUT_S = 600.0  # a long CPU prefill is slow, a hung collective must still surface


class ShardStepError(RuntimeError):
    """A rank answered a plan with an error: the others may be waiting in a collective."""


def _config_kwargs(config: EngineConfig) -> dict:
    """EngineConfig's init fields as plain data (the actor rebuilds it and re-derives the spec)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}


def _remove_leftover_group(name: str, timeout_s: float = 30.0) -> None:
    import time

    import ray
    from ray.util.placement_group import placement_group_table, remove_placement_group
    try:
        old = ray.util.get_placement_group(name)
    except ValueError:  # none by that name: the usual case
        return
    logger.warning("removing the placement group %s left by a previous router", name)
    remove_placement_group(old)  # its shard actors go with it
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and placement_group_table(old).get("state") != "REMOVED":
        time.sleep(0.1)


def _target(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig, use_gpu: bool | None = None, cpus_per_shard: float = 1.0,
                 start_timeout_s: float = 600.0, pg_name: str | None = None):
        """pg_name: a stable name for the shards' placement group. A group left by a dead owner (a
        router that was killed) outlives it and still holds the resources; naming it lets the next
        owner remove it first."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from aptray.worker.shard import GRPC_OPTIONS, ShardWorker

        tp = config.tensor_parallel_size
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= tp
        bundle = {"GPU": 1, "CPU": cpus_per_shard} if use_gpu else {"CPU": cpus_per_shard}
        if pg_name:
            _remove_leftover_group(pg_name)
        # STRICT_PACK: all ranks on one node, where NCCL/gloo collectives are fast
        self.pg = placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK", name=pg_name or "")
        ray.get(self.pg.ready(), timeout=start_timeout_s)
        actor_cls = ray.remote(ShardWorker)
        kwargs = _config_kwargs(config)
        # named for operators and fault drills (ray list actors); unique, since a killed group's
        # actors may still hold their names while this one starts
        group = f"aptray-shard-{uuid.uuid4().hex[:8]}"
        self.shards = [
            actor_cls.options(
                name=f"{group}-rank{rank}", num_cpus=cpus_per_shard, num_gpus=1 if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(kwargs, rank, tp, use_gpu, max(1, int(cpus_per_shard)))
            for rank in range(tp)]
        # no secret, no Plan(): anything else on the cluster network that finds a shard's port is refused
        secret = secrets.token_urlsafe(32)
        self.metadata = ((SECRET_METADATA, secret),)
        master_addr, master_port = ray.get(self.shards[0].node_address.remote())
        endpoints = ray.get([s.start.remote(master_addr, master_port, secret) for s in self.shards],
                            timeout=start_timeout_s)
        self.num_blocks = min(n for _, _, n in endpoints)
        self.endpoints = [(ip, port) for ip, port, _ in endpoints]
        self.channels = [grpc.insecure_channel(_target(ip, port), options=GRPC_OPTIONS) for ip, port, _ in endpoints]
        # raw-bytes callables: the plan is serialised once and the same bytes go to every rank
        self.plan_calls = [ch.unary_unary(PLAN_METHOD, request_serializer=None,
                                          response_deserializer=shard_pb2.StepResult.FromString)
                           for ch in self.channels]
        self.use_gpu = use_gpu
        self._check_versions()
        logger.info("RayExecutor: %d shard(s) on %s, %d cache blocks", tp, "GPU" if use_gpu else "CPU",
                    self.num_blocks)

    def _check_versions(self) -> None:
        from aptray.proto import shard_pb2_grpc
        from aptray.proto.convert import PLAN_VERSION
        for ch in self.channels:
            info = shard_pb2_grpc.ShardStub(ch).Info(shard_pb2.ShardInfoRequest(), timeout=30, metadata=self.metadata)
            if info.version != PLAN_VERSION:
                raise RuntimeError(f"shard rank {info.rank} speaks plan version {info.version}, "
                                   f"the router {PLAN_VERSION}")

    def execute(self, plan: BatchPlan) -> StepResult:
        payload = plan_to_proto(plan).SerializeToString()
        pending = [call.future(payload, timeout=STEP_TIMEOUT_S, metadata=self.metadata) for call in self.plan_calls]
        replies = self._gather(pending)
        self.last_step_times = [r.step_time for r in replies]  # per rank: shows stragglers
        return result_from_proto(replies[0])

    @staticmethod
    def _gather(pending: list) -> list:
        """All replies, but fail as soon as any rank fails, by a transport error or an error reply: a
        failed rank leaves the others blocked in a collective, so waiting for them would hang until
        the step timeout."""
        arrived = threading.Semaphore(0)
        for f in pending:
            f.add_done_callback(lambda _: arrived.release())
        for _ in pending:
            arrived.acquire()
            for f in pending:
                if not f.done():
                    continue
                if f.exception() is not None:
                    raise f.exception()
                if f.result().error:
                    raise ShardStepError(f"shard step failed: {f.result().error}")
        return [f.result() for f in pending]

    def alive(self, timeout_s: float = 2.0) -> bool:
        """Every rank answers Info: false when a shard process is gone."""
        from aptray.proto import shard_pb2_grpc
        try:
            for ch in self.channels:
                shard_pb2_grpc.ShardStub(ch).Info(shard_pb2.ShardInfoRequest(), timeout=timeout_s,
                                                  metadata=self.metadata)
        except grpc.RpcError:
            return False
        return True

    def shutdown(self, graceful: bool = True) -> None:
        """graceful=False after a fault: the surviving ranks may be stuck in a broken collective."""
        import ray
        from ray.util.placement_group import remove_placement_group
        for ch in getattr(self, "channels", []):
            ch.close()
        if graceful:
            try:
                ray.get([s.stop.remote() for s in self.shards], timeout=10)
            except Exception:  # already dead: nothing to stop
                pass
        for s in self.shards:
            ray.kill(s)
        remove_placement_group(self.pg)
