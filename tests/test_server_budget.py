"""`hybrid-vae serve` bounded by its own memory: a real server process on a CPU with ``--memory-budget 0.375``
(GiB), measured from outside through Linux's peak-RSS counter (``VmHWM`` of ``/proc/PID/status``, reset by
writing 5 to ``/proc/PID/clear_refs``).

- a 1024 px request, whose full decode takes more than the budget (measured here, in this process), is
  decoded in tiles with the server's peak RSS growth under the budget;
- a request that can never fit gets 413 before its body is sent, and the server's memory does not move;
- concurrent large requests are queued and decoded one by one, never together past the budget.
"""

from __future__ import annotations

import concurrent.futures
import gc
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests
import torch
from hybrid_vae.extension.fixture import FIXTURE_DIR, load_fixture_vae

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak RSS")

EXE = shutil.which("hybrid-vae") or os.path.join(os.path.dirname(sys.executable), "hybrid-vae")
GiB = 1024**3
BUDGET_GIB = 0.375


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakRss:
    """Peak resident memory growth of process ``pid`` over a block (Linux's high-water mark, reset first)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.growth = 0

    def __enter__(self) -> PeakRss:
        with open(f"/proc/{self.pid}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # VmHWM := VmRSS
        self.base = _status(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = _status(self.pid, "VmHWM") - self.base


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    proc = subprocess.Popen([EXE, "serve", "--family", f"sd15={FIXTURE_DIR}", "--device", "cpu", "--port", "0",
                             "--memory-budget", str(BUDGET_GIB), "--batch-window-ms", "200"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert "http://127.0.0.1:" in line, line
        base = "http://" + line.split("http://", 1)[1].split("/<family>", 1)[0]
        end = time.monotonic() + 120
        while True:
            try:
                requests.get(base + "/health", timeout=5)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < end
                time.sleep(0.2)
        # warm up: the runtime's one-off allocations (thread pools, kernels) are not the decode's
        assert _post(base, _latent(8)).status_code == 200
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def _latent(side: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(seed)).half()


def _post(base: str, z: torch.Tensor) -> requests.Response:
    return requests.post(base + "/sd15", params={"shape": list(z.shape), "dtype": "float16", "output_type": "pt",
                                                 "partial_postprocess": "true"},
                         data=z.numpy().tobytes(), headers={"Content-Type": "tensor/binary"}, timeout=600)


def test_budget_is_reported(server: tuple[str, int]) -> None:
    base, _ = server
    mem = requests.get(base + "/health", timeout=10).json()["memory"]
    assert mem["budget_bytes"] == int(BUDGET_GIB * GiB) and mem["held_bytes"] == 0


def test_a_request_far_above_the_budget_is_decoded_in_tiles_within_it(server: tuple[str, int]) -> None:
    base, pid = server
    z = _latent(128)  # 1024 x 1024 px
    # what the same decode takes in one piece, measured in this process: more than the budget
    vae = load_fixture_vae()
    gc.collect()
    with PeakRss(os.getpid()) as full, torch.no_grad():
        out = vae.decode(z.float() / 0.18215).sample
    del out, vae
    gc.collect()
    assert full.growth > BUDGET_GIB * GiB, full.growth
    with PeakRss(pid) as served:
        r = _post(base, z)
    assert r.status_code == 200, r.text
    assert r.headers["X-Decode-Plan"].startswith("tiled "), r.headers["X-Decode-Plan"]
    assert r.headers["shape"] == "[1, 1024, 1024, 3]"
    assert served.growth <= BUDGET_GIB * GiB, (served.growth, full.growth)
    print(f"1024 px: full decode {full.growth / GiB:.3f} GiB (measured here); served as {r.headers['X-Decode-Plan']}: "
          f"peak RSS growth {served.growth / GiB:.3f} GiB of the {BUDGET_GIB} GiB budget")


def _raw_http(base: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
    """POST with a Content-Length but no body: an answer can only come from the admission checks."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(head.encode() + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 10:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1].decode(errors="replace")


def test_a_request_that_can_never_fit_gets_413_before_any_allocation(server: tuple[str, int]) -> None:
    base, pid = server
    before = requests.get(base + "/health", timeout=10).json()["queue"]["requests"]
    side = 1024  # 8192 x 8192 px: even its output alone is over the budget
    with PeakRss(pid) as rss:
        status, body = _raw_http(base, f"/sd15?shape=1&shape=4&shape={side}&shape={side}&dtype=float16",
                                 {"Content-Type": "tensor/binary", "Content-Length": str(4 * side * side * 2)})
    assert status == 413 and "budget is 0.38 GiB" in body and "smallest tile" in body, body
    assert rss.growth < 64 * 1024**2, rss.growth  # nothing near the 512 MiB output was allocated
    print(f"8192 px: {status} before the body, peak RSS growth {rss.growth / 1024**2:.1f} MiB")
    assert requests.get(base + "/health", timeout=10).json()["queue"]["requests"] == before  # never queued


def test_concurrent_large_requests_are_queued_not_decoded_together(server: tuple[str, int]) -> None:
    """Three 768 px requests at once: one 768 px full decode of the fixture peaks near 0.26 GiB here, three
    together would take about three times that, twice the budget; the server plans them against the budget
    and decodes them one at a time, its peak growth stays under the budget."""
    base, pid = server
    zs = [_latent(96, seed=i) for i in range(3)]
    seen_waiting = []
    with PeakRss(pid) as rss, concurrent.futures.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(_post, base, z) for z in zs]
        while not all(f.done() for f in futs):
            q = requests.get(base + "/health", timeout=10).json()
            seen_waiting.append(q["queue"]["waiting"] + q["queue"]["decoding"] + q["memory"]["waiting_for_memory"])
            time.sleep(0.05)
        res = [f.result() for f in futs]
    assert all(r.status_code == 200 for r in res), [r.text for r in res]
    plans = [(r.headers["X-Decode-Plan"], r.headers["X-Decode-Batch"]) for r in res]
    assert max(seen_waiting) >= 2, seen_waiting  # they were in the server at the same time
    # never one decode of several items: each item alone ("full" for a batch of 1, or a plan "x3": item by item)
    assert all(batch == "1" or plan.endswith(f" x{batch}") for plan, batch in plans), plans
    assert rss.growth <= BUDGET_GIB * GiB, (rss.growth, plans)
    print(f"concurrent 3 x 768 px: plans {plans}, server peak RSS growth {rss.growth / GiB:.3f} GiB")


def test_ledger_admits_in_arrival_order_and_leaves_room_for_one_decode() -> None:
    """Pure: sum(holds) + the largest smallest-plan never exceeds the budget, and a request that does not fit
    holds back those behind it (no starvation of large requests)."""
    from hybrid_vae.server.service import MemoryLedger

    led = MemoryLedger(100)
    assert not led.fits_ever(60, 41) and led.fits_ever(60, 40)
    assert led.try_reserve(1, 30, 40)  # 30 + 40 <= 100
    assert not led.try_reserve(2, 20, 60)  # 30 + 20 + 60 > 100: waits, first in line
    assert not led.try_reserve(3, 1, 1)  # would fit, but 2 is ahead of it
    assert led.info() == {"budget_bytes": 100, "held_bytes": 30, "admitted": 1, "waiting_for_memory": 2}
    led.release(1)
    assert not led.try_reserve(3, 1, 1) and led.try_reserve(2, 20, 60) and led.try_reserve(3, 1, 1)
    assert led.held_bytes() == 21
    led.release(2)
    led.release(3)
    assert led.info()["admitted"] == 0 and led.info()["waiting_for_memory"] == 0
