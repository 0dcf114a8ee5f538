"""Exact HunyuanVideo tiles against diffusers' tiles and the full decode: CPU seconds and PSNR; writes
docs/benchmarks.md.

Run ``python -m hybrid_vae.bench.hunyuan_exact`` (HunyuanVideo's decoder config, ``AutoencoderKLHunyuanVideo()``,
with seeded random weights -- time does not depend on the weights; float32 on the CPU; defaults: 3 latent frames
(9 output frames) at 256x256, several minutes on 2 cores). Each decode runs ``--repeat`` times (median of the
process's CPU seconds, which other processes on a shared machine do not inflate; the ratios are what a CPU run
is for):

- ``full``: ``vae.decode`` with diffusers' tiling and framewise decoding off (its default decodes videos of more
  than 4 latent frames in blended temporal chunks), the reference;
- diffusers' tiles at ``--tile`` px with a quarter-tile overlap and 2-latent-frame chunks through
  ``extension.executors.run_plan`` (a ``local`` plan: each tile and chunk has its own GroupNorm statistics, so the
  frames differ from the full decode);
- exact 3-D tiles at ``--tile`` px and 16 and 4 output frames per tile (``extension.stream_hunyuan``, the
  whole-video buffers in host memory as the engine plans them), with the executor's ledger
  (elements copied between the buffers and the compute device, which on a GPU cross the host link).

``--memory`` instead measures the peak (PyTorch's own count of allocated bytes, :func:`bench.exact_memory.cpu_peak_bytes`)
of exact tiles at ``--tile`` and twice it, 16 and 4 frames, against the ledger: the engine prices the device side
as 2 x the counted tile (region with context + output) + the keys and values, x ``exact_margin`` (3 x with host
buffers on a GPU: the next tile's reads and the last output in flight on the copy stream); on the CPU the
buffers share the one memory, so the table gives the whole peak against buffers + 2 x tile + keys/values, and the
per-tile working set as the difference of two tile sizes over the difference of their counted tiles.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Any


def run(*, size: int = 256, frames: int = 3, tile: int = 128, repeat: int = 1, device: str = "cpu",
        dtype: str = "float32", width: int | None = None) -> dict[str, Any]:
    """Time the decodes of one seeded latent; returns rows ``{name, seconds, psnr_db, moved, buffers, peak,
    est_peak, est_s}`` and the setup. On CUDA: wall seconds (synchronised) and the CUDA peak over the weights,
    with the engine's estimate for the exact plans on this card (``policy.video_exact.video_exact_estimate``)."""
    import torch
    from diffusers import AutoencoderKLHunyuanVideo
    from hybrid_vae.extension.cli_local import psnr
    from hybrid_vae.extension.executors import run_plan
    from hybrid_vae.extension.stream_hunyuan import hunyuan_exact_decode
    from hybrid_vae.policy import DecodeJob, DecodeSettings, Plan, load_profiles
    from hybrid_vae.policy.estimate import SpeedModel
    from hybrid_vae.policy.model import Estimate
    from hybrid_vae.policy.profiles import dtype_bytes
    from hybrid_vae.policy.video_exact import video_exact_counts, video_exact_estimate

    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    tdt = getattr(torch, dtype)
    vae = AutoencoderKLHunyuanVideo().eval().to(device=device, dtype=tdt)
    profiles = load_profiles("")
    fam = profiles.family("hunyuanvideo")
    lat_h, lat_w = size // 8, (width or size) // 8
    z = torch.randn(1, 16, frames, lat_h, lat_w, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=tdt)
    est = Estimate(peak_bytes=0, seconds=0.0, peak_source="bench", seconds_source="bench")
    local = Plan(path="tiled", estimate=est, dtype=dtype, tile_px=tile, overlap_px=tile // 4, frame_chunk=2,
                 frame_overlap=1, slice_batch=True)
    card = torch.cuda.get_device_name(0) if cuda else None
    gp = profiles.gpu(card) if card else None
    job = DecodeJob("hunyuanvideo", lat_w * 8, lat_h * 8, frames=1 + 4 * (frames - 1), dtype=dtype)
    speed = SpeedModel(fam, gp, dtype_bytes(dtype), DecodeSettings())

    def exact(tile_frames: int, ledger: dict[str, int], buffers: str = "host", budget: int = 0) -> Any:
        return hunyuan_exact_decode(vae, z, tile_px=tile, tile_frames=tile_frames, buffers=buffers,  # type: ignore[arg-type]
                                    device_budget=budget, ledger=ledger).clamp(-1, 1)

    def estimate(host: bool, budget: int = 0) -> Estimate | None:
        return video_exact_estimate(job, fam, speed, gp, tile, dtype_bytes(dtype), host_buffers=host,
                                    device_budget=budget) if cuda else None

    half = video_exact_counts(job, fam, tile, 16).buffer_elements * dtype_bytes(dtype) // 2

    vae.use_framewise_decoding = False  # the reference is the whole video at once (run_plan sets it per plan)
    vae.use_tiling = False
    cases = [("full (diffusers, no tiling, not framewise)", lambda _: vae.decode(z).sample.clamp(-1, 1), None),
             (f"diffusers' tiles {tile}px/{tile // 4}, 2-latent-frame chunks (local)",
              lambda _: run_plan(local, vae, z, family=fam), None),
             (f"exact 3-D tiles {tile}px x 16 frames, buffers in host memory", lambda led: exact(16, led), estimate(True)),
             (f"exact 3-D tiles {tile}px x 4 frames, buffers in host memory", lambda led: exact(4, led), None)]
    if cuda:
        cases.append((f"exact 3-D tiles {tile}px x 16 frames, buffers on the GPU",
                      lambda led: exact(16, led, "device"), estimate(False)))
        cases.append((f"exact 3-D tiles {tile}px x 16 frames, half the buffers' bytes on the GPU",
                      lambda led: exact(16, led, "host", half), estimate(True, half)))
    rows, ref = [], None
    for name, fn, e in cases:
        times, out, ledger, peak = [], None, {}, None
        for _ in range(repeat):
            ledger = {}
            if cuda:
                out = None
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter() if cuda else time.process_time()
            with torch.no_grad():
                out = fn(ledger)
            if cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            times.append((time.perf_counter() if cuda else time.process_time()) - t0)
        out = out.float().cpu()
        ref = out if ref is None else ref
        rows.append({"name": name, "seconds": statistics.median(times), "psnr_db": psnr(out, ref),
                     "moved": ledger.get("moved_elements"), "buffers": ledger.get("buffer_elements"), "peak": peak,
                     "est_peak": e.peak_bytes if e else None, "est_s": e.seconds if e else None})
    unequal = [r["name"] for r in rows if r["name"].startswith("exact") and r["psnr_db"] < 100]
    if unequal:
        print(f"WARNING: exact tiles differ from the full decode (< 100 dB): {unequal}", file=sys.stderr)
    return {"size": size, "width": width or size, "frames": frames, "tile": tile, "repeat": repeat, "rows": rows,
            "device": card or "CPU", "dtype": dtype}


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
    gpu = res["device"] != "CPU"
    size = f"{res['width']}x{res['size']}"
    secs = "wall s (synchronised)" if gpu else "CPU seconds of the process"
    out = [f"## Exact HunyuanVideo tiles vs diffusers' tiles vs full (HunyuanVideo decoder config, random weights, "
           f"{n_out} frames of {size}, {res['dtype']}, {res['device']})", "",
           "`python -m hybrid_vae.bench.hunyuan_exact` (`bench/hunyuan_exact.py`): " + secs + ", median "
           f"of {res['repeat']}; PSNR against the full decode (with random weights only the equality of exact tiles "
           "is meaningful). Copied: elements the executor moved between the whole-video buffers and the compute "
           "device (on a GPU they cross the host link: the engine prices them)." + (
               " Peak: CUDA max allocated over the weights; est.: the engine's estimate for this card "
               "(`policy.video_exact.video_exact_estimate`)." if gpu else ""), ""]
    ds = {"float32": 4}.get(res["dtype"], 2)
    head = f"| decode | {'s' if gpu else 'CPU s'} | x full | PSNR vs full | buffers (GB) | copied (GB) |"
    if gpu:
        head += " peak GiB | est. peak GiB | est. s |"
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in res["rows"]:
        db = "= (reference)" if r is res["rows"][0] else ("inf" if math.isinf(r["psnr_db"]) else f"{r['psnr_db']:.1f} dB")
        buf = "-" if r["buffers"] is None else f"{r['buffers'] * ds / 1e9:.2f}"
        moved = "-" if r["moved"] is None else f"{r['moved'] * ds / 1e9:.2f}"
        line = f"| {r['name']} | {r['seconds']:.2f} | {r['seconds'] / full:.2f}x | {db} | {buf} | {moved} |"
        if gpu:
            g = 2**30
            line += (f" {r['peak'] / g:.2f} | " + ("-" if r["est_peak"] is None else f"{r['est_peak'] / g:.2f}") + " | "
                     + ("-" if r["est_s"] is None else f"{r['est_s']:.2f}") + " |")
        out.append(line)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from hybrid_vae.bench.report import count_arg, px_arg

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=px_arg, default=None,
                    help="frame side in output pixels (multiple of 8; default 256, with --memory 128)")
    ap.add_argument("--frames", type=count_arg, default=3, help="latent frames (output frames: 1 + 4 (frames - 1))")
    ap.add_argument("--tile", type=px_arg, default=None,
                    help="tile side in output pixels (multiple of 8; default 128, with --memory 32 and 64)")
    ap.add_argument("--width", type=px_arg, default=None, help="frame width (default: --size)")
    ap.add_argument("--repeat", type=count_arg, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA: wall seconds, peaks and the estimates)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--memory", action="store_true", help="measure peak memory against the ledger instead "
                    "(defaults: 3 latent frames at 128x128, tiles of 32 and 64 px)")
    ap.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    a = ap.parse_args(argv)
    if a.memory:
        text = memory_markdown(memory(size=a.size or 128, frames=a.frames, tile=a.tile or 32))
        print(text)
        if not a.no_write:
            from hybrid_vae.bench.report import write_section

            write_section("bench/hunyuan_exact.py --memory", text)
        return 0
    if a.device != "cpu" and not a.device.startswith("cuda"):
        ap.error(f"--device {a.device!r}: give cpu or cuda")
    res = run(size=a.size or 256, frames=a.frames, tile=a.tile or 128, repeat=a.repeat, device=a.device, dtype=a.dtype,
              width=a.width)
    text = markdown(res)
    print(text)
    if not a.no_write:
        from hybrid_vae.bench.report import write_section

        write_section("bench/hunyuan_exact.py" + (" --device cuda" if res["device"] != "CPU" else ""), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
