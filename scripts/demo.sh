#!/usr/bin/env bash
# Sets everything up on a fresh machine (see setup_env.sh) and runs the blend demo on
# the bundled SmolLM2-135M model: full prefill vs full KV reuse vs CacheBlend.
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --ratio 0.2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${CACHEBLEND_VENV:-.venv}
"$VENV/bin/python" -m cacheblend_ext demo "$@"
