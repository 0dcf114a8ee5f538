"""What the remote client learns about each endpoint's network and speed, for :func:`policy.decide`.

:class:`EndpointStats` keeps exponentially weighted moving averages (EWMA) of the round-trip time, the
download and upload rates and the server's seconds per output voxel; :func:`record` folds one answered request
into them; :func:`network_stats` gives the engine's :class:`~policy.model.NetworkStats` (the engine's defaults
for figures not measured yet).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hybrid_vae.policy.model import NetworkStats

if TYPE_CHECKING:
    from hybrid_vae.extension.remote_wire import Reply

#: Bodies smaller than this (32 KiB) say little about throughput: they measure round trips instead.
MIN_RATE_BYTES = 32 * 1024
#: Cap on a measured rate (bytes/s): a reply timed at ~0 s must not claim an infinite link.
MAX_RATE = 1e10


class EndpointStats:
    """EWMA figures for one endpoint (``alpha``: weight of a new measurement). Not locked: the client reads
    and writes them from the thread of the call that measured."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.rtt: float | None = None
        self.down: float | None = None
        self.up: float | None = None
        self.server_spv: float | None = None
        self.samples = 0

    def add(self, name: str, value: float) -> None:
        old = getattr(self, name)
        setattr(self, name, value if old is None else old + self.alpha * (value - old))
        self.samples += 1


def record(stats: EndpointStats, reply: Reply, bytes_up: int, voxels: int | None) -> float | None:
    """Fold one successful reply into ``stats``; returns the server's decode seconds (``X-Decode-Seconds``) or None.

    Time to the headers less the server's own seconds is the network's share: a round trip for a small
    request, the upload for a large one (less the known round trip); the body's transfer time gives the
    download rate; the server's seconds per voxel its speed.
    """
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
            stats.add("server_spv", server / voxels)
    return server


def network_stats(stats: EndpointStats, *, circuit: str, failures: int) -> NetworkStats:
    """The engine's view of one endpoint: measured figures where there are some, the defaults elsewhere.

    ``source`` is ``measured`` once a figure was measured; ``available`` is False while the circuit
    (``circuit``: ``closed``/``open``/``half-open``, after ``failures`` failed calls) is open.
    """
    d = NetworkStats()
    note = (f"circuit {circuit} after {failures} failed calls" if circuit != "closed"
            else f"{stats.samples} measurements" if stats.samples else "not measured")
    return NetworkStats(rtt_s=stats.rtt if stats.rtt is not None else d.rtt_s,
                        down_bytes_per_s=stats.down or d.down_bytes_per_s,
                        up_bytes_per_s=stats.up or d.up_bytes_per_s,
                        source="measured" if stats.samples else "assumed",
                        available=circuit != "open", server_seconds_per_voxel=stats.server_spv, note=note)
