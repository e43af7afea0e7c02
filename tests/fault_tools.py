"""Fault injection for the reliability tests and the soak: a restartable Redis, process kills.

Only processes this test process started (its descendants) are ever signalled: other people's
Ray clusters on the same machine are left alone.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import tempfile
import time

import psutil

from aptray.serve.redis_server import RedisServer


class RedisProcess(RedisServer):
    """A real redis-server on 127.0.0.1:port without persistence: a restart comes back empty,
    the hard case (the router must rewrite everything it knows). stop() crashes it."""

    def __init__(self, port: int, password: str | None = None):
        super().__init__(tempfile.mkdtemp(prefix="aptray-redis-"), port=port, password=password)

    def stop(self, crash: bool = True) -> None:
        super().stop(crash)


def descendants_named(title: str) -> list[psutil.Process]:
    """This process's descendants whose process title starts with title (Ray names workers ray::Class)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cmd.startswith(title):
            out.append(p)
    return out


def kill_one(title: str, timeout: float = 30.0, signum: int = signal.SIGKILL) -> int:
    """Send signum (SIGKILL) to one live descendant named title; returns its pid."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        procs = descendants_named(title)
        if procs:
            procs[-1].send_signal(signum)
            return procs[-1].pid
        time.sleep(0.1)
    raise RuntimeError(f"no process named {title!r} under this one")


def worker_stderr(pid: int, timeout: float = 30.0, until: str = "") -> str:
    """What the Ray worker process pid wrote to stderr (its log file on this node), once it holds
    `until` or timeout passed."""
    from ray._private.worker import global_worker  # the logs' folder has no public accessor
    pattern = os.path.join(global_worker.node.get_logs_dir_path(), f"worker-*-{pid}.err")
    deadline, text = time.time() + timeout, ""
    while time.time() < deadline:
        text = "".join(open(path, errors="replace").read() for path in glob.glob(pattern))
        if until in text:
            break
        time.sleep(0.2)
    return text


def metric(text: str, name: str, labels: str = "") -> float | None:
    for line in text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    return None


def sse_events(lines) -> list[dict]:
    """Parsed `data:` events of an SSE stream, up to [DONE]."""
    out = []
    for line in lines:
        if line.startswith("data:"):
            body = line[5:].strip()
            if body == "[DONE]":
                break
            out.append(json.loads(body))
    return out
