#!/usr/bin/env bash
# Start/stop the SD.Next that setup.sh built (CPU, offline), on 127.0.0.1:${SDNEXT_PORT:-7861}.
#
#   ROOT=... launch.sh start [extra SD.Next args]   console -> ROOT/console.log, pid -> ROOT/sdnext.pid; waits until up
#   ROOT=... launch.sh stop                         stops it (by PID), waits until the port is free
#   ROOT=... launch.sh serve-start | serve-stop     `python -m hybrid_vae serve --demo` on 127.0.0.1:${SERVE_PORT:-8300}
#                                                   with ${HV_PYTHON:-python3} (a Python that has the project's [server] extra)
# SD.Next's own log file is ROOT/sdnext/sdnext.log (always at DEBUG). SD.Next 058a7f0 runs with --debug by default
# (console at DEBUG); QUIET=1 sets SD_NODEBUG=1, SD.Next's switch for a console at INFO.
# Flags: no --quick/--skip-all/--skip-git/--skip-extensions, so SD.Next does a full launch (and runs extensions'
# install.py) whenever its installer state changed (first start, an extension's new commit: sync-ext.sh);
# --experimental keeps it from replacing diffusers/transformers by git builds; --skip-torch/--skip-requirements
# keep it offline. Anything in the environment (e.g. HYBRID_VAE_SIMULATE_GPU) reaches SD.Next.
set -euo pipefail
ROOT=${ROOT:?set ROOT to the folder setup.sh built}
PORT=${SDNEXT_PORT:-7861}
case "${1:-}" in
  start) shift
    cd "$ROOT/sdnext"
    if [ "${QUIET:-0}" = 1 ]; then export SD_NODEBUG=1; fi
    TORCH_COMPILE_DISABLE=1 nohup ../venv/bin/python launch.py --skip-torch --skip-requirements --experimental \
      --port "$PORT" --data-dir "$ROOT/D" --models-dir "$ROOT/M" "$@" > "$ROOT/console.log" 2>&1 &
    echo $! > "$ROOT/sdnext.pid"
    for _ in $(seq 1 180); do
      if ! kill -0 "$(cat "$ROOT/sdnext.pid")" 2>/dev/null; then echo "SD.Next exited; see $ROOT/console.log"; exit 1; fi
      if curl -sf -o /dev/null "http://127.0.0.1:$PORT/sdapi/v1/options" && grep -q "Startup time" "$ROOT/console.log"; then
        echo "up (pid $(cat "$ROOT/sdnext.pid"))"; exit 0
      fi
      sleep 5
    done; echo "not up after 15 min; see $ROOT/console.log"; exit 1 ;;
  stop)
    if [ -f "$ROOT/sdnext.pid" ]; then
      pid=$(cat "$ROOT/sdnext.pid"); kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
      rm -f "$ROOT/sdnext.pid"
    fi
    echo stopped ;;
  serve-start)
    SP=${SERVE_PORT:-8300}
    nohup "${HV_PYTHON:-python3}" -m hybrid_vae serve --demo --host 127.0.0.1 --port "$SP" > "$ROOT/serve.log" 2>&1 &
    echo $! > "$ROOT/serve.pid"
    for _ in $(seq 1 60); do curl -sf "http://127.0.0.1:$SP/health" >/dev/null && { echo "serve up on $SP"; exit 0; }; sleep 2; done
    echo "serve not up; see $ROOT/serve.log"; exit 1 ;;
  serve-stop) [ -f "$ROOT/serve.pid" ] && kill "$(cat "$ROOT/serve.pid")" 2>/dev/null; rm -f "$ROOT/serve.pid"; echo stopped ;;
  *) echo "usage: ROOT=... launch.sh start [args]|stop|serve-start|serve-stop"; exit 2 ;;
esac
