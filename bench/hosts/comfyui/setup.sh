#!/usr/bin/env bash
# Build a CPU-only ComfyUI (v0.8.0 by default) with the hybrid-vae node linked in as the README says.
#
# usage: setup.sh COMFY_SRC ROOT [PROJECT_DIR]
#   COMFY_SRC:   ComfyUI's source: a source folder (has main.py; copied as it is) or a git directory
#                (bare or a checkout's .git; the commit COMFY_COMMIT is extracted blob by blob, so a partial
#                copy that lacks some blobs still builds: the missing ones are listed in ROOT/missing-blobs.txt)
#   ROOT:        where to build (created; an existing build is checked and completed, not redone)
#   PROJECT_DIR: the hybrid-vae checkout (default: the repository holding this script). It is COPIED to
#                ROOT/src/hybrid_vae (the package name), never installed into ComfyUI's venv: the node must
#                find the engine through its custom_nodes symlink alone, as the README's install does.
# Env: COMFY_COMMIT (git sources only; default 3cd7b32f..., = ComfyUI v0.8.0 + 2 commits, from the fork
#      github.com/pollockjj/ComfyUI), PYTHON (default python3), REFRESH_PROJECT=1 (re-copy the project).
# Result: ROOT/ComfyUI (+ ROOT/comfyui.commit), ROOT/venv (torch 2.13.0 CPU pinned by ROOT/cons.txt, ComfyUI's
#   requirements, the project's dependencies and [server] extra), ROOT/src/hybrid_vae (+ ROOT/hybrid-vae.commit),
#   custom_nodes/hybrid_vae_node -> ROOT/src/hybrid_vae/extension/comfyui, custom_nodes/zz_testnodes (test-only
#   helper nodes), random SD1.5-config VAEs: models/vae/sd15_seed0.safetensors (ComfyUI) and ROOT/vaes/sd15_seed0,
#   ROOT/vaes/sd15_seed1 (diffusers folders for `hybrid-vae serve`). ~6-10 min on 2 cores from scratch.
set -euo pipefail
SRC=${1:?usage: setup.sh COMFY_SRC ROOT [PROJECT_DIR]}
ROOT=${2:?usage: setup.sh COMFY_SRC ROOT [PROJECT_DIR]}
HERE=$(cd "$(dirname "$0")" && pwd)
PROJECT=$(cd "${3:-$HERE/../../..}" && pwd)
COMMIT=${COMFY_COMMIT:-3cd7b32f1b7e7e90395cefe7d9f9b1f89276d8ce}
[ -f "$PROJECT/__init__.py" ] && [ -f "$PROJECT/extension/comfyui/__init__.py" ] \
  || { echo "setup.sh: PROJECT_DIR=$PROJECT is not a hybrid-vae checkout (no extension/comfyui/__init__.py)" >&2; exit 2; }
SRC=$(cd "$SRC" && pwd)
mkdir -p "$ROOT"; ROOT=$(cd "$ROOT" && pwd); cd "$ROOT"
say() { echo "[setup] $*"; }

# 1. ComfyUI's tree
if [ ! -f ComfyUI/main.py ]; then
  rm -rf ComfyUI.part
  if [ -f "$SRC/main.py" ]; then
    tar -C "$SRC" --exclude=./.git -cf - . | { mkdir ComfyUI.part; tar -C ComfyUI.part -xf -; }
    { git -C "$SRC" rev-parse HEAD 2>/dev/null || echo "source folder $SRC (not a git checkout)"; } > comfyui.commit
    : > missing-blobs.txt
  elif git --git-dir "$SRC" rev-parse --verify -q "$COMMIT^{commit}" >/dev/null \
       || git --git-dir "$SRC/.git" rev-parse --verify -q "$COMMIT^{commit}" >/dev/null; then
    GITDIR=$SRC; [ -d "$SRC/.git" ] && GITDIR=$SRC/.git
    python3 "$HERE/extract.py" "$GITDIR" "$COMMIT" ComfyUI.part missing-blobs.txt
    echo "$COMMIT" > comfyui.commit
  else
    echo "setup.sh: $SRC is neither a ComfyUI source folder (main.py) nor a git dir holding $COMMIT" >&2; exit 2
  fi
  mv ComfyUI.part ComfyUI
  say "ComfyUI $(grep -o '"[0-9.]*"' ComfyUI/comfyui_version.py) from $SRC ($(head -1 comfyui.commit))"
else
  say "ComfyUI/ present ($(grep -o '"[0-9.]*"' ComfyUI/comfyui_version.py), $(head -1 comfyui.commit 2>/dev/null)); not re-extracted"
fi
[ -s missing-blobs.txt ] && say "blobs missing from the git dir (not extracted): $(tr '\n' ' ' < missing-blobs.txt)"

# 2. venv: torch 2.13.0 (CPU wheel) first, pinned by a constraint file for every later pip call
printf 'torch==2.13.0\ntorchvision==0.28.0\n' > cons.txt
[ -x venv/bin/python ] || { say "creating venv"; "${PYTHON:-python3}" -m venv venv; }
PIP="venv/bin/pip install -q -c cons.txt"
$PIP torch==2.13.0
grep -v -E '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;[]|$)' ComfyUI/requirements.txt > req-notorch.txt
$PIP -r req-notorch.txt
$PIP torchvision==0.28.0
# torchvision 0.28.0's wheel registers fake kernels for torchvision::nms/qnms unconditionally; against this CPU
# torch its C ops are absent, so `import torchvision` fails. Register them only when the ops exist.
TVM=$(venv/bin/python -c "import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec('torchvision').origin),'_meta_registrations.py'))")
venv/bin/python - "$TVM" <<'PY'
import sys
p = sys.argv[1]; s = open(p).read(); n = 0
for op in ("nms", "qnms"):
    old = f'@torch.library.register_fake("torchvision::{op}")\n'
    new = f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() else (lambda f: f))\n'
    if old in s:
        s = s.replace(old, new); n += 1
if n:
    open(p, "w").write(s)
print(f"[setup] torchvision patch: {n} decorator(s) changed in {p}" if n else "[setup] torchvision patch already in place")
PY
venv/bin/python -c "import torch, torchvision; print('[setup] torch', torch.__version__, 'torchvision', torchvision.__version__)"

# 3. the project: a copy named as the package, its dependencies (not the project) in the venv
if [ "${REFRESH_PROJECT:-0}" = 1 ]; then rm -rf src/hybrid_vae; fi
if [ ! -d src/hybrid_vae ]; then
  mkdir -p src; rm -rf src/hybrid_vae.part; mkdir src/hybrid_vae.part
  tar -C "$PROJECT" --exclude=./.git --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache \
      --exclude=./bench/results --exclude=./demo-out -cf - . | tar -C src/hybrid_vae.part -xf -
  mv src/hybrid_vae.part src/hybrid_vae
  { git -C "$PROJECT" rev-parse HEAD 2>/dev/null || echo unknown; git -C "$PROJECT" status --porcelain 2>/dev/null | head -20; } > hybrid-vae.commit
  say "copied project $(head -1 hybrid-vae.commit) to src/hybrid_vae"
else
  say "src/hybrid_vae present ($(head -1 hybrid-vae.commit)); REFRESH_PROJECT=1 replaces it"
fi
venv/bin/python - "$PROJECT/pyproject.toml" > req-project.txt <<'PY'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
for r in p["dependencies"] + p["optional-dependencies"]["server"]:
    if not r.lower().startswith("torch"):
        print(r)
PY
$PIP -r req-project.txt
if venv/bin/python -c "import hybrid_vae" 2>/dev/null; then
  echo "setup.sh: hybrid_vae is importable in ComfyUI's venv without the node; uninstall it (the check would prove nothing)" >&2; exit 1
fi

# 4. custom nodes: the project's node exactly as its README says, and the test-only helper nodes
link() {  # link TARGET NAME
  if [ "$(readlink "ComfyUI/custom_nodes/$2" 2>/dev/null)" != "$1" ]; then
    ln -sfn "$1" "ComfyUI/custom_nodes/$2"; say "linked custom_nodes/$2 -> $1"
  fi
}
rm -f ComfyUI/custom_nodes/hybrid_vae  # the old link name: it is the package's import name
link "$ROOT/src/hybrid_vae/extension/comfyui" hybrid_vae_node
mkdir -p testnodes
cmp -s "$HERE/testnodes/__init__.py" testnodes/__init__.py || { cp "$HERE/testnodes/__init__.py" testnodes/; say "testnodes updated"; }
link "$ROOT/testnodes" zz_testnodes

# 5. random SD1.5-config VAEs (diffusers AutoencoderKL): seed 0 for ComfyUI and an endpoint, seed 1 for another endpoint
mkdir -p ComfyUI/models/vae vaes dumps
for seed in 0 1; do
  [ -f "vaes/sd15_seed$seed/config.json" ] || PYTHONPATH="$ROOT/src" venv/bin/python "$HERE/mkvae.py" "$seed" "vaes/sd15_seed$seed"
done
[ -f ComfyUI/models/vae/sd15_seed0.safetensors ] || cp vaes/sd15_seed0/diffusion_pytorch_model.safetensors ComfyUI/models/vae/sd15_seed0.safetensors
venv/bin/pip freeze 2>/dev/null | sort > pip-freeze.txt  # what this build resolved (ComfyUI's deps are unpinned)
say "done. ROOT=$ROOT; next: $HERE/run.sh $ROOT"
