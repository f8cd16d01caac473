#!/usr/bin/env bash
# Builds libcacheblend_ops and the C++ consumer example with CMake against the torch of
# a venv made by setup_env.sh, then runs the example.
#   usage: bash scripts/cmake_build.sh [VENV] [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${CACHEBLEND_VENV:-.venv}}
BUILD=${2:-build-cmake}
PYTHON="$VENV/bin/python"
PREFIX=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
IS_CUDA=$("$PYTHON" -c 'import torch; print(1 if torch.version.cuda else 0)')
ARGS=(-S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PREFIX"
      -DPython_EXECUTABLE="$PYTHON")
if [[ "$IS_CUDA" == 1 ]]; then
  # Facts of this toolchain: torch's CMake config needs the toolkit root, and nvrtc plus
  # the math-library headers come from the nvidia-* wheels beside torch.
  CUDA_ROOT=${CUDA_HOME:-/usr/local/cuda}
  NVIDIA=$("$PYTHON" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
  ARGS+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" -DCMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc"
         -DCUDA_nvrtc_LIBRARY="$(ls "$NVIDIA"/lib/libnvrtc.so.* | head -n 1)"
         -DCACHEBLEND_EXTRA_CUDA_INCLUDES="$NVIDIA/include")
fi
echo "== [cmake] configure ($BUILD, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})"
PATH="$VENV/bin:$PATH" cmake "${ARGS[@]}" >"$BUILD.configure.log" 2>&1 || { cat "$BUILD.configure.log"; exit 1; }
echo "== [cmake] build"
PATH="$VENV/bin:$PATH" cmake --build "$BUILD" -j "${MAX_JOBS:-$(nproc)}"
"$BUILD/cacheblend_cpp_smoke"
