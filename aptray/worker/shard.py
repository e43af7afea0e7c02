"""ShardWorker: one tensor-parallel rank in a Ray actor, serving the shard gRPC service (TGI-style shard).

It holds a ModelRunner and nothing of scheduling: the router sends a BatchPlan per iteration to
every rank (shard.proto), all ranks run it in lockstep through torch.distributed collectives,
and rank 0 answers with the sampled tokens and the step time.
"""
from __future__ import annotations

import logging
import socket
from concurrent import futures

import grpc

from aptray.proto import shard_pb2, shard_pb2_grpc
from aptray.proto.convert import PLAN_VERSION, plan_from_proto, result_to_proto
from aptray.worker.shard_auth import SecretCheck

logger = logging.getLogger("aptray")

GRPC_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class _ShardService(shard_pb2_grpc.ShardServicer):
    def __init__(self, worker: "ShardWorker"):
        self.worker = worker

    def Plan(self, request, context):
        try:
            self.worker.take_injected_fault()
            result = self.worker.runner.execute(plan_from_proto(request))
        except Exception as e:  # the router turns this into an error for the step, not a hang
            logger.exception("rank %d failed plan %d", self.worker.rank, request.iteration)
            return shard_pb2.StepResult(version=PLAN_VERSION, error=f"rank {self.worker.rank}: {e!r}")
        return result_to_proto(result)

    def Info(self, request, context):
        w = self.worker
        return shard_pb2.ShardInfo(version=PLAN_VERSION, rank=w.rank, world_size=w.world_size,
                                   num_blocks=w.runner.num_blocks)


class ShardWorker:
    """Wrapped with ray.remote by RayExecutor; methods are the actor's control plane (start, stop)."""

    def __init__(self, config_kwargs: dict, rank: int, world_size: int, use_gpu: bool, num_threads: int = 1):
        self.config_kwargs = config_kwargs
        self.rank, self.world_size, self.use_gpu = rank, world_size, use_gpu
        self.num_threads = num_threads
        self.runner = None
        self.server = None
        self.injected_faults = 0  # plans to fail on purpose (fail_next_plans: fault drills, tests)

    def node_address(self) -> tuple[str, int]:
        """This node's IP and a free port: rank 0's pair is the torch.distributed rendezvous."""
        import ray
        return ray.util.get_node_ip_address(), free_port()

    def start(self, master_addr: str, master_port: int, secret: str) -> tuple[str, int, int]:
        """Join the process group, build the shard, serve gRPC on this node's address to callers that
        present the router's secret; returns (ip, port, num_blocks)."""
        import ray
        import torch

        from aptray.config import EngineConfig
        from aptray.worker.model_runner import ModelRunner

        if not self.use_gpu:
            # ranks share the machine's cores: oversubscribed BLAS threads made steps 10x slower
            torch.set_num_threads(self.num_threads)
        config = EngineConfig(**self.config_kwargs)  # a demo model name is built on this node
        if self.world_size > 1:
            backend = "nccl" if self.use_gpu else "gloo"
            torch.distributed.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}",
                                                 rank=self.rank, world_size=self.world_size)
        device = "cuda" if self.use_gpu else "cpu"
        if self.use_gpu:
            torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        self.runner = ModelRunner(config, self.rank, self.world_size, device=device)
        # one worker thread: plans must run in the order they arrive, in lockstep with the other ranks
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=GRPC_OPTIONS,
                                  interceptors=[SecretCheck(secret)])
        shard_pb2_grpc.add_ShardServicer_to_server(_ShardService(self), self.server)
        ip = ray.util.get_node_ip_address()
        port = self.server.add_insecure_port(f"[{ip}]:0" if ":" in ip else f"{ip}:0")
        self.server.start()
        return ip, port, self.runner.num_blocks

    def fail_next_plans(self, count: int = 1) -> None:
        """Fault drill: this rank answers its next `count` plans with an error, as a rank whose
        model raised would (the router must fail the step fast and resume its requests)."""
        self.injected_faults = count

    def take_injected_fault(self) -> None:
        if self.injected_faults > 0:
            self.injected_faults -= 1
            raise RuntimeError("fault injected by fail_next_plans")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=1).wait()
        import torch
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
