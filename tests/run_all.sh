#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0          # the CPU wheel first: anything else pulls a CUDA build
python -m pip install -q -e ".[all]"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
# Serve restarts a proxy that is not ready in 5 s; on a busy 2-core machine it takes ~18 s to start
export RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=60 RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S=30
python -m pytest tests -q "$@"
