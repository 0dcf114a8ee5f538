"""One HTTP exchange that returns by its deadline, whatever the server does (:func:`exchange`).

``requests`` has per-connect and per-read timeouts but no overall one: a server that trickles a byte every
few seconds keeps a read alive forever. So each exchange runs on a daemon guard thread; the caller waits on
an event until the deadline, then cancels (shutting the socket down so the thread's read ends) and raises
:class:`RemoteTimeoutError`. The body is read in chunks with the socket timeout cut to what is left, and
bounded: ``Content-Length`` is checked before reading and the stream is aborted past the cap. Redirects
are never followed and only identity-encoded bodies are accepted (no unbounded decompression).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import requests
from hybrid_vae.extension.remote_wire import Reply, short
from hybrid_vae.policy.errors import RemoteConnectError, RemoteProtocolError, RemoteTimeoutError

#: Error bodies (status >= 400) are read up to this many bytes (64 KiB), for the message.
ERROR_BODY_CAP = 64 * 1024


def exchange(session: requests.Session, method: str, url: str, *, deadline: float, limit: int,
             connect_timeout_s: float, read_timeout_s: float, params: Any = None, data: bytes | None = None,
             headers: Mapping[str, str]) -> Reply:
    """One request on a guard thread: returns (or raises) by ``deadline`` (``time.monotonic()`` seconds).

    Args:
        session: the client's ``requests.Session``. method / url / params / data / headers: the request.
        limit (`int`): most body bytes accepted from a successful answer.
        connect_timeout_s / read_timeout_s (`float`): per connect and per socket read, cut to what is left.

    Raises:
        RemoteTimeoutError: the deadline ran out (before, during or after the headers).
        RemoteConnectError: the connection failed or the URL is invalid.
        RemoteProtocolError: an encoded, oversized or truncated body.
    """
    box: dict[str, Any] = {}
    done, cancel = threading.Event(), threading.Event()

    def run() -> None:
        try:
            box["reply"] = _exchange_inner(session, method, url, deadline=deadline, limit=limit,
                                           timeouts=(connect_timeout_s, read_timeout_s), params=params, data=data,
                                           headers=headers, box=box, cancel=cancel)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="hybrid-vae-remote", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        cancel.set()
        sock = box.get("sock")
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        raise RemoteTimeoutError("deadline ran out while waiting for the response", endpoint=url)
    if "error" in box:
        raise box["error"]
    return box["reply"]


def _exchange_inner(session: requests.Session, method: str, url: str, *, deadline: float, limit: int,
                    timeouts: tuple[float, float], params: Any, data: bytes | None, headers: Mapping[str, str],
                    box: dict[str, Any], cancel: threading.Event) -> Reply:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise RemoteTimeoutError("deadline ran out before the request", endpoint=url)
    timeout = (min(timeouts[0], remaining), min(timeouts[1], remaining))
    t0 = time.monotonic()
    try:
        resp = session.request(method, url, params=params, data=data, headers=dict(headers),
                               timeout=timeout, stream=True, allow_redirects=False)
    except requests.exceptions.ConnectTimeout as exc:
        raise RemoteConnectError(f"connect timeout after {timeout[0]:.1f} s ({exc})", endpoint=url) from None
    except requests.exceptions.Timeout:
        raise RemoteTimeoutError(f"no response within the read timeout of {timeout[1]:.1f} s",
                                 endpoint=url) from None
    except requests.exceptions.ConnectionError as exc:
        raise RemoteConnectError(f"cannot connect ({short(exc)})", endpoint=url) from None
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema) as exc:
        raise RemoteConnectError(f"invalid endpoint URL ({exc}); use http(s)://host[:port]/path",
                                 endpoint=url) from None
    t_headers = time.monotonic()
    try:
        conn = getattr(resp.raw, "connection", None) or getattr(resp.raw, "_connection", None)
        box["sock"] = getattr(conn, "sock", None)
        hdrs = {k.lower(): v for k, v in resp.headers.items()}
        enc = hdrs.get("content-encoding", "identity").lower()
        if enc not in ("", "identity"):
            raise RemoteProtocolError(f"response is {enc}-encoded although identity was asked; refusing "
                                      "to decompress an unbounded body", endpoint=url)
        declared = hdrs.get("content-length")
        cap = limit if resp.status_code < 400 else ERROR_BODY_CAP
        if declared is not None and declared.isdigit() and int(declared) > cap and resp.status_code < 400:
            raise RemoteProtocolError(f"response of {int(declared)} bytes exceeds the limit of {cap} bytes",
                                      endpoint=url)
        body = _read_body(resp, url=url, cap=cap, deadline=deadline, read_timeout_s=timeouts[1], sock=box["sock"],
                          cancel=cancel, keep_partial=resp.status_code >= 400)
        if declared is not None and declared.isdigit() and len(body) < int(declared) and resp.status_code < 400:
            raise RemoteProtocolError(f"truncated body: {len(body)} of {declared} bytes", endpoint=url)
    finally:
        resp.close()
    return Reply(resp.status_code, hdrs, body, t0, t_headers, time.monotonic())


def _read_body(resp: requests.Response, *, url: str, cap: int, deadline: float, read_timeout_s: float, sock: Any,
               cancel: threading.Event, keep_partial: bool) -> bytes:
    """The body in chunks, each socket read bounded by what is left of the deadline; ``keep_partial``
    (error answers) returns what arrived instead of raising on a cut or oversized body."""
    import urllib3.exceptions

    raw = resp.raw
    read1 = getattr(raw, "read1", None)
    buf = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or cancel.is_set():
            raise RemoteTimeoutError(f"deadline ran out after {len(buf)} body bytes (slow transfer)", endpoint=url)
        if sock is not None:
            try:
                sock.settimeout(min(read_timeout_s, remaining))
            except OSError:
                pass
        try:
            chunk = read1(64 * 1024) if read1 is not None else raw.read(8 * 1024)
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
            raise RemoteTimeoutError(f"read timeout after {len(buf)} body bytes", endpoint=url) from None
        except (urllib3.exceptions.ProtocolError, requests.exceptions.ChunkedEncodingError, OSError) as exc:
            if keep_partial:
                break
            if cancel.is_set():
                raise RemoteTimeoutError("deadline ran out during the transfer", endpoint=url) from None
            raise RemoteProtocolError(f"truncated body after {len(buf)} bytes ({short(exc)})",
                                      endpoint=url) from None
        if not chunk:
            break
        buf += chunk
        if len(buf) > cap:
            if keep_partial:
                break
            raise RemoteProtocolError(f"response exceeds the limit of {cap} bytes; aborted", endpoint=url)
    return bytes(buf)
