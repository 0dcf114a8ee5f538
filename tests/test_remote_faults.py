"""Faults, with real sockets on loopback: each one -> the right RemoteError, within the deadline; the
circuit breaker skips an endpoint that keeps failing; and through the orchestrator every fault ends
in a local decode, with the report saying why.

Each fault is a small raw-socket server written here (it counts the connections it accepts).
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hybrid_vae.extension.fixture import build_tiny_vae
from hybrid_vae.extension.orchestrator import HybridDecoder
from hybrid_vae.extension.remote import CircuitBreaker, RemoteClient
from hybrid_vae.policy import (
    CircuitOpenError,
    DecodeJob,
    DecodeSettings,
    Estimate,
    GpuState,
    Plan,
    RemoteConnectError,
    RemoteError,
    RemoteProtocolError,
    RemoteStatusError,
    RemoteTimeoutError,
    load_profiles,
)
from hybrid_vae.server.testing import free_port, verified_identity

PROFILES = load_profiles()
SD15 = PROFILES.family("sd15")
Behaviour = Callable[[socket.socket, bytes], None]


class FaultServer:
    """A TCP server on 127.0.0.1 that reads one HTTP request per connection and runs ``behaviour``."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.accepts = 0
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/sd15"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepts += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            n = next((int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")), 0)
            while len(body) < n:
                body += conn.recv(65536)
            self.behaviour(conn, head)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def fault() -> Iterator[Callable[[Behaviour], FaultServer]]:
    servers: list[FaultServer] = []

    def make(b: Behaviour) -> FaultServer:
        servers.append(FaultServer(b))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _head(status: str, headers: dict[str, str]) -> bytes:
    return (f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()


def respond(status: str, body: bytes = b"", **headers: str) -> Behaviour:
    hdrs = {"Content-Length": str(len(body)), "Connection": "close", **{k.replace("_", "-"): v for k, v in headers.items()}}
    return lambda conn, head: conn.sendall(_head(status, hdrs) + body)


def hang(conn: socket.socket, head: bytes) -> None:
    time.sleep(5)


def truncated(conn: socket.socket, head: bytes) -> None:
    conn.sendall(_head("200 OK", {"Content-Length": str(64 * 64 * 3), "shape": "[1, 64, 64, 3]", "dtype": "uint8"})
                 + bytes(1000))


def drip(conn: socket.socket, head: bytes) -> None:
    conn.sendall(_head("200 OK", {"Content-Length": str(64 * 64 * 3), "shape": "[1, 64, 64, 3]", "dtype": "uint8"}))
    for _ in range(200):
        conn.sendall(b"\0" * 16)
        time.sleep(0.05)


def header_drip(conn: socket.socket, head: bytes) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    for _ in range(200):
        conn.sendall(b"X-Slow: a\r\n")
        time.sleep(0.05)


def endless_chunked(conn: socket.socket, head: bytes) -> None:
    conn.sendall(_head("200 OK", {"Transfer-Encoding": "chunked", "shape": "[1, 64, 64, 3]", "dtype": "uint8"}))
    chunk = b"\0" * 65536
    for _ in range(2000):
        conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")


def png_bomb(side: int) -> bytes:
    """A tiny PNG whose header declares ``side`` x ``side`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


HTML_500 = b"<html><head><title>500 Internal Server Error</title></head><body><h1>Oops</h1> upstream died</body></html>"
U8_OK = bytes(64 * 64 * 3)
FAULTS: dict[str, tuple[Callable[[], Behaviour] | None, type[RemoteError], str]] = {
    "refused": (None, RemoteConnectError, "cannot connect"),
    "hang": (lambda: hang, RemoteTimeoutError, "read timeout"),
    "503": (lambda: respond("503 Service Unavailable", b'{"error": "overloaded"}', Content_Type="application/json"),
            RemoteStatusError, "HTTP 503: overloaded"),
    "404": (lambda: respond("404 Not Found", b"Not Found", Content_Type="text/plain"), RemoteStatusError, "HTTP 404"),
    "500-html": (lambda: respond("500 Internal Server Error", HTML_500, Content_Type="text/html"), RemoteStatusError,
                 "500 Internal Server Error"),
    "truncated": (lambda: truncated, RemoteProtocolError, "truncated"),
    "wrong-shape": (lambda: respond("200 OK", U8_OK, shape="[1, 32, 128, 3]", dtype="uint8"), RemoteProtocolError,
                    "does not match the request"),
    "wrong-dtype": (lambda: respond("200 OK", U8_OK, shape="[1, 64, 64, 3]", dtype="int64"), RemoteProtocolError,
                    "dtype header"),
    "oversize": (lambda: respond("200 OK", b"", shape="[1, 64, 64, 3]", dtype="uint8", Content_Length=str(10**10)),
                 RemoteProtocolError, "exceeds the limit"),
    "oversize-chunked": (lambda: endless_chunked, RemoteProtocolError, "exceeds the limit"),
    "slow-drip": (lambda: drip, RemoteTimeoutError, "deadline"),
    "header-drip": (lambda: header_drip, RemoteTimeoutError, "deadline"),
}


def _client(**kw: object) -> RemoteClient:
    args = {"connect_timeout_s": 1.0, "read_timeout_s": 0.5, "max_retries": 2, "backoff_base_s": 0.01,
            "backoff_max_s": 0.05, "seed": 0, **kw}
    return RemoteClient(**args)  # type: ignore[arg-type]


def _decode(client: RemoteClient, url: str, *, fmt: str = "raw", deadline_s: float = 1.5):  # type: ignore[no-untyped-def]
    plan = Plan(path="remote", dtype="float16", endpoint=url, response_format=fmt,  # type: ignore[arg-type]
                estimate=Estimate(peak_bytes=0, seconds=1.0, peak_source="-", seconds_source="-"))
    return client.decode(torch.randn(1, 4, 8, 8), plan=plan, job=DecodeJob("sd15", 64, 64), family=SD15,
                         deadline_s=deadline_s, height=64, width=64)


def _url_for(name: str, fault: Callable[[Behaviour], FaultServer]) -> tuple[str, FaultServer | None]:
    make = FAULTS[name][0]
    if make is None:
        return f"http://127.0.0.1:{free_port()}/sd15", None
    srv = fault(make())
    return srv.url, srv


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_raises_the_right_error_within_the_deadline(name: str, fault: Callable[[Behaviour], FaultServer]) -> None:
    url, _ = _url_for(name, fault)
    deadline = 1.5
    t0 = time.monotonic()
    with pytest.raises(FAULTS[name][1]) as ei:
        _decode(_client(), url, deadline_s=deadline)
    elapsed = time.monotonic() - t0
    assert FAULTS[name][2] in str(ei.value)
    assert elapsed < deadline + 0.3, elapsed


def test_retries_with_backoff_then_gives_up(fault: Callable[[Behaviour], FaultServer]) -> None:
    srv = fault(respond("503 Service Unavailable", b"busy", Retry_After="0"))
    with pytest.raises(RemoteStatusError):
        _decode(_client(max_retries=2), srv.url)
    assert srv.accepts == 3  # 1 + 2 retries
    nf = fault(respond("404 Not Found", b"gone"))
    with pytest.raises(RemoteStatusError):
        _decode(_client(max_retries=2), nf.url)
    assert nf.accepts == 1  # 4xx is not retried


def test_retry_after_beyond_the_cap_fails_fast(fault: Callable[[Behaviour], FaultServer]) -> None:
    srv = fault(respond("429 Too Many Requests", b"slow down", Retry_After="3600"))
    t0 = time.monotonic()
    with pytest.raises(RemoteStatusError, match="exceeds the cap"):
        _decode(_client(retry_after_cap_s=5), srv.url, deadline_s=10)
    assert srv.accepts == 1 and time.monotonic() - t0 < 1


def test_recovers_after_one_transient_503(fault: Callable[[Behaviour], FaultServer]) -> None:
    calls = {"n": 0}

    def flaky(conn: socket.socket, head: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            respond("503 Service Unavailable", b"warming up")(conn, head)
        else:
            respond("200 OK", U8_OK, shape="[1, 64, 64, 3]", dtype="uint8")(conn, head)

    srv = fault(flaky)
    r = _decode(_client(), srv.url)
    assert r.attempts == 2 and r.tensor.shape == (1, 3, 64, 64) and float(r.tensor.min()) == -1.0


@pytest.mark.parametrize(("side", "message"), [(9000, "declares 9000x9000, expected 64x64"),
                                               (100000, "decompression bomb")])
def test_image_bomb_rejected_before_decoding(fault: Callable[[Behaviour], FaultServer], side: int, message: str) -> None:
    srv = fault(respond("200 OK", png_bomb(side), Content_Type="image/png"))
    t0 = time.monotonic()
    with pytest.raises(RemoteProtocolError, match=message):
        _decode(_client(), srv.url, fmt="png")
    assert time.monotonic() - t0 < 1  # 81 M / 10 G pixels were never decoded


def test_circuit_breaker_skips_the_endpoint(fault: Callable[[Behaviour], FaultServer]) -> None:
    srv = fault(respond("503 Service Unavailable", b"down"))
    client = _client(max_retries=0, failure_threshold=3, cooldown_s=0.4)
    for _ in range(3):
        with pytest.raises(RemoteStatusError):
            _decode(client, srv.url)
    assert srv.accepts == 3 and client.breaker(srv.url).state == "open"
    assert client.network_stats()[srv.url].available is False
    t0 = time.monotonic()
    for _ in range(5):
        with pytest.raises(CircuitOpenError):
            _decode(client, srv.url)
    assert srv.accepts == 3  # no connection was made while open
    assert time.monotonic() - t0 < 0.1
    time.sleep(0.45)  # cool-down over: one half-open probe goes through, fails, re-opens (longer)
    with pytest.raises(RemoteStatusError):
        _decode(client, srv.url)
    assert srv.accepts == 4 and client.breaker(srv.url).state == "open"
    assert client.breaker(srv.url).cooldown == pytest.approx(0.8)


def test_half_open_probe_closes_on_success() -> None:
    now = [0.0]
    b = CircuitBreaker(failure_threshold=2, cooldown_s=10, clock=lambda: now[0])
    b.failure()
    b.failure()
    assert b.acquire() == 10.0
    now[0] = 10.5
    assert b.acquire() is None and b.state == "open"  # this caller probes; others wait
    assert b.acquire() is not None
    b.success()
    assert b.state == "closed" and b.acquire() is None


# ---- through the orchestrator: every fault ends in a local decode ---------------------------------------
@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    return build_tiny_vae("sd15", seed=0)


CPU = GpuState(name="cpu", total_bytes=0, free_bytes=0, source="cpu")


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_falls_back_to_a_local_decode(name: str, fault: Callable[[Behaviour], FaultServer],
                                            vae: torch.nn.Module, tmp_path: object) -> None:
    url, _ = _url_for(name, fault)
    deadline = 1.5
    settings = DecodeSettings(allow_remote=True, mode="remote", endpoints={"sd15": url}, remote_deadline_s=deadline,
                              remote_format="raw")
    # the endpoint passed its identity canary earlier; now it misbehaves
    dec = HybridDecoder(settings=settings, remote=_client(), probe=lambda: CPU, latent_dir=str(tmp_path),
                        identity=verified_identity(Path(str(tmp_path)) / "identity.json", url, vae))
    z = torch.randn(1, 4, 8, 8)
    result = dec.decode(z, vae, family="sd15")
    rep = result.report
    assert result.tensor.shape == (1, 3, 64, 64)  # the image is there
    assert rep.chosen.path == "remote" and rep.ran.path == "cpu" and rep.fell_back
    label, error, secs = rep.attempts[0]
    assert label == "remote raw" and error and secs < deadline + 0.3
    assert "fell back from remote raw" in rep.infotext()
    want = {"refused": "RemoteConnectError", "hang": "timeout", "slow-drip": "timeout", "header-drip": "timeout",
            "503": "HTTP 503", "404": "HTTP 404", "500-html": "HTTP 500"}.get(name, "RemoteProtocolError")
    assert want in error, error
    with torch.no_grad():
        local = vae.decode(z / 0.18215).sample.clamp(-1, 1)
    assert torch.allclose(result.tensor.float().cpu(), local, atol=1e-4)


def test_open_circuit_means_decide_skips_remote(fault: Callable[[Behaviour], FaultServer], vae: torch.nn.Module,
                                                tmp_path: object) -> None:
    srv = fault(respond("503 Service Unavailable", b"down"))
    client = _client(max_retries=0, failure_threshold=2, cooldown_s=60)
    settings = DecodeSettings(allow_remote=True, mode="remote", endpoints={"sd15": srv.url}, remote_deadline_s=2)
    dec = HybridDecoder(settings=settings, remote=client, probe=lambda: CPU, latent_dir=str(tmp_path),
                        identity=verified_identity(Path(str(tmp_path)) / "identity.json", srv.url, vae))
    for _ in range(2):
        assert dec.decode(torch.randn(1, 4, 8, 8), vae, family="sd15").report.fell_back
    rep = dec.decode(torch.randn(1, 4, 8, 8), vae, family="sd15").report
    assert srv.accepts == 2  # the third decode never touched the endpoint
    assert rep.chosen.path == "cpu" and "unavailable" in rep.reason
    assert json.dumps(rep.to_dict())  # the report is serialisable for the decision log
