#!/usr/bin/env bash
# Build an offline, CPU-only SD.Next with hybrid-vae installed in it as a user would.
#
# usage: bench/hosts/sdnext/setup.sh SDNEXT_SRC ROOT [PROJECT_DIR]
#   SDNEXT_SRC   SD.Next's source: a checkout/unpacked folder (has launch.py) or a (bare) git directory
#                of github.com/vladmandic/sdnext. Its commit is recorded in ROOT/sdnext.commit.
#   ROOT         where everything goes (created; ~6 GB with the venv)
#   PROJECT_DIR  this repository (default: two folders above this script)
# Result:
#   ROOT/sdnext        SD.Next's source, made a git repository (without .git SD.Next forces --skip-git, i.e. a
#                      quick launch, and a quick launch never runs extensions' install.py)
#   ROOT/venv          SD.Next's Python: torch 2.13.0 (CPU, never a CUDA build), SD.Next's requirements,
#                      diffusers 0.39.0, gradio 3.43.2 (what SD.Next's installer would add, offline)
#   ROOT/M             tiny random-weight SD pipelines (make_tiny_sd.py): tiny-sd (SD1.5 VAE config),
#                      tiny-sd-tinyvae (a 2-block VAE with 2x compression: matches no family)
#   ROOT/D             SD.Next's data folder (config.json) with D/extensions/sdnext-hybrid-vae: the project's
#                      working tree (sync-ext.sh), a git repository like a user's clone
# Then: launch.sh start (the first start is a full launch: install.py runs), check.py, browser.py.
# About 10 minutes on 2 cores (pip). Only PyPI through plain pip; no GitHub access.
set -euo pipefail
SRC=${1:?usage: setup.sh SDNEXT_SRC ROOT [PROJECT_DIR]}
ROOT=${2:?usage: setup.sh SDNEXT_SRC ROOT [PROJECT_DIR]}
HERE=$(cd "$(dirname "$0")" && pwd)
PROJECT=${3:-$(cd "$HERE/../../.." && pwd)}
mkdir -p "$ROOT"; ROOT=$(cd "$ROOT" && pwd); cd "$ROOT"

# 1. SD.Next's source, as a git repository
if [ ! -f sdnext/launch.py ]; then
  mkdir -p sdnext
  if [ -f "$SRC/launch.py" ]; then
    (cd "$SRC" && tar --exclude=./.git -cf - .) | tar -x -C sdnext
    if git -C "$SRC" rev-parse HEAD >/dev/null 2>&1; then git -C "$SRC" log -1 --format='%H %cd' > sdnext.commit
    else echo "unknown (copied from $SRC)" > sdnext.commit; fi
  else
    git --git-dir="$SRC" archive HEAD | tar -x -C sdnext
    git --git-dir="$SRC" log -1 --format='%H %cd' > sdnext.commit
  fi
  (cd sdnext && git init -q && git add -A >/dev/null 2>&1 &&
   git -c user.email=host@local -c user.name=host commit -q -m "sdnext snapshot $(cut -c1-9 ../sdnext.commit)")
fi
echo "SD.Next snapshot: $(cat sdnext.commit)"

# 2. SD.Next's venv (CPU torch; never a CUDA torch)
echo "torch==2.13.0" > cons.txt
[ -x venv/bin/python ] || python3 -m venv venv
P="venv/bin/pip install -q -c cons.txt"
$P torch==2.13.0
grep -v -E '^(setuptools|ruff|pylint|pre-commit)' sdnext/requirements.txt > req.txt
$P -r req.txt transformers torchvision==0.28.0 diffusers==0.39.0
$P --no-deps gradio==3.43.2 gradio-client==0.5.0 compel==2.4.0
$P aiofiles altair ffmpy jinja2 matplotlib python-multipart pydub semantic-version uvicorn importlib-resources markupsafe
# what SD.Next's install_requirements() adds (skipped by --skip-requirements): pydantic pin, opencv, scipy, onnxruntime
$P pydantic==2.13.4 scipy opencv-python-headless==4.13.0.92 onnxruntime
# torchvision 0.28.0 from PyPI is a CUDA build: its op registrations fail against the CPU torch
TV=$(venv/bin/python -c "import importlib.util,os;print(os.path.dirname(importlib.util.find_spec('torchvision').origin))")
venv/bin/python - "$TV/__init__.py" <<'PY'
import sys
p = sys.argv[1]; s = open(p).read()
old = "from torchvision import (\n    _autograd_registrations,\n    _meta_registrations,\n    datasets,"
new = ("try:  # local patch (bench/hosts/sdnext): CUDA torchvision wheel against a CPU torch\n"
       "    from torchvision import _autograd_registrations, _meta_registrations  # noqa: F401\n"
       "except Exception:\n    pass\nfrom torchvision import (\n    datasets,")
if old in s:
    open(p, "w").write(s.replace(old, new)); print("patched", p)
PY
venv/bin/python -c "import torch, torchvision, diffusers, gradio, cv2, scipy; print('ok', torch.__version__, diffusers.__version__, gradio.__version__)"
# the extension's install.py must install these itself: make sure the host does not have them yet
venv/bin/pip uninstall -q -y nvidia-ml-py pynvml 2>/dev/null || true

# 3. tiny models and the data folder
mkdir -p D/extensions M
[ -f M/Diffusers/tiny-sd-tinyvae/model_index.json ] || venv/bin/python "$HERE/make_tiny_sd.py" M
[ -f D/config.json ] || echo '{"sd_model_checkpoint":"Diffusers/tiny-sd","sdnq_dequantize_compile":false,"show_progress_type":"None"}' > D/config.json
venv/bin/pip freeze 2>/dev/null | sort > freeze-before-extension.txt

# 4. the extension, as a user's clone in <data>/extensions
"$HERE/sync-ext.sh" "$ROOT" "$PROJECT"
echo "setup done in $ROOT. Start SD.Next (the first start is a full launch and runs install.py): ROOT=$ROOT $HERE/launch.sh start"
