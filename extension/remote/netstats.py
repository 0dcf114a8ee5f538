"""What the remote client learns about each endpoint's network and speed, for :func:`policy.decide`.

:class:`EndpointStats` keeps exponentially weighted moving averages (EWMA) of the round-trip time, the
download and upload rates and the server's seconds per output voxel; :func:`record` folds one answered request
into them; :func:`network_stats` gives the engine's :class:`~policy.model.NetworkStats` (the engine's defaults
for figures not measured yet).

An endpoint that reports its decode seconds (``X-Decode-Seconds``, this project's server) gives the server's speed
directly. One that does not (Hugging Face's endpoints) still shows it in the time to the response headers: that
is a round trip, the upload and the server's work, so :func:`infer_server_seconds` takes the round trip and the
upload at the figures the engine itself uses (measured, or its defaults) away from it. The engine's next estimate
for the same request then reproduces what was observed, whatever part the defaults got wrong; for requests of
other sizes, a wrong default round trip is spread per voxel (the figure is an average). Without this the engine
ranked a hosted endpoint at its assumed speed (``policy.estimate.REMOTE_SPEED_FACTOR``) forever.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from hybrid_vae.policy.model import NetworkStats

if TYPE_CHECKING:
    from hybrid_vae.extension.remote_wire import Reply

#: Bodies smaller than this (32 KiB) say little about throughput: they measure round trips instead.
MIN_RATE_BYTES = 32 * 1024
#: Cap on a measured rate (bytes/s): a reply timed at ~0 s must not claim an infinite link.
MAX_RATE = 1e10
#: Weight of a new measurement in the running figures (``RemoteClient(ewma_alpha=...)``'s default).
DEFAULT_ALPHA = 0.3
#: An inferred server speed older than this (seconds) is forgotten: one slow reply (a cold start, a queue) must
#: not keep the engine away from the endpoint for the rest of the session, as it never measures it again.
INFERRED_TTL_S = 600.0
#: An inferred sample counts at most this multiple of the running figure (a cold start is not the endpoint's speed).
INFERRED_MAX_STEP = 4.0
#: A reply is used for an inferred speed only when the server's share of its time to the headers is at least this:
#: below it the round trip and upload the engine assumes are most of that time (or more: a fast endpoint on a short
#: link), so the remainder says nothing about the server, and a figure near 0 would rank big requests as free.
INFERRED_MIN_SHARE = 0.25


class EndpointStats:
    """EWMA figures for one endpoint (``alpha``: weight of a new measurement). Not locked: the client reads
    and writes them from the thread of the call that measured."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.rtt: float | None = None
        self.down: float | None = None
        self.up: float | None = None
        self.server_spv: float | None = None
        self.server_inferred = False  # server_spv from the time to the headers, not X-Decode-Seconds
        self.server_t = 0.0  # time.monotonic() of the last server_spv sample
        self.samples = 0

    def add(self, name: str, value: float) -> None:
        old = getattr(self, name)
        setattr(self, name, value if old is None else old + self.alpha * (value - old))
        self.samples += 1


def _link(stats: EndpointStats) -> tuple[float, float]:
    """The round trip (s) and upload rate (bytes/s) the engine estimates with: measured, else its defaults."""
    d = NetworkStats()
    return (stats.rtt if stats.rtt is not None else d.rtt_s), (stats.up or d.up_bytes_per_s)


def _fresh_inferred(stats: EndpointStats, now: float) -> float | None:
    """The inferred server speed while it is younger than :data:`INFERRED_TTL_S`, else None."""
    return stats.server_spv if stats.server_inferred and now - stats.server_t <= INFERRED_TTL_S else None


def infer_server_seconds(ttfb_s: float, bytes_up: int, *, rtt_s: float, up_bytes_per_s: float) -> float:
    """The server's seconds in a reply that does not report them: the time to the response headers (``ttfb_s``)
    less one round trip (``rtt_s``) and the upload of ``bytes_up`` at ``up_bytes_per_s`` (the figures the engine
    estimates with: measured, or its defaults); at least 0."""
    return max(0.0, ttfb_s - rtt_s - bytes_up / up_bytes_per_s)


def record(stats: EndpointStats, reply: Reply, bytes_up: int, voxels: int | None, *,
           now: float | None = None) -> float | None:
    """Fold one successful reply into ``stats``; returns the server's decode seconds (``X-Decode-Seconds``) or None.

    Time to the headers less the server's own seconds is the network's share: a round trip for a small
    request, the upload for a large one (less the known round trip); the body's transfer time gives the
    download rate; the server's seconds per voxel its speed. Without ``X-Decode-Seconds`` the server's seconds
    are inferred (:func:`infer_server_seconds`; a sample counts at most :data:`INFERRED_MAX_STEP` x the running
    figure, and only when it is at least :data:`INFERRED_MIN_SHARE` of the time to the headers) and the round
    trip and upload are not measured. ``now``: ``time.monotonic()`` (tests pass their own).
    """
    now = time.monotonic() if now is None else now
    server: float | None = None
    try:
        server = float(reply.headers["x-decode-seconds"])
    except (KeyError, ValueError):
        pass
    ttfb = reply.t_headers - reply.t_start
    down_t = reply.t_end - reply.t_headers
    if len(reply.body) >= MIN_RATE_BYTES and down_t > 0:
        stats.add("down", min(len(reply.body) / down_t, MAX_RATE))
    if server is not None:
        overhead = max(1e-4, ttfb - server)
        if bytes_up < MIN_RATE_BYTES or stats.rtt is None:
            stats.add("rtt", overhead)
        else:
            stats.add("up", min(bytes_up / max(1e-4, overhead - stats.rtt), MAX_RATE))
        if voxels:
            if stats.server_inferred:  # a reported figure replaces the inferred ones
                stats.server_spv, stats.server_inferred = None, False
            stats.add("server_spv", server / voxels)
            stats.server_t = now
    elif voxels and (stats.server_inferred or stats.server_spv is None):
        rtt, up = _link(stats)
        secs = infer_server_seconds(ttfb, bytes_up, rtt_s=rtt, up_bytes_per_s=up)
        if secs < INFERRED_MIN_SHARE * ttfb:
            return server
        running = stats.server_spv = _fresh_inferred(stats, now)  # a stale figure is forgotten: start again
        spv = secs / voxels
        stats.add("server_spv", spv if running is None else min(spv, INFERRED_MAX_STEP * running))
        stats.server_inferred, stats.server_t = True, now
    return server


def network_stats(stats: EndpointStats, *, circuit: str, failures: int, now: float | None = None) -> NetworkStats:
    """The engine's view of one endpoint: measured figures where there are some, the defaults elsewhere.

    ``source`` is ``measured`` once a figure was measured; ``available`` is False while the circuit
    (``circuit``: ``closed``/``open``/``half-open``, after ``failures`` failed calls) is open. An inferred
    server speed older than :data:`INFERRED_TTL_S` is not reported (the engine's assumption applies again).
    """
    now = time.monotonic() if now is None else now
    d = NetworkStats()
    rtt, up = _link(stats)
    spv = _fresh_inferred(stats, now) if stats.server_inferred else stats.server_spv
    note = (f"circuit {circuit} after {failures} failed calls" if circuit != "closed"
            else f"{stats.samples} measurements" if stats.samples else "not measured")
    return NetworkStats(rtt_s=rtt, down_bytes_per_s=stats.down or d.down_bytes_per_s, up_bytes_per_s=up,
                        source="measured" if stats.samples else "assumed",
                        available=circuit != "open", server_seconds_per_voxel=spv,
                        server_inferred=spv is not None and stats.server_inferred, note=note)
