"""Tiled vs full decode quality of the engine's tiler on the trained fixture VAE; writes docs/tiling-quality.md.

Run ``python -m hybrid_vae.bench.tiling_quality [--size 512] [--out docs/tiling-quality.md]``. CPU only, seeded,
a few minutes on 2 cores. For each picture it encodes with the fixture VAE, decodes the latent in full
and then tiled: with the engine's exact tiling at each tile size (``extension/stream.py``: whole-image
GroupNorm statistics, no overlap), and at every (tile, overlap) pair with the engine's local-GroupNorm
tiler (equal tiles from ``policy.tiles.axis_tiles``, linear-ramp blending) and, for comparison, with
diffusers' own ``AutoencoderKL`` tiling (``tile_overlap_factor = overlap / tile``). Overlaps are given
as fractions of the tile (0.125 and 0.25 are the ones the issue asks for; 0.25 is diffusers' default).
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
    from hybrid_vae.extension.fixture import fixture_image
    from PIL import Image

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


def run(size: int, tiles: list[int], overlaps: list[float]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import torch
    from hybrid_vae.extension.executors import run_plan
    from hybrid_vae.extension.fixture import load_fixture_vae
    from hybrid_vae.policy.model import Estimate, Plan
    from hybrid_vae.policy.profiles import load_profiles
    from hybrid_vae.policy.tiles import axis_tiles

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
        rows.append({"picture": name, "kind": "full", "tile": None, "overlap": None, "tiles": 1, "psnr": math.inf,
                     "max_err": 0.0, "seconds": t_full, "vs_picture": _psnr(full, x)})
        for tile in tiles:
            p = Plan("tiled", est, "float32", tile_px=tile, groupnorm="exact")
            t0 = time.perf_counter()
            out = run_plan(p, vae, z, family=fam)
            secs = time.perf_counter() - t0
            n = len(axis_tiles(size, tile, 0)) ** 2
            rows.append({"picture": name, "kind": "exact", "tile": tile, "overlap": 0.0, "tiles": n,
                         "psnr": _psnr(out, full), "max_err": float((out - full).abs().max()) * 127.5,
                         "seconds": secs, "vs_picture": _psnr(out, x)})
            print(f"{name[:30]:<30} exact tile {tile:>4}: {rows[-1]['psnr']:6.2f} dB", file=sys.stderr)
            for frac in overlaps:
                ov = round(frac * tile / 8) * 8
                if ov >= tile:
                    continue
                n = len(axis_tiles(z.shape[-1], tile // 8, ov // 8)) * len(axis_tiles(z.shape[-2], tile // 8, ov // 8))
                p = Plan("tiled", est, "float32", tile_px=tile, overlap_px=ov)
                t0 = time.perf_counter()
                out = run_plan(p, vae, z, family=fam)
                secs = time.perf_counter() - t0
                ref = _diffusers_tiled(vae, z, tile, ov)
                rows.append({"picture": name, "kind": "local", "tile": tile, "overlap": frac, "overlap_px": ov,
                             "tiles": n, "psnr": _psnr(out, full), "max_err": float((out - full).abs().max()) * 127.5,
                             "seconds": secs, "diffusers_psnr": _psnr(ref, full), "vs_picture": _psnr(out, x)})
                print(f"{name[:30]:<30} local tile {tile:>4} overlap {ov:>4}: {rows[-1]['psnr']:6.2f} dB "
                      f"(diffusers {rows[-1]['diffusers_psnr']:6.2f} dB)", file=sys.stderr)
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "threads": torch.get_num_threads(), "size": size}
    return rows, env


def render(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [
        "# Tiled vs full decode quality (fixture VAE)",
        "",
        "Written by `python -m hybrid_vae.bench.tiling_quality` (do not edit by hand). The trained fixture VAE",
        "(`extension/fixture`, SD1.5-style `AutoencoderKL`, 4 latent channels, 8x, with GroupNorm and",
        "mid-block attention like the real one) encodes each picture; the latent is decoded in full and",
        "tiled. PSNR is against the full decode, over [-1, 1]; max err in 8-bit levels; float32 on CPU.",
        "\"exact\" is the engine's exact tiling (`extension/stream.py`: the decoder runs layer by layer over",
        "the whole image, every GroupNorm with the whole image's statistics, 1 px of context per tile, no",
        "overlap) -- the engine's tiled plan when it fits and is estimated no slower. \"local\" is the engine's "
        "one-pass tiler",
        "(each tile through the whole decoder with its own GroupNorm statistics, linear-ramp blending over",
        "the overlap) -- the plan when only the least memory fits or it is estimated faster. \"diffusers\" is "
        "`AutoencoderKL`'s own",
        "tiling at the same tile and `tile_overlap_factor`. Overlap as a fraction of the tile.",
        "Seconds are CPU seconds (relative cost only; the fixture's narrow channels make pointwise work",
        "weigh more than in a real VAE -- docs/benchmarks.md has SD-width timings).",
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
                      "| tiling | tile px | overlap | tiles | PSNR vs full dB | max err | diffusers PSNR dB "
                      "(same tile, overlap) | seconds | PSNR vs picture |",
                      "|---|---|---|---|---|---|---|---|---|"]
        if r["kind"] == "full":
            lines.append(f"| full | - | - | 1 | - | - | - | {r['seconds']:.2f} | {r['vs_picture']:.2f} |")
        elif r["kind"] == "exact":
            lines.append(f"| exact | {r['tile']} | none (1 px context) | {r['tiles']} | {r['psnr']:.2f} | "
                         f"{r['max_err']:.4f} | - | {r['seconds']:.2f} | {r['vs_picture']:.2f} |")
        else:
            lines.append(f"| local | {r['tile']} | {r['overlap']:g} ({r['overlap_px']} px) | {r['tiles']} | "
                         f"{r['psnr']:.2f} | {r['max_err']:.1f} | {r['diffusers_psnr']:.2f} | {r['seconds']:.2f} | "
                         f"{r['vs_picture']:.2f} |")
    lines += ["", "## Summary (all pictures and tiles)", "",
              "| tiling | overlap | min PSNR vs full dB | min diffusers PSNR dB | seconds / full seconds (mean) |",
              "|---|---|---|---|---|"]
    full_s = {r["picture"]: r["seconds"] for r in rows if r["kind"] == "full"}
    ex = [r for r in rows if r["kind"] == "exact"]
    if ex:
        lines.append(f"| exact | none | {min(r['psnr'] for r in ex):.2f} | - | "
                     f"{sum(r['seconds'] / full_s[r['picture']] for r in ex) / len(ex):.2f} |")
    for frac in sorted({r["overlap"] for r in rows if r["kind"] == "local"}):
        rs = [r for r in rows if r["kind"] == "local" and r["overlap"] == frac]
        lines.append(f"| local | {frac:g} | {min(r['psnr'] for r in rs):.2f} | "
                     f"{min(r['diffusers_psnr'] for r in rs):.2f} | "
                     f"{sum(r['seconds'] / full_s[r['picture']] for r in rs) / len(rs):.2f} |")
    ok = bool(ex) and min(r["psnr"] for r in ex) >= 40
    lines += ["", f"Exact tiling (the engine's tiled plan while it fits) reaches 40 dB on every picture and tile: "
              f"**{'yes' if ok else 'no'}**. Local tiles stay far below 40 dB at any overlap on this VAE (its",
              "top GroupNorms have one channel per group, so per-tile statistics move every colour); overlap only",
              "hides the seams. The engine's local overlap stays 64 px (0.25 of a 256 px tile, 0.125 of 512):",
              "more costs time without reaching 40 dB, less shows seams."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="picture side in px (multiple of 64)")
    ap.add_argument("--tiles", default="256,384", help="tile sizes in px, comma-separated")
    ap.add_argument("--overlaps", default="0,0.125,0.25,0.5", help="local overlaps as fractions of the tile")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="markdown file to write")
    args = ap.parse_args(argv)
    rows, env = run(args.size, [int(t) for t in args.tiles.split(",")], [float(o) for o in args.overlaps.split(",")])
    text = render(rows, env)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    if Path(args.out).resolve() == DEFAULT_OUT:
        from hybrid_vae.bench.report import write_section

        summary = text[text.index("## Summary (all"):].replace("## Summary (all pictures and tiles)",
                                                               "## Tiled vs full decode quality (fixture VAE)", 1)
        write_section("bench/tiling_quality.py", summary + "\n\nPer picture and tile: docs/tiling-quality.md. "
                      "`tile_groupnorm` (`DecodeSettings`, `hybrid-vae decode --groupnorm`) is `auto` by default: "
                      "local tiles only when nothing exact fits or they are estimated faster than exact ones "
                      "(`exact_tolerance`, default 1.0).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
