"""Tiled vs full decode time (and peak memory on CUDA) at one memory budget; writes docs/benchmarks.md.

Run ``python -m hybrid_vae.bench.tiled_speed`` (CPU: SD-architecture decoder with random weights -- time does not
depend on the weights -- 512 px float32, a few minutes on 2 cores) or, on a GPU, the issue's case:
``python -m hybrid_vae.bench.tiled_speed --device cuda --size 2048 --dtype float16 --budget-gib 2.5
--card "NVIDIA H100 80GB HBM3"``.

For the budget, the engine decides as it would on ``--card`` with that much memory free (its
estimates, ``policy.decide``), and the benchmark times, each ``--repeat`` times (median):

- ``full``: ``vae.decode`` without tiling (the reference; on a GPU it may need more than the budget);
- the engine's chosen plan, and the best plan of the other tiling kind (exact / local GroupNorm) that
  fits the same budget, through ``extension.executors.run_plan``;
- diffusers' own tiling (its tile attributes) at the largest of 64-1024 px tiles (overlap factor 0.25, its default)
  whose peak the engine's fitted model puts under the budget -- what a user of ``enable_tiling()``
  would pick.

On CUDA each run also records the peak allocated bytes, so the estimate can be checked against it.
PSNR is against the full decode (random weights: only the equality of exact tiling is meaningful;
the trained fixture's quality numbers are in docs/tiling-quality.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

SD_CONFIG = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
             "norm_num_groups": 32, "down_block_types": ["DownEncoderBlock2D"] * 4,
             "up_block_types": ["UpDecoderBlock2D"] * 4}


def _psnr(a: Any, b: Any) -> float:
    import math

    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def _timed(fn: Any, device: str, repeat: int) -> tuple[float, int | None, Any]:
    import torch

    cuda = device.startswith("cuda")
    # CPU: the process's CPU seconds, which other processes on a shared machine do not inflate (the ratios
    # between decodes are what the CPU run is for); CUDA: wall seconds after a synchronize
    clock = time.perf_counter if cuda else time.process_time
    times, peak, out = [], None, None
    for _ in range(repeat):
        out = None
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = clock()
        with torch.no_grad():
            out = fn()
        if cuda:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        times.append(clock() - t0)
    return statistics.median(times), peak, out


def _kinds(d: Any) -> dict[str, Any]:
    """The fastest feasible plan of each tiling kind in a decision: exact (all buffers on the device), exact+host
    (buffers partly in host memory) and local (per-tile GroupNorm)."""
    best: dict[str, Any] = {}
    for o in d.options:
        p = o.plan
        if not o.feasible or p.path != "tiled":
            continue
        kind = "exact+host" if p.offloaded else p.groupnorm
        if kind not in best or p.estimate.seconds < best[kind].estimate.seconds:
            best[kind] = p
    return best


def run(*, size: int, dtype: str, budget_gib: float, card: str, device: str, repeat: int,
        min_tile_px: int | None = None, overlap_px: int = 64) -> dict[str, Any]:
    """Time the full decode, the engine's choice, the fastest plan of every tiling kind that fits the budget,
    exact tiles with every whole-image buffer in host memory, and diffusers' tiling (see the module docstring)."""
    import dataclasses

    import torch
    from diffusers import AutoencoderKL
    from hybrid_vae.extension.executors import run_plan
    from hybrid_vae.policy import passes
    from hybrid_vae.policy.decide import decide
    from hybrid_vae.policy.estimate import exact_peak_bytes, exact_schedule, offload_peak_bytes, peak_bytes
    from hybrid_vae.policy.gpu import GiB, GpuState, host_memory
    from hybrid_vae.policy.model import DecodeJob, DecodeSettings
    from hybrid_vae.policy.profiles import load_profiles

    torch.manual_seed(0)
    tdtype = getattr(torch, dtype)
    vae = AutoencoderKL(**SD_CONFIG).eval().to(device=device, dtype=tdtype)
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1)).to(device, tdtype)
    profiles = load_profiles("")
    fam = profiles.family("sd15")
    job = DecodeJob("sd15", size, size, dtype=dtype)  # type: ignore[arg-type]
    settings = DecodeSettings(min_tile_px=min_tile_px, tile_overlap_px=overlap_px)  # small sizes (tests): less overlap
    mem = host_memory()
    host = None if mem is None else mem[1]
    gpu = GpuState(name=card, total_bytes=int(80 * GiB), free_bytes=int(budget_gib * GiB), source="simulated",
                   simulated=True, host_available_bytes=host)
    d = decide(job, gpu, profiles, settings)
    chosen = d.chosen
    # every tiling kind at this budget; on a roomy budget (the CPU run) the exact tile's buffers are pushed
    # to the host by hand, so the copies' cost shows against the same tile kept in memory
    kinds = _kinds(d)
    exact = kinds.get("exact") or kinds.get("exact+host")
    extra = []
    if exact is not None and exact.offloaded:  # the same tile with every buffer on the device, for comparison
        inmem = exact_peak_bytes(job, fam, exact.tile_px)
        extra.append(("exact, all buffers on the device", dataclasses.replace(
            exact, device_budget=None, estimate=dataclasses.replace(exact.estimate, peak_bytes=inmem, host_bytes=0,
                                                                    transfer_bytes=0, transfer_seconds=0.0))))
    sched = exact_schedule(fam, offload=True)
    if exact is not None and sched is not None:
        tile, lat = exact.tile_px, size // 8
        half = passes.costs(sched, lat, lat, tile, tdtype.itemsize, 1, 0).buffer_bytes // 2
        for label, budget in (("exact, half the buffers in host memory", half), ("exact, all buffers in host memory", 0)):
            c = passes.costs(sched, lat, lat, tile, tdtype.itemsize, 1, budget)
            plan = dataclasses.replace(exact, device_budget=budget, estimate=dataclasses.replace(
                exact.estimate, peak_bytes=offload_peak_bytes(job, fam, tile, c), host_bytes=c.host_bytes,
                transfer_bytes=c.moved_bytes))
            extra.append((label, plan))
    diff_tile = None
    for t in (1024, 512, 256, 128, 64):
        if t < size and peak_bytes(job, fam, tile_px=t, overlap_px=t // 4, frame_chunk=None, slice_batch=True,
                                   geometry="diffusers") <= d.budget_bytes:
            diff_tile = t
            break

    runs: list[tuple[str, Any, Any]] = [("full (diffusers, no tiling)", None, lambda: vae.decode(z).sample)]
    plans = [("engine's choice", chosen)] + [(f"fastest {k}", p) for k, p in kinds.items() if p is not chosen] + extra
    for label, plan in plans:
        if plan is not None and plan.path in ("full", "tiled"):
            runs.append((f"{label}: {plan.label}", plan, lambda p=plan: run_plan(p, vae, z, family=fam, device=device)))
    if diff_tile is not None:
        from hybrid_vae.bench.tiling_quality import _diffusers_tiled

        runs.append((f"diffusers enable_tiling({diff_tile}, overlap 0.25)", diff_tile,
                     lambda: _diffusers_tiled(vae, z, diff_tile, diff_tile // 4)))
    # round robin: every repeat times each decode once, so a machine whose load changes meanwhile
    # (a shared CPU) slows all of them alike; the median of the repeats is reported
    times: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    peaks: dict[str, int | None] = {}
    outs: dict[str, Any] = {}
    for _ in range(repeat):
        for label, _, fn in runs:
            s, pk, out = _timed(fn, device, 1)
            times[label].append(s)
            peaks[label], outs[label] = pk, out
    ref = outs[runs[0][0]]
    rows: list[dict[str, Any]] = []
    for label, what, _ in runs:
        row: dict[str, Any] = {"what": label, "seconds": statistics.median(times[label]), "peak": peaks[label],
                               "psnr": float("inf") if what is None else _psnr(outs[label].to(ref.device), ref.clamp(-1, 1))}
        if what is None:
            row["est"] = d.options[0].plan.estimate.peak_bytes
        elif isinstance(what, int):
            row["est"] = peak_bytes(job, fam, tile_px=what, overlap_px=what // 4, frame_chunk=None, slice_batch=True,
                                    geometry="diffusers")
        else:
            row.update(est=what.estimate.peak_bytes, host=what.estimate.host_bytes, moved=what.estimate.transfer_bytes)
        rows.append(row)
    full_s = rows[0]["seconds"]
    return {"size": size, "dtype": dtype, "budget_gib": budget_gib, "card": card, "device": device,
            "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
            "threads": torch.get_num_threads(), "repeat": repeat, "reason": d.reason, "rows": rows,
            "full_s": full_s}


def markdown(res: dict[str, Any]) -> str:
    gib = 2**30
    lines = [f"## Tiled vs full decode time at one budget ({res['size']}x{res['size']} {res['dtype']}, "
             f"{res['device_name']})", "",
             f"SD-architecture decoder (random weights), {res['budget_gib']:g} GiB free on a simulated "
             f"{res['card']} for the engine's decision (\"{res['reason']}\"); median of {res['repeat']} runs "
             f"(round robin) on {res['device_name']} ({res['threads']} threads"
             f"{'; seconds are the process CPU time' if res['device'] == 'cpu' else ''}). Written by "
             f"`python -m hybrid_vae.bench.tiled_speed {res.get('argv', '')}`.".replace(" `.", "`."), "",
             "| decode | seconds | x full | PSNR vs full dB | peak GiB measured | peak GiB estimated | host GiB | GB copied |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        peak = f"{r['peak'] / gib:.2f}" if r["peak"] is not None else "- (CPU)"
        psnr = "-" if r["psnr"] == float("inf") else f"{r['psnr']:.1f}"
        host = f"{r['host'] / gib:.2f} | {r['moved'] / 1e9:.2f}" if r.get("host") else "- | -"
        lines.append(f"| {r['what']} | {r['seconds']:.3f} | {r['seconds'] / res['full_s']:.2f} | {psnr} | {peak} | "
                     f"{r['est'] / gib:.2f} | {host} |")
    if res["device"] == "cpu":
        lines += ["", "CPU: only the ratios mean something (compute-bound, no launch overhead; CPU time, so other "
                  "processes on a shared machine do not skew them). \"In host memory\" "
                  "on a CPU means the whole-image buffers are a separate store and every tile is copied in and out, "
                  "as on a GPU, so those rows show the cost of the copy machinery, not of a PCIe link. The GPU "
                  "figures for the offloaded case (2048x2048 float16, 2.5 GiB free: estimate >= measured peak, "
                  "time <= 1.6x full) come from `bash bench/gpu_session.sh offload` (`--check-offload 1.6`)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="output side in px (multiple of 8)")
    ap.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--budget-gib", type=float, default=0.9, help="free memory the engine decides for (GiB)")
    ap.add_argument("--card", default="NVIDIA GeForce RTX 3070", help="the card the engine decides for")
    ap.add_argument("--device", default="cpu", help="where the decodes run (cpu, cuda)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--min-tile-px", type=int, default=None, help="smallest tile the engine may choose (default: the family's)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch docs/benchmarks.md")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--check-offload", type=float, default=None, metavar="X",
                    help="exit 1 unless the fastest exact+host plan ran under its peak estimate (CUDA) and within "
                         "X times the full decode's seconds")
    args = ap.parse_args(argv)
    if args.size <= 0 or args.size % 8:
        ap.error(f"--size {args.size}: use a positive multiple of 8")
    if args.budget_gib <= 0:
        ap.error(f"--budget-gib {args.budget_gib}: must be > 0")
    if not 1 <= args.repeat <= 100:
        ap.error(f"--repeat {args.repeat}: give 1 to 100 timed runs")
    res = run(size=args.size, dtype=args.dtype, budget_gib=args.budget_gib, card=args.card, device=args.device,
              repeat=args.repeat, min_tile_px=args.min_tile_px)
    res["argv"] = " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(res)
    print(text)
    if args.json:
        import json
        from pathlib import Path

        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    if not args.no_write:
        from hybrid_vae.bench.report import write_section

        write_section(f"bench/tiled_speed.py {res['device_name']}", text)
    return 0 if args.check_offload is None else check_offload(res, args.check_offload)


def check_offload(res: dict[str, Any], max_ratio: float) -> int:
    """Print and return (0 pass, 1 fail) the offloaded-plan check: peak <= estimate, seconds <= ratio x full."""
    rows = [r for r in res["rows"] if r["what"].startswith(("fastest exact+host", "engine's choice")) and r.get("host")]
    if not rows:
        print(f"check-offload: FAIL: no exact+host plan fits {res['budget_gib']:g} GiB here")
        return 1
    r = rows[0]
    ratio = r["seconds"] / res["full_s"]
    peak_ok = r["peak"] is None or r["peak"] <= r["est"]
    peak = "not measured (CPU)" if r["peak"] is None else f"{r['peak'] / 2**30:.2f} GiB"
    ok = peak_ok and ratio <= max_ratio
    print(f"check-offload: {'PASS' if ok else 'FAIL'}: {r['what']}: peak {peak} vs estimate {r['est'] / 2**30:.2f} GiB, "
          f"{r['seconds']:.3f} s = {ratio:.2f}x full (limit {max_ratio:g}x)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
