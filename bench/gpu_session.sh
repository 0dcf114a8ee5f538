#!/usr/bin/env bash
# Everything this project needs a GPU for, in one run (about 8 minutes on an H100; each step has its own
# time limit so one slow step cannot eat the others). Run it from the repository root on the lent
# machine, e.g. with the device tool:  bash bench/gpu_session.sh
# It writes under ${OUT:-bench/results/gpu}: the logs, the JSON of each step, docs/benchmarks.md sections
# (copied back as benchmarks.md) and the calibrated profile (calibrated.yaml); copy them into the repo
# afterwards (docs/benchmarks.md, bench/results/).
#   1. issue #3: tiled vs full at 2048x2048 float16 with a 2.5 GiB budget (target <= 1.35x full, peak
#      under the estimate), and the same at 1024x1024 where exact tiles fit
#   2. issue #6: `hybrid-vae bench --gpu` (31 real decodes under emulated smaller cards: OOMs, peaks vs
#      estimates) and `hybrid-vae calibrate` + `explain --profile` naming it
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -m pip install -q -e ".[server,test]" >"$OUT/pip.log" 2>&1 || echo "pip install failed (see pip.log)"
CARD=$($PY -c "import torch; print(torch.cuda.get_device_name(0))")
step() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s)"; timeout "$limit" "$@" >"$OUT/$name.log" 2>&1;
         echo "   rc=$?"; tail -n 25 "$OUT/$name.log"; }
step tiled_speed_2048 150 $PY -m bench.tiled_speed --device cuda --size 2048 --dtype float16 --budget-gib 2.5 --card "$CARD" --repeat 5
step tiled_speed_1024 90 $PY -m bench.tiled_speed --device cuda --size 1024 --dtype float16 --budget-gib 1.5 --card "$CARD" --repeat 5
step bench_gpu 330 $PY -m bench.cli gpu --out "$OUT"
step calibrate 150 $PY -m extension.cli calibrate --out "$OUT/calibrated.yaml" --sizes 512,1024,2048 --dtypes float16,float32 --repeats 2
step explain_profile 30 $PY -m extension.cli explain --family sdxl --width 1024 --height 1024 --profile "$OUT/calibrated.yaml" --free-gib 4
cp docs/benchmarks.md "$OUT/benchmarks.md"
echo "done: $OUT"
