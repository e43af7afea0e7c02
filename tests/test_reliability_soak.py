"""The bounded soak (loadgen/soak.py) as a test: long, so only with APTRAY_LONG_TESTS=1.

    APTRAY_LONG_TESTS=1 APTRAY_SOAK_MINUTES=10 python -m pytest -q -s tests/test_reliability_soak.py
"""
import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("APTRAY_LONG_TESTS") != "1",
                                reason="long test: set APTRAY_LONG_TESTS=1")


def test_soak_at_80_percent_of_effective_throughput(tmp_path):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from loadgen import soak

    minutes = os.environ.get("APTRAY_SOAK_MINUTES", "10")
    argv = ["--minutes", minutes, "--out", str(tmp_path / "soak.json")]
    if os.environ.get("APTRAY_SOAK_RATE"):  # skip the measurement with a known effective throughput
        argv += ["--rate", os.environ["APTRAY_SOAK_RATE"]]
    assert soak.main(argv) == 0, (tmp_path / "soak.json").read_text()
