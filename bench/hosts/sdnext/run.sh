#!/usr/bin/env bash
# Rerun the whole real-SD.Next check: build (if needed), start, check, browser, restart simulated, check.
#
# usage: bench/hosts/sdnext/run.sh SDNEXT_SRC ROOT
#   SDNEXT_SRC: SD.Next's source folder or (bare) git directory (see setup.sh); ROOT: the work folder.
# Run with the project's Python active (a venv with `pip install -e ".[server]"` and selenium), so that
# `python -m hybrid_vae serve` works for check.py. Needs chromium + chromium-driver (apt) for browser.py.
# Writes ROOT/evidence/{plain,simulated,browser}.json and images, docs/img/sdnext-*.png; ~30 min on 2 cores.
set -euo pipefail
SRC=${1:?usage: run.sh SDNEXT_SRC ROOT}
ROOT=${2:?usage: run.sh SDNEXT_SRC ROOT}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${HV_PYTHON:-python3}
export ROOT
"$HERE/setup.sh" "$SRC" "$ROOT"
"$HERE/launch.sh" stop
"$HERE/sync-ext.sh" "$ROOT"            # a new commit of the extension: the next start is a full launch
rc=0
# 1. plain: SD.Next's defaults (console at DEBUG), full launch, install.py runs
"$HERE/launch.sh" start
"$PY" "$HERE/check.py" "$ROOT" plain || rc=1
"$PY" "$HERE/browser.py" --out "$ROOT/evidence" || rc=1
"$HERE/launch.sh" stop
# 2. simulated: a quick launch (state unchanged: install.py does not run) without nvidia-ml-py, a simulated
#    RTX 3070 with 1 GiB free, console at INFO
"$ROOT/venv/bin/pip" uninstall -q -y nvidia-ml-py
QUIET=1 HYBRID_VAE_SIMULATE_GPU="name=NVIDIA GeForce RTX 3070,free_gib=1.0" "$HERE/launch.sh" start
"$PY" "$HERE/check.py" "$ROOT" simulated || rc=1
"$HERE/launch.sh" stop
echo "evidence in $ROOT/evidence; exit $rc"
exit $rc
