"""``hybrid-vae decode``: local decoding through the engine, from the shell.

``decode`` turns a saved latent (``.safetensors``, e.g. one the engine saved when every plan failed)
into PNGs. torch and diffusers are imported inside the handlers only. ``hybrid-vae demo`` lives in
:mod:`hybrid_vae.demo` (it starts ``hybrid-vae serve`` apps, and ``extension/`` never imports ``server/``);
it reuses :func:`write_images` and :func:`psnr` from here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybrid_vae.extension.cli_engine import fail
from hybrid_vae.policy.env import env_name, read_env
from hybrid_vae.policy.errors import DecodeFailedError, HybridVAEError, LatentError, ProfileError, SettingsError
from hybrid_vae.policy.model import field_choices

if TYPE_CHECKING:
    import torch
    from hybrid_vae.extension.orchestrator import DecodeResult, HybridDecoder
    from hybrid_vae.policy.model import Decision
    from hybrid_vae.policy.profiles import Family

#: VAE class per family architecture (``Family.architecture``).
VAE_CLASSES = {"sd": "AutoencoderKL", "hunyuanvideo": "AutoencoderKLHunyuanVideo", "wan": "AutoencoderKLWan"}
#: Show a progress bar when the chosen plan is estimated to take longer than this (seconds).
PROGRESS_MIN_S = 1.0
#: Bearer token for ``decode --endpoint`` when ``--token`` is not given.
ENV_TOKEN = env_name("token")

log = logging.getLogger("hybrid_vae.cli")


def add_parser(sub: Any) -> None:
    d = sub.add_parser("decode", help="decode a saved latent (.safetensors) to PNG through the engine")
    d.add_argument("latent", help="a .safetensors latent (e.g. one the engine saved after a failed decode)")
    d.add_argument("--family", default=None, help="family key (default: from the file's metadata)")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--vae", default=None, help="VAE: a local folder, a single .safetensors file or a hub id")
    src.add_argument("--fixture", action="store_true", help="use the bundled fixture VAE (tests, demo latents)")
    d.add_argument("-o", "--out", default=None,
                   help="output .png (video: .gif, or a folder for PNG frames); default: next to the latent")
    d.add_argument("--height", type=int, default=None, help="output height (packed latents without metadata)")
    d.add_argument("--width", type=int, default=None, help="output width (packed latents without metadata)")
    d.add_argument("--gpu", default=None, help="simulate this card (see `hybrid-vae explain`)")
    d.add_argument("--total-gib", type=float, default=None, help="simulated total memory")
    d.add_argument("--free-gib", type=float, default=None, help="simulated free memory")
    d.add_argument("--mode", choices=field_choices("mode"), default="auto")
    d.add_argument("--endpoint", action="append", default=[], metavar="URL",
                   help="remote endpoint for this family (opts in to remote decode: the endpoint sees the image); "
                        "used only after a random canary latent decodes the same there as with --vae; "
                        "repeat for several: health-checked, tried best first, failing over within the deadline")
    d.add_argument("--token", default=None,
                   help=f"bearer token for the endpoints (default: env {ENV_TOKEN}; HTTPS unless loopback)")
    d.add_argument("--groupnorm", choices=field_choices("tile_groupnorm"), default="auto",
                   help="tiled decodes: exact (whole-image GroupNorm, output equals a full decode, needs "
                        "memory per image pixel, in host memory when the GPU's is short), offload (exact with "
                        "its whole-image buffers in host memory as far as needed), local (per-tile GroupNorm, "
                        "least memory, colours drift) or auto (lossless first; default)")
    d.add_argument("--profile", default=None, help="your profile YAML, merged over the built-ins")
    d.add_argument("--remote-custom-vae", action="store_true",
                   help="use --endpoint even when it serves another VAE than --vae")
    d.add_argument("--learned", nargs="?", const="", default=None, metavar="PATH",
                   help="apply and update learned timings and peaks (alone: $HYBRID_VAE_LEARNED or the user cache "
                        "file; a GPU decode is recorded, a simulated or CPU one is not; see `explain --learned`)")
    d.add_argument("--latent-dir", default=None, help="where a latent is saved if this decode fails too")
    d.add_argument("--json", action="store_true", help="print the decode report as JSON")
    d.set_defaults(func=cmd_decode)



def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two images in [-1, 1] (peak-to-peak 2); ``inf`` when identical."""
    mse = float(((a.detach().float().cpu() - b.detach().float().cpu()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


#: Single-file VAE weights ``load_vae`` accepts.
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def vae_source(spec: str, *, flag: str = "--vae") -> tuple[str, str]:
    """Where a VAE spec points, checked before anything loads: ``("file", path)``, ``("dir", path)`` or
    ``("hub", id)``.

    A spec that looks like a path (``/...``, ``./...``, ``~/...``, more than one ``/``, a weights
    suffix) must exist; only ``name`` or ``org/name`` that is not a local path is taken as a hub id.

    Raises:
        ProfileError: naming ``flag``, the spec and what to give instead.
    """
    path = Path(spec).expanduser()
    if not spec.strip():
        raise ProfileError("empty; give a VAE folder, a .safetensors file or a hub id", key_path=flag, value=spec)
    if path.is_file():
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise ProfileError(f"is a {path.suffix or 'suffix-less'} file, not VAE weights; give a "
                               f"{'/'.join(WEIGHT_SUFFIXES)} file or a diffusers folder", key_path=flag, value=spec)
        return "file", str(path)
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "vae" / "config.json").is_file():
            raise ProfileError("folder has no config.json (nor vae/config.json); give a diffusers VAE or "
                               "pipeline folder, or the .safetensors file itself", key_path=flag, value=spec)
        return "dir", str(path)
    looks_local = (spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1
                   or spec.lower().endswith(WEIGHT_SUFFIXES) or not _HUB_ID.match(spec))
    if looks_local:
        raise ProfileError("no such file or folder; give an existing VAE folder, a .safetensors file, or a "
                           "hub id such as madebyollin/sdxl-vae-fp16-fix", key_path=flag, value=spec)
    return "hub", spec


def load_vae(spec: str, family: Family | None, *, dtype: torch.dtype | None = None, vae_class: str | None = None,
             flag: str = "--vae") -> Any:
    """Load the diffusers VAE class of ``family`` (or ``vae_class``) from a folder, a single file or a hub id.

    A folder or repo holding a whole pipeline is read from its ``vae`` subfolder. Hub ids need the
    weights in the local Hugging Face cache or network access. ``dtype`` defaults to float32.

    Raises:
        ProfileError: the VAE cannot be loaded; one line naming ``flag``, the spec, what was tried and
            what to give instead (the loader's traceback is logged at DEBUG).
    """
    import diffusers
    import torch

    name = vae_class or (VAE_CLASSES[family.architecture] if family is not None else "AutoencoderKL")
    cls = getattr(diffusers, name, None)
    if cls is None or name not in VAE_CLASSES.values():
        raise ProfileError(f"{name} is not a VAE class hybrid-vae decodes ({', '.join(VAE_CLASSES.values())})",
                           key_path="vae_class", value=name)
    dtype = dtype or torch.float32
    kind, where = vae_source(spec, flag=flag)
    # without accelerate, diffusers loads as if low_cpu_mem_usage=False anyway but warns each time
    kw: dict[str, Any] = {"torch_dtype": dtype}
    if importlib.util.find_spec("accelerate") is None:
        kw["low_cpu_mem_usage"] = False
    tried: list[str] = []
    try:
        if kind == "file":
            if not hasattr(cls, "from_single_file"):
                raise ProfileError(f"{cls.__name__} cannot load a single file; give a diffusers folder",
                                   key_path=flag, value=spec)
            return cls.from_single_file(where, **kw).eval()
        if kind == "dir":
            path = Path(where)
            sub = "vae" if not (path / "config.json").is_file() else None
            return cls.from_pretrained(where, subfolder=sub, **kw).eval()
        for sub in (None, "vae"):
            try:
                with warnings.catch_warnings():  # the hub's deprecation notices: the error below says it all
                    warnings.simplefilter("ignore", UserWarning)
                    warnings.simplefilter("ignore", FutureWarning)
                    return cls.from_pretrained(spec, subfolder=sub, **kw).eval()
            except (OSError, ValueError) as exc:
                log.debug("loading %s (subfolder %s) failed", spec, sub, exc_info=True)
                tried.append(f"{spec}{'/' + sub if sub else ''}: {_first_line(exc)}")
    except ProfileError:
        raise
    except Exception as exc:  # third-party loader: any failure is "this is not a loadable VAE", said in one line
        log.debug("loading %s failed", spec, exc_info=True)
        tried.append(f"{type(exc).__name__}: {_first_line(exc)}")
    raise ProfileError(f"cannot load it as {cls.__name__} ({'; '.join(tried)}); give a diffusers VAE folder with "
                       "config.json + weights, a .safetensors file of this family's VAE, or a cached hub id",
                       key_path=flag, value=spec)


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:limit] + ("..." if len(text) > limit else "")


class _Progress:
    """tqdm bar, drawn only when the chosen plan is expected to take over ``PROGRESS_MIN_S``."""

    def __init__(self) -> None:
        self.show = False
        self.bar: Any = None

    def on_decision(self, decision: Decision) -> None:
        self.show = decision.chosen.estimate.seconds > PROGRESS_MIN_S or decision.chosen.path == "cpu"

    def __call__(self, done: int, total: int) -> None:
        if not self.show:
            return
        from tqdm import tqdm

        if self.bar is None or self.bar.total != total or done < self.bar.n:
            self.close()
            # disable=None: no bar when stderr is not a terminal (logs, pipes, tests)
            self.bar = tqdm(total=total, unit="tile", desc="hybrid-vae decode", leave=False, file=sys.stderr,
                            disable=None)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _decoder(args: argparse.Namespace, family: str, **kw: Any) -> HybridDecoder:
    from hybrid_vae.extension.cli_engine import simulated_state
    from hybrid_vae.extension.orchestrator import DEFAULT_LATENT_DIR, HybridDecoder
    from hybrid_vae.policy.model import build_settings
    from hybrid_vae.policy.profiles import load_profiles

    state = simulated_state(load_profiles(args.profile), args.gpu, args.total_gib, args.free_gib)
    flags = {"mode": "--mode", "tile_groupnorm": "--groupnorm", "endpoints": "--endpoint"}
    values: dict[str, Any] = {"mode": args.mode, "tile_groupnorm": args.groupnorm}
    if getattr(args, "endpoint", None):
        from hybrid_vae.extension.endpoints import EndpointPool, join_endpoints
        from hybrid_vae.extension.remote import RemoteClient

        try:
            spec = join_endpoints(args.endpoint)
        except ValueError as exc:
            raise LatentError(f"--endpoint: {exc}") from None
        token = args.token or read_env().token
        values.update({"allow_remote": True, "endpoints": {family: spec}, "use_builtin_endpoints": False,
                       "allow_remote_custom_vae": bool(getattr(args, "remote_custom_vae", False))})
        kw["remote"] = EndpointPool(RemoteClient(token=token, trusted_endpoints=[spec] if token else []), pools=[spec])
    if getattr(args, "learned", None) is not None:
        from hybrid_vae.policy.learned import LearnedStore

        kw["learned"] = LearnedStore(args.learned or None)
    return HybridDecoder(settings=build_settings(values, names=flags), profile_path=args.profile,
                         latent_dir=args.latent_dir or DEFAULT_LATENT_DIR,
                         probe=(lambda: state) if state is not None else None, **kw)


def write_images(result: DecodeResult, out: Path) -> list[Path]:
    """Write the decoded tensor: one PNG per image (``out``, or ``out-<i>.png`` for a batch); a video as
    an animated GIF (``out`` ending in .gif) or PNG frames in the folder ``out``."""
    from hybrid_vae.extension.orchestrator import to_pil

    t = result.tensor
    written: list[Path] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    if t.dim() == 5:
        for b in range(t.shape[0]):
            frames = to_pil(t[b:b + 1])
            if out.suffix.lower() == ".gif":
                p = out if t.shape[0] == 1 else out.with_name(f"{out.stem}-{b}.gif")
                frames[0].save(p, save_all=True, append_images=frames[1:], duration=125, loop=0)
                written.append(p)
            else:
                folder = out if t.shape[0] == 1 else out.with_name(f"{out.name}-{b}")
                folder.mkdir(parents=True, exist_ok=True)
                for i, f in enumerate(frames):
                    p = folder / f"frame-{i:04d}.png"
                    f.save(p)
                    written.append(p)
        return written
    images = to_pil(t)
    fmt = None if out.suffix else "PNG"  # no suffix (or a device such as /dev/full): PNG
    for i, img in enumerate(images):
        p = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
        img.save(p, format=fmt)
        written.append(p)
    return written


def _unwritable(out: Path, *, video: bool) -> str | None:
    """Why ``out`` cannot take the decoded image(s), checked before decoding; None when it can."""
    if out.is_dir() and not (video and out.suffix.lower() != ".gif"):
        return "is a folder; give a file name such as " + str(out / ("video.gif" if video else "image.png"))
    from PIL import Image

    known = Image.registered_extensions()
    if out.suffix and out.suffix.lower() not in known and not (video and not out.suffix.lower() == ".gif"):
        return f"{out.suffix} is not an image format; end the name in .png (or .jpg, .webp{', .gif' if video else ''})"
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK)):
        return f"cannot write into {parent} ({'not a folder' if not parent.is_dir() else 'no permission'})"
    return None


def _rescue(result: DecodeResult, out: Path) -> str:
    """Write the decoded image(s) to a fresh temporary folder; the sentence that says where."""
    import tempfile

    try:
        folder = Path(tempfile.mkdtemp(prefix="hybrid-vae-decoded-"))
        written = write_images(result, folder / (out.name if out.suffix else out.name + ".png"))
    except OSError as exc:
        return f"saving it to a temporary folder failed too ({exc.strerror or exc}); the latent is unchanged"
    more = f" (+{len(written) - 1} more)" if len(written) > 1 else ""
    return f"the decoded image is saved as {written[0]}{more} instead"


def cmd_decode(args: argparse.Namespace) -> int:
    import torch
    from hybrid_vae.extension.geometry import UNMATCHED, resolve_family
    from hybrid_vae.extension.latents import load_latent, validate_latents
    from hybrid_vae.policy.profiles import load_profiles

    try:
        latents, meta = load_latent(args.latent)
        profiles = load_profiles(args.profile)
        family = args.family or meta.get("family")
        if not family:
            return fail(f"{args.latent} has no family in its metadata; pass --family "
                         f"({', '.join(sorted(profiles.families))})", 2)
        height = args.height or meta.get("height")
        width = args.width or meta.get("width")
        fam = None
        if family != UNMATCHED:  # a VAE that matched no family: its own config decides (after loading it)
            fam = profiles.family(family)
        out = Path(args.out) if args.out else Path(args.latent).with_suffix(".gif" if fam and fam.video else ".png")
        if (why := _unwritable(out, video=bool(fam and fam.video))) is not None:
            return fail(f"-o {out}: {why}", 2)
        if fam is not None:
            # check the latent before loading a VAE (loading real weights takes a while)
            validate_latents(latents, fam, family_name=family, height=height, width=width,
                             families=profiles.families)
        if args.fixture:
            from hybrid_vae.extension.fixture import load_fixture_vae

            vae = load_fixture_vae()
        elif args.vae or meta.get("vae_id"):
            dtype = getattr(torch, fam.default_dtype) if torch.cuda.is_available() and fam else torch.float32
            vae = load_vae(str(args.vae or meta["vae_id"]), fam, dtype=dtype, vae_class=meta.get("vae_class"))
        else:
            return fail("no VAE: pass --vae PATH_OR_HUB_ID (or --fixture for the bundled fixture VAE)", 2)
        family, profiles, _ = resolve_family(vae, profiles, None if family == UNMATCHED else family)
        fam = profiles.family(family)
        if not args.out and fam.video:  # a family known only now (from the VAE): a video goes to a GIF
            out = Path(args.latent).with_suffix(".gif")
        from tqdm.contrib.logging import logging_redirect_tqdm

        bar = _Progress()
        decoder = _decoder(args, family, on_decision=bar.on_decision)
        try:
            with logging_redirect_tqdm():  # log lines go above the progress bar, not into it
                result = decoder.decode(latents, vae, family=family, height=height, width=width,
                                        vae_id=args.vae or meta.get("vae_id"),
                                        custom_vae=bool(meta.get("custom_vae", False)), progress=bar)
        finally:
            bar.close()
    except (LatentError, ProfileError, SettingsError) as exc:
        return fail(str(exc), 2)
    except FileNotFoundError as exc:  # the fixture's weights
        return fail(str(exc), 2)
    except DecodeFailedError as exc:
        return fail(str(exc), 1)
    except HybridVAEError as exc:
        return fail(str(exc), 1)
    try:
        written = write_images(result, out)
    except OSError as exc:  # the disk filled, permissions changed: the decoded image goes elsewhere, named
        return fail(f"-o {out}: cannot write ({exc.strerror or exc}); {_rescue(result, out)}", 1)
    r = result.report
    if args.json:
        print(json.dumps({**r.to_dict(), "written": [str(p) for p in written]}, indent=2, default=str))
        return 0
    print(f"Hybrid VAE: {r.infotext()}")
    print(f"reason     {r.reason}")
    for label, err, secs in r.attempts:
        print(f"attempt    {label:<22} {secs:7.2f} s  {err or 'ok'}")
    print(f"wrote      {written[0]}" + (f" (+{len(written) - 1} more)" if len(written) > 1 else ""))
    return 0
