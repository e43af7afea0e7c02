"""Scheduling policies: each turns request states and block counts into a BatchPlan (torch-free)."""
from aptray.scheduler.base import Scheduler


def make_scheduler(config, blocks) -> Scheduler:
    if config.scheduler == "fcfs":
        from aptray.scheduler.fcfs import FcfsScheduler
        return FcfsScheduler(config, blocks)
    if config.scheduler == "sarathi":
        from aptray.scheduler.sarathi import SarathiScheduler
        return SarathiScheduler(config, blocks)
    if config.scheduler == "apt":
        from aptray.scheduler.apt import AptScheduler
        return AptScheduler(config, blocks)
    if config.scheduler == "vllm":
        from aptray.scheduler.vllm import VllmScheduler
        return VllmScheduler(config, blocks)
    raise ValueError(f"unknown scheduler {config.scheduler!r}")
