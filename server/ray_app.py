"""``hybrid-vae serve --ray``: the decode endpoint on Ray Serve (replicas, dynamic batching, autoscaling).

Same HTTP protocol, same paths, same checks as ``hybrid-vae serve``: each replica runs the very Starlette
app of :func:`server.cli.build_app` (token, limits, parsing, validation, encoding); only the step that
decodes a checked latent changes, from the service's own queue to Ray Serve's ``@serve.batch``.

::

    hybrid-vae serve --ray --family sdxl=madebyollin/sdxl-vae-fp16-fix            # one replica per GPU
    hybrid-vae serve --ray --demo --device cpu --replicas 2                        # CPU, offline
    serve run server/ray-serve.yaml          # or: serve deploy server/ray-serve.yaml (a running cluster)

**One deployment holding every family, one replica per GPU** (not one deployment per family), because:

* VAE weights are small (0.1-0.5 GB in fp16) next to a decode's activations (several GiB for SDXL at
  1024 px, tens for video), so every replica can hold every family (loaded on first use with ``--lazy``)
  and any replica can take any request: all GPUs serve the whole load, and a quiet family costs no GPU;
* a decode's memory peak is what limits a GPU. One replica per GPU owns that GPU's free memory and runs one
  batch at a time, so the engine's plan (full / exact tiles / one by one, from the free memory it reads
  just before the decode) holds. Per-family deployments sharing a GPU (fractional ``num_gpus``) would race
  for the same memory, and Ray schedules by reserved fractions, not by free bytes;
* batching still only joins compatible requests: Ray collects what arrived during the window and
  :meth:`server.service.DecodeService.decode_batch` splits it into groups of the same family and latent
  shape (images only; the output format and wire dtype are per request, applied after the decode).

The cost: a long video decode holds its replica while image requests wait for the next batch; Ray's
router sends new requests to the replica with the fewest ongoing ones, and ``max_ongoing_requests`` caps
what one replica holds. Per-family scaling, if a deployment ever needs it, is a second application with
``--family`` limited to that family under its own route prefix.

Ray is imported only by this module; ``hybrid_vae.server`` and plain ``hybrid-vae serve`` never import it
(``tests/test_ray_serve.py`` checks). Install: ``pip install 'sdnext-hybrid-vae[ray]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

try:
    import ray
    from ray import serve
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("hybrid-vae on Ray Serve needs Ray: pip install -e '.[ray]' in the hybrid-vae checkout "
                      f"(missing: {exc.name})") from exc

from hybrid_vae.policy.env import read_env
from hybrid_vae.server.cli import ENV_TOKEN, add_arguments, build_app, config_from_args
from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger("hybrid_vae.server")

APP_NAME = "hybrid-vae"
DEPLOYMENT = "VaeDecoder"
#: ``args`` keys of a config file that are not the application's business (Ray's config sets them).
NOT_ARGS = {"host": "http_options.host", "port": "http_options.port", "workers": "the deployment's num_replicas",
            "token": f"env {ENV_TOKEN} (runtime_env.env_vars or the pod's env; never in a config file)"}


async def call_asgi(app: Any, request: Request) -> Response:
    """Run one HTTP request through an ASGI ``app`` in this process; its response as a Starlette ``Response``."""
    start: dict[str, Any] = {"status": 500, "headers": []}
    body: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(status=message["status"], headers=list(message.get("headers", [])))
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))

    await app(request.scope, request.receive, send)
    response = Response(b"".join(body), status_code=start["status"])
    response.raw_headers = [(bytes(k), bytes(v)) for k, v in start["headers"]]
    return response


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=16, max_queued_requests=256, health_check_period_s=10.0,
                  graceful_shutdown_timeout_s=60.0, ray_actor_options={"num_cpus": 1})
class VaeDecoder:
    """One replica: the serve app with a ``@serve.batch`` decode step, on the device Ray gave it.

    Args:
        config (`dict`): a ``hybrid-vae serve`` configuration (:func:`config_from_args`); ``device`` None means
            the replica's own GPU when Ray assigned one (``CUDA_VISIBLE_DEVICES``), else the CPU. The token
            comes from env ``HYBRID_VAE_SERVER_TOKEN`` of the replica.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        self.replica = str(getattr(rid, "unique_id", None) or getattr(ctx, "replica_tag", "replica"))
        self.app = build_app(config, read_env().server_token, decode=self._decode)
        self.service = self.app.state.service
        self._batched.set_max_batch_size(int(config["max_batch"]))
        self._batched.set_batch_wait_timeout_s(float(config["batch_window_s"]))
        if config.get("preload", True):
            for served in self.app.state.served.values():
                served.get()
        log.info("hybrid-vae ray replica %s (pid %d): %s on %s", self.replica, os.getpid(),
                 ", ".join(sorted(self.app.state.served)), self.service.device)

    async def __call__(self, request: Request) -> Response:
        return await call_asgi(self.app, request)

    async def _decode(self, served: Any, req: Any, z: Any) -> tuple[Any, dict[str, Any]]:
        out = await self._batched((served, req, z))
        if isinstance(out, BaseException):
            raise out
        x, meta = out
        return x, {**meta, "replica": self.replica}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.004)
    async def _batched(self, entries: list[tuple[Any, Any, Any]]) -> list[Any]:
        # one batch at a time per replica (max_concurrent_batches=1): the device runs one decode at a time,
        # requests that arrive meanwhile form the next batch
        futures = await asyncio.to_thread(self.service.decode_batch, entries)
        return [f.exception() or f.result() for f in futures]

    def check_health(self) -> None:
        """Ray's periodic health check: the device must still be readable (a lost GPU restarts the replica)."""
        self.service.gpu()


class _ArgsParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # type: ignore[override]
        raise ValueError(f"args: {message}; keys are hybrid-vae serve's flags without the dashes")


def config_from_mapping(args: Mapping[str, Any]) -> dict[str, Any]:
    """A config file's ``args`` -> a serve configuration, through the same flags and checks as the CLI.

    Keys are ``hybrid-vae serve``'s flags with ``_`` for ``-``: ``family`` (a mapping ``{sdxl: hub/id}`` or a
    list of ``F=SRC``), ``demo``, ``device``, ``dtype``, ``max_body_mib``, ``max_output_pixels``,
    ``batch_window_ms``, ``max_batch``, ``profile``, ``lazy``.

    Raises:
        ValueError: an unknown key or a bad value, naming it.
    """
    argv: list[str] = []
    for key, value in args.items():
        if key in NOT_ARGS:
            raise ValueError(f"args.{key}: not an application argument on Ray Serve; set {NOT_ARGS[key]}")
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif isinstance(value, Mapping):
            for k, v in value.items():
                argv += [flag, f"{k}={v}"]
        elif isinstance(value, (list, tuple)):
            for v in value:
                argv += [flag, str(v)]
        elif value is not None:
            argv += [flag, str(value)]
    parser = _ArgsParser(prog="hybrid-vae ray args", add_help=False)
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def build(args: dict[str, Any]) -> Any:
    """Application builder for ``serve run`` / ``serve deploy`` (``import_path: hybrid_vae.server.ray_app:build``).

    Deployment options (replicas, autoscaling, GPUs, ``max_ongoing_requests``) come from the config file's
    ``deployments:`` section; see ``server/ray-serve.yaml``.
    """
    return VaeDecoder.bind(config_from_mapping(args or {}))


def parse_replicas(text: str | None, default: int) -> int | tuple[int, int]:
    """``"2"`` -> 2, ``"1:4"`` -> (1, 4) (autoscaling), None -> ``default``.

    Raises:
        ValueError: naming the flag, the value and the fix.
    """
    if text is None:
        return default
    lo, sep, hi = str(text).partition(":")
    try:
        a, b = int(lo), int(hi) if sep else None
    except ValueError:
        raise ValueError(f"--replicas {text!r}: give a number (2) or MIN:MAX to autoscale (1:4)") from None
    if b is None:
        if not 1 <= a <= 1024:
            raise ValueError(f"--replicas {text!r}: give 1 to 1024")
        return a
    if not 0 <= a <= b or not 1 <= b <= 1024:
        raise ValueError(f"--replicas {text!r}: give MIN:MAX with 0 <= MIN <= MAX, 1 <= MAX <= 1024")
    return a, b


def autoscaling(lo: int, hi: int, max_batch: int) -> dict[str, Any]:
    """Ray Serve autoscaling for ``lo``..``hi`` replicas: scale up when replicas hold more than one full batch
    each on average (decoding one, collecting the next), after 10 s; down after 5 idle minutes (a replica
    reloads its VAEs when it comes back)."""
    return {"min_replicas": lo, "initial_replicas": max(lo, 1), "max_replicas": hi,
            "target_ongoing_requests": max(1, max_batch), "upscale_delay_s": 10.0, "downscale_delay_s": 300.0}


def deployment_options(config: dict[str, Any], *, replicas: int | tuple[int, int] = 1, gpus_per_replica: float = 0.0,
                       cpus_per_replica: float = 1.0, max_ongoing_requests: int | None = None,
                       token: str | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``VaeDecoder.options(...)`` for the CLI's flags: replicas (a number, or ``(min, max)`` to autoscale),
    resources, ``max_ongoing_requests`` (default 2 x ``max_batch``), the token and other ``env`` (into the
    replicas' environment, e.g. ``HF_HOME``)."""
    actor: dict[str, Any] = {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}
    env_vars = {**(env or {}), **({ENV_TOKEN: token} if token else {})}
    if env_vars:  # the token goes to the replicas' environment, where build_app reads it (never into the config)
        actor["runtime_env"] = {"env_vars": env_vars}
    opts: dict[str, Any] = {"ray_actor_options": actor,
                            "max_ongoing_requests": max_ongoing_requests or 2 * int(config["max_batch"])}
    if isinstance(replicas, tuple):
        opts["autoscaling_config"] = autoscaling(*replicas, int(config["max_batch"]))
    else:
        opts["num_replicas"] = replicas
    return opts


def application(config: dict[str, Any], **options: Any) -> Any:
    """The Ray Serve application for a serve configuration; ``options`` as :func:`deployment_options`."""
    return VaeDecoder.options(**deployment_options(config, **options)).bind(config)


def run(config: dict[str, Any], token: str | None, *, host: str, port: int, address: str = "local",
        replicas: str | None = None, gpus_per_replica: float | None = None, cpus_per_replica: float = 1.0,
        max_ongoing_requests: int | None = None, stop: threading.Event | None = None) -> int:
    """Start (``address="local"``) or join a Ray instance, deploy, serve until SIGINT/SIGTERM (or ``stop``), clean up.

    A local instance is stopped on exit (no process is left behind); on a joined cluster only this
    application is deleted.
    """
    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() and config.get("device") in (None, "cuda") else 0
    gpus = gpus_per_replica if gpus_per_replica is not None else (1.0 if cuda else 0.0)
    n = parse_replicas(replicas, max(1, int(cuda / gpus)) if gpus else 1)
    app = application(config, replicas=n, gpus_per_replica=gpus, cpus_per_replica=cpus_per_replica,
                      max_ongoing_requests=max_ongoing_requests, token=token)
    local = address == "local"
    ray.init(address=address, include_dashboard=False)
    stop = stop or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        shown = f"[{host}]" if ":" in host else host
        what = f"{n[0]}..{n[1]} replicas (autoscaling)" if isinstance(n, tuple) else f"{n} replica{'s' * (n != 1)}"
        print(f"hybrid-vae serve --ray: http://{shown}:{port}/<family>, {what}, {gpus:g} GPU and "
              f"{cpus_per_replica:g} CPU each{' (token required)' if token else ''}; Ray at "
              f"{ray.get_runtime_context().gcs_address}; Ctrl-C stops", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        if local:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)
    return 0
