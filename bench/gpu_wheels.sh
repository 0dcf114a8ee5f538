#!/usr/bin/env bash
# Run HERE (a machine with pip access), before lending a GPU machine: downloads, into .whl/ (ignored by
# git), the wheels the device image lacks for Python 3.12 -- diffusers and pydantic with their missing
# needs (the image has torch, numpy, safetensors, huggingface-hub, PyYAML, requests, Pillow, tqdm,
# nvidia-ml-py, pytest, hypothesis; see the device tool's KINDS.md). About 9 MB.
# Then: device run  command="bash bench/gpu_session.sh"  carry=[".whl"]  timeout_s=600
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 importlib-metadata==10.2.0
ls -la .whl
