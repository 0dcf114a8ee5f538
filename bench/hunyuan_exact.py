"""Exact HunyuanVideo tiles against diffusers' tiles and the full decode: CPU seconds and PSNR; writes
docs/benchmarks.md.

Run ``python -m hybrid_vae.bench.hunyuan_exact`` (HunyuanVideo's decoder config, ``AutoencoderKLHunyuanVideo()``,
with seeded random weights -- time does not depend on the weights; float32 on the CPU; defaults: 3 latent frames
(9 output frames) at 256x256, several minutes on 2 cores). Each decode runs ``--repeat`` times (median of the
process's CPU seconds, which other processes on a shared machine do not inflate; the ratios are what a CPU run
is for):

- ``full``: ``vae.decode`` (diffusers, no tiling), the reference;
- diffusers' tiles at ``--tile`` px with a quarter-tile overlap and 2-latent-frame chunks through
  ``extension.executors.run_plan`` (a ``local`` plan: each tile and chunk has its own GroupNorm statistics, so the
  frames differ from the full decode);
- exact 3-D tiles at ``--tile`` px and 16 and 4 output frames per tile (``extension.stream_hunyuan``, the
  whole-video buffers in host memory as the engine plans them), with the executor's ledger
  (elements copied between the buffers and the compute device, which on a GPU cross the host link).

``--memory`` instead measures the peak (PyTorch's own count of allocated bytes, :func:`bench.exact_memory.cpu_peak_bytes`)
of exact tiles at ``--tile`` and twice it, 16 and 4 frames, against the ledger: the engine prices the device side
as 2 x the counted tile (region with context + output) + the keys and values, x ``exact_margin``; on the CPU the
buffers share the one memory, so the table gives the whole peak against buffers + 2 x tile + keys/values, and the
per-tile working set as the difference of two tile sizes over the difference of their counted tiles.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any


def run(*, size: int = 256, frames: int = 3, tile: int = 128, repeat: int = 1) -> dict[str, Any]:
    """Time the decodes of one seeded latent; returns rows ``{name, seconds, psnr_db, moved}`` and the setup."""
    import torch
    from diffusers import AutoencoderKLHunyuanVideo
    from hybrid_vae.extension.cli_local import psnr
    from hybrid_vae.extension.executors import run_plan
    from hybrid_vae.extension.stream_hunyuan import hunyuan_exact_decode
    from hybrid_vae.policy import Plan, load_profiles
    from hybrid_vae.policy.model import Estimate

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo().eval()
    fam = load_profiles("").family("hunyuanvideo")
    lat = size // 8
    z = torch.randn(1, 16, frames, lat, lat, generator=torch.Generator().manual_seed(1))
    est = Estimate(peak_bytes=0, seconds=0.0, peak_source="bench", seconds_source="bench")
    local = Plan(path="tiled", estimate=est, dtype="float32", tile_px=tile, overlap_px=tile // 4, frame_chunk=2,
                 frame_overlap=1, slice_batch=True)

    def exact(tile_frames: int, ledger: dict[str, int]) -> Any:
        return hunyuan_exact_decode(vae, z, tile_px=tile, tile_frames=tile_frames, buffers="host",
                                    ledger=ledger).clamp(-1, 1)

    cases = [("full (diffusers, no tiling)", lambda _: vae.decode(z).sample.clamp(-1, 1)),
             (f"diffusers' tiles {tile}px/{tile // 4}, 2-latent-frame chunks (local)",
              lambda _: run_plan(local, vae, z, family=fam)),
             (f"exact 3-D tiles {tile}px x 16 frames, buffers in host memory", lambda led: exact(16, led)),
             (f"exact 3-D tiles {tile}px x 4 frames, buffers in host memory", lambda led: exact(4, led))]
    rows, ref = [], None
    for name, fn in cases:
        times, out, ledger = [], None, {}
        for _ in range(repeat):
            ledger = {}
            t0 = time.process_time()
            with torch.no_grad():
                out = fn(ledger)
            times.append(time.process_time() - t0)
        ref = out if ref is None else ref
        rows.append({"name": name, "seconds": statistics.median(times), "psnr_db": psnr(out, ref),
                     "moved": ledger.get("moved_elements"), "buffers": ledger.get("buffer_elements")})
    return {"size": size, "frames": frames, "tile": tile, "repeat": repeat, "rows": rows}


def memory(*, size: int = 128, frames: int = 3, tile: int = 32) -> list[dict[str, Any]]:
    """Peak bytes of exact tiles at ``tile`` and ``2 * tile`` px, 16 and 4 frames, with the executor's ledger."""
    import torch
    from diffusers import AutoencoderKLHunyuanVideo
    from hybrid_vae.bench.exact_memory import cpu_peak_bytes
    from hybrid_vae.extension.stream_hunyuan import hunyuan_exact_decode

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo().eval()
    z = torch.randn(1, 16, frames, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
    rows = []
    for tf in (16, 4):
        for t in (tile, 2 * tile):
            ledger: dict[str, int] = {}
            with torch.no_grad():
                peak = cpu_peak_bytes(lambda t=t, tf=tf, ledger=ledger: hunyuan_exact_decode(
                    vae, z, tile_px=t, tile_frames=tf, ledger=ledger))
            rows.append({"size": size, "frames": frames, "tile": t, "tile_frames": tf, "peak": peak, **ledger})
    return rows


def memory_markdown(rows: list[dict[str, Any]]) -> str:
    r0 = rows[0]
    out = [f"## Exact HunyuanVideo tiles: peak memory against the counted tile (CPU, float32, {1 + 4 * (r0['frames'] - 1)} "
           f"frames of {r0['size']}x{r0['size']}, HunyuanVideo decoder config)", "",
           "`python -m hybrid_vae.bench.hunyuan_exact --memory`: PyTorch's peak allocated bytes of one decode against "
           "the executor's ledger. Model = buffers + 2 x tile + keys/values (the engine's device side before its "
           "margin, plus the buffers, which on the CPU share the one memory). Working set per counted tile = the "
           "difference of the peaks at two tile sizes over the difference of their counted tiles (the buffers and "
           "the keys/values cancel).", "",
           "| tile | frames per tile | peak MB | buffers MB | tile (counted) MB | peak / model | working set / counted tile |",
           "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        model = (r["buffer_elements"] + 2 * r["tile_elements"] + r["kv_elements"]) * 4
        ws = "-"
        if i % 2:
            a = rows[i - 1]
            ws = f"{(r['peak'] - a['peak']) / ((r['tile_elements'] - a['tile_elements']) * 4):.2f}x"
        out.append(f"| {r['tile']} px | {r['tile_frames']} | {r['peak'] / 1e6:.1f} | {r['buffer_elements'] * 4 / 1e6:.1f} | "
                   f"{r['tile_elements'] * 4 / 1e6:.1f} | {r['peak'] / model:.2f} | {ws} |")
    return "\n".join(out)


def markdown(res: dict[str, Any]) -> str:
    full = res["rows"][0]["seconds"]
    n_out = 1 + 4 * (res["frames"] - 1)
    out = [f"## Exact HunyuanVideo tiles vs diffusers' tiles vs full (HunyuanVideo decoder config, random weights, "
           f"{n_out} frames of {res['size']}x{res['size']}, float32, CPU)", "",
           "`python -m hybrid_vae.bench.hunyuan_exact` (`bench/hunyuan_exact.py`): CPU seconds of the process, median "
           f"of {res['repeat']}; PSNR against the full decode (with random weights only the equality of exact tiles "
           "is meaningful). Copied: elements the executor moved between the whole-video buffers and the compute "
           "device (float32 here; on a GPU in float16/bfloat16 they cross the host link: the engine prices them).", "",
           "| decode | CPU s | x full | PSNR vs full | buffers (GB, fp32) | copied (GB, fp32) |",
           "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        db = "= (reference)" if r is res["rows"][0] else ("inf" if math.isinf(r["psnr_db"]) else f"{r['psnr_db']:.1f} dB")
        buf = "-" if r["buffers"] is None else f"{r['buffers'] * 4 / 1e9:.2f}"
        moved = "-" if r["moved"] is None else f"{r['moved'] * 4 / 1e9:.2f}"
        out.append(f"| {r['name']} | {r['seconds']:.1f} | {r['seconds'] / full:.2f}x | {db} | {buf} | {moved} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    def px(text: str) -> int:
        v = int(text)
        if v < 8 or v % 8:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive multiple of 8 (output pixels; e.g. 128)")
        return v

    def count(text: str) -> int:
        v = int(text)
        if v < 1:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
        return v

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=px, default=256, help="frame side in output pixels (multiple of 8)")
    ap.add_argument("--frames", type=count, default=3, help="latent frames (output frames: 1 + 4 (frames - 1))")
    ap.add_argument("--tile", type=px, default=128, help="tile side in output pixels (multiple of 8)")
    ap.add_argument("--repeat", type=count, default=1)
    ap.add_argument("--memory", action="store_true", help="measure peak memory against the ledger instead "
                    "(defaults: 3 latent frames at 128x128, tiles of 32 and 64 px)")
    ap.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    a = ap.parse_args(argv)
    if a.memory:
        text = memory_markdown(memory(size=128 if a.size == 256 else a.size, frames=a.frames,
                                      tile=32 if a.tile == 128 else a.tile))
        print(text)
        if not a.no_write:
            from hybrid_vae.bench.report import write_section

            write_section("bench/hunyuan_exact.py --memory", text)
        return 0
    res = run(size=a.size, frames=a.frames, tile=a.tile, repeat=a.repeat)
    text = markdown(res)
    print(text)
    if not a.no_write:
        from hybrid_vae.bench.report import write_section

        write_section("bench/hunyuan_exact.py", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
