#!/usr/bin/env bash
# Sets everything up on a fresh machine (see setup_env.sh; on an unchanged tree that takes
# about a second) and runs the test suite with the 15 slowest tests listed at the end.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k rope` or
# `bash scripts/test.sh -m "not slow"` (markers: docs/development.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${CACHEBLEND_VENV:-.venv}
echo "== [test] pytest"
"$VENV/bin/python" -m pytest python_tests -q -rs --durations=15 "$@"
