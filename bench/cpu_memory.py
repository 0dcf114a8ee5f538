"""Host memory and seconds of a full CPU decode (the engine's ``cpu`` plan), measured on this machine.

Run ``python -m hybrid_vae.bench.cpu_memory [--sizes 256,384,512,768] [--out FILE]``. Each row: one SD-architecture
decoder (random weights, float32, ``bench.tiled_speed.SD_CONFIG``) decoding one latent on the CPU; the peak is
PyTorch's own count of allocated bytes during the decode (:func:`bench.exact_memory.cpu_peak_bytes`, the
CPU counterpart of ``torch.cuda.max_memory_allocated``), the seconds the median of ``--repeat`` runs.
The rows go to ``profiles/measured/cpu-sd-decode-<date>.jsonl`` (package data), where the simulated world
reads them as the truth of a ``cpu`` plan's host memory and time (``bench/truth.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from hybrid_vae.bench.report import write_measured


def run(sizes: list[int], batches: list[int], repeat: int = 1) -> list[dict[str, Any]]:
    """One row per (size, batch): peak allocated bytes and median seconds of a float32 CPU decode."""
    import torch
    from diffusers import AutoencoderKL
    from hybrid_vae.bench.exact_memory import cpu_peak_bytes
    from hybrid_vae.bench.report import machine
    from hybrid_vae.bench.tiled_speed import SD_CONFIG

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_CONFIG).eval()
    rows = []
    for size in sizes:
        for batch in batches:
            z = torch.randn(batch, vae.config.latent_channels, size // 8, size // 8)
            with torch.no_grad():
                peak = cpu_peak_bytes(lambda z=z: vae.decode(z))
                times = []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    vae.decode(z)
                    times.append(time.perf_counter() - t0)
            row = {"tag": "cpu_full", "dtype": "torch.float32", "mode": "full", "res": size, "batch": batch,
                   "peak_alloc_delta": peak, "median_s": statistics.median(times), "times_s": times,
                   "threads": torch.get_num_threads(), "machine": machine()}
            rows.append(row)
            print(f"{size} px x{batch}: {peak / 2**20:.0f} MiB, {row['median_s']:.2f} s", file=sys.stderr)
    return rows


def _ints(ap: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        ap.error(f"{flag} {text!r}: give comma-separated integers, e.g. 256,512")
    if any(v < 1 for v in vals):
        ap.error(f"{flag} {text!r}: every value must be >= 1")
    return vals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,384,512,768", help="output sides in px (multiples of 8), comma-separated")
    ap.add_argument("--batches", default="1,2", help="batch sizes, comma-separated")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per row (after the profiled one)")
    ap.add_argument("--out", default=None, help="JSONL file (default: profiles/measured/cpu-sd-decode-<date>.jsonl)")
    args = ap.parse_args(argv)
    sizes, batches = _ints(ap, "--sizes", args.sizes), _ints(ap, "--batches", args.batches)
    if any(s % 8 for s in sizes):
        ap.error(f"--sizes {args.sizes!r}: every side must be a multiple of 8")
    if args.repeat < 1:
        ap.error(f"--repeat {args.repeat}: must be >= 1")
    rows = run(sizes, batches, args.repeat)
    write_measured(rows, args.out, "cpu-sd-decode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
