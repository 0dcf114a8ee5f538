"""``hybrid-vae serve``: run the self-hosted decode endpoint under uvicorn.

::

    hybrid-vae serve --demo                                   # fixture + tiny VAEs, offline
    hybrid-vae serve --family sdxl=madebyollin/sdxl-vae-fp16-fix --family flux=/models/flux-vae
    hybrid-vae serve --host 0.0.0.0 --port 8300 --token "$TOKEN" --workers 2 --family sd15=...

Each family is served at ``http://HOST:PORT/<family>``. torch, diffusers, starlette and uvicorn are
imported only when the command runs (``hybrid-vae --help`` stays fast).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from hybrid_vae.policy.env import env_name, read_env
from hybrid_vae.policy.errors import EnvError

#: Default port: not ComfyUI's 8188 nor SD.Next's 7860, so a serve on the same machine as either starts.
DEFAULT_PORT = 8300
log = logging.getLogger("hybrid_vae.server")

ENV_TOKEN = env_name("server_token")
ENV_CONFIG = env_name("serve_config")
DEMO_FAMILIES = ("sd15", "sdxl", "flux", "hunyuanvideo", "wan")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run a decode endpoint that speaks the hybrid-inference protocol",
                       description="Serve VAEs over HTTP at http://HOST:PORT/<family>; diffusers' remote_decode "
                                   "and hybrid-vae's remote client both work against it.")
    add_arguments(p)
    ray = p.add_argument_group("Ray Serve (with --ray; pip install -e '.[ray]'; server/ray_app.py)")
    ray.add_argument("--ray", action="store_true",
                     help="serve on Ray Serve (replicas, dynamic batching, autoscaling) instead of one uvicorn process")
    ray.add_argument("--ray-address", default="local",
                     help="'local' (default): start a Ray instance on this machine, stopped on exit; 'auto' or "
                          "ray://HOST:10001: deploy to a running cluster (the application is deleted on exit)")
    ray.add_argument("--replicas", default=None, metavar="N|MIN:MAX",
                     help="replicas: a number, or MIN:MAX to autoscale on ongoing requests (default: one per "
                          "visible GPU, 1 without a GPU)")
    ray.add_argument("--gpus-per-replica", type=float, default=None,
                     help="GPUs each replica reserves (default 1 when this machine has CUDA, else 0)")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves (default 1)")
    ray.add_argument("--max-ongoing-requests", type=int, default=None,
                     help="requests a replica holds at once, decoding or waiting to batch (default 2 x --max-batch); "
                          "more wait in Ray's queue")
    p.set_defaults(func=cmd_serve)


#: Flags of the Ray group (refused without --ray) and their defaults.
RAY_FLAGS = {"ray_address": "local", "replicas": None, "gpus_per_replica": None, "cpus_per_replica": 1.0,
             "max_ongoing_requests": None}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The serve flags shared by ``hybrid-vae serve`` and the Ray Serve config's ``args`` (``server/ray_app.py``)."""
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default 127.0.0.1: this machine only; 0.0.0.0 exposes it, set --token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--family", action="append", default=[], metavar="F=PATH_OR_HUB_ID",
                   help="serve family F (sd15, sdxl, sd3, flux, hunyuanvideo, wan) from a diffusers folder, a "
                        "pipeline folder with vae/, a .safetensors file, or a hub id; repeat for more")
    p.add_argument("--demo", action="store_true",
                   help="serve the trained fixture VAE as sd15 and tiny random-weight VAEs as sdxl, flux, "
                        "hunyuanvideo and wan (offline; images are not meaningful except sd15)")
    p.add_argument("--token", default=None,
                   help=f"require 'Authorization: Bearer TOKEN' (default: env {ENV_TOKEN}; unset = no auth)")
    p.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: the best available)")
    p.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                   help="weights dtype on a GPU (auto: the family's, float32 for VAEs that force an upcast)")
    p.add_argument("--max-body-mib", type=float, default=256.0, help="largest request body (default 256)")
    p.add_argument("--max-output-pixels", type=int, default=2**27,
                   help="largest output per request in voxels, batch x frames x H x W (default 134217728)")
    p.add_argument("--batch-window-ms", type=float, default=4.0,
                   help="wait for same-shape requests to batch while others upload (default 4)")
    p.add_argument("--max-batch", type=int, default=8, help="images decoded together at most (default 8)")
    p.add_argument("--workers", type=int, default=1,
                   help="uvicorn worker processes (each loads every VAE; see server/README.md)")
    p.add_argument("--profile", default=None, help="profile YAML merged over the built-ins (extra families)")
    p.add_argument("--lazy", action="store_true", help="load each VAE on its first request, not at startup")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                   help="memory (GiB) this server's decodes and the requests it holds may use: each request is "
                        "decoded with the plan that fits (full, items one by one, tiles), requests that do not fit "
                        "now wait, one that can never fit gets 413 (default: the memory free at startup less 0.5 GiB; "
                        "GPU: its free VRAM, CPU: the machine's available RAM; divided by --workers)")
    p.add_argument("--queue-timeout-s", type=float, default=60.0,
                   help="how long a request waits for memory before 503 + Retry-After (default 60)")


def _parse_families(specs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, src = spec.partition("=")
        if not sep or not name.strip() or not src.strip():
            raise ValueError(f"--family {spec!r}: use F=PATH_OR_HUB_ID, e.g. sdxl=madebyollin/sdxl-vae-fp16-fix")
        if name.strip() in out:
            raise ValueError(f"--family {name.strip()!r} given twice")
        out[name.strip()] = src.strip()
    return out


def load_vae(family_name: str, source: str, *, device: str, dtype: str = "auto", profile: str | None = None) -> Any:
    """Load the VAE of ``family_name`` from a folder, a pipeline folder (``vae/``), a single file or a hub id
    (:func:`extension.cli_local.load_vae`, checked before anything loads).

    The class comes from the family's architecture (AutoencoderKL / AutoencoderKLHunyuanVideo /
    AutoencoderKLWan). On a CPU the weights are float32; on a GPU the ``dtype`` (auto: float32 when the
    VAE's config forces an upcast, else the family's default dtype).

    Raises:
        ProfileError: one line naming ``--family F=...``, the source and the fix.
    """
    import torch
    from hybrid_vae.extension.cli_local import load_vae as load_local
    from hybrid_vae.policy.profiles import load_profiles

    fam = load_profiles(profile).family(family_name)
    vae = load_local(source, fam, dtype=torch.float32, flag=f"--family {family_name}")
    if device != "cpu":
        name = dtype
        if name == "auto":
            upcast = bool(getattr(vae.config, "force_upcast", False)) and fam.force_upcast
            name = "float32" if upcast else fam.default_dtype
        vae = vae.to(getattr(torch, name))
    return vae.eval()


def demo_families() -> dict[str, Any]:
    """Loaders for ``--demo``: the trained fixture as sd15, tiny random-weight VAEs for the others."""
    from hybrid_vae.extension.fixture import build_tiny_vae, load_fixture_vae

    def sd15() -> Any:
        try:
            return load_fixture_vae()
        except FileNotFoundError as exc:
            log.warning("hybrid-vae serve --demo: %s; serving a tiny random-weight sd15 VAE instead", exc)
            return build_tiny_vae("sd15")

    out: dict[str, Any] = {"sd15": sd15}
    for kind in DEMO_FAMILIES[1:]:
        out[kind] = (lambda k=kind: build_tiny_vae(k))
    return out


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The serve configuration (a JSON-able dict) from parsed flags; ``ValueError`` names a bad flag."""
    fams = _parse_families(args.family)
    if not fams and not args.demo:
        raise ValueError("nothing to serve: give --family F=PATH_OR_HUB_ID (repeatable) or --demo")
    limits = (("--port", args.port, 0, 65535), ("--workers", args.workers, 1, 256),
              ("--max-body-mib", args.max_body_mib, 1e-3, 1e6), ("--max-output-pixels", args.max_output_pixels, 1, 2**40),
              ("--batch-window-ms", args.batch_window_ms, 0, 10_000), ("--max-batch", args.max_batch, 1, 1024),
              ("--queue-timeout-s", args.queue_timeout_s, 0, 86_400))
    if args.memory_budget is not None:
        limits += (("--memory-budget", args.memory_budget, 1 / 1024, 1e6),)
    for flag, value, lo, hi in limits:
        if not lo <= value <= hi:
            raise ValueError(f"{flag} {value}: give a value between {lo:g} and {hi:g}")
    from hybrid_vae.policy.errors import ProfileError
    from hybrid_vae.policy.profiles import load_profiles

    try:
        known = load_profiles(args.profile).families
    except ProfileError as exc:
        raise ValueError(str(exc)) from None
    from hybrid_vae.extension.cli_local import vae_source

    for name, src in fams.items():
        if name not in known:
            raise ValueError(f"--family {name}=...: unknown family; known: {', '.join(sorted(known))}")
        try:
            vae_source(src, flag=f"--family {name}")  # a missing path fails here, before anything loads
        except ProfileError as exc:
            raise ValueError(str(exc)) from None
    return {"families": fams, "demo": bool(args.demo), "device": args.device, "dtype": args.dtype,
            "max_body_bytes": int(args.max_body_mib * 1024**2), "max_output_pixels": args.max_output_pixels,
            "batch_window_s": args.batch_window_ms / 1000.0, "max_batch": args.max_batch, "profile": args.profile,
            "preload": not args.lazy, "queue_timeout_s": args.queue_timeout_s,
            "memory_budget_bytes": None if args.memory_budget is None else int(args.memory_budget * 1024**3),
            "workers": args.workers}


def build_app(config: dict[str, Any], token: str | None, decode: Any = None) -> Any:
    """The Starlette app for a serve configuration (also used by each uvicorn worker and each Ray Serve
    replica, which passes its batched ``decode``; see :func:`server.app.create_app`)."""
    from hybrid_vae.policy.profiles import load_profiles
    from hybrid_vae.server.app import create_app, default_device

    device = config.get("device") or default_device()
    families: dict[str, Any] = demo_families() if config.get("demo") else {}
    for name, src in config["families"].items():
        families[name] = (lambda n=name, s=src: load_vae(n, s, device=device, dtype=config.get("dtype", "auto"),
                                                         profile=config.get("profile")))
    return create_app(families=families, token=token, max_body_bytes=config["max_body_bytes"],
                      max_output_pixels=config["max_output_pixels"], device=device,
                      profiles=load_profiles(config.get("profile")), batch_window_s=config["batch_window_s"],
                      max_batch=config["max_batch"], preload=config.get("preload", True), decode=decode,
                      memory_budget_bytes=config.get("memory_budget_bytes"),
                      queue_timeout_s=config.get("queue_timeout_s", 60.0), workers=config.get("workers", 1))


def app_from_env() -> Any:
    """uvicorn factory for ``--workers N`` (and for running under your own uvicorn/gunicorn):
    ``HYBRID_VAE_SERVE_CONFIG`` holds the JSON configuration, ``HYBRID_VAE_SERVER_TOKEN`` the token."""
    env = read_env()
    raw = env.serve_config
    if not raw:
        raise RuntimeError(f"{ENV_CONFIG} is not set; start through `hybrid-vae serve` or set it to the JSON config")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise EnvError(f"not JSON ({exc.msg} at character {exc.pos}); start through `hybrid-vae serve --workers N`, "
                       "which sets it", key_path=ENV_CONFIG, value=raw) from None
    return build_app(config, env.server_token)


def check_device(device: str | None) -> str:
    """The device to serve on: ``device`` when this torch can use it, else a one-line error naming the fix.

    Raises:
        ValueError: an unknown device, CUDA on a torch without CUDA, an index past the device count, MPS
            unavailable.
    """
    import torch
    from hybrid_vae.server.app import default_device

    if device is None:
        return default_device()
    d = device.strip().lower()
    if d == "cpu":
        return "cpu"
    if d == "cuda" or d.startswith("cuda:"):
        index = d.partition(":")[2]
        if index and not index.isdigit():
            raise ValueError(f"--device {device!r}: give cuda, cuda:N (N a number), mps or cpu")
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None and getattr(torch.version, "hip", None) is None \
                else "built with CUDA, but no device is visible (driver? CUDA_VISIBLE_DEVICES?)"
            raise ValueError(f"--device {device!r}: this torch {torch.__version__} is {build}; use --device cpu, or "
                             "install a CUDA build of torch")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return d
    if d == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"--device {device!r}: MPS is not available here (Apple silicon with a macOS torch "
                             "only); use --device cpu")
        return d
    raise ValueError(f"--device {device!r}: give cuda, cuda:N, mps or cpu")


def bind_socket(host: str, port: int) -> Any:
    """Bind the listening socket before anything loads, so a port in use is one line, not a traceback
    after every VAE has loaded; ``port`` 0 gets a free port (read it from ``getsockname()``).

    Raises:
        ValueError: the port is taken, the host is not an address of this machine, or binding is not allowed.
    """
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host!r}: cannot resolve ({exc.strerror}); give an address such as 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ValueError(f"--port {port}: already in use on {host} (another server?); stop it, or pick another "
                             "port (--port 0 picks a free one)") from None
        if exc.errno == errno.EACCES:
            raise ValueError(f"--port {port}: not allowed for this user (ports below 1024 need privileges); "
                             "use a port from 1024 up") from None
        raise ValueError(f"--host {host!r} --port {port}: cannot listen ({exc.strerror})") from None
    sock.set_inheritable(True)
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("hybrid-vae: error: serve needs the server extra: pip install -e '.[server]' in the hybrid-vae "
              "checkout (starlette, uvicorn, av)", file=sys.stderr)
        return 3
    try:
        config = config_from_args(args)
        _check_ray_flags(args)
        if config["device"] is not None:  # None: the best available where it runs (each Ray replica's own)
            config["device"] = check_device(config["device"])
        # Ray Serve's proxy binds --host/--port itself; plain serve binds before anything loads
        sock = None if getattr(args, "ray", False) else bind_socket(args.host, args.port)
    except ValueError as exc:
        print(f"hybrid-vae: error: {exc}", file=sys.stderr)
        return 2
    token = args.token or read_env().server_token
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        log.warning("hybrid-vae serve: listening on %s without a token: anyone who reaches it can decode "
                    "(and sees the images); set --token or %s", args.host, ENV_TOKEN)
    if getattr(args, "ray", False):
        return _serve_ray(args, config, token)
    assert sock is not None
    names = sorted(set(config["families"]) | (set(DEMO_FAMILIES) if config["demo"] else set()))
    port = int(sock.getsockname()[1])
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url_line = (f"hybrid-vae serve: http://{shown}:{port}/<family> for {', '.join(names)}"
                f"{' (token required)' if token else ''}")
    if args.workers > 1:
        os.environ[ENV_CONFIG] = json.dumps(config)
        if token:
            os.environ[ENV_TOKEN] = token
        print(url_line, flush=True)
        uvicorn.run("hybrid_vae.server.cli:app_from_env", factory=True, fd=sock.fileno(), workers=args.workers,
                    log_level="info")
        return 0
    try:
        app = build_app(config, token)
        for served in app.state.served.values():  # load now: a broken VAE is one line before the URL
            served.get()
    except Exception as exc:  # any load failure ends the command with one line
        sock.close()
        from hybrid_vae.policy.errors import HybridVAEError

        log.debug("hybrid-vae serve: startup failed", exc_info=True)
        text = str(exc) if isinstance(exc, (HybridVAEError, ValueError)) else f"{type(exc).__name__}: {exc}"
        print(f"hybrid-vae: error: {text.splitlines()[0] if text else type(exc).__name__}", file=sys.stderr)
        return 2
    print(url_line, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", lifespan="on"))
    server.run(sockets=[sock])
    return 0


def _check_ray_flags(args: argparse.Namespace) -> None:
    if not getattr(args, "ray", False):
        for dest, default in RAY_FLAGS.items():
            if getattr(args, dest, default) != default:
                raise ValueError(f"--{dest.replace('_', '-')} is a Ray Serve option; add --ray (or drop it)")
        return
    if args.workers != 1:
        raise ValueError("--workers is for plain serve; with --ray give --replicas N (or MIN:MAX to autoscale)")
    if args.port == 0:
        raise ValueError(f"--port 0: Ray Serve needs a fixed port; give one (default {DEFAULT_PORT})")
    for flag, value, lo, hi in (("--gpus-per-replica", args.gpus_per_replica, 0, 64),
                                ("--cpus-per-replica", args.cpus_per_replica, 0, 1024),
                                ("--max-ongoing-requests", args.max_ongoing_requests, 1, 1_000_000)):
        if value is not None and not lo <= value <= hi:
            raise ValueError(f"{flag} {value}: give a value between {lo:g} and {hi:g}")


def _serve_ray(args: argparse.Namespace, config: dict[str, Any], token: str | None) -> int:
    """``serve --ray``: the same app on Ray Serve (``server/ray_app.py``; Ray is imported here only)."""
    if args.ray_address == "local":
        # a single-machine Ray keeps its own ports on loopback (Ray's switch for one-machine instances; read when
        # ray is imported, so before that); Serve's HTTP proxy binds --host
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        from hybrid_vae.server import ray_app
    except ImportError as exc:
        print(f"hybrid-vae: error: {exc}", file=sys.stderr)
        return 3
    try:
        return ray_app.run(config, token, host=args.host, port=args.port, address=args.ray_address,
                           replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                           cpus_per_replica=args.cpus_per_replica, max_ongoing_requests=args.max_ongoing_requests)
    except ValueError as exc:  # --replicas
        print(f"hybrid-vae: error: {exc}", file=sys.stderr)
        return 2
