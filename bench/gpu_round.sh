#!/usr/bin/env bash
# One round on a GPU machine (no network), from the repository root, results under $OUT:
#   1. the GPU kernel tests (hypothesis profile "gpu"), 2. the public entry points of an older
#   checkout in .old/ (if present) and of this one timed in one run (bench/before_after.py),
#   3. the attention benchmark (correctness first; CUDA graph replays, eager and host times).
# Usage: OUT=/some/dir bash bench/gpu_round.sh [--flex]
set -uo pipefail
out=${OUT:?set OUT}
flex=--no-flex
[ "${1:-}" = "--flex" ] && flex=
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
if [ -d .old/sparvar ]; then
  old=/tmp/old-site && rm -rf "$old" && mkdir -p "$old" && cp -r .old/sparvar "$old/sparvar"
  for pkg in reference kernels autotune tuned_configs; do cp -r ".old/$pkg" "$old/sparvar/$pkg"; done
fi
source bench/stage.sh
export PYTHONUNBUFFERED=1
SPARVAR_HYPOTHESIS_PROFILE=gpu timeout ${TEST_S:-240} python3 -P -m pytest -q -p no:cacheprovider \
  tests/test_kernels.py --durations=6 > "$out/gpu_tests.txt" 2>&1
tail -22 "$out/gpu_tests.txt"
if [ -n "${MEMCHECK_S:-}" ]; then
  # The kernel tests on small shapes (NaN/Inf inputs, top-k, plan cache, fast launch) under memcheck.
  SPARVAR_HYPOTHESIS_PROFILE=gpu timeout "$MEMCHECK_S" compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -P -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "$MEMCHECK_K" > "$out/memcheck.txt" 2>&1
  echo "memcheck exit code $?" >> "$out/memcheck.txt"
  grep -E "ERROR SUMMARY|passed|failed|exit code|Error" "$out/memcheck.txt" | tail -8
fi
python3 -P bench/before_after.py --label after --out "$out" 2>&1 | tail -12
if [ -d /tmp/old-site ]; then
  PYTHONPATH=/tmp/old-site python3 -P bench/before_after.py --label before --out "$out" 2>&1 | tail -12
  python3 -P bench/before_after.py --compare "$out/before.json" "$out/after.json" | tee "$out/before_after.txt"
fi
python3 -P bench/attention.py $flex --out "$out" 2>&1 | grep -v -i "warn" | tail -45
