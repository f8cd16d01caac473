#!/usr/bin/env bash
# Sets everything up on a fresh machine (see setup_env.sh) and runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k rope`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${CACHEBLEND_VENV:-.venv}
echo "== [test] pytest"
"$VENV/bin/python" -m pytest python_tests -q -rs "$@"
