#!/usr/bin/env bash
# On a GPU machine without network: make the package importable from the source tree (the same
# layout `pip install .` gives) under /tmp/sparvar-site, and optuna from .whl/ when present.
# Usage: source bench/stage.sh
set -e
site=/tmp/sparvar-site
rm -rf "$site" && mkdir -p "$site"
cp -r sparvar "$site/sparvar"
for pkg in reference kernels autotune tuned_configs; do cp -r "$pkg" "$site/sparvar/$pkg"; done
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
set +e
