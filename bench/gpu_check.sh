#!/usr/bin/env bash
# One command for a machine with a GPU: builds cacheblend against that machine's own
# torch, runs the CUDA tests and the benchmarks, and writes everything under $OUT
# (default bench/out/<date>): gpu_check.log (all output), pytest.log, results.json.
#
#   OUT=/some/dir bash bench/gpu_check.sh [COMMAND[:FLAGS]...]   (default: all below)
#
# Needs no network: the build uses --no-build-isolation --no-deps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/json"
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
COMMANDS=("$@")
[[ ${#COMMANDS[@]} -gt 0 ]] || COMMANDS=(rope concat select attention e2e)

echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
"$PY" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "python", sys.version.split()[0])'

echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
rm -rf build
t0=$SECONDS
if ! CACHEBLEND_BUILD_CUDA=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -n 60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "built in $((SECONDS - t0)) s"
"$PY" -c 'import cacheblend_ext as c; assert c.has_cuda_kernels(), "CUDA kernels missing"; print("CUDA kernels: yes")' || exit 1

echo "== CUDA tests"
t0=$SECONDS
# Numerical tests first; the bad-argument tests (CPU and CUDA) in their own process, so
# that a crash there cannot hide the other results.
ERRORS="bad_inputs or argument_errors or errors or mismatch"
timeout 240 "$PY" -m pytest python_tests -q -k "(cuda or CUDA or gpu) and not ($ERRORS)" -p no:cacheprovider -rs \
  2>&1 | tee "$OUT/pytest.log" | tail -n 40
timeout 120 "$PY" -m pytest python_tests -q -k "$ERRORS" -p no:cacheprovider -rs 2>&1 | tee -a "$OUT/pytest.log" | tail -n 15
echo "tests took $((SECONDS - t0)) s"

# Each argument is a bench command, optionally with extra flags after a colon, e.g.
# "e2e:--source ram --ratios 0,15"; e2e always runs the Mistral-7B-shaped random model.
n=0
for spec in "${COMMANDS[@]}"; do
  cmd=${spec%%:*}
  extra=()
  [[ "$spec" == *:* ]] && read -r -a extra <<<"${spec#*:}"
  [[ "$cmd" == e2e ]] && extra+=(--model random-7b)
  n=$((n + 1))
  echo "== bench $cmd ${extra[*]}"
  timeout 240 "$PY" -m bench "$cmd" --device cuda "${extra[@]}" --json "$OUT/json/$n-$cmd.json" ||
    echo "bench $cmd FAILED ($?)"
done

"$PY" - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
merged = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "json", "*.json")))}
json.dump(merged, open(os.path.join(out, "results.json"), "w"), indent=1, default=str)
print("merged:", ", ".join(merged) or "nothing")
PY
rm -rf "$OUT/json"
echo "== done $(date -u +%FT%TZ)"
