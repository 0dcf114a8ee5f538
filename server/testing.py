"""Run an ASGI app under a real uvicorn server on loopback, in a background thread (tests, benchmarks).

::

    with serve_in_thread(create_app(families={"sd15": vae}, device="cpu")) as base:
        requests.post(f"{base}/sd15", ...)

or ``with serve_demo() as base:`` for ``hybrid-vae serve --demo``. Also ``/proc`` helpers that tests use to
prove a server left no process behind (:func:`descendants`, :func:`processes_mentioning`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

#: ``hybrid-vae serve --demo`` as tests and benchmarks run it: CPU, the fixture VAEs preloaded, a short
#: batching window.
DEMO_CONFIG: dict[str, Any] = {"families": {}, "demo": True, "device": "cpu", "max_body_bytes": 256 * 1024**2,
                               "max_output_pixels": 2**27, "batch_window_s": 0.004, "max_batch": 8, "preload": True}


@contextlib.contextmanager
def serve_demo() -> Iterator[str]:
    """The demo server (:data:`DEMO_CONFIG`) on loopback; yields its base URL."""
    from hybrid_vae.server.cli import build_app

    with serve_in_thread(build_app(dict(DEMO_CONFIG), None)) as base:
        yield base


#: Ports :func:`free_port` has handed out in this process: it never hands one out twice, so a "dead" endpoint
#: a test took from it stays dead when a server it starts later asks for a port (the kernel may offer the same
#: ephemeral port again as soon as it is closed).
_HANDED_OUT: set[tuple[str, int]] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` and that this process has not been given before."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if (host, port) not in _HANDED_OUT:
            _HANDED_OUT.add((host, port))
            return port


@contextlib.contextmanager
def serve_in_thread(app: Any, *, host: str = "127.0.0.1", port: int | None = None,
                    start_timeout_s: float = 120.0) -> Iterator[str]:
    """Start ``app`` with uvicorn on ``host``; yield ``http://host:port``; stop it on exit.

    Raises:
        RuntimeError: the server did not start within ``start_timeout_s`` (e.g. a VAE failed to load).
    """
    import uvicorn

    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    end = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > end:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """``(parent pid, state)`` of a live process from ``/proc`` (Linux), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            tail = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(tail[1]), tail[0]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not reaped, counts as gone)."""
    st = _proc_stat(pid)
    return st is not None and st[1] != "Z"


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, their children, ...), read from ``/proc`` (Linux)."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _proc_stat(int(name))) is not None and st[1] != "Z":
            parent[int(name)] = st[0]
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier and p not in out}
        out |= frontier
    return out


def cmdline(pid: int) -> str:
    """The process's command line (Ray actors show their title, e.g. ``ray::ServeReplica:app:Deployment``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def processes_mentioning(text: str) -> set[int]:
    """Live processes whose command line contains ``text`` (e.g. a Ray instance's own temp folder)."""
    return {int(n) for n in os.listdir("/proc") if n.isdigit() and alive(int(n)) and text in cmdline(int(n))}


class RayServeProcess:
    """``hybrid-vae serve --ray ...`` in a subprocess with its own Ray instance (tests, benchmarks).

    The instance lives in a fresh temp folder (``RAY_TMPDIR``), so its processes are told apart from any other
    Ray on the machine; :meth:`stop` sends SIGTERM to the command only (it shuts Serve and Ray down itself)
    and returns the processes still alive afterwards (none, when teardown is clean), killing them.

    Args:
        args (`list[str]`): flags after ``serve --ray`` (``--port`` is added).
        env (`dict[str, str] | None`): extra environment for the command (its local Ray's processes inherit it).
        start_timeout_s (`float`, defaults to `300`): until the ready line and ``GET /health`` answers.
    """

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, start_timeout_s: float = 300.0) -> None:
        import subprocess
        import sys
        import tempfile

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.tmp = tempfile.mkdtemp(prefix="hvray-")  # short: Ray's unix sockets live below it
        self.log_path = os.path.join(self.tmp, "serve.log")
        self._log = open(self.log_path, "w+", encoding="utf-8")  # closed in stop()
        cmd = [sys.executable, "-m", "hybrid_vae.extension.cli", "serve", "--ray", "--port", str(self.port), *args]
        full_env = {**os.environ, **(env or {}), "RAY_TMPDIR": self.tmp, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)
        self.seen: set[int] = set()
        self.gcs_address: str | None = None
        self.final_log: str | None = None
        try:
            self._wait_ready(start_timeout_s)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        """The command's output so far (after :meth:`stop`: all of it)."""
        if self.final_log is not None:
            return self.final_log
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def _wait_ready(self, timeout_s: float) -> None:
        import requests

        end = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"hybrid-vae serve --ray did not start (exit {self.proc.poll()}):\n{self.log()[-4000:]}")
            ready = [ln for ln in self.log().splitlines() if ln.startswith("hybrid-vae serve --ray: http")]
            if ready:
                try:
                    if requests.get(self.base + "/health", timeout=5).status_code == 200:
                        self.gcs_address = ready[0].rsplit("Ray at ", 1)[-1].split(";")[0].strip()
                        self.snapshot()
                        return
                except requests.RequestException:
                    pass
            time.sleep(0.5)

    def snapshot(self) -> set[int]:
        """Record the command's current process tree (kept for the leftover check); returns it."""
        now = descendants(self.proc.pid) | {self.proc.pid}
        self.seen |= now
        return now

    def replica_pids(self, app: str = "hybrid-vae") -> list[int]:
        """The live Serve replica processes of application ``app`` (their title: ``ray::ServeReplica:APP:...``)."""
        return sorted(p for p in self.snapshot() if cmdline(p).startswith(f"ray::ServeReplica:{app}:"))

    def stop(self, timeout_s: float = 120.0) -> set[int]:
        """Stop the command (SIGTERM, then wait); returns the pids of this instance still alive after it (then
        killed), by its process tree and by its temp folder."""
        import shutil
        import signal

        if self.proc.poll() is None:
            self.snapshot()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except Exception:
                self.proc.kill()
                self.proc.wait(10)
        end = time.monotonic() + 20  # Ray's own processes exit shortly after the driver
        left: set[int] = set()
        while time.monotonic() < end:
            left = {p for p in self.seen if alive(p)} | processes_mentioning(self.tmp)
            if not left:
                break
            time.sleep(0.5)
        for p in left:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)
        if not self._log.closed:
            self._log.close()
            self.final_log = self.log()
            shutil.rmtree(self.tmp, ignore_errors=True)
        return left

def verified_identity(path: Any, endpoint: str, vae: Any, family: str = "sd15") -> Any:
    """An :class:`~extension.identity.IdentityChecker` whose cache file ``path`` already holds a ``same`` verdict
    for (``endpoint``, ``family``, ``vae``'s weights), as after a canary the endpoint passed while it was healthy.
    For tests of what a remote *plan* does when a verified endpoint then fails (503, hang, garbage)."""
    from hybrid_vae.extension.identity import DEFAULT_MIN_PSNR_DB, IdentityChecker, IdentityStore, weights_fingerprint
    from hybrid_vae.policy.model import EndpointIdentity

    fingerprint = weights_fingerprint(vae)
    if fingerprint is None:
        raise ValueError("verified_identity needs a VAE with weights")
    store = IdentityStore(path)
    store.put(EndpointIdentity(endpoint=endpoint, family=family, fingerprint=fingerprint, verdict="same",
                               psnr_db=100.0, threshold_db=DEFAULT_MIN_PSNR_DB, checked_at=time.time()),
              answer_sha="verified-before-the-test")
    return IdentityChecker(store)
