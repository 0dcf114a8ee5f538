"""The remote decode client: :class:`RemoteClient` (the protocol, retries, the token) and its results.

It composes the other modules of :mod:`extension.remote`: a :class:`~extension.remote.breaker.CircuitBreaker`
and :class:`~extension.remote.netstats.EndpointStats` per endpoint, and
:func:`~extension.remote.deadline.exchange` for every HTTP request. The wire format (bodies, images, mp4,
headers) is :mod:`extension.remote_wire`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import requests
from hybrid_vae.extension.remote.breaker import CircuitBreaker
from hybrid_vae.extension.remote.deadline import exchange
from hybrid_vae.extension.remote.netstats import DEFAULT_ALPHA, EndpointStats, network_stats, record
from hybrid_vae.extension.remote_wire import (
    Reply,
    error_text,
    has_av,
    image_to_tensor,
    origin,
    parse_image,
    parse_tensor,
    read_mp4,
    retry_after,
    tensor_bytes,
    uint8_to_tensor,
)
from hybrid_vae.policy.env import env_name
from hybrid_vae.policy.errors import (
    CircuitOpenError,
    LatentError,
    PlanError,
    RemoteConnectError,
    RemoteError,
    RemoteProtocolError,
    RemoteSecurityError,
    RemoteStatusError,
    RemoteTimeoutError,
)
from hybrid_vae.policy.model import NetworkStats, split_endpoints
from hybrid_vae.policy.trust import TokenPolicy

if TYPE_CHECKING:
    import torch
    from hybrid_vae.policy.model import DecodeJob, DecodeSettings, Plan
    from hybrid_vae.policy.profiles import Family, Profiles

log = logging.getLogger("hybrid_vae.remote")

MiB = 1024**2
#: Statuses retried with backoff.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Statuses that say "this request" is wrong, not "this endpoint": they do not trip the breaker.
REQUEST_STATUSES = frozenset({400, 413, 415, 422})
USER_AGENT = "hybrid-vae/0.1 (+remote decode client)"
#: Environment variable the ComfyUI node and `hybrid-vae decode` read a bearer token from (never a widget/flag).
ENV_TOKEN = env_name("token")


@dataclasses.dataclass(frozen=True)
class RemoteResult:
    """A finished remote decode, shaped like a local one.

    Attributes:
        tensor: float32 in [-1, 1] on the CPU, ``[B, 3, H, W]`` or ``[B, 3, F, H, W]``.
        endpoint: the URL that answered.
        bytes_up / bytes_down: request and response body bytes (all requests of the call).
        seconds: wall time of the call, retries and backoff included.
        status: HTTP status of the answer (200).
        format: ``raw`` | ``png`` | ``jpg`` | ``mp4`` (what was actually requested).
        attempts: HTTP requests made (retries and per-image requests included).
        server_seconds: decode time the server reported (``X-Decode-Seconds``), when it did.
    """

    tensor: torch.Tensor
    endpoint: str
    bytes_up: int
    bytes_down: int
    seconds: float
    status: int
    format: str
    attempts: int = 1
    server_seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class RemoteResponse:
    """One successful protocol request (:meth:`RemoteClient.request`).

    ``output`` is a ``torch.Tensor`` (``pt`` output, or a video server's ``pil`` frames), a
    ``PIL.Image.Image`` (``pil`` image) or ``bytes`` (``mp4``; a uint8 ``[F, H, W, 3]`` tensor with
    ``decode_video``), already checked against what was asked.
    """

    endpoint: str
    status: int
    headers: Mapping[str, str]
    output: Any
    output_type: str
    bytes_up: int
    bytes_down: int
    seconds: float
    attempts: int
    server_seconds: float | None = None


def output_geometry(lat: torch.Tensor, family: Family, *, family_name: str, height: int,
                    width: int) -> tuple[int, int | None, int, int]:
    """``(batch, frames or None, height, width)`` of the decoded output of ``lat`` for ``family``.

    Raises:
        LatentError: a latent layout the family cannot have (the message gives the expected one).
    """
    sc = family.spatial_compression
    if family.video:
        if lat.ndim != 5 or lat.shape[1] != family.latent_channels:
            raise LatentError(f"latents shape {tuple(lat.shape)}: {family_name} needs [B, "
                              f"{family.latent_channels}, T, h, w]")
        frames = (lat.shape[2] - 1) * family.temporal_compression + 1
        return lat.shape[0], frames, lat.shape[3] * sc, lat.shape[4] * sc
    if lat.ndim == 3:
        if not family.packed or lat.shape[2] != family.latent_channels * 4:
            raise LatentError(f"latents shape {tuple(lat.shape)}: 3-D latents are only valid packed for a "
                              f"packed family ([B, (H/16)*(W/16), {family.latent_channels * 4}])")
        if (height // (sc * 2)) * (width // (sc * 2)) != lat.shape[1]:
            raise LatentError(f"height={height}, width={width} do not match {lat.shape[1]} packed patches")
        return lat.shape[0], None, height, width
    if lat.ndim != 4 or lat.shape[1] != family.latent_channels:
        raise LatentError(f"latents shape {tuple(lat.shape)}: {family_name} needs [B, "
                          f"{family.latent_channels}, h, w]")
    return lat.shape[0], None, lat.shape[2] * sc, lat.shape[3] * sc


class RemoteClient:
    """A client for remote VAE decode endpoints (the hybrid-inference protocol).

    Args:
        token (`str | None`, defaults to `None`): bearer token (e.g. your Hugging Face token).
        trusted_endpoints (`Iterable[str]`, defaults to `()`): URLs the token may go to; matched by exact
            origin (scheme, host, port) with :meth:`policy.trust.TokenPolicy.exact`. Other endpoints are
            called without it. A trusted endpoint on plain HTTP that is not loopback raises
            :class:`RemoteSecurityError` before anything is sent.
        token_policy (`TokenPolicy | None`): the policy itself, instead of ``trusted_endpoints`` (the
            token goes where ``token_policy.allows(url)``); one policy for every entry point.
        connect_timeout_s (`float`, defaults to `5.0`) / read_timeout_s (`float`, defaults to `60.0`):
            per connect and per socket read; the call's ``deadline_s`` caps both.
        max_retries (`int`, defaults to `2`): extra attempts after a connection error, 429 or 5xx.
        backoff_base_s (`float`, defaults to `0.25`) / backoff_max_s (`float`, defaults to `4.0`):
            delay ``base * 2**n`` capped, times a random factor in [0.5, 1] (jitter).
        retry_after_cap_s (`float`, defaults to `10.0`): longest ``Retry-After`` honoured; longer waits fail fast.
        failure_threshold (`int`, defaults to `3`), cooldown_s (`float`, defaults to `30.0`),
            max_cooldown_s (`float`, defaults to `300.0`): circuit breaker per endpoint.
        max_response_bytes (`int`, defaults to 1 GiB): hard cap on any response body; each decode also caps
            it at 1.25x the raw output size + 1 MiB.
        max_image_pixels (`int`, defaults to `2**28`): largest image decoded when the size is not known.
        ewma_alpha (`float`, defaults to `0.3`): weight of a new network measurement.
        session (`requests.Session | None`): bring your own (proxies, certificates); redirects are never
            followed whatever its settings.
        seed (`int | None`): seed of the jitter (tests).

    Trade-offs: retries cost time inside the deadline; a lower ``failure_threshold`` gives up on a flaky
    endpoint sooner (the orchestrator then decodes locally).
    """

    def __init__(self, *, token: str | None = None, trusted_endpoints: Iterable[str] = (),
                 token_policy: TokenPolicy | None = None, connect_timeout_s: float = 5.0, read_timeout_s: float = 60.0,
                 max_retries: int = 2,
                 backoff_base_s: float = 0.25, backoff_max_s: float = 4.0, retry_after_cap_s: float = 10.0,
                 failure_threshold: int = 3, cooldown_s: float = 30.0, max_cooldown_s: float = 300.0,
                 max_response_bytes: int = 1024 * MiB, max_image_pixels: int = 2**28, ewma_alpha: float = DEFAULT_ALPHA,
                 session: requests.Session | None = None, seed: int | None = None) -> None:
        for name, v in (("connect_timeout_s", connect_timeout_s), ("read_timeout_s", read_timeout_s)):
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}; timeouts cannot be disabled")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.token = token or None
        trusted = [u for spec in trusted_endpoints for u in split_endpoints(spec)]  # pools: 'a|b'
        if token_policy is not None and trusted:
            raise ValueError("give trusted_endpoints or token_policy, not both")
        self.token_policy = token_policy or TokenPolicy.exact(trusted)
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self.max_retries, self.backoff_base_s, self.backoff_max_s = max_retries, backoff_base_s, backoff_max_s
        self.retry_after_cap_s = retry_after_cap_s
        self._breaker_args = {"failure_threshold": failure_threshold, "cooldown_s": cooldown_s,
                              "max_cooldown_s": max_cooldown_s}
        self.max_response_bytes, self.max_image_pixels = max_response_bytes, max_image_pixels
        self._alpha = ewma_alpha
        self.session = session or requests.Session()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._breakers: dict[str, CircuitBreaker] = {}
        self._stats: dict[str, EndpointStats] = {}

    @classmethod
    def for_settings(cls, settings: DecodeSettings, profiles: Profiles, *, token: str | None = None,
                     **kwargs: Any) -> RemoteClient:
        """A client whose token may go to the endpoints these settings can choose: the configured ones
        (``settings.endpoints``) and, with ``use_builtin_endpoints``, the families' built-in endpoints.

        Extra keyword arguments go to the constructor (timeouts, retries, breaker, ...).
        """
        trusted = list(settings.endpoints.values())
        if settings.use_builtin_endpoints:
            trusted += [ep.url for fam in profiles.families.values() for ep in fam.endpoints]
        return cls(token=token, trusted_endpoints=trusted, **kwargs)

    # ---- bookkeeping -----------------------------------------------------------------------------
    def breaker(self, endpoint: str) -> CircuitBreaker:
        """The circuit breaker of ``endpoint`` (created on first use)."""
        with self._lock:
            if endpoint not in self._breakers:
                self._breakers[endpoint] = CircuitBreaker(**self._breaker_args)
            return self._breakers[endpoint]

    def _stat(self, endpoint: str) -> EndpointStats:
        with self._lock:
            return self._stats.setdefault(endpoint, EndpointStats(self._alpha))

    def network_stats(self) -> dict[str, NetworkStats]:
        """What is known about each endpoint used so far, for :func:`policy.decide`.

        ``source`` is ``measured`` once a figure was measured (unmeasured figures keep the engine's
        defaults); ``available`` is False while the endpoint's circuit is open.
        """
        with self._lock:
            keys = set(self._stats) | set(self._breakers)
        out: dict[str, NetworkStats] = {}
        for ep in sorted(keys):
            b = self.breaker(ep)
            out[ep] = network_stats(self._stat(ep), circuit=b.state, failures=b.failures)
        return out

    def _headers(self, endpoint: str) -> dict[str, str]:
        """Base headers, with the token when (and only when) this endpoint may have it."""
        h = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if self.token is None:
            return h
        if self.token_policy.insecure(endpoint):
            raise RemoteSecurityError("refusing to send the bearer token over plain HTTP to a non-loopback host; "
                                      "use https:// or remove the token", endpoint=endpoint)
        why = self.token_policy.check(endpoint)
        if why is not None:
            log.debug("token not sent to %s: %s", endpoint, why)
            return h
        h["Authorization"] = f"Bearer {self.token}"
        return h

    # ---- one HTTP exchange -----------------------------------------------------------------------
    def _exchange(self, method: str, url: str, *, deadline: float, limit: int, params: Any = None,
                  data: bytes | None = None, headers: Mapping[str, str]) -> Reply:
        """One request with this client's session and timeouts; returns by ``deadline`` (see :func:`exchange`)."""
        return exchange(self.session, method, url, deadline=deadline, limit=limit,
                        connect_timeout_s=self.connect_timeout_s, read_timeout_s=self.read_timeout_s,
                        params=params, data=data, headers=headers)

    # ---- a call: breaker, retries, deadline ------------------------------------------------------
    def _call(self, endpoint: str, *, params: Any, data: bytes, headers: Mapping[str, str], deadline: float,
              limit: int, parse: Callable[[Reply], Any], max_retries: int | None = None) -> tuple[Reply, Any, int]:
        base = self._headers(endpoint)  # may raise RemoteSecurityError: nothing sent, breaker untouched
        breaker = self.breaker(endpoint)
        retry_at = breaker.acquire()
        if retry_at is not None:
            raise CircuitOpenError(f"skipped: {breaker.failures} failed calls; retry in "
                                   f"{max(0.0, retry_at - time.monotonic()):.0f} s", endpoint=endpoint,
                                   retry_at=retry_at)
        attempt = 0
        last: RemoteError | None = None
        try:
            while True:
                attempt += 1
                wait = None
                try:
                    reply = self._exchange("POST", endpoint, deadline=deadline, limit=limit, params=params,
                                           data=data, headers={**base, **headers})
                    if 200 <= reply.status < 300:
                        out = parse(reply)
                        breaker.success()
                        return reply, out, attempt
                    if 300 <= reply.status < 400:
                        raise RemoteStatusError(f"redirect to {reply.headers.get('location', '?')} not followed; "
                                                "configure the final URL", endpoint=endpoint, status=reply.status)
                    err = RemoteStatusError(error_text(reply), endpoint=endpoint, status=reply.status,
                                            body=reply.body[:2048].decode("utf-8", "replace"))
                    if reply.status not in RETRY_STATUSES:
                        raise err
                    last = err
                    if reply.status in (429, 503):
                        ra = retry_after(reply.headers.get("retry-after"))
                        if ra is not None and ra > self.retry_after_cap_s:
                            raise RemoteStatusError(f"{error_text(reply)} (Retry-After {ra:.0f} s exceeds the cap of "
                                                    f"{self.retry_after_cap_s:.0f} s)", endpoint=endpoint,
                                                    status=reply.status) from None
                        wait = ra
                except RemoteConnectError as exc:
                    last = exc
                assert last is not None
                if attempt > (self.max_retries if max_retries is None else max_retries):
                    raise last
                if wait is None:
                    wait = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1)) * (0.5 + self._rng.random() / 2)
                if time.monotonic() + wait >= deadline:
                    raise last
                log.info("remote %s: attempt %d failed (%s); retrying in %.2f s", endpoint, attempt, last, wait)
                time.sleep(wait)
        except RemoteStatusError as exc:
            if exc.status in REQUEST_STATUSES:
                breaker.release()
            else:
                breaker.failure()
            raise
        except RemoteError:
            breaker.failure()
            raise
        except BaseException:
            breaker.release()
            raise

    # ---- public API ------------------------------------------------------------------------------
    def health(self, endpoint: str, *, timeout_s: float = 5.0) -> dict[str, Any]:
        """GET ``<origin>/health``: ``{"status": "ok"|"unknown"|"down"|"error", "http_status", "seconds", "info"}``.

        A 404 means the server has no health route: ``unknown``, not down. Measures round-trip time.
        """
        scheme, host, port = origin(endpoint)
        url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}/health"
        t0 = time.monotonic()
        try:
            reply = self._exchange("GET", url, deadline=t0 + timeout_s, limit=MiB,
                                   headers=self._headers(endpoint))
        except (RemoteConnectError, RemoteTimeoutError, RemoteProtocolError) as exc:
            return {"status": "down", "http_status": None, "seconds": time.monotonic() - t0, "info": str(exc)}
        secs = reply.t_headers - reply.t_start
        self._stat(endpoint).add("rtt", secs)
        info: Any = None
        try:
            info = json.loads(reply.body.decode("utf-8"))
        except ValueError:
            info = reply.body[:200].decode("utf-8", "replace")
        status = "ok" if reply.status == 200 else "unknown" if reply.status in (404, 405) else "error"
        return {"status": status, "http_status": reply.status, "seconds": secs, "info": info}

    def request(self, endpoint: str, latents: torch.Tensor, *, output_type: str = "pil", image_format: str = "jpg",
                partial_postprocess: bool = False, scaling_factor: float | None = None,
                shift_factor: float | None = None, do_scaling: bool | None = None, height: int | None = None,
                width: int | None = None, deadline_s: float = 60.0, expect_shape: Sequence[Sequence[int]] | None = None,
                expect_size: tuple[int, int] | None = None, expect_frames: int | None = None,
                max_response_bytes: int | None = None, voxels: int | None = None,
                decode_video: bool = False, max_retries: int | None = None) -> RemoteResponse:
        """One protocol request, with query parameters exactly as diffusers' ``remote_decode`` sends them
        (same defaults: ``output_type="pil"``, ``image_format="jpg"``, ``partial_postprocess=False``).

        Args:
            endpoint: decode URL. latents: sent as-is (un-normalised; packed for Flux).
            output_type: ``pil`` | ``pt`` | ``mp4``. image_format: ``jpg`` | ``png`` (for ``pil``).
            partial_postprocess: with ``pt``, True asks for uint8 ``[B, H, W, 3]``.
            scaling_factor / shift_factor: the server decodes ``z / scaling + shift``; ``do_scaling=True``
                (legacy) asks for the server model's own normalisation.
            height / width: output pixels (needed for packed latents).
            deadline_s: the whole call, retries included.
            expect_shape: accepted tensor shapes; expect_size: ``(width, height)`` of an image or video frame;
                expect_frames: frames of an mp4.
            max_response_bytes: body cap (default: the client's).
            voxels: output voxels (to learn the server's speed).
            decode_video: with ``mp4``, return the frames as a uint8 ``[F, H, W, 3]`` tensor (needs PyAV).
            max_retries: this call's retries (default: the client's); an endpoint pool passes 0 while other
                endpoints remain, so it fails over instead of backing off.

        Raises:
            RemoteError subclasses; :class:`policy.errors.LatentError` for a dtype the protocol cannot carry.
        """
        if output_type not in ("pil", "pt", "mp4"):
            raise ValueError(f"output_type={output_type!r}: use 'pil', 'pt' or 'mp4'")
        if image_format not in ("jpg", "png"):
            raise ValueError(f"image_format={image_format!r}: use 'jpg' or 'png'")
        t_start = time.monotonic()
        deadline = t_start + deadline_s
        data = tensor_bytes(latents)
        params: dict[str, Any] = {"image_format": image_format, "output_type": output_type,
                                  "partial_postprocess": partial_postprocess, "shape": list(latents.shape),
                                  "dtype": str(latents.dtype).rsplit(".", 1)[-1]}
        if scaling_factor is not None:
            params["scaling_factor"] = scaling_factor
        if shift_factor is not None:
            params["shift_factor"] = shift_factor
        if do_scaling and scaling_factor is None:
            params["do_scaling"] = True
        if height is not None and width is not None:
            params["height"], params["width"] = height, width
        accept = {"mp4": "text/plain", "pil": "image/jpeg" if image_format == "jpg" else "image/png"}.get(
            output_type, "tensor/binary")
        headers = {"Content-Type": "tensor/binary", "Accept": accept}
        limit = min(max_response_bytes or self.max_response_bytes, self.max_response_bytes)

        def parse(reply: Reply) -> Any:
            if "shape" in reply.headers or output_type == "pt":
                return parse_tensor(reply, endpoint, expect_shape)
            if output_type == "pil":
                return parse_image(reply.body, endpoint, expect_size, image_format, self.max_image_pixels)
            if decode_video or expect_size is not None:
                return read_mp4(reply.body, endpoint, expect_size, expect_frames, decode=decode_video)
            return reply.body

        reply, out, attempts = self._call(endpoint, params=params, data=data, headers=headers, deadline=deadline,
                                          limit=limit, parse=parse, max_retries=max_retries)
        server = record(self._stat(endpoint), reply, len(data), voxels)
        return RemoteResponse(endpoint=endpoint, status=reply.status, headers=reply.headers, output=out,
                              output_type=output_type, bytes_up=len(data) * attempts, bytes_down=len(reply.body),
                              seconds=time.monotonic() - t_start, attempts=attempts, server_seconds=server)

    def decode(self, latents: torch.Tensor, *, plan: Plan, job: DecodeJob, family: Family, deadline_s: float,
               height: int, width: int, max_retries: int | None = None) -> RemoteResult:
        """Run a remote plan: send the ORIGINAL latents with the family's factors, return a local-like tensor.

        Args:
            latents: un-normalised latents: ``[B, C, h, w]``, Flux packed ``[B, (H/16)*(W/16), 64]``, or
                video ``[B, C, T, h, w]``.
            plan: a ``remote`` plan (``endpoint``, ``response_format`` raw|png|jpg|mp4).
            job / family: what is decoded (batch, frames, compression, normalisation).
            deadline_s: the whole decode, every request of it.
            height / width: output pixels (used for packed latents; checked for the others).
            max_retries: this call's retries (default: the client's).

        Returns:
            RemoteResult: float32 CPU tensor in [-1, 1] (quantised to 8 bits by every format).
        """
        if plan.endpoint is None:
            raise ValueError("plan.endpoint is None: decode() needs a remote plan with an endpoint")
        if len(split_endpoints(plan.endpoint)) > 1:
            raise PlanError(f"{plan.endpoint}: several endpoints; decode through extension.endpoints.EndpointPool")
        endpoint, fmt = plan.endpoint, plan.response_format or "raw"
        lat = latents
        b, frames, h, w = output_geometry(lat, family, family_name=job.family, height=height, width=width)
        if fmt == "mp4" and (not family.video or not has_av()):
            log.info("remote %s: mp4 %s; asking for raw frames", endpoint,
                     "is for video families" if not family.video else "needs PyAV (pip install av)")
            fmt = "raw"
        if family.video and fmt in ("png", "jpg"):
            fmt = "raw"
        scaling: dict[str, Any] = {
            "scaling_factor": family.scaling_factor, "shift_factor": family.shift_factor,
            "do_scaling": family.latents_mean is not None and family.scaling_factor is None}
        nf = frames or 1
        raw_size = b * nf * h * w * 3
        limit = int(raw_size * 1.25) + MiB
        t0 = time.monotonic()
        deadline = t0 + deadline_s
        if fmt in ("png", "jpg"):
            parts, up, down, attempts, server = [], 0, 0, 0, 0.0
            for i in range(b):
                r = self.request(endpoint, lat[i:i + 1], output_type="pil", image_format=fmt, partial_postprocess=False,
                                 height=height, width=width, deadline_s=max(1e-3, deadline - time.monotonic()),
                                 expect_size=(w, h), max_response_bytes=limit, voxels=h * w, max_retries=max_retries, **scaling)
                parts.append(image_to_tensor(r.output))
                up, down, attempts = up + r.bytes_up, down + r.bytes_down, attempts + r.attempts
                server += r.server_seconds or 0.0
            import torch

            return RemoteResult(torch.cat(parts), endpoint, up, down, time.monotonic() - t0, 200, fmt, attempts,
                                server or None)
        if fmt == "mp4":
            r = self.request(endpoint, lat, output_type="mp4", height=height, width=width, deadline_s=deadline_s,
                             expect_size=(w, h), expect_frames=b * nf, max_response_bytes=limit, voxels=b * nf * h * w,
                             decode_video=True, max_retries=max_retries, **scaling)
            tensor = uint8_to_tensor(r.output, b, frames)
        else:
            shapes = [[b * nf, h, w, 3]] + ([[b, nf, h, w, 3]] if family.video else [])
            r = self.request(endpoint, lat, output_type="pt", partial_postprocess=True, height=height, width=width,
                             deadline_s=deadline_s, expect_shape=shapes, max_response_bytes=limit,
                             voxels=b * nf * h * w, max_retries=max_retries, **scaling)
            tensor = uint8_to_tensor(r.output, b, frames)
        return RemoteResult(tensor, endpoint, r.bytes_up, r.bytes_down, time.monotonic() - t0, r.status, fmt,
                            r.attempts, r.server_seconds)

    def close(self) -> None:
        """Close the HTTP session's connections."""
        self.session.close()


