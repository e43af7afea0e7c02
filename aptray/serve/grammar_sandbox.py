"""A router's structured outputs compile first in a child process, under a deadline, and only then in
the router.

xgrammar cannot stop a compile once begun, and a short spec can take minutes: a regex alternating
bounded character classes, `[a-z]{1,37}x|[a-z]{1,74}x|...`, compiles in 0.8 s with 50 of them, 2.7 s
with 100 and 11.3 s with 200 (python -m loadgen.bench_grammar, 2026-12-07 02:29), about the square
of their number: some 10 minutes for 1,500 (20,000 characters) by that trend. Compiled in the
router, each such spec would hold a grammar thread and a core to its end, and a few of them would
make every other structured request time out. Here a spec the router has not compiled before
compiles first in a child process, which is killed at the deadline (and which alone dies should
xgrammar crash); the router compiles a spec only once a child compiled it in time and within
CHILD_MEMORY_BYTES, so the router's own compile is bounded by about the deadline. A spec refused
there is remembered and refused again at once, unless it missed the deadline because the machine
gave the child under a quarter of it in CPU time (429), or the child was killed from outside (503):
neither is the spec's fault, and the spec may come again. The price: a new spec compiles twice (2.6 ms against
0.7 ms for a small schema, same run), and each grammar thread keeps a child (263 MB) once a
structured request came. The child does not send its compiled grammar back (xgrammar's serialize_json):
for a regex like the one above, that JSON is many times the grammar's memory and takes longer to write
and read than the compile itself.

  python -m aptray.serve.grammar_sandbox   # a child: JSON lines on stdin, replies on stdout
"""
from __future__ import annotations

import asyncio
import faulthandler
import hashlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor

from aptray.sampling_params import InvalidRequest
from aptray.structured_output import PARAM, Grammars, StructuredOutput, as_structured_output

STARTUP_TIMEOUT_S = 120.0  # a child imports xgrammar and torch: 2-3 s on an idle machine
# what a compile may add to a child's address space: past it the compile fails (400), and a spec's
# memory never reaches the router, which compiles only what compiled in the child
CHILD_MEMORY_BYTES = 4 << 30
REMEMBERED_REFUSALS = 1024
# a child that had under this share of the deadline in CPU time was starved by the machine's load: its
# spec is not judged slow (a spec that is, gets nearly all of it on a core the child has to itself)
STARVED_CPU_SHARE = 0.25


class GrammarBusy(Exception):
    """Too many structured outputs are compiling: the request may come again (429)."""


class GrammarUnavailable(Exception):
    """No child process could start (503)."""


class GrammarSandbox:
    """One child process that compiles specs for the router's tokenizer. Used by one thread at a time."""

    def __init__(self, grammars: Grammars, memory_bytes: int = CHILD_MEMORY_BYTES):
        self._grammars, self._memory_bytes = grammars, memory_bytes
        self._proc: subprocess.Popen | None = None
        self._ready = False
        self._buffer = b""

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def check(self, so: StructuredOutput, timeout_s: float) -> None:
        """Returns once so compiled in the child within timeout_s; InvalidRequest with the reason
        otherwise (xgrammar's error, the deadline, or a crash of the child, which is then replaced).
        GrammarBusy: the deadline passed while the machine's load kept the child off the CPU;
        GrammarUnavailable: something outside killed the child (SIGKILL): neither is the spec's fault."""
        self._ensure_ready()
        cpu_before = self._cpu_seconds()
        self._send({"kind": so.kind, "spec": so.spec})
        reply = self._receive(time.monotonic() + timeout_s)
        if reply is None or "error" not in reply and not reply.get("ok"):
            cpu = None if reply is not None or cpu_before is None else self._cpu_seconds()
            code = self._exit_code() if reply == {} else None
            self._restart()
            if cpu is not None and cpu - cpu_before < STARVED_CPU_SHARE * timeout_s:
                raise GrammarBusy(f"the server was too busy to compile the {so.kind} structured output within "
                                  f"{timeout_s:g} s ({cpu - cpu_before:.2f} s of CPU): try again")
            if code == -signal.SIGKILL:  # killed from outside (the kernel's OOM killer, an operator)
                raise GrammarUnavailable("the grammar compiler was killed while it compiled this structured output: "
                                         "try again")
            reason = (f"did not compile within {timeout_s:g} s: simplify it" if reply is None
                      else "crashed the grammar compiler")
            raise InvalidRequest(f"the {so.kind} structured output {reason}", PARAM)
        if "error" in reply:
            raise InvalidRequest(reply["error"], PARAM)

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def _exit_code(self) -> int | None:
        """The exit status of a child whose output ended (None if it lingers on)."""
        try:
            return self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def _cpu_seconds(self) -> float | None:
        """The child's CPU time so far (Linux; None elsewhere or once it is gone)."""
        try:
            with open(f"/proc/{self._proc.pid}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def _ensure_ready(self) -> None:
        if self._proc is None or self._proc.poll() is not None:  # none yet, or it died between specs
            self.close()
            self._spawn()
        if not self._ready:
            reply = self._receive(time.monotonic() + STARTUP_TIMEOUT_S)
            if not (reply or {}).get("ready"):
                self.close()
                raise GrammarUnavailable("the grammar compiler's process did not start: structured outputs are "
                                         "unavailable for now")
            self._ready = True

    def _restart(self) -> None:
        """Kill the child and start the next one now: its start-up overlaps the wait for the next spec."""
        self.close()
        self._spawn()

    def _spawn(self) -> None:
        # the child sees the router's import path (Ray's working_dir is on sys.path, not always PYTHONPATH)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self._proc = subprocess.Popen([sys.executable, "-m", "aptray.serve.grammar_sandbox"], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._ready, self._buffer = False, b""
        self._send({"tokenizer_info": self._grammars.tokenizer_info_json(), "vocab_size": self._grammars.vocab_size,
                    "memory_bytes": self._memory_bytes})

    def _send(self, message: dict) -> None:
        try:
            self._proc.stdin.write(json.dumps(message).encode() + b"\n")
            self._proc.stdin.flush()
        except OSError:  # the child died: _receive reads its end
            pass

    def _receive(self, deadline: float) -> dict | None:
        """The child's next reply; None at the deadline; {} if the child is gone."""
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            data = os.read(fd, 1 << 16)
            if not data:
                return {}
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)


class SandboxedCompiler:
    """The router's compiles of structured outputs: on `threads` threads of their own (never the event
    loop or the engine thread), each with its GrammarSandbox. At most max_pending specs compile at
    once, and at most max_per_caller of one caller's (an API key's), so that one key cannot take every
    slot (GrammarBusy beyond either). Requests that bring a spec already compiling (the choices of an
    `n` > 1 request, say) wait for that one compile."""

    def __init__(self, grammars: Grammars, timeout_s: float, threads: int = 2, max_pending: int = 8,
                 max_per_caller: int | None = None, child_memory_bytes: int = CHILD_MEMORY_BYTES):
        self.grammars, self.timeout_s, self.max_pending = grammars, timeout_s, max_pending
        self.max_per_caller = max(1, max_pending // 2) if max_per_caller is None else max_per_caller
        self.child_memory_bytes = child_memory_bytes
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="aptray-grammar")
        self._local = threading.local()
        self._sandboxes: list[GrammarSandbox] = []
        self._lock = threading.Lock()
        self._refused: OrderedDict[bytes, str] = OrderedDict()  # by spec digest: the refusal's message
        self._compiling: dict[bytes, asyncio.Future] = {}  # by spec digest, on the router's event loop
        self._by_caller: Counter[str] = Counter()  # compiles begun for each caller ("": no API keys)
        self._closed = False

    async def compile(self, so: StructuredOutput, caller: str = ""):
        """so's compiled grammar. InvalidRequest: it does not compile, or not within timeout_s.
        caller: who asks (a digest of its API key; "" without keys: not counted per caller)."""
        compiled = self.grammars.kept(so)  # one look: a compile() after it could compile here, on the event loop
        if compiled is not None:
            return compiled
        digest = hashlib.sha256(json.dumps([so.kind, so.spec]).encode()).digest()
        with self._lock:
            if digest in self._refused:
                raise InvalidRequest(self._refused[digest], PARAM)
        compiling = self._compiling.get(digest)
        if compiling is None:
            compiling = self._begin(so, digest, caller)
        return await asyncio.shield(compiling)  # a caller that goes away leaves the compile to the others

    def _begin(self, so: StructuredOutput, digest: bytes, caller: str) -> asyncio.Future:
        if len(self._compiling) >= self.max_pending:
            raise GrammarBusy(f"{len(self._compiling)} structured outputs are compiling (limit {self.max_pending})")
        if caller and self._by_caller[caller] >= self.max_per_caller:
            raise GrammarBusy(f"this API key has {self._by_caller[caller]} structured outputs compiling "
                              f"(limit {self.max_per_caller})")
        compiling = asyncio.wrap_future(self._pool.submit(self._checked_compile, so, digest))
        self._compiling[digest] = compiling
        self._by_caller[caller] += 1

        def done(f: asyncio.Future) -> None:
            del self._compiling[digest]
            self._by_caller[caller] -= 1
            if not self._by_caller[caller]:
                del self._by_caller[caller]
            if not f.cancelled():
                f.exception()  # retrieved: every waiter may have gone

        compiling.add_done_callback(done)
        return compiling

    @property
    def child_pids(self) -> list[int]:
        with self._lock:
            return [s.pid for s in self._sandboxes if s.pid is not None]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._closed = True
            for sandbox in self._sandboxes:
                sandbox.close()

    def _checked_compile(self, so: StructuredOutput, digest: bytes):
        sandbox = getattr(self._local, "sandbox", None)
        if sandbox is None:
            sandbox = self._local.sandbox = GrammarSandbox(self.grammars, self.child_memory_bytes)
            with self._lock:
                self._sandboxes.append(sandbox)
        if self._closed:  # the router is shutting down: start no child
            raise GrammarUnavailable("the router is shutting down")
        try:
            sandbox.check(so, self.timeout_s)
        except InvalidRequest as e:
            with self._lock:
                self._refused[digest] = str(e)
                if len(self._refused) > REMEMBERED_REFUSALS:
                    self._refused.popitem(last=False)
            raise
        except (OSError, AttributeError, ValueError):
            if self._closed:  # close() took the child from under the check
                raise GrammarUnavailable("the router is shutting down") from None
            raise
        return self.grammars.compile(so)


def main() -> None:
    """The child: the first line names the tokenizer; each next line is a StructuredOutput to compile,
    answered {"ok": true} or {"error": reason}."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever else writes to stdout goes to the log, not into the replies
    first = json.loads(sys.stdin.readline())
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    grammars = Grammars(None, first["vocab_size"], tokenizer_info=first["tokenizer_info"])
    grammars.compile_uncached(StructuredOutput("regex", "a"))  # loads xgrammar
    # a crash writes the Python stacks, then takes the default action: the import kept that
    # (aptray.fatal_signals), so the child dies at once and the router reads a crash, not a busy machine
    faulthandler.enable(all_threads=True)
    os.nice(10)  # the router's engine thread comes first on a busy machine
    _limit_memory(first["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a spec that crashes xgrammar leaves no core of GBs
    print(json.dumps({"ready": True}), file=replies)
    for line in sys.stdin:
        try:
            grammars.compile_uncached(as_structured_output(json.loads(line)))
            reply = {"ok": True}
        except (InvalidRequest, MemoryError) as e:  # xgrammar's out of memory is a std::bad_alloc
            out_of_memory = isinstance(e, MemoryError) or "std::bad_alloc" in str(e)
            reply = {"error": f"the structured output needs over {first['memory_bytes'] >> 20} MiB to compile"
                     if out_of_memory else str(e)}
        print(json.dumps(reply), file=replies)


def _limit_memory(growth: int) -> None:
    """Cap this process's address space at its size now plus growth (Linux: elsewhere no cap)."""
    try:
        with open("/proc/self/status") as f:
            size_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    except OSError:
        return
    resource.setrlimit(resource.RLIMIT_AS, (size_kb * 1024 + growth, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _exit_with_parent(parent: int) -> None:
    """A compile does not read stdin: a router that died mid-compile would leave its child running on."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


if __name__ == "__main__":
    main()
