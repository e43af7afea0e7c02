"""A router's structured outputs compile first in a child process (aptray.serve.grammar_sandbox): a
spec past the deadline is refused and its child killed, and the next spec compiles (busy, and not
refused, where the child was starved of CPU); a refused spec is
refused again without a compile; a crash of the child is a refusal, not the router's; at most
max_pending compile at once, and max_per_caller of one API key's; no child outlives its router."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from transformers import AutoTokenizer

from aptray.model.demo import demo_model_dir, ensure_demo_model
from aptray.sampling_params import InvalidRequest
from aptray.serve.grammar_sandbox import GrammarBusy, GrammarUnavailable, SandboxedCompiler
from aptray.structured_output import Grammars, StructuredOutput

# a 20,000-character regex: about 10 minutes to compile by the growth loadgen.bench_grammar measures
# (0.8 s, 2.7 s, 11.3 s for 50, 100, 200 of its 1,499 alternatives)
SLOW = StructuredOutput("regex", "|".join(f"[a-z]{{1,{i * 37}}}x" for i in range(1, 1500)))
USUAL = StructuredOutput("json", '{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}')


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ensure_demo_model(demo_model_dir()))


@pytest.fixture
def compiler(tokenizer):
    c = SandboxedCompiler(Grammars(tokenizer, 512), timeout_s=1.0, threads=1)
    yield c
    c.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, only not yet reaped
        return f.read().split(") ")[1][0] != "Z"


def _refusal(compiler, so) -> str:
    with pytest.raises(InvalidRequest) as e:
        asyncio.run(compiler.compile(so))
    return str(e.value)


def test_a_spec_past_the_deadline_is_refused_and_its_child_replaced(compiler):
    asyncio.run(compiler.compile(USUAL))  # starts the child
    [first] = compiler.child_pids
    assert "did not compile within 1 s" in _refusal(compiler, SLOW)
    [second] = compiler.child_pids
    assert second != first and not _alive(first)
    # sent again: refused without a compile (the child is the same)
    assert "did not compile within 1 s" in _refusal(compiler, SLOW)
    assert compiler.child_pids == [second]
    # and the next spec compiles, in the child and then in the router, which keeps it
    so = StructuredOutput("regex", "[0-9]{2}-[a-z]+")
    assert not compiler.grammars.kept(so)
    assert asyncio.run(compiler.compile(so)) is compiler.grammars.compile(so)
    assert compiler.grammars.kept(so)


def test_a_spec_past_the_deadline_on_a_starved_child_is_busy_not_refused(compiler):
    """A child the machine keeps off the CPU (here: stopped) misses the deadline through no fault of
    its spec: 429, a new child, and the same spec compiles when sent again."""
    asyncio.run(compiler.compile(USUAL))
    [pid] = compiler.child_pids
    os.kill(pid, signal.SIGSTOP)
    so = StructuredOutput("regex", "[0-9]{3}-[a-z]+")
    with pytest.raises(GrammarBusy, match=r"too busy to compile the regex structured output within 1 s \(0\.00 s"):
        asyncio.run(compiler.compile(so))
    assert compiler.child_pids != [pid] and not _alive(pid)
    assert asyncio.run(compiler.compile(so)) is compiler.grammars.compile(so)


def test_a_compile_error_is_xgrammars_own_message(compiler, tokenizer):
    bad = StructuredOutput("grammar", 'root ::= "a" undefined_rule')
    with pytest.raises(InvalidRequest) as direct:
        Grammars(tokenizer, 512).compile_uncached(bad)
    assert _refusal(compiler, bad) == str(direct.value)
    assert "undefined_rule" in str(direct.value)


def _killed_mid_compile(compiler, so, signum):
    """compile(so)'s exception where the child gets signum mid-compile, and the child's pid."""
    asyncio.run(compiler.compile(USUAL))
    [pid] = compiler.child_pids

    async def kill_mid_compile():
        compiling = asyncio.ensure_future(compiler.compile(so))
        await asyncio.sleep(0.3)
        os.kill(pid, signum)
        return await asyncio.gather(compiling, return_exceptions=True)

    [error] = asyncio.run(kill_mid_compile())
    assert compiler.child_pids and compiler.child_pids != [pid]
    return error


def test_a_crash_of_the_child_is_a_refusal_and_the_next_spec_compiles(tokenizer, capfd):
    """A crash of xgrammar (SIGSEGV) is the spec's doing: 400, remembered. The child dies by Python's
    faulthandler, not by the handler of xgrammar's runtime, whose symbolized backtrace can hang past the
    deadline, where the crash would read as a busy machine (429)."""
    compiler = SandboxedCompiler(Grammars(tokenizer, 512), timeout_s=60.0, threads=1)
    try:
        error = _killed_mid_compile(compiler, SLOW, signal.SIGSEGV)
        assert isinstance(error, InvalidRequest) and "crashed the grammar compiler" in str(error)
        log = capfd.readouterr().err  # the child writes to the router's stderr
        assert "Fatal Python error: Segmentation fault" in log and "Segfault encountered" not in log
        assert "crashed the grammar compiler" in _refusal(compiler, SLOW)
        assert asyncio.run(compiler.compile(StructuredOutput("choice", ("yes", "no")))) is not None
    finally:
        compiler.close()


def test_a_child_killed_from_outside_is_unavailable_not_refused(compiler):
    """SIGKILL (the kernel's OOM killer, an operator) is not the spec's doing: 503, and the spec is
    compiled again when it comes again (here it then runs to its deadline, in a new child)."""
    error = _killed_mid_compile(compiler, SLOW, signal.SIGKILL)
    assert isinstance(error, GrammarUnavailable) and "killed while it compiled" in str(error)
    before = compiler.child_pids
    assert "did not compile within 1 s" in _refusal(compiler, SLOW)
    assert compiler.child_pids != before


def test_a_compile_past_the_childs_memory_is_refused(tokenizer):
    compiler = SandboxedCompiler(Grammars(tokenizer, 512), timeout_s=60.0, threads=1, child_memory_bytes=4 << 20)
    try:
        asyncio.run(compiler.compile(USUAL))
        with open(f"/proc/{compiler.child_pids[0]}/limits") as f:  # nor does a crash leave a core file
            assert re.search(r"^Max core file size\s+0\s+0\s", f.read(), re.M)
        big = StructuredOutput("regex", SLOW.spec[:SLOW.spec.index("{1,3737}")].rsplit("|", 1)[0])  # 100 classes
        assert "needs over 4 MiB to compile" in _refusal(compiler, big)
        assert not compiler.grammars.kept(big)
        assert asyncio.run(compiler.compile(StructuredOutput("regex", "b+"))) is not None
    finally:
        compiler.close()


def test_too_many_compiles_at_once_are_busy(tokenizer):
    compiler = SandboxedCompiler(Grammars(tokenizer, 512), timeout_s=2.0, threads=1, max_pending=1)
    try:
        async def two():
            slow = asyncio.ensure_future(compiler.compile(SLOW))
            await asyncio.sleep(0)  # the first is pending
            with pytest.raises(GrammarBusy, match="limit 1"):
                await compiler.compile(USUAL)
            with pytest.raises(InvalidRequest, match="did not compile within 2 s"):
                await slow
            return await compiler.compile(USUAL)  # no longer busy

        assert asyncio.run(two()) is not None
    finally:
        compiler.close()


def test_one_key_cannot_take_every_compile_and_one_spec_compiles_once(tokenizer):
    """A caller (API key) has at most max_per_caller compiles at once, others still compile; requests
    that bring a spec already compiling (an n > 1 request's choices) wait for that one compile."""
    compiler = SandboxedCompiler(Grammars(tokenizer, 512), timeout_s=2.0, threads=1, max_pending=3, max_per_caller=1)
    try:
        async def run():
            slow = asyncio.ensure_future(compiler.compile(SLOW, "key-a"))
            await asyncio.sleep(0)
            with pytest.raises(GrammarBusy, match="this API key has 1 structured outputs compiling"):
                await compiler.compile(USUAL, "key-a")
            others = [compiler.compile(USUAL, "key-b") for _ in range(3)] + [compiler.compile(USUAL, "")]
            # the same spec four times: one compile, so neither key-b's share nor max_pending is used up
            got = await asyncio.gather(slow, *others, return_exceptions=True)
            return got[0], got[1:]

        refused, grammars = asyncio.run(run())
        assert isinstance(refused, InvalidRequest) and "did not compile within 2 s" in str(refused)
        assert all(g is grammars[0] for g in grammars) and grammars[0] is compiler.grammars.kept(USUAL)
        assert asyncio.run(compiler.compile(StructuredOutput("regex", "c+"), "key-a")) is not None
    finally:
        compiler.close()


def test_no_child_outlives_its_compiler_or_its_process(compiler, tokenizer, tmp_path):
    asyncio.run(compiler.compile(USUAL))
    [pid] = compiler.child_pids
    compiler.close()
    assert not _alive(pid) and compiler.child_pids == []
    # a router process that dies (SIGKILL) mid-compile: its child exits by itself
    script = tmp_path / "router.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, sys
        from transformers import AutoTokenizer
        from aptray.serve.grammar_sandbox import SandboxedCompiler
        from aptray.structured_output import Grammars, StructuredOutput
        c = SandboxedCompiler(Grammars(AutoTokenizer.from_pretrained({demo_model_dir()!r}), 512), timeout_s=600)
        asyncio.run(c.compile(StructuredOutput("regex", "a")))
        print(c.child_pids[0], flush=True)
        asyncio.run(c.compile(StructuredOutput("regex", {SLOW.spec!r})))
    """))
    router = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(router.stdout.readline())
    time.sleep(0.5)  # the slow compile has begun
    assert _alive(child)
    router.kill()
    router.wait()
    deadline = time.monotonic() + 30
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child)
