#!/usr/bin/env bash
# Compatibility run: the SD.Next adapter, executor and orchestrator tests under
#   * diffusers 0.39.0 with pydantic 2.13 and requests 2.34 (what SD.Next pins, mid-2026), in $COMPAT_VENV
#   * the main environment's diffusers (newest release), in $MAIN_VENV
# The compat venv is created on first use (torch 2.13.0, CPU wheel when the index offers it); the repository
# is installed into it editable with --no-deps, so nothing can move diffusers off 0.39.0.
#
# usage: bench/compat.sh [extra pytest args]      env: MAIN_VENV (/work/venv), COMPAT_VENV (/work/venv39)
# exit status: 0 when every run passed.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
MAIN_VENV=${MAIN_VENV:-/work/venv}
COMPAT_VENV=${COMPAT_VENV:-/work/venv39}
TESTS=(tests/test_sdnext.py tests/test_sdnext_parts.py tests/test_sdnext_load.py tests/test_executors.py tests/test_stream.py
       tests/test_orchestrator.py)
PINS=(torch==2.13.0 diffusers==0.39.0 "pydantic==2.13.*" "requests==2.34.*" "PyYAML>=6.0" "safetensors>=0.4"
      "numpy>=1.24" "Pillow>=9.5" "tqdm>=4.60" "nvidia-ml-py>=12.535")
TEST_DEPS=("pytest>=8" "hypothesis>=6.100" "starlette>=0.37" "uvicorn>=0.29" "httpx>=0.27")

if [ ! -x "$COMPAT_VENV/bin/python" ]; then
    echo "== creating $COMPAT_VENV (diffusers 0.39.0)"
    python3 -m venv "$COMPAT_VENV" || exit 2
    "$COMPAT_VENV/bin/pip" install -q "${PINS[@]}" "${TEST_DEPS[@]}" || exit 2
fi
"$COMPAT_VENV/bin/pip" install -q --no-deps -e "$REPO" || exit 2

present=()
for t in "${TESTS[@]}"; do [ -f "$REPO/$t" ] && present+=("$t"); done

status=0
for venv in "$COMPAT_VENV" "$MAIN_VENV"; do
    versions=$("$venv/bin/python" -c "import diffusers, pydantic, requests, torch; print(f'diffusers {diffusers.__version__}, torch {torch.__version__}, pydantic {pydantic.__version__}, requests {requests.__version__}')")
    echo "== $venv: $versions"
    (cd "$REPO" && "$venv/bin/python" -m pytest -q -p no:cacheprovider "${present[@]}" "$@") | tail -n 15
    rc=${PIPESTATUS[0]}
    echo "== $venv: pytest exit status $rc"
    [ "$rc" -eq 0 ] || status=1
done
exit $status
