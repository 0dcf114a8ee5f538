#!/usr/bin/env bash
# Run the real-ComfyUI checks of the Hybrid VAE Decode node against a build made by setup.sh.
#
# usage: run.sh ROOT [PARTS...]     PARTS: tiles local cpu identity (default: all four)
# Starts two `hybrid-vae serve` endpoints (ROOT/vaes/sd15_seed0 = the VAE ComfyUI loads, ROOT/vaes/sd15_seed1 =
# another VAE) from the copied project (PYTHONPATH=ROOT/src; never installed in ComfyUI's venv), then ComfyUI per
# simulated card (tiles + identity: free_gib=0.9; local: free_gib=0.5; cpu: free_gib=0.01 with 3 GiB of host
# memory), runs probes.py, stops everything.
# Env: PORT (ComfyUI, default 8189), SERVE_PORTS (default "8201 8202"), KEEP_IDENTITY=1 (keep the verdict cache).
# Results: ROOT/results/probes.jsonl, ROOT/results/comfy-<part>.log (ComfyUI's console), ROOT/results/serve-*.log.
set -euo pipefail
ROOT=$(cd "${1:?usage: run.sh ROOT [tiles|local|cpu|identity ...]}" && pwd); shift
PARTS=${*:-tiles identity local cpu}
for p in $PARTS; do
  case "$p" in tiles|local|cpu|identity) ;; *) echo "run.sh: part '$p': use tiles, local, cpu or identity" >&2; exit 2;; esac
done
HERE=$(cd "$(dirname "$0")" && pwd)
PORT=${PORT:-8189}
read -r P1 P2 <<< "${SERVE_PORTS:-8201 8202}"
RES="$ROOT/results"; mkdir -p "$RES" "$ROOT/dumps"
PY="$ROOT/venv/bin/python"
export HYBRID_VAE_IDENTITY="$RES/identity.json"
[ "${KEEP_IDENTITY:-0}" = 1 ] || rm -f "$HYBRID_VAE_IDENTITY"
export HYBRID_VAE_LEARNED="$RES/learned.json"  # the node's learned store (a simulated card learns nothing)
rm -f "$HYBRID_VAE_LEARNED"
SERVE_PIDS=()
cleanup() {
  ROOT="$ROOT" PORT="$PORT" "$HERE/launch.sh" stop >/dev/null 2>&1 || true
  for p in "${SERVE_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

serve() {  # serve PORT VAE_DIR
  PYTHONPATH="$ROOT/src" nohup "$PY" -m hybrid_vae.extension.cli serve --family "sd15=$2" --port "$1" \
    > "$RES/serve-$1.log" 2>&1 &
  SERVE_PIDS+=($!)
}
if [[ " $PARTS " == *" identity "* ]]; then
  serve "$P1" "$ROOT/vaes/sd15_seed0"; serve "$P2" "$ROOT/vaes/sd15_seed1"
  for port in "$P1" "$P2"; do
    for _ in $(seq 1 120); do curl -sf -o /dev/null "http://127.0.0.1:$port/health" && break; sleep 1; done
    curl -sf "http://127.0.0.1:$port/health" > /dev/null || { echo "serve on :$port did not come up"; tail -5 "$RES/serve-$port.log"; exit 1; }
  done
fi

comfy() {  # comfy FREE_GIB[,host_gib=N] PART...
  local free=$1; shift
  HYBRID_VAE_SIMULATE_GPU="name=NVIDIA GeForce RTX 3070,free_gib=$free" ROOT="$ROOT" PORT="$PORT" \
    "$HERE/launch.sh" start --fp32-vae
  local rc=0
  for part in "$@"; do
    echo "== part $part (simulated RTX 3070: free_gib=$free)"
    "$PY" "$HERE/probes.py" --port "$PORT" --dumps "$ROOT/dumps" --part "$part" \
      --same "http://127.0.0.1:$P1/sd15" --other "http://127.0.0.1:$P2/sd15" --out "$RES/probes.jsonl" \
      --learned-file "$HYBRID_VAE_LEARNED" || rc=1
  done
  cp "$ROOT/comfy-$PORT.log" "$RES/comfy-$(echo "$@" | tr ' ' '-').log"
  ROOT="$ROOT" PORT="$PORT" "$HERE/launch.sh" stop
  return $rc
}
rc=0
first=(); for p in tiles identity; do [[ " $PARTS " == *" $p "* ]] && first+=("$p"); done
[ ${#first[@]} -gt 0 ] && { comfy 0.9 "${first[@]}" || rc=1; }
[[ " $PARTS " == *" local "* ]] && { comfy 0.5 local || rc=1; }
[[ " $PARTS " == *" cpu "* ]] && { comfy "0.01,host_gib=3" cpu || rc=1; }
echo "results: $RES/probes.jsonl; ComfyUI logs: $RES/comfy-*.log; exit $rc"
exit $rc
