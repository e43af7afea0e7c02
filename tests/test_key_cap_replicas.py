"""max_requests_per_key across ingress replicas that share one Redis (aptray.serve.key_load): a key
at its cap is refused at every replica, not only at the one that holds its requests (real Ray
Serve, two replicas, a real Redis server, HTTP and gRPC)."""
import os
import time

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import grpc  # noqa: E402
import httpx  # noqa: E402

from aptray.model.demo import demo_model_dir, ensure_demo_model  # noqa: E402
from aptray.worker.shard import free_port  # noqa: E402
from fault_tools import RedisProcess  # noqa: E402
from serve_tools import served_app  # noqa: E402

ALICE, MALLORY = "alice-key", "mallory-key"
CAP = 2


@pytest.fixture(scope="module")
def server():
    ensure_demo_model(demo_model_dir())
    redis_proc = RedisProcess(free_port())
    redis_proc.start()
    args = {"num_replicas": 2, "num_cache_blocks": 128, "max_num_seqs": 8, "max_queue": 64, "use_gpu": False,
            "api_keys": f"{ALICE},{MALLORY}", "max_requests_per_key": CAP, "redis_url": redis_proc.url}
    try:
        with served_app(args, num_cpus=4) as addresses:
            yield addresses
    finally:
        redis_proc.close()


def _post(server, key, prompt="hi"):
    return httpx.post(server["http"] + "/v1/completions", json={"prompt": prompt, "max_tokens": 4},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_a_key_at_its_cap_is_refused_at_every_replica(server):
    """The key holds CAP streams (wherever they run); each of its next 8 requests gets 429, whichever
    replica it reaches (with a cap per replica, one that holds fewer would admit it); another key is
    served; once the streams end the key is served again."""
    from aptray.client import Client
    with Client(server["grpc"], api_key=MALLORY) as c:
        calls = [c.generate_call("hello", max_tokens=400, ignore_eos=True) for _ in range(CAP)]
        for call in calls:
            next(call)  # admitted: it streams
        answers = [_post(server, MALLORY, f"hi {i}") for i in range(8)]
        assert all(r.status_code == 429 for r in answers), [(r.status_code, r.text[:200]) for r in answers]
        assert all(f"(limit {CAP})" in r.json()["error"]["message"] for r in answers)
        with pytest.raises(grpc.RpcError) as e:
            list(c.generate("hi", max_tokens=4))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _post(server, ALICE).status_code == 200
        for call in calls:
            call.cancel()
    deadline = time.monotonic() + 30
    while (r := _post(server, MALLORY)).status_code == 429:
        assert time.monotonic() < deadline, "the key's ended requests still count"
        time.sleep(0.2)
    assert r.status_code == 200, r.text[:300]
