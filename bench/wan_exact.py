"""Exact Wan tiles against diffusers' tiles and the full decode: CPU seconds and PSNR; writes docs/benchmarks.md.

Run ``python -m hybrid_vae.bench.wan_exact`` (Wan 2.1's decoder config, ``AutoencoderKLWan()``, with seeded
random weights -- time does not depend on the weights; one latent frame or more at 512x512, float32, a few
minutes on 2 cores). Each decode runs ``--repeat`` times (median of the process's CPU seconds, which other
processes on a shared machine do not inflate; the ratios are what a CPU run is for):

- ``full``: ``vae.decode`` (diffusers, no tiling), the reference;
- diffusers' tiles at ``--tile`` px with 64 px overlap through ``extension.executors.run_plan`` (a ``local`` plan:
  the frames differ from the full decode where the tiles meet);
- exact tiles at ``--tile`` px (``extension.stream_wan.wan_exact_tiles``: each tile decodes a 104 px halo on
  every side), the same through ``run_plan``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any


def run(*, size: int = 512, frames: int = 1, tile: int = 256, repeat: int = 1) -> dict[str, Any]:
    """Time the three decodes of one seeded latent; returns rows ``{name, seconds, psnr_db}`` and the setup."""
    import torch
    from diffusers import AutoencoderKLWan
    from hybrid_vae.extension.cli_local import psnr
    from hybrid_vae.extension.executors import run_plan
    from hybrid_vae.extension.stream_wan import halo_latent
    from hybrid_vae.policy import Plan, load_profiles
    from hybrid_vae.policy.model import Estimate

    torch.manual_seed(0)
    vae = AutoencoderKLWan().eval()
    fam = load_profiles("").family("wan")
    lat = size // 8
    z = torch.randn(1, 16, frames, lat, lat, generator=torch.Generator().manual_seed(1))
    est = Estimate(peak_bytes=0, seconds=0.0, peak_source="bench", seconds_source="bench")
    local = Plan(path="tiled", estimate=est, dtype="float32", tile_px=tile, overlap_px=64, slice_batch=True,
                 host_output=True)
    exact = Plan(path="tiled", estimate=est, dtype="float32", tile_px=tile, slice_batch=True, groupnorm="exact",
                 host_output=True)
    cases = [("full (diffusers, no tiling)", lambda: vae.decode(z).sample.clamp(-1, 1)),
             (f"diffusers' tiles {tile}px/64 (local)", lambda: run_plan(local, vae, z, family=fam)),
             (f"exact tiles {tile}px (halo {halo_latent(vae.decoder) * 8} px)", lambda: run_plan(exact, vae, z, family=fam))]
    rows, ref = [], None
    for name, fn in cases:
        times, out = [], None
        for _ in range(repeat):
            t0 = time.process_time()
            with torch.no_grad():
                out = fn()
            times.append(time.process_time() - t0)
        ref = out if ref is None else ref
        rows.append({"name": name, "seconds": statistics.median(times), "psnr_db": psnr(out, ref)})
    return {"size": size, "frames": frames, "tile": tile, "repeat": repeat, "rows": rows}


def markdown(res: dict[str, Any]) -> str:
    full = res["rows"][0]["seconds"]
    out = [f"## Exact Wan tiles vs diffusers' tiles vs full (Wan 2.1 decoder config, random weights, "
           f"{res['size']}x{res['size']}, {res['frames']} latent frame(s), float32, CPU)", "",
           "`python -m hybrid_vae.bench.wan_exact` (`bench/wan_exact.py`): CPU seconds of the process, median of "
           f"{res['repeat']}; PSNR against the full decode (with random weights only the equality of exact "
           "tiles is meaningful: diffusers' tiles differ where they meet).", "",
           "| decode | CPU s | x full | PSNR vs full |", "|---|---|---|---|"]
    for r in res["rows"]:
        db = "= (reference)" if r is res["rows"][0] else ("inf" if math.isinf(r["psnr_db"]) else f"{r['psnr_db']:.1f} dB")
        out.append(f"| {r['name']} | {r['seconds']:.1f} | {r['seconds'] / full:.2f}x | {db} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from hybrid_vae.bench.report import count_arg, px_arg

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=px_arg, default=512, help="frame side in output pixels (multiple of 8)")
    ap.add_argument("--frames", type=count_arg, default=1, help="latent frames")
    ap.add_argument("--tile", type=px_arg, default=256, help="tile side in output pixels (multiple of 8)")
    ap.add_argument("--repeat", type=count_arg, default=1)
    ap.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    a = ap.parse_args(argv)
    res = run(size=a.size, frames=a.frames, tile=a.tile, repeat=a.repeat)
    text = markdown(res)
    print(text)
    if not a.no_write:
        from hybrid_vae.bench.report import write_section

        write_section("bench/wan_exact.py", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
