"""``hybrid-vae calibrate``: measure this GPU's decode peak and time, write a GPU profile YAML.

On a CUDA GPU it decodes random latents with a random-weight SD-architecture ``AutoencoderKL``
(block_out_channels 128/256/512/512, 2 layers per block, 4 latent channels: the decoder of SD1.5,
SDXL, SD3 and Flux.1, whose time and memory do not depend on weight values) over a small grid
(512-2048 px, float16 and float32; a few minutes, with a progress bar), and writes::

    gpus:
      - name: NVIDIA GeForce RTX 4060 Ti      # as the driver reports it
        total_gib: 16.0
        rows:
          - {model: sd15, size: 1024, time_s: 0.33, peak_alloc_bytes: 2552365056, dtype: float16,
             source: hybrid-vae calibrate 2026-11-27}

``hybrid-vae explain --profile FILE`` (or ``HYBRID_VAE_PROFILE=FILE``) then times decodes on this
card from these rows (``explain`` names the card's profile as the seconds source). An existing
``--out`` file is merged: this card's entry is replaced, everything else is kept.

Without a CUDA GPU there is nothing to measure: the command says so, writes nothing and exits 0.
``--reset-learned`` deletes the learned timings (see :mod:`policy.learned`) and needs no GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_OUT = "hybrid-vae-profile.yaml"
GRID_SIZES = (512, 768, 1024, 1536, 2048)
GRID_DTYPES = ("float16", "float32")
MODEL_FOR_DTYPE = {"float16": "sd15", "bfloat16": "flux", "float32": "sdxl"}


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One calibrated full decode (a :class:`policy.profiles.GpuRow` once written)."""

    size: int
    dtype: str
    time_s: float
    peak_alloc_bytes: int

    @property
    def model(self) -> str:
        return MODEL_FOR_DTYPE[self.dtype]


def profile_dict(card: str, total_gib: float, measurements: Sequence[Measurement], *, date: str) -> dict[str, Any]:
    """The ``gpus:`` entry for ``card`` (pure)."""
    if not measurements:
        raise ValueError("no measurements: nothing to write")
    rows = [{"model": m.model, "size": m.size, "time_s": round(m.time_s, 5), "peak_alloc_bytes": int(m.peak_alloc_bytes),
             "dtype": m.dtype, "source": f"hybrid-vae calibrate {date}"}
            for m in sorted(measurements, key=lambda m: (m.dtype, m.size))]
    return {"name": card, "total_gib": round(total_gib, 2), "rows": rows}


def write_profile(path: str | Path, card: str, total_gib: float, measurements: Sequence[Measurement], *,
                  date: str | None = None) -> Path:
    """Write (or merge into) a profile YAML and check that it loads; returns the path.

    Raises:
        ProfileError: the merged file would not load (the file is left as it was).
    """
    import yaml
    from hybrid_vae.policy.profiles import load_profiles

    path = Path(path).expanduser()
    date = date or _dt.date.today().isoformat()
    data: dict[str, Any] = {}
    if path.exists():
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: not a profile YAML (top level is {type(loaded).__name__}); choose another --out")
        data = loaded
    entry = profile_dict(card, total_gib, measurements, date=date)
    gpus = [g for g in data.get("gpus", []) or [] if not (isinstance(g, dict) and g.get("name") == card)]
    data["gpus"] = [*gpus, entry]
    text = ("# GPU profile written by `hybrid-vae calibrate` (peak = allocated bytes of a full decode).\n"
            "# Use it: hybrid-vae explain --profile THIS_FILE ...  or  HYBRID_VAE_PROFILE=THIS_FILE\n"
            + yaml.safe_dump(data, sort_keys=False, width=120))
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text, encoding="utf-8")
    try:
        load_profiles(tmp)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path


# ---- VAEs for measuring (also used by `hybrid-vae bench --gpu`) -----------------------------------


def sd_vae_config(latent_channels: int = 4, *, quant: bool = True) -> dict[str, Any]:
    """The published SD-architecture ``AutoencoderKL`` config (SD1.5/SDXL: 4 channels with quant convs;
    Flux.1/SD3: 16 channels without)."""
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2, "latent_channels": latent_channels, "norm_num_groups": 32, "sample_size": 1024,
            "use_quant_conv": quant, "use_post_quant_conv": quant}


def build_vae(kind: str, *, device: str, dtype: Any) -> Any:
    """A random-weight VAE with the real architecture, built directly on ``device``.

    ``kind``: ``sd`` (4 channels), ``sd16`` (16 channels, no quant convs), ``hunyuanvideo``
    (``AutoencoderKLHunyuanVideo`` defaults) or ``wan`` (``AutoencoderKLWan`` defaults: Wan 2.1's VAE).
    """
    import torch
    from diffusers import AutoencoderKL, AutoencoderKLHunyuanVideo, AutoencoderKLWan

    torch.manual_seed(0)
    with torch.device(device):
        if kind == "sd":
            vae = AutoencoderKL(**sd_vae_config(4))
        elif kind == "sd16":
            vae = AutoencoderKL(**sd_vae_config(16, quant=False))
        elif kind == "hunyuanvideo":
            vae = AutoencoderKLHunyuanVideo()
        elif kind == "wan":
            vae = AutoencoderKLWan()
        else:
            raise ValueError(f"unknown VAE kind {kind!r}; use sd, sd16, hunyuanvideo or wan")
    return vae.to(dtype=dtype).eval()


def measure_full(vae: Any, size: int, dtype: Any, *, device: str, repeats: int = 3) -> Measurement | None:
    """Median seconds and peak allocated bytes of a full decode at ``size`` px; None on out-of-memory."""
    import torch

    z = torch.randn(1, vae.config.latent_channels, size // 8, size // 8, device=device, dtype=dtype)
    times = []
    peak = 0
    try:
        with torch.inference_mode():
            vae.decode(z, return_dict=False)  # warm-up (kernels, cuDNN heuristics)
            torch.cuda.synchronize(device)
            for _ in range(repeats):
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                t0 = time.perf_counter()
                out = vae.decode(z, return_dict=False)[0]
                torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
                peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
                del out
    except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError):
        return None
    finally:
        del z
        torch.cuda.empty_cache()
    return Measurement(size=size, dtype=str(dtype).replace("torch.", ""), time_s=statistics.median(times),
                       peak_alloc_bytes=int(peak))


def calibrate(*, sizes: Sequence[int] = GRID_SIZES, dtypes: Sequence[str] = GRID_DTYPES, device: str = "cuda",
              repeats: int = 3, progress: Callable[[str], None] | None = None) -> tuple[str, float, list[Measurement]]:
    """Measure the grid on ``device``; returns (card name, total GiB, measurements). Needs CUDA."""
    import torch
    from tqdm import tqdm

    card = torch.cuda.get_device_name(device)
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    out: list[Measurement] = []
    grid = [(d, s) for d in dtypes for s in sizes]
    bar = tqdm(grid, desc=f"calibrating {card}", unit="decode", file=sys.stderr)
    vaes: dict[str, Any] = {}
    for dname, size in bar:
        bar.set_postfix_str(f"{dname} {size}px")
        dt = getattr(torch, dname)
        if dname not in vaes:
            vaes.clear()
            torch.cuda.empty_cache()
            vaes[dname] = build_vae("sd", device=device, dtype=dt)
        m = measure_full(vaes[dname], size, dt, device=device, repeats=repeats)
        if m is None:
            bar.write(f"  {dname} {size}px: out of memory, skipped")
            continue
        out.append(m)
        if progress:
            progress(f"{dname} {size}px: {m.time_s:.3f} s, peak {m.peak_alloc_bytes / 2**30:.2f} GiB")
    return card, total, out


# ---- CLI ----------------------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="measure this GPU's decode time and memory; write a GPU profile YAML",
                       description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help=f"profile YAML to write or merge into (default: {DEFAULT_OUT})")
    p.add_argument("--sizes", default=",".join(map(str, GRID_SIZES)), help="comma-separated square sizes in px")
    p.add_argument("--dtypes", default=",".join(GRID_DTYPES), help="comma-separated: float16, bfloat16, float32")
    p.add_argument("--repeats", type=int, default=3, help="timed decodes per point (median)")
    p.add_argument("--device", default="cuda", help="CUDA device, e.g. cuda:1")
    p.add_argument("--reset-learned", action="store_true",
                   help="delete the learned timings and peaks file (no GPU needed) and exit")
    p.add_argument("--learned", default=None, metavar="PATH",
                   help="learned timings file for --reset-learned (default: $HYBRID_VAE_LEARNED or the user cache)")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.reset_learned:
        from hybrid_vae.policy.learned import LearnedStore

        store = LearnedStore(args.learned)
        n = store.reset()
        print(f"learned timings reset: {store.path} ({n} entries removed)")
        return 0
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    except ValueError:
        print(f"hybrid-vae: error: --sizes={args.sizes!r}: give comma-separated integers, e.g. 512,1024", file=sys.stderr)
        return 2
    bad = [d for d in dtypes if d not in MODEL_FOR_DTYPE]
    if bad or any(s % 8 or s < 64 for s in sizes):
        print(f"hybrid-vae: error: --dtypes must be float16/bfloat16/float32 and --sizes multiples of 8 >= 64 "
              f"(got dtypes {dtypes}, sizes {sizes})", file=sys.stderr)
        return 2
    try:
        import torch
    except ImportError as exc:
        print(f"hybrid-vae calibrate: torch is not importable ({exc}): nothing to calibrate. Nothing written.")
        return 0
    if not torch.cuda.is_available():
        print("hybrid-vae calibrate: no CUDA GPU found, so there is nothing to calibrate: calibration measures a GPU's "
              "decode time and memory, and on this machine decodes run on the CPU. Nothing written.")
        return 0
    card, total, ms = calibrate(sizes=sizes, dtypes=dtypes, device=args.device, repeats=args.repeats,
                                progress=lambda s: print(f"  {s}", file=sys.stderr))
    if not ms:
        print(f"hybrid-vae calibrate: every decode on {card} ran out of memory; nothing written", file=sys.stderr)
        return 1
    path = write_profile(args.out, card, total, ms)
    print(f"wrote {path}: {card}, {total:.1f} GiB, {len(ms)} rows")
    print(f"use it: hybrid-vae explain --profile {path} --family sdxl --width 1024 --height 1024")
    print(f"   or:  export HYBRID_VAE_PROFILE={path}")
    return 0
