"""Run an ASGI app under a real uvicorn server on loopback, in a background thread (tests, benchmarks).

::

    with serve_in_thread(create_app(families={"sd15": vae}, device="cpu")) as base:
        requests.post(f"{base}/sd15", ...)

or ``with serve_demo() as base:`` for ``hybrid-vae serve --demo``.
"""

from __future__ import annotations

import contextlib
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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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
