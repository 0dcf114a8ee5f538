#!/usr/bin/env bash
# Everything this project needs a GPU for, in one run (about 8 minutes on an H100; each step has its own
# time limit so one slow step cannot eat the others). The lent machine has no network: first run
# `bash bench/gpu_wheels.sh` here (wheels into .whl/), then with the device tool:
#   run  command="bash bench/gpu_session.sh 1"  carry=[".whl"]  timeout_s=480   (tests, #3/#15 timing, calibrate)
#   run  command="bash bench/gpu_session.sh 2"  carry=[".whl"]  timeout_s=420   (#6: bench --gpu, 35 decodes)
#   run  command="bash bench/gpu_session.sh offload"  carry=[".whl"]  timeout_s=330   (#15 alone, ~3-4 minutes)
# (no argument runs parts 1 and 2, which may not fit one 600 s call.)
# It writes under ${OUT:-bench/results/gpu}: the logs, the JSON of each step, docs/benchmarks.md sections
# (copied back as benchmarks.md) and the calibrated profile (calibrated.yaml); copy them into the repo
# afterwards (docs/benchmarks.md, bench/results/).
#   1. issue #3: tiled vs full at 2048x2048 float16 with a 2.5 GiB budget (target <= 1.35x full, peak
#      under the estimate), and the same at 1024x1024 where exact tiles fit
#   2. issue #6: `hybrid-vae bench --gpu` (35 real decodes under emulated smaller cards: OOMs, peaks vs
#      estimates) and `hybrid-vae calibrate` + `explain --profile` naming it
#   offload (also inside part 1): issue #15, exact tiles with their whole-image buffers in host memory:
#      CUDA tests (equal to the full decode, the copy stream), then 2048x2048 float16 at 2.5 GiB free:
#      the offloaded plan's CUDA peak <= its estimate and its time <= 1.6x the full decode
#      (tiled_speed --check-offload 1.6; offload_2048.json); then exact HunyuanVideo tiles (33 frames of 512x320,
#      bfloat16): full vs diffusers' tiles vs exact tiles with host / GPU buffers, peaks and seconds against the
#      engine's estimates (bench/hunyuan_exact.py --device cuda: its docs/benchmarks.md section)
#   wan_memory (inside part 1): Wan's decoder on the GPU (its estimate is interpolated from CPU rows; the
#      HunyuanVideo row checks the CPU/GPU ratio): video-cuda-decode.jsonl
set -u
PART=${1:-all}
case "$PART" in 1|2|offload|all) ;; *) echo "gpu_session.sh: part '$PART': use 1, 2, offload or nothing (1 and 2)" >&2; exit 2;; esac
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1; then  # offline: the carried wheels, into a private site dir
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/pip.log" 2>&1 || echo "wheel install failed (see pip.log)"
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  $PY -m pip install -q -e ".[test]" >"$OUT/pip.log" 2>&1 || echo "pip install failed (see pip.log)"
fi
$PY -c "import torch, diffusers, pydantic; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" \
  | tee -a "$OUT/gpu.txt"
CARD=$($PY -c "import torch; print(torch.cuda.get_device_name(0))")
step() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s)"; timeout "$limit" "$@" >"$OUT/$name.log" 2>&1;
         echo "   rc=$?"; tail -n 25 "$OUT/$name.log"; }
if [ "$PART" = 1 ] || [ "$PART" = all ]; then
  step cuda_tests 60 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_stream.py tests/test_offload.py tests/test_executors.py tests/test_orchestrator.py tests/test_stream_wan.py tests/test_stream_hunyuan.py
  step tiled_speed_2048 120 $PY -m hybrid_vae.bench.tiled_speed --device cuda --size 2048 --dtype float16 --budget-gib 2.5 --card "$CARD" --repeat 3 --json "$OUT/offload_2048.json" --check-offload 1.6
  step tiled_speed_1024 60 $PY -m hybrid_vae.bench.tiled_speed --device cuda --size 1024 --dtype float16 --budget-gib 1.5 --card "$CARD" --repeat 3
  step calibrate 120 $PY -m hybrid_vae.extension.cli calibrate --out "$OUT/calibrated.yaml" --sizes 512,1024,2048 --dtypes float16,float32 --repeats 2
  step wan_memory 90 $PY -m hybrid_vae.bench.video_cpu_memory --device cuda --dtype bfloat16 --shapes wan:1x40x64,wan:3x40x64,wan:3x68x120,hunyuanvideo:3x40x64 --out "$OUT/video-cuda-decode.jsonl"
  step explain_profile 20 $PY -m hybrid_vae.extension.cli explain --family sdxl --width 1024 --height 1024 --profile "$OUT/calibrated.yaml" --free-gib 4
fi
if [ "$PART" = offload ]; then
  step cuda_offload_tests 60 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_offload.py tests/test_stream.py tests/test_stream_hunyuan.py
  step tiled_speed_2048 150 $PY -m hybrid_vae.bench.tiled_speed --device cuda --size 2048 --dtype float16 --budget-gib 2.5 --card "$CARD" --repeat 3 --json "$OUT/offload_2048.json" --check-offload 1.6
  step hunyuan_exact 90 $PY -m hybrid_vae.bench.hunyuan_exact --device cuda --dtype bfloat16 --size 320 --width 512 --frames 9 --tile 256
fi
if [ "$PART" = 2 ] || [ "$PART" = all ]; then
  step bench_gpu 400 $PY -m hybrid_vae.bench.cli gpu --out "$OUT" --budget-s 330
fi
cp docs/benchmarks.md "$OUT/benchmarks.md"
echo "done: $OUT"
