#!/usr/bin/env bash
# One round on a GPU machine (no network), from the repository root, results under $OUT:
#   1. the GPU kernel tests (hypothesis profile "gpu"): attention kernels and fused block kernels,
#   2. the public entry points of older checkouts (.old/, .prev/ if present) and of this one timed
#      in one run (bench/before_after.py), 3. the host time of an eager call by part,
#   4. the attention benchmark (correctness first; CUDA graph replays, eager and host times).
# Usage: OUT=/some/dir bash bench/gpu_round.sh [--flex]
set -uo pipefail
out=${OUT:?set OUT}
flex=--no-flex
[ "${1:-}" = "--flex" ] && flex=
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
olds=()
for dir in .old .prev; do
  if [ -d "$dir/sparvar" ]; then
    site=/tmp/site$dir && rm -rf "$site" && mkdir -p "$site" && cp -r "$dir/sparvar" "$site/sparvar"
    for pkg in reference kernels autotune tuned_configs; do cp -r "$dir/$pkg" "$site/sparvar/$pkg"; done
    olds+=("$dir")
  fi
done
source bench/stage.sh
export PYTHONUNBUFFERED=1
SPARVAR_HYPOTHESIS_PROFILE=gpu timeout ${TEST_S:-240} python3 -P -m pytest -q -p no:cacheprovider \
  tests/test_kernels.py tests/test_fused.py --durations=6 > "$out/gpu_tests.txt" 2>&1
tail -22 "$out/gpu_tests.txt"
if [ -n "${MEMCHECK_S:-}" ]; then
  # The kernel tests on small shapes (NaN/Inf inputs, top-k, plan cache, fast launch) under memcheck.
  SPARVAR_HYPOTHESIS_PROFILE=gpu timeout "$MEMCHECK_S" compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -P -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "$MEMCHECK_K" > "$out/memcheck.txt" 2>&1
  echo "memcheck exit code $?" >> "$out/memcheck.txt"
  grep -E "ERROR SUMMARY|passed|failed|exit code|Error" "$out/memcheck.txt" | tail -8
fi
python3 -P bench/before_after.py --label after --out "$out" 2>&1 | tail -12
for dir in "${olds[@]}"; do
  name=before${dir#.}
  PYTHONPATH=/tmp/site$dir python3 -P bench/before_after.py --label "$name" --out "$out" 2>&1 | tail -12
  python3 -P bench/before_after.py --compare "$out/$name.json" "$out/after.json" | tee "$out/before_after$dir.txt"
done
python3 -P bench/host_breakdown.py 2>&1 | grep -v -i warn | tee "$out/host_breakdown.txt"
[ -n "${SKIP_ATTENTION:-}" ] || python3 -P bench/attention.py $flex --out "$out" 2>&1 | grep -v -i "warn" | tail -45
