"""Remote VAE decode over the hybrid-inference protocol: a hardened client on ``requests``.

What it adds to diffusers' ``remote_decode`` (see ``shared/notes/remote-protocol.md``), by module:

* :mod:`.deadline`: connect and read timeouts on by default, and an overall deadline per call that holds even
  when a server trickles bytes (each attempt runs on a guard thread; the caller never waits past it); bounded
  responses (``Content-Length`` checked before reading, the stream aborted past the limit); redirects are
  never followed;
* :mod:`.client` (:class:`RemoteClient`): bounded retries with exponential backoff and jitter on connection
  errors, 429 (``Retry-After`` honoured up to a cap) and 5xx; a bearer token that goes only where its
  :class:`~policy.trust.TokenPolicy` allows (by default the exact origins it was configured for), and only
  over HTTPS unless the host is loopback: a configured plain-HTTP remote origin raises
  :class:`RemoteSecurityError` before a socket is opened; ``shape``/``dtype`` headers checked against what
  was asked, image decoding guarded against decompression bombs (with :mod:`extension.remote_wire`);
* :mod:`.breaker`: a circuit breaker per endpoint: after ``failure_threshold`` failed calls the endpoint is
  skipped (no connection at all) for ``cooldown_s``, then one half-open probe decides;
* :mod:`.netstats`: per-endpoint round-trip time and throughput (EWMA) for the engine:
  :meth:`RemoteClient.network_stats`.

Every failure raises a :class:`policy.errors.RemoteError` subclass. The names below are this package's
public API (``from hybrid_vae.extension.remote import RemoteClient``).
"""

from __future__ import annotations

from hybrid_vae.extension.remote.breaker import CircuitBreaker
from hybrid_vae.extension.remote.client import (
    ENV_TOKEN,
    REQUEST_STATUSES,
    RETRY_STATUSES,
    USER_AGENT,
    MiB,
    RemoteClient,
    RemoteResponse,
    RemoteResult,
    output_geometry,
)
from hybrid_vae.extension.remote.deadline import exchange
from hybrid_vae.extension.remote.netstats import EndpointStats, network_stats, record
from hybrid_vae.extension.remote_wire import Reply, origin, tensor_bytes
from hybrid_vae.policy.trust import TokenPolicy, is_loopback

__all__ = [
    "ENV_TOKEN", "REQUEST_STATUSES", "RETRY_STATUSES", "USER_AGENT", "CircuitBreaker", "EndpointStats", "MiB",
    "RemoteClient", "RemoteResponse", "RemoteResult", "Reply", "TokenPolicy", "exchange", "is_loopback",
    "network_stats", "origin", "output_geometry", "record", "tensor_bytes",
]
