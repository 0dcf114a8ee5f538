"""Peak memory of the video decoders on the CPU: the measured basis of the Wan memory estimate.

Run ``python -m hybrid_vae.bench.video_cpu_memory [--shapes wan:3x20x32,hunyuanvideo:3x20x32] [--out FILE]``
(``--device cuda --dtype bfloat16 --out F``: the same decodes on a GPU, part of ``bench/gpu_session.sh 1``).
Each row: one diffusers video VAE built from its default config (``AutoencoderKLWan``: Wan 2.1's VAE;
``AutoencoderKLHunyuanVideo``: HunyuanVideo's; random weights: memory does not depend on them), float32,
decoding one latent of ``T x H x W`` latent frames x pixels on the CPU; the peak is PyTorch's own count of
allocated bytes during the decode (:func:`bench.exact_memory.cpu_peak_bytes`, the CPU counterpart of
``torch.cuda.max_memory_allocated``).

Why: no GPU has measured Wan's decoder here, and HunyuanVideo's has (``profiles/measured/h200-*.jsonl``). The
same decode measured on the CPU for both gives HunyuanVideo's CPU/GPU ratio, which with the SD decoder's
(``cpu-sd-decode-*.jsonl`` against the H200 rows) bounds how a CPU peak carries over to a GPU; Wan's GPU peak
is then interpolated from its CPU row (docs/estimator.md "Wan"). The rows go to
``profiles/measured/cpu-video-decode-<date>.jsonl`` (package data), which the simulated world reads as the basis
of Wan's memory truth (``bench/truth.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from hybrid_vae.bench.report import write_measured

MODELS = ("wan", "hunyuanvideo")
DEFAULT_SHAPES = "wan:1x20x32,wan:3x20x32,wan:5x20x32,wan:3x30x48,hunyuanvideo:3x20x32,hunyuanvideo:3x30x48"


def _vae(model: str) -> Any:
    from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLWan

    return (AutoencoderKLWan() if model == "wan" else AutoencoderKLHunyuanVideo()).eval()


def _cuda_peak_bytes(fn: Any) -> int:
    """Peak CUDA bytes allocated while ``fn()`` runs, above what was allocated before."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def run(shapes: list[tuple[str, int, int, int]], *, device: str = "cpu", dtype: str = "float32") -> list[dict[str, Any]]:
    """One row per ``(model, latent frames, latent height, latent width)``: peak allocated bytes and seconds.

    ``device="cuda"`` measures the same decodes on a GPU (``torch.cuda.max_memory_allocated``; tag ``video_cuda``,
    to set against the CPU rows and the Wan estimate when a GPU is lent)."""
    import torch
    from hybrid_vae.bench.exact_memory import cpu_peak_bytes
    from hybrid_vae.bench.report import machine

    dt = getattr(torch, dtype)
    peak_of = cpu_peak_bytes if device == "cpu" else _cuda_peak_bytes
    rows, vaes = [], {}
    for model, t, h, w in shapes:
        torch.manual_seed(0)
        vae = vaes.get(model) or vaes.setdefault(model, _vae(model).to(device=device, dtype=dt))
        z = torch.randn(1, 16, t, h, w, device=device, dtype=dt)
        t0 = time.perf_counter()
        with torch.no_grad():
            peak = peak_of(lambda vae=vae, z=z: vae.decode(z))
        secs = time.perf_counter() - t0
        frames, fh, fw = (t - 1) * 4 + 1, h * 8, w * 8
        row = {"tag": "cpu_video" if device == "cpu" else "video_cuda", "model": model, "dtype": f"torch.{dtype}",
               "mode": "full", "latent": [1, 16, t, h, w],
               "res": f"{frames}x{fh}x{fw}", "peak_alloc_delta": peak, "bytes_per_frame_px": peak / (fh * fw),
               "seconds": round(secs, 2), "threads": torch.get_num_threads(), "machine": machine(),
               "diffusers_class": type(vae).__name__}
        rows.append(row)
        print(f"{model} {row['res']}: {peak / 2**20:.0f} MiB, {row['bytes_per_frame_px']:.0f} B per frame px, "
              f"{secs:.1f} s", file=sys.stderr)
    return rows


def _shapes(ap: argparse.ArgumentParser, text: str) -> list[tuple[str, int, int, int]]:
    out = []
    for item in text.split(","):
        model, _, dims = item.partition(":")
        try:
            t, h, w = (int(v) for v in dims.split("x"))
        except ValueError:
            ap.error(f"--shapes item {item!r}: give model:TxHxW in latent units, e.g. wan:3x20x32")
        if model not in MODELS:
            ap.error(f"--shapes item {item!r}: model must be one of {', '.join(MODELS)}")
        if min(t, h, w) < 1:
            ap.error(f"--shapes item {item!r}: every latent dimension must be >= 1")
        out.append((model, t, h, w))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="model:TxHxW latent shapes, comma-separated")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (the shipped rows) or cuda")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--out", default=None, help="JSONL file (default: profiles/measured/cpu-video-decode-<date>.jsonl;"
                    " give one for --device cuda: its rows are to be checked before they join the shipped data)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not args.out:
        ap.error("--device cuda: give --out (the shipped data folder takes reviewed rows only)")
    rows = run(_shapes(ap, args.shapes), device=args.device, dtype=args.dtype)
    write_measured(rows, args.out, "cpu-video-decode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
