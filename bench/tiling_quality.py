"""Tiled vs full decode quality of the engine's tiler on the trained fixture VAE; writes docs/tiling-quality.md.

Run ``python -m bench.tiling_quality [--size 512] [--out docs/tiling-quality.md]``. CPU only, seeded,
a few minutes on 2 cores. For each picture it encodes with the fixture VAE, decodes the latent in full
and then tiled at every (tile, overlap) pair, with the engine's tiler (equal tiles from
``policy.tiles.axis_tiles``, linear-ramp blending) and, for comparison, with diffusers' own
``AutoencoderKL`` tiling at the same tile and overlap (``tile_overlap_factor = overlap / tile``).
PSNR is over [-1, 1] (peak-to-peak 2); "max err" is the largest absolute pixel difference (in 8-bit
levels) from the full decode.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "tiling-quality.md"


def _psnr(a: Any, b: Any) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def _pictures(size: int) -> list[tuple[str, Any]]:
    import numpy as np
    import torch
    from PIL import Image

    from extension.fixture import fixture_image

    out = []
    up = fixture_image("astronaut", 256).resize((size, size), Image.Resampling.LANCZOS)
    out.append(("astronaut (bundled 256 px, upscaled; tests and demo)", up))
    try:
        import skimage  # noqa: F401
    except ImportError:
        pass
    else:
        out.append((f"astronaut (scikit-image, {size} px; held out of training)", fixture_image("astronaut", size)))
        out.append((f"coffee (scikit-image, {size} px)", fixture_image("coffee", size)))
    return [(name, torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None])
            for name, img in out]


def _diffusers_tiled(vae: Any, z: Any, tile: int, overlap: int) -> Any:
    import torch

    saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor)
    try:
        vae.use_tiling = True
        vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
        vae.tile_overlap_factor = overlap / tile
        with torch.no_grad():
            return vae.decode(z).sample.clamp(-1, 1)
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = saved


def run(size: int, tiles: list[int], overlaps: list[int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import torch

    from extension.executors import run_plan
    from extension.fixture import load_fixture_vae
    from policy.model import Estimate, Plan
    from policy.profiles import load_profiles
    from policy.tiles import axis_tiles

    torch.manual_seed(0)
    vae = load_fixture_vae()
    fam = load_profiles("").family("sd15")
    est = Estimate(0, 0.0, "bench", "bench")
    rows: list[dict[str, Any]] = []
    for name, x in _pictures(size):
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        t0 = time.perf_counter()
        full = run_plan(Plan("full", est, "float32"), vae, z, family=fam)
        t_full = time.perf_counter() - t0
        rows.append({"picture": name, "tile": None, "overlap": None, "tiles": 1, "psnr": math.inf,
                     "max_err": 0.0, "seconds": t_full, "diffusers_psnr": None, "vs_picture": _psnr(full, x)})
        for tile in tiles:
            for ov in overlaps:
                if ov >= tile:
                    continue
                n = len(axis_tiles(z.shape[-1], tile // 8, ov // 8)) * len(axis_tiles(z.shape[-2], tile // 8, ov // 8))
                p = Plan("tiled", est, "float32", tile_px=tile, overlap_px=ov)
                t0 = time.perf_counter()
                out = run_plan(p, vae, z, family=fam)
                secs = time.perf_counter() - t0
                t0 = time.perf_counter()
                exact = run_plan(p, vae, z, family=fam, groupnorm="exact")
                secs_exact = time.perf_counter() - t0
                ref = _diffusers_tiled(vae, z, tile, ov)
                rows.append({"picture": name, "tile": tile, "overlap": ov, "tiles": n, "psnr": _psnr(out, full),
                             "max_err": float((out - full).abs().max()) * 127.5, "seconds": secs,
                             "exact_psnr": _psnr(exact, full), "exact_max_err": float((exact - full).abs().max()) * 127.5,
                             "exact_seconds": secs_exact, "diffusers_psnr": _psnr(ref, full), "vs_picture": _psnr(out, x)})
                print(f"{name[:30]:<30} tile {tile:>4} overlap {ov:>4}: local {rows[-1]['psnr']:6.2f} dB, "
                      f"exact {rows[-1]['exact_psnr']:6.2f} dB (diffusers {rows[-1]['diffusers_psnr']:6.2f} dB)",
                      file=sys.stderr)
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "threads": torch.get_num_threads(), "size": size}
    return rows, env


def render(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [
        "# Tiled vs full decode quality (fixture VAE)",
        "",
        "Written by `python -m bench.tiling_quality` (do not edit by hand). The trained fixture VAE",
        "(`extension/fixture`, SD1.5-style `AutoencoderKL`, 4 latent channels, 8x, with GroupNorm and",
        "mid-block attention like the real one) encodes each picture; the latent is decoded in full and",
        "tiled. PSNR is against the full decode, over [-1, 1]; max err in 8-bit levels; float32 on CPU.",
        "\"local\" is the engine's tiler with per-tile GroupNorm (one pass, what the time estimate assumes);",
        "\"exact\" is the same tiler with the whole image's GroupNorm statistics (`groupnorm=\"exact\"`: mid",
        "block once on the whole latent, then one statistics pass per up-block GroupNorm); \"diffusers\" is",
        "`AutoencoderKL`'s own tiling at the same tile and `tile_overlap_factor = overlap / tile`.",
        "Seconds are CPU seconds here (relative cost only; GPU timings belong in docs/benchmarks.md).",
        "",
        f"Environment: torch {env['torch']}, Python {env['python']}, {env['machine']}, "
        f"{env['threads']} threads, {env['size']}x{env['size']} px.",
        "",
    ]
    picture = None
    for r in rows:
        if r["picture"] != picture:
            picture = r["picture"]
            lines += ["", f"## {picture}", "",
                      "| tile px | overlap px | tiles | local PSNR dB | local max err | exact PSNR dB | "
                      "exact max err | diffusers PSNR dB | local s | exact s | local PSNR vs picture |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
        if r["tile"] is None:
            lines.append(f"| full | - | 1 | - | - | - | - | - | {r['seconds']:.2f} | - | {r['vs_picture']:.2f} |")
            continue
        lines.append(f"| {r['tile']} | {r['overlap']} | {r['tiles']} | {r['psnr']:.2f} | {r['max_err']:.1f} | "
                     f"{r['exact_psnr']:.2f} | {r['exact_max_err']:.1f} | {r['diffusers_psnr']:.2f} | "
                     f"{r['seconds']:.2f} | {r['exact_seconds']:.2f} | {r['vs_picture']:.2f} |")
    lines += ["", "## Summary by overlap (all pictures and tiles)", "",
              "| overlap px | min local PSNR dB | min exact PSNR dB | min diffusers PSNR dB | "
              "local s / full s | exact s / full s |",
              "|---|---|---|---|---|---|"]
    full_s = {r["picture"]: r["seconds"] for r in rows if r["tile"] is None}
    overlaps = sorted({r["overlap"] for r in rows if r["tile"] is not None})
    ok = []
    for ov in overlaps:
        rs = [r for r in rows if r["overlap"] == ov]
        lo, ex = min(r["psnr"] for r in rs), min(r["exact_psnr"] for r in rs)
        if ex >= 40:
            ok.append(ov)
        lines.append(f"| {ov} | {lo:.2f} | {ex:.2f} | {min(r['diffusers_psnr'] for r in rs):.2f} | "
                     f"{sum(r['seconds'] / full_s[r['picture']] for r in rs) / len(rs):.2f} | "
                     f"{sum(r['exact_seconds'] / full_s[r['picture']] for r in rs) / len(rs):.2f} |")
    lines += ["", "Smallest overlap whose exact-statistics tiles reach 40 dB on every picture and tile: "
              + (f"**{ok[0]} px**." if ok else "none measured.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="picture side in px (multiple of 64)")
    ap.add_argument("--tiles", default="256,384", help="tile sizes in px, comma-separated")
    ap.add_argument("--overlaps", default="0,32,64,128", help="overlaps in px, comma-separated")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="markdown file to write")
    args = ap.parse_args(argv)
    rows, env = run(args.size, [int(t) for t in args.tiles.split(",")], [int(o) for o in args.overlaps.split(",")])
    text = render(rows, env)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    if Path(args.out).resolve() == DEFAULT_OUT:
        from bench.report import write_section

        summary = text[text.index("## Summary by overlap"):].replace("## Summary by overlap",
                                                                     "## Tiled vs full decode quality (fixture VAE)", 1)
        write_section("bench/tiling_quality.py", summary + "\nPer picture and tile: docs/tiling-quality.md. "
                      "The engine's default is per-tile (\"local\") GroupNorm with 64 px overlap; exact "
                      "statistics are opt-in (`HybridDecoder(tile_groupnorm=\"exact\")`, `hybrid-vae decode "
                      "--groupnorm exact`).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
