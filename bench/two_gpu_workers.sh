#!/usr/bin/env bash
# Two autotune workers, one per GPU, on one shared journal-file study; then list who ran what.
# Usage on a two-GPU machine, from the repository root: bash bench/two_gpu_workers.sh OUT_DIR
set -euo pipefail
out=${1:-/tmp/two-gpu}
source bench/stage.sh
cd /tmp
journal=/tmp/sparvar-two-gpu.journal
rm -f "$journal"
python3 -P -c "import sys; from sparvar.cli import main; sys.exit(main(sys.argv[1:]))" autotune \
  --model infinity-2b --resolution 1024x1024 --trials 12 --workers 2 --storage "journal:$journal" \
  --output-dir "$out" --no-progress 2>&1 | grep -v -i -E "warn|sdpa\("
python3 -P - "$journal" <<'PY'
import collections, sys
import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
study = optuna.load_study(study_name=None if False else optuna.study.get_all_study_names(
    JournalStorage(JournalFileBackend(sys.argv[1])))[0], storage=JournalStorage(JournalFileBackend(sys.argv[1])))
by = collections.Counter((t.user_attrs.get("worker"), t.user_attrs.get("cuda_visible_devices"), t.state.name) for t in study.trials)
print("trials:", len(study.trials), "numbers unique:", len({t.number for t in study.trials}) == len(study.trials))
for (w, gpu, state), n in sorted(by.items(), key=str):
    print(f"worker {w} CUDA_VISIBLE_DEVICES={gpu} {state}: {n}")
PY
