"""``create_app``: a Starlette app that decodes latents over the hybrid-inference protocol.

diffusers' own ``remote_decode`` works against it unchanged::

    from diffusers.utils.remote_utils import remote_decode
    image = remote_decode("http://127.0.0.1:8300/sd15", latent, scaling_factor=0.18215)

Routes: ``POST /<family>`` (also ``/<family>/`` and ``/<family>/predict``), ``POST /`` and ``/predict``
when exactly one family is served, ``GET /health`` (also ``GET /``). Errors are JSON
``{"error": ..., "field": ...}`` with a 4xx/5xx status; nothing is allocated for a request that is
refused (auth, content type, size, shape and memory are checked before the body is read).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from hybrid_vae.policy.errors import LatentError
from hybrid_vae.policy.gpu import GpuState, format_gib
from hybrid_vae.policy.profiles import Profiles, load_profiles
from hybrid_vae.server.protocol import BadRequest, DecodeRequest, encode_output, latent_from_body, normalise, parse_request
from hybrid_vae.server.service import DecodeService, ServedVAE, VaeOrLoader
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger("hybrid_vae.server")

MiB = 1024**2
CONTENT_TYPES = ("tensor/binary", "application/octet-stream")

#: ``decode(served, request, z)`` -> ``(float [-1, 1] CPU tensor, meta)``: runs a checked, normalised latent.
#: The default queues it in the app's :class:`DecodeService` (its own batching thread); the Ray Serve
#: deployment (``server/ray_app.py``) passes its ``@serve.batch`` method instead. ``meta`` has ``plan``,
#: ``seconds``, ``batch`` and optionally ``replica`` (sent as ``X-Decode-Replica``).
DecodeFn = Callable[[ServedVAE, DecodeRequest, Any], Awaitable[tuple[Any, dict[str, Any]]]]


def default_device() -> str:
    """``cuda`` when available, else ``mps``, else ``cpu``."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _error(exc: BadRequest) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.status, headers=exc.headers)


def create_app(*, families: Mapping[str, VaeOrLoader], token: str | None = None, max_body_bytes: int = 256 * MiB,
               max_output_pixels: int = 2**27, device: str | None = None, profiles: Profiles | None = None,
               batch_window_s: float = 0.004, max_batch: int = 8, preload: bool = False, jpeg_quality: int = 95,
               probe_fn: Callable[[], GpuState] | None = None, decode: DecodeFn | None = None,
               memory_budget_bytes: int | None = None, queue_timeout_s: float = 60.0, workers: int = 1) -> Starlette:
    """Build the decode app.

    Args:
        families (`Mapping[str, VAE | Callable[[], VAE]]`): family key (``sd15``, ``sdxl``, ``flux``,
            ``hunyuanvideo``, ``wan``, ``sd3`` or one from your profile) -> a diffusers VAE or a loader
            called on first use. The key selects the latent layout and default normalisation.
        token (`str | None`, defaults to `None`): when set, every decode needs ``Authorization: Bearer <token>``
            (401 otherwise). ``/health`` stays open for load balancers.
        max_body_bytes (`int`, defaults to 256 MiB): larger bodies get 413 before they are read.
        max_output_pixels (`int`, defaults to `2**27`): output voxels (B x F x H x W) per request; more gets
            422 before anything is allocated. On a GPU the engine's smallest-tile estimate is also checked
            against the device's memory.
        device (`str | None`): ``cuda``/``cuda:N``/``mps``/``cpu``; default: :func:`default_device`.
        profiles (`Profiles | None`): default :func:`policy.load_profiles` (honours ``HYBRID_VAE_PROFILE``).
        batch_window_s (`float`, defaults to `0.004`) / max_batch (`int`, defaults to `8`): batching of
            concurrent same-shape image requests (see :class:`server.service.DecodeService`).
        preload (`bool`, defaults to `False`): load every VAE at startup instead of on first use.
        jpeg_quality (`int`, defaults to `95`): quality of ``image_format=jpg`` answers.
        probe_fn: reads the device memory (default :func:`policy.gpu.probe` for ``device``).
        decode (`DecodeFn | None`): runs each accepted latent (default: the service's batching queue). Everything
            before it (auth, limits, parsing, validation, normalisation) and after it (encoding) is the same.
        memory_budget_bytes (`int | None`, defaults to `None`): the most memory decodes and the requests
            held may use (a CPU server: host RAM); None: the memory free at the first request less a 512 MiB
            reserve. A request that can never fit gets 413 before its body is read; one that does not fit
            now waits (up to ``queue_timeout_s``, defaults to `60`, then 503 + Retry-After).
        workers (`int`, defaults to `1`): server processes sharing the machine; the default budget is divided by it.

    Raises:
        ProfileError: a family key the profiles do not know (the message lists the known ones).
    """
    profiles = profiles or load_profiles()
    device = device or default_device()
    served = {name: ServedVAE(name, profiles.family(name), src, device=device) for name, src in families.items()}
    if not served:
        raise ValueError("families is empty: serve at least one, e.g. families={'sd15': vae}")
    service = DecodeService(served, profiles=profiles, device=device, max_output_pixels=max_output_pixels,
                            batch_window_s=batch_window_s, max_batch=max_batch, probe_fn=probe_fn,
                            memory_budget_bytes=memory_budget_bytes, queue_timeout_s=queue_timeout_s,
                            workers=workers)
    routes = _DecodeRoutes(served, service, token=token, max_body_bytes=max_body_bytes, decode=decode,
                           jpeg_quality=jpeg_quality, queue_timeout_s=queue_timeout_s)
    app = Starlette(routes=routes.routes(), lifespan=_lifespan(service, served, device=device, preload=preload),
                    exception_handlers={HTTPException: _http_error_handler(served)})
    app.state.service = service
    app.state.served = served
    return app


class _DecodeRoutes:
    """The decode and health routes of one app: auth, limits, admission, upload, decode, encoding.

    Each step is its own method; :meth:`handle` runs them in order and turns every refusal into the documented
    JSON error (nothing is allocated before the checks that can refuse a request have passed)."""

    def __init__(self, served: Mapping[str, ServedVAE], service: DecodeService, *, token: str | None,
                 max_body_bytes: int, decode: DecodeFn | None, jpeg_quality: int, queue_timeout_s: float) -> None:
        self.served, self.service = served, service
        self.secret = token.encode() if token else None
        self.max_body_bytes, self.decode, self.jpeg_quality = max_body_bytes, decode, jpeg_quality
        self.queue_timeout_s = queue_timeout_s
        self.keys = itertools.count()

    def routes(self) -> list[Route]:
        health, handle = self.health, self.handle
        return [Route("/health", health, methods=["GET"]), Route("/", health, methods=["GET"]),
                Route("/", handle, methods=["POST"]), Route("/predict", handle, methods=["POST"]),
                Route("/{family}", handle, methods=["POST"]), Route("/{family}/", handle, methods=["POST"]),
                Route("/{family}/predict", handle, methods=["POST"])]

    def authorised(self, request: Request) -> bool:
        if self.secret is None:
            return True
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.secret)

    def family(self, request: Request) -> tuple[str, ServedVAE]:
        """The served family this path names (the only one for ``/`` and ``/predict``); 404 otherwise."""
        served, name = self.served, request.path_params.get("family")
        if name is None:
            if len(served) != 1:
                raise BadRequest(f"this server serves {len(served)} families; POST to /<family>, one of "
                                 f"{', '.join(sorted(served))}", field="family", status=404)
            name = next(iter(served))
        s = served.get(name)
        if s is None:
            raise BadRequest(f"family {name!r} is not served here; served: {', '.join(sorted(served))}",
                             field="family", status=404)
        return name, s

    def checked_request(self, request: Request) -> tuple[ServedVAE, DecodeRequest]:
        """Family, content type, query and the body's declared size, checked before anything is read."""
        name, s = self.family(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in CONTENT_TYPES:
            raise BadRequest(f"Content-Type {ctype or '(none)'!r}: send the latent's raw bytes as tensor/binary",
                             field="content-type", status=415)
        req = parse_request(request.query_params.multi_items(), family_name=name, family=s.family,
                            accept=request.headers.get("accept"))
        limit = self.max_body_bytes
        if req.body_bytes > limit:
            raise BadRequest(f"latent of {req.body_bytes} bytes exceeds this server's limit of {limit}",
                             field="shape", status=413)
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise BadRequest(f"Content-Length {declared!r} is not a number", field="content-length")
            if int(declared) > limit:
                raise BadRequest(f"body of {declared} bytes exceeds the limit of {limit}",
                                 field="content-length", status=413)
            if int(declared) != req.body_bytes:
                raise BadRequest(f"Content-Length {declared} does not match shape {list(req.shape)} {req.dtype} "
                                 f"({req.body_bytes} bytes)", field="shape")
        return s, req

    async def wait_for_memory(self, key: int, hold: int, smallest: int) -> None:
        """Wait (before reading the body) until the budget has room for this request; 503 after
        ``queue_timeout_s``. Requests are admitted in arrival order."""
        ledger = self.service.ledger
        end = time.monotonic() + self.queue_timeout_s
        while not ledger.try_reserve(key, hold, smallest):
            if time.monotonic() >= end:
                raise BadRequest(f"waited {self.queue_timeout_s:g} s for memory: the server's "
                                 f"{format_gib(ledger.budget)} budget is taken by other requests; retry later",
                                 field="memory", status=503, headers={"Retry-After": "5"})
            await asyncio.sleep(0.02)

    async def read_body(self, request: Request, expected: int) -> bytes:
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > expected:
                raise BadRequest(f"body is longer than shape x dtype ({expected} bytes)", field="shape",
                                 status=413 if len(buf) > self.max_body_bytes else 400)
        if len(buf) != expected:
            raise BadRequest(f"body has {len(buf)} bytes; shape x dtype needs {expected}", field="shape")
        return bytes(buf)

    @staticmethod
    def prepare(body: bytes, req: DecodeRequest, s: ServedVAE) -> Any:
        """The body as the checked, normalised latent the VAE decodes (runs in a worker thread)."""
        from hybrid_vae.extension.latents import validate_latents

        z = latent_from_body(body, req)
        validate_latents(z, s.family, family_name=s.name, height=req.height if req.packed else None,
                         width=req.width if req.packed else None)
        vae = s.get()
        return normalise(z, req, family=s.family, vae_config=getattr(vae, "config", None))

    def start_decode(self, s: ServedVAE, req: DecodeRequest, z: Any) -> Awaitable[tuple[Any, dict[str, Any]]]:
        """The decode of a prepared latent: the service's batching queue, or the app's own ``decode``."""
        if self.decode is None:
            return asyncio.wrap_future(self.service.submit(s, req, z))
        return self.decode(s, req, z)

    async def decode_one(self, request: Request, s: ServedVAE, req: DecodeRequest) -> tuple[bytes, dict[str, str]]:
        """Admission (memory), upload, decode and encoding of one checked request: ``(body, headers)``."""
        service = self.service
        hold, smallest = await run_in_threadpool(service.admit, s, req)
        key = next(self.keys)
        try:
            await self.wait_for_memory(key, hold, smallest)
            with service.uploading():
                body = await self.read_body(request, req.body_bytes)
                z = await run_in_threadpool(self.prepare, body, req, s)
                del body
                pending = self.start_decode(s, req, z)  # queued here; a custom ``decode`` runs when awaited
            x, meta = await pending
            out, headers = await run_in_threadpool(encode_output, x, req, jpeg_quality=self.jpeg_quality)
            del x
        finally:
            service.ledger.release(key)
        headers.update({"X-Decode-Seconds": f"{meta['seconds']:.6f}", "X-Decode-Plan": str(meta["plan"]),
                        "X-Decode-Batch": str(meta["batch"])})
        if meta.get("replica"):
            headers["X-Decode-Replica"] = str(meta["replica"])
        return out, headers

    async def handle(self, request: Request) -> Response:
        if not self.authorised(request):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        try:
            s, req = self.checked_request(request)
            out, headers = await self.decode_one(request, s, req)
        except BadRequest as exc:
            return _error(exc)
        except LatentError as exc:
            return _error(BadRequest(str(exc), field="latents"))
        except ClientDisconnect:
            log.info("hybrid-vae serve: client left during the upload")
            return Response(status_code=499)
        except Exception as exc:
            log.exception("hybrid-vae serve: decode failed")
            return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"[:500]}, status_code=500)
        media = headers.pop("content-type")
        return Response(out, media_type=media, headers=headers)

    async def health(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(self.service.health))


def _lifespan(service: DecodeService, served: Mapping[str, ServedVAE], *, device: str,
              preload: bool) -> Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]:
    """Start the service's batching thread (and load every VAE with ``preload``); stop it at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.start()
        if preload:
            for s in served.values():
                await run_in_threadpool(s.get)
        ledger = await run_in_threadpool(lambda: service.ledger)  # the default budget: free memory after loading
        log.info("hybrid-vae serve: %s on %s, memory budget %s", ", ".join(sorted(served)), device,
                 format_gib(ledger.budget))
        try:
            yield
        finally:
            service.stop()

    return lifespan


def _http_error_handler(served: Mapping[str, ServedVAE]) -> Callable[[Request, Exception], Awaitable[Response]]:
    """Starlette's own 404/405 (unknown path, GET on a decode path) as the documented JSON error."""

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            allowed = exc.headers.get("Allow", "") if exc.headers else ""
            msg = f"{request.method} is not allowed on {request.url.path}; decode with POST (allowed: {allowed})"
        elif exc.status_code == 404:
            msg = (f"no route {request.url.path}; POST to /<family> ({', '.join(sorted(served))}), "
                   "or GET /health")
        else:
            msg = str(exc.detail)
        return JSONResponse({"error": msg, "field": "path"}, status_code=exc.status_code, headers=exc.headers)

    return http_error
