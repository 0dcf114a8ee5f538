"""Several endpoints per family: an :class:`EndpointPool` over one :class:`~extension.remote.RemoteClient`.

A family's endpoint setting may name several URLs joined by ``|`` (``"https://a/sdxl|https://b/sdxl"``;
:func:`policy.model.split_endpoints`). The engine sees the pool as one endpoint (its key is that string, its
network figures those of the member that would be tried first); the pool decides which member answers::

    from hybrid_vae.extension.endpoints import EndpointPool
    pool = EndpointPool(RemoteClient(token=tok, trusted_endpoints=[spec]), pools=[spec])
    HybridDecoder(settings=DecodeSettings(allow_remote=True, endpoints={"sdxl": spec}), remote=pool)

Per decode, the members are ordered by, in this order of precedence:

1. circuit breaker open (the client's breaker, per URL) -> last;
2. health check says down (``GET /health`` refused, timed out or 5xx) -> after the healthy ones;
3. recent errors, fewest first: each failure counts 1 and halves every ``error_half_life_s`` (60 s), rounded,
   so a member that failed in the last minute goes after those that did not, and is forgiven after ~2 minutes;
4. the engine's own remote estimate for this job (:func:`policy.estimate.remote_estimate` from the client's
   measured round trip, bandwidth and server speed of that URL) times ``(1 + requests in flight from this
   pool)``, so concurrent decodes spread over members of similar speed;
5. the configured order (ties, e.g. nothing measured yet).

Then it tries them in that order until one answers or the deadline runs out. Every member but the last is
tried without the client's own retries (failing over is the retry: a refused connection moves on at once
instead of backing off); the last gets the client's retries. A 400 or 415 answer (the request itself is
wrong, the same on every member) stops at once. The result's ``endpoint`` is the URL that answered and
``skipped`` says which members failed first and why; the orchestrator puts both in the infotext and the
decision log.

Health checks run in the background (one short thread per member, ``health_timeout_s``) when a pool's
last check is older than ``health_interval_s``; a decode never waits for one. :meth:`EndpointPool.refresh`
with ``wait=True`` checks now (e.g. at startup). A pool of one URL behaves exactly like the bare client.

Trade-offs: a member that is down but accepts connections slowly (a black hole) costs up to the client's
connect timeout once, then the health check or the breaker puts it last; failing over re-uploads the
latent (bytes_up counts the answering member's request only).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from hybrid_vae.extension.remote import RemoteResult
from hybrid_vae.policy.errors import (
    CircuitOpenError,
    RemoteConnectError,
    RemoteError,
    RemoteSecurityError,
    RemoteStatusError,
    RemoteTimeoutError,
)
from hybrid_vae.policy.estimate import remote_estimate
from hybrid_vae.policy.model import ENDPOINT_SEP, NetworkStats, split_endpoints

if TYPE_CHECKING:
    from hybrid_vae.extension.remote import RemoteClient
    from hybrid_vae.policy.model import DecodeJob, Plan
    from hybrid_vae.policy.profiles import Family

log = logging.getLogger("hybrid_vae.endpoints")

__all__ = ["EndpointPool", "PoolResult", "join_endpoints", "pool_for"]

#: Answers that say the request is wrong (the same on every member): no failover.
FINAL_STATUSES = frozenset({400, 415})


def join_endpoints(urls: str | Sequence[str]) -> str:
    """``["https://a/x", "https://b/x"]`` -> ``"https://a/x|https://b/x"`` (a string passes through, stripped).

    Raises:
        ValueError: an empty list, or a URL that is not ``http(s)://...`` or contains ``|`` (names the value).
    """
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"endpoint {item!r}: give http(s):// URLs as strings")
        for url in split_endpoints(item):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"endpoint {url!r}: give an http:// or https:// URL")
            if url not in out:
                out.append(url)
    if not out:
        raise ValueError(f"endpoint {urls!r}: give at least one http(s):// URL")
    return ENDPOINT_SEP.join(out)


def _host(url: str) -> str:
    return urlsplit(url).netloc or url


def _why(exc: RemoteError) -> str:
    """A few words for the infotext: why a member was skipped."""
    if isinstance(exc, RemoteStatusError):
        return f"HTTP {exc.status}"
    if isinstance(exc, CircuitOpenError):
        return "circuit open"
    if isinstance(exc, RemoteTimeoutError):
        return "timeout"
    if isinstance(exc, RemoteConnectError):
        return "unreachable"
    if isinstance(exc, RemoteSecurityError):
        return "token refused over plain HTTP"
    return type(exc).__name__


@dataclasses.dataclass(frozen=True)
class PoolResult(RemoteResult):
    """A :class:`~extension.remote.RemoteResult` from a pool: ``endpoint`` is the member that answered,
    ``seconds`` the whole call (failed members included), ``skipped`` ``"host (why)"`` per member that
    failed before it, in order."""

    skipped: tuple[str, ...] = ()


@dataclasses.dataclass
class _Member:
    url: str
    errors: float = 0.0  # decayed failure count at errors_t
    errors_t: float = 0.0
    inflight: int = 0
    health: str = "unknown"  # unknown | ok | down
    checked_t: float = -math.inf
    checking: bool = False
    last_error: str | None = None
    answered: int = 0


class EndpointPool:
    """Pools of remote endpoints behind one client: health-checked, ordered, failing over within the deadline.

    Implements the orchestrator's ``RemoteDecoder`` (``decode``, ``network_stats``).

    Args:
        client (`RemoteClient`): does every request (token, timeouts, retries, breakers, measurements).
        pools (`Iterable[str]`, defaults to `()`): endpoint settings to know from the start (``"a|b"``);
            others are learnt from the plans they appear in.
        health_interval_s (`float`, defaults to `30.0`): a pool's members are re-checked in the background
            when their last check is older than this (``math.inf``: only by :meth:`refresh`).
        health_timeout_s (`float`, defaults to `2.0`): one health check's deadline.
        error_half_life_s (`float`, defaults to `60.0`): how fast a member's recent failures are forgiven.
        min_attempt_s (`float`, defaults to `0.05`): a member is not tried with less of the deadline left.
        clock (`Callable[[], float]`, defaults to `time.monotonic`): injectable for tests.
    """

    def __init__(self, client: RemoteClient, *, pools: Iterable[str] = (), health_interval_s: float = 30.0,
                 health_timeout_s: float = 2.0, error_half_life_s: float = 60.0, min_attempt_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic) -> None:
        for name, v in (("health_interval_s", health_interval_s), ("health_timeout_s", health_timeout_s),
                        ("error_half_life_s", error_half_life_s)):
            if not v > 0 or (math.isinf(v) and name != "health_interval_s"):
                raise ValueError(f"{name}={v!r}: give a positive number of seconds")
        self.client = client
        self.health_interval_s, self.health_timeout_s = health_interval_s, health_timeout_s
        self.error_half_life_s, self.min_attempt_s = error_half_life_s, min_attempt_s
        self._clock = clock
        self._lock = threading.Lock()
        self._members: dict[str, _Member] = {}
        self._pools: dict[str, tuple[str, ...]] = {}
        for spec in pools:
            self.add(spec)

    # ---- membership and state ---------------------------------------------------------------------
    def add(self, spec: str) -> tuple[str, ...]:
        """Register an endpoint setting (one URL or ``"a|b|..."``); returns its URLs."""
        with self._lock:
            urls = self._pools.get(spec)
            if urls is None:
                urls = split_endpoints(spec)
                if not urls:
                    raise ValueError(f"endpoint {spec!r}: give at least one http(s):// URL")
                self._pools[spec] = urls
                for u in urls:
                    self._members.setdefault(u, _Member(u))
            return urls

    def _recent_errors(self, m: _Member, now: float) -> float:
        return m.errors * 0.5 ** ((now - m.errors_t) / self.error_half_life_s) if m.errors else 0.0

    def _failed(self, url: str, exc: RemoteError) -> None:
        with self._lock:
            m, now = self._members[url], self._clock()
            m.errors, m.errors_t, m.last_error = self._recent_errors(m, now) + 1.0, now, str(exc)[:300]

    def _answered(self, url: str) -> None:
        with self._lock:
            m = self._members[url]
            m.answered += 1
            m.health = "ok"  # it just answered a decode

    def order(self, spec: str, *, job: DecodeJob | None = None, family: Family | None = None,
              fmt: str = "raw") -> list[str]:
        """The members of ``spec``, best first (see the module docstring for the ranking)."""
        urls = self.add(spec)
        stats = self.client.network_stats()
        now = self._clock()
        with self._lock:
            members = [self._members[u] for u in urls]
            errors = {m.url: math.floor(self._recent_errors(m, now) + 0.5) for m in members}
            load = {m.url: 1 + m.inflight for m in members}
            down = {m.url: m.health == "down" for m in members}

        def key(item: tuple[int, str]) -> tuple[bool, bool, int, float, int]:
            i, url = item
            net = stats.get(url) or NetworkStats()
            if job is not None and family is not None:
                est = remote_estimate(job, family, net, fmt).seconds  # type: ignore[arg-type]
            else:
                est = net.rtt_s
            return (not net.available, down[url], errors[url], est * load[url], i)

        return [u for _, u in sorted(enumerate(urls), key=key)]

    # ---- health -----------------------------------------------------------------------------------
    def refresh(self, spec: str | None = None, *, wait: bool = False) -> dict[str, str]:
        """Health-check the members of ``spec`` (default: every known member), each on its own thread.

        Returns:
            ``{url: "ok" | "down" | "unknown"}`` as known when it returns (after the checks with ``wait``).
        """
        if spec is not None:
            urls = self.add(spec)
        else:
            with self._lock:
                urls = tuple(self._members)
        threads = []
        with self._lock:
            todo = [u for u in urls if not self._members[u].checking]
            for u in todo:
                self._members[u].checking = True
        for u in todo:
            t = threading.Thread(target=self._check, args=(u,), name=f"hybrid-vae-health {_host(u)}", daemon=True)
            t.start()
            threads.append(t)
        if wait:
            for t in threads:
                t.join(self.health_timeout_s + 1.0)
        with self._lock:
            return {u: self._members[u].health for u in urls}

    def _check(self, url: str) -> None:
        try:
            h = self.client.health(url, timeout_s=self.health_timeout_s)
            # a server without /health (404/405: "unknown") still decodes; refused, timeout or 5xx: down
            health = "down" if h["status"] in ("down", "error") else "ok"
        except RemoteError as exc:  # e.g. a token that may not go to this URL over plain HTTP
            health = "down"
            log.warning("hybrid-vae: health check of %s failed: %s", url, exc)
        finally:
            with self._lock:
                self._members[url].checking = False
        with self._lock:
            m = self._members[url]
            if m.health != health:
                log.info("hybrid-vae: endpoint %s is %s", url, health)
            m.health, m.checked_t = health, self._clock()

    def _maybe_refresh(self, spec: str, urls: Sequence[str]) -> None:
        now = self._clock()
        with self._lock:
            stale = any(now - self._members[u].checked_t > self.health_interval_s and not self._members[u].checking
                        for u in urls)
        if stale:
            self.refresh(spec)

    # ---- the RemoteDecoder protocol ---------------------------------------------------------------
    def decode(self, latents: Any, *, plan: Plan, job: DecodeJob, family: Family, deadline_s: float,
               height: int, width: int) -> RemoteResult:
        """Decode on the best member of ``plan.endpoint``, failing over to the next ones within ``deadline_s``.

        Raises:
            RemoteError: every member failed, or the deadline ran out (the message lists each member's error);
                the answer of a member that says the request is wrong (400/415) at once.
            LatentError: a latent the protocol cannot carry (before anything is sent).
        """
        if plan.endpoint is None:
            raise ValueError("plan.endpoint is None: decode() needs a remote plan with an endpoint")
        urls = self.add(plan.endpoint)
        kw = {"job": job, "family": family, "height": height, "width": width}
        if len(urls) == 1:
            return self._attempt(urls[0], latents, plan, deadline_s=deadline_s, max_retries=None, **kw)
        self._maybe_refresh(plan.endpoint, urls)
        start = self._clock()
        end = start + deadline_s
        ranked = self.order(plan.endpoint, job=job, family=family, fmt=plan.response_format or "raw")
        skipped: list[str] = []
        errors: list[str] = []
        for i, url in enumerate(ranked):
            left = end - self._clock()
            if left < self.min_attempt_s:
                errors.append(f"{url}: not tried, {max(0.0, left):.2f} s of the deadline left")
                break
            try:
                r = self._attempt(url, latents, dataclasses.replace(plan, endpoint=url), deadline_s=left,
                                  max_retries=0 if i < len(ranked) - 1 else None, **kw)
            except RemoteStatusError as exc:
                if exc.status in FINAL_STATUSES:
                    raise
                skipped.append(f"{_host(url)} {_why(exc)}")
                errors.append(str(exc))
                continue
            except RemoteError as exc:
                skipped.append(f"{_host(url)} {_why(exc)}")
                errors.append(str(exc))
                continue
            if skipped:
                log.info("hybrid-vae: %s answered after %s", url, ", ".join(skipped))
            fields = {f.name: getattr(r, f.name) for f in dataclasses.fields(RemoteResult)}
            fields["seconds"] = self._clock() - start
            return PoolResult(**fields, skipped=tuple(skipped))
        raise RemoteError(f"no endpoint of the pool answered: {'; '.join(errors)}", endpoint=plan.endpoint)

    def _attempt(self, url: str, latents: Any, plan: Plan, *, job: DecodeJob, family: Family, deadline_s: float,
                 height: int, width: int, max_retries: int | None) -> RemoteResult:
        with self._lock:
            self._members[url].inflight += 1
        try:
            r = self.client.decode(latents, plan=plan, job=job, family=family, deadline_s=deadline_s, height=height,
                                   width=width, max_retries=max_retries)
        except CircuitOpenError:
            raise  # the breaker already counts this member's failures
        except RemoteStatusError as exc:
            if exc.status not in FINAL_STATUSES:
                self._failed(url, exc)
            raise
        except RemoteError as exc:
            self._failed(url, exc)
            raise
        finally:
            with self._lock:
                self._members[url].inflight -= 1
        self._answered(url)
        return r

    def network_stats(self) -> dict[str, NetworkStats]:
        """The client's figures per URL, plus one entry per pool: its first member's figures, available while
        any member's circuit is closed."""
        out = dict(self.client.network_stats())
        with self._lock:
            pools = [(s, u) for s, u in self._pools.items() if len(u) > 1]
        for spec, urls in pools:
            best = self.order(spec)[0]
            net = out.get(best) or NetworkStats()
            up = [u for u in urls if (out.get(u) or NetworkStats()).available]
            out[spec] = dataclasses.replace(net, available=bool(up),
                                            note=f"pool of {len(urls)}: {_host(best)} first, {len(up)} available")
        return out

    def status(self) -> list[dict[str, Any]]:
        """One row per member: health, breaker state, recent errors, requests in flight, answers, last error."""
        stats = self.client.network_stats()
        now = self._clock()
        with self._lock:
            members = list(self._members.values())
            rows = [{"url": m.url, "health": m.health, "recent_errors": round(self._recent_errors(m, now), 3),
                     "inflight": m.inflight, "answered": m.answered, "last_error": m.last_error} for m in members]
        for row in rows:
            net: NetworkStats | None = stats.get(row["url"])
            row["rtt_s"] = net.rtt_s if net is not None and net.source == "measured" else None
            row["breaker"] = self.client.breaker(row["url"]).state
        return rows

    def close(self) -> None:
        """Close the client's connections."""
        self.client.close()


def pool_for(client: Any, specs: Mapping[str, str] | Iterable[str] = ()) -> Any:
    """``client`` wrapped in an :class:`EndpointPool` knowing ``specs`` (a pool passes through, with the
    specs added; anything else, e.g. a test double, is returned as is)."""
    from hybrid_vae.extension.remote import RemoteClient

    values = list(specs.values()) if isinstance(specs, Mapping) else list(specs)
    if isinstance(client, EndpointPool):
        for s in values:
            client.add(s)
        return client
    if isinstance(client, RemoteClient):
        return EndpointPool(client, pools=values)
    return client
