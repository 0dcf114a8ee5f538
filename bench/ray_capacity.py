"""Capacity of a decode endpoint per GPU: requests/s, bytes in/out per request, network and CPU needed.

Run: ``python -m hybrid_vae.bench.ray_capacity [--no-write]``; writes its section of docs/ray.md.

Computed, not measured here. Sources, per column:

* **decode s**: measured decode times, one image at a time, the GPU doing nothing else:
  NVIDIA H200 rows from ``profiles/measured/h200-vae-decode-2026-11-27.jsonl`` (package data) (median of 3 timed decodes after a
  warm-up; diffusers 0.42.1, torch 2.11 + CUDA 13.0; batch rows are the same runs with 2 and 4 images);
  the RTX rows from the diffusers "Hybrid Inference: VAE decode" guide's tables as ``profiles/gpus.yaml``
  transcribes them (fp16 latents; its SDXL is the stock VAE, which upcasts to float32).
* **requests/s per GPU** = batch / decode s: one replica per GPU decodes one batch at a time (what
  ``server/ray_app.py`` does), so this is the GPU-bound ceiling; HTTP and encoding run beside it on the
  replica's CPUs (last column) and are not in it.
* **bytes in** = the latent as the client sends it: channels x (H/8) x (W/8) [x latent frames] x dtype bytes
  (fp16/bf16: 2; the family's latent layout from ``profiles/families.yaml``).
* **bytes out**: raw = H x W x 3 (uint8, exact); png / jpg = the bytes per pixel of the server's own encoder
  (``server/protocol.py``: PNG compress level 1, JPEG quality 95) on the bundled 256 px photo
  (``extension/fixture/astronaut_256.png``), measured when this script runs; real pictures vary, noise-like
  ones compress far less. Video: mp4 at the policy's assumed 0.08 bytes per pixel (``policy/estimate.py``).
* **network per GPU** = requests/s x (bytes in + bytes out) x 8, in Mbit/s, at full load.
* **CPU cores for PNG** = requests/s x the server's PNG encode time per image, measured on this machine
  (the CPU named in the stamp; one thread): cores a replica needs so encoding keeps up with the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from hybrid_vae.profiles.measurements import DATA_DIR, measured_rows

NAME = "bench/ray_capacity.py"
ROOT = Path(__file__).resolve().parent.parent
H200_FILE = DATA_DIR / "h200-vae-decode-2026-11-27.jsonl"
DOC = ROOT / "docs" / "ray.md"
#: measured-data tag -> (family key for the latent layout, label)
TAGS = {"sd15": ("sd15", "sd15"), "sdxl": ("sdxl", "sdxl (stock VAE, float32)"),
        "sdxl_fp16": ("sdxl", "sdxl (fp16-fix VAE)"), "flux": ("flux", "flux"), "hunyuan": ("hunyuanvideo", "hunyuanvideo")}
SEED_LABEL = {"sd15": "sd15", "sdxl": "sdxl (stock VAE, float32)"}


def encoder_costs() -> dict[str, float]:
    """Bytes per pixel of png/jpg and PNG encode seconds per megapixel, with the server's encoder on the
    bundled photo (one thread, median of 5)."""
    import numpy as np
    import torch
    from hybrid_vae.extension.fixture import FIXTURE_DIR
    from hybrid_vae.policy.profiles import load_profiles
    from hybrid_vae.server.protocol import encode_output, parse_request
    from PIL import Image

    img = np.asarray(Image.open(FIXTURE_DIR.parent / "astronaut_256.png").convert("RGB"))
    h, w = img.shape[:2]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
    fam = load_profiles().family("sd15")
    out: dict[str, float] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for fmt in ("png", "jpg"):
            req = parse_request([("shape", "1"), ("shape", "4"), ("shape", str(h // 8)), ("shape", str(w // 8)),
                                 ("image_format", fmt)], family_name="sd15", family=fam)
            took = []
            for _ in range(5):
                t0 = time.perf_counter()
                body, _ = encode_output(x, req)
                took.append(time.perf_counter() - t0)
            out[f"{fmt}_bytes_per_px"] = len(body) / (h * w)
            out[f"{fmt}_s_per_mp"] = statistics.median(took) / (h * w / 1e6)
    finally:
        torch.set_num_threads(threads)
    return out


def rows() -> list[dict[str, Any]]:
    """One row per (GPU, family, size, batch) with the measured decode seconds and where it comes from."""
    from hybrid_vae.policy.profiles import load_profiles

    profiles = load_profiles()
    out: list[dict[str, Any]] = []
    for m in measured_rows():
        if m.where.rsplit(":", 1)[0] != H200_FILE.stem or m.mode != "full" or m.series not in TAGS or m.seconds is None:
            continue
        fam_key, label = TAGS[m.series]
        fam = profiles.family(fam_key)
        c, sc = fam.latent_channels, fam.spatial_compression
        if m.frames:
            latent = [m.batch, c, (m.frames - 1) // fam.temporal_compression + 1, m.height // sc, m.width // sc]
            size = f"{m.frames} x {m.height}x{m.width}"
        else:
            latent, size = [m.batch, c, m.height // sc, m.width // sc], f"{m.height}"
        out.append({"gpu": "H200", "family": fam_key, "label": label, "size": size, "h": m.height, "w": m.width,
                    "frames": m.frames, "batch": m.batch, "latent": latent, "seconds": m.seconds,
                    "source": "H200 measured (profiles/measured)"})
    for g in profiles.gpus:
        if "H200" in g.name:
            continue  # the same measurements as profiles/measured
        for r in g.rows:
            if r.model not in SEED_LABEL:
                continue
            fam = profiles.family(r.model)
            c, sc = fam.latent_channels, fam.spatial_compression
            out.append({"gpu": g.name.replace("NVIDIA GeForce ", ""), "family": r.model, "label": SEED_LABEL[r.model],
                        "size": str(r.size), "h": r.size, "w": r.size, "frames": None, "batch": 1,
                        "latent": [1, c, r.size // sc, r.size // sc], "seconds": float(r.time_s),
                        "source": "seed table (profiles/gpus.yaml)"})
    return out


def compute(enc: dict[str, float]) -> list[dict[str, Any]]:
    import math

    table = []
    for r in rows():
        lat = math.prod(r["latent"]) * 2  # clients send fp16/bf16 latents, whatever dtype the VAE computes in
        px = r["h"] * r["w"] * (r["frames"] or 1)
        rps = r["batch"] / r["seconds"]
        per_req = lat / r["batch"]
        raw = px * 3
        if r["frames"]:
            packed = {"raw": raw, "mp4": px * 0.08}
        else:
            packed = {"raw": raw, "png": px * enc["png_bytes_per_px"], "jpg": px * enc["jpg_bytes_per_px"]}
        net = {k: rps * (per_req + v) * 8 / 1e6 for k, v in packed.items()}
        cpu_png = rps * px / 1e6 * enc["png_s_per_mp"] if not r["frames"] else None
        table.append({**r, "rps": rps, "bytes_in": per_req, "bytes_out": packed, "mbit": net, "cpu_png": cpu_png})
    return table


def _mb(b: float) -> str:
    return f"{b / 1e6:.2f} MB" if b >= 1e5 else f"{b / 1e3:.0f} kB"


def render(table: list[dict[str, Any]], enc: dict[str, float]) -> str:
    lines = [
        "## Capacity per GPU (computed from measured decode times)",
        "",
        "`python -m hybrid_vae.bench.ray_capacity` computes this from the sources in its docstring: decode "
        "seconds measured on an H200 (`profiles/measured`) and the diffusers guide's RTX tables (`profiles/gpus.yaml`); "
        f"bytes out of png/jpg from the server's encoder on the bundled photo ({enc['png_bytes_per_px']:.2f} and "
        f"{enc['jpg_bytes_per_px']:.2f} bytes per pixel against 3 for raw); PNG encode {enc['png_s_per_mp']:.3f} s "
        "per megapixel on one core of the machine named below. Requests/s is the GPU-bound ceiling of one replica "
        "per GPU decoding one batch at a time; network is at that rate, in + out.",
        "",
        "| GPU | family | size (px) | batch | decode s | requests/s per GPU | bytes in / request | bytes out raw / png / jpg "
        "| network per GPU, Mbit/s raw / png / jpg | CPU cores for PNG | source |",
        "|---|---|---|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for t in table:
        outs = " / ".join(_mb(v) for v in t["bytes_out"].values())
        nets = " / ".join(f"{v:,.0f}" for v in t["mbit"].values())
        if t["frames"]:
            outs += " (raw / mp4)"
            nets += " (raw / mp4)"
        cpu = f"{t['cpu_png']:.1f}" if t["cpu_png"] is not None else "-"
        lines.append(f"| {t['gpu']} | {t['label']} | {t['size']} | {t['batch']} | {t['seconds']:.4f} | {t['rps']:.1f} | "
                     f"{_mb(t['bytes_in'])} | {outs} | {nets} | {cpu} | {t['source']} |")
    h200 = {(t["family"], t["label"], t["size"], t["batch"]): t for t in table if t["gpu"] == "H200"}
    b1 = h200.get(("sd15", "sd15", "1024", 1))
    b4 = h200.get(("sd15", "sd15", "1024", 4))
    sdxl = h200.get(("sdxl", "sdxl (fp16-fix VAE)", "1024", 1))
    lines += [""]
    if b1 and b4:
        lines.append(f"Batching on the H200 (measured): sd15 at 1024 px decodes {b1['rps']:.1f} images/s one at a time "
                     f"and {b4['rps']:.1f} images/s in batches of 4 (+{(b4['rps'] / b1['rps'] - 1) * 100:.0f}%), at "
                     f"{b4['seconds'] / b1['seconds']:.1f}x the latency per batch; on a GPU, batching buys throughput "
                     "under load, not latency.")
    if sdxl:
        users = 100
        every = 10.0
        need = users / every
        lines.append(f"Sizing example: {users} users each finishing an SDXL 1024 px image every {every:.0f} s need "
                     f"{need:.0f} decodes/s; one H200 with the fp16-fix VAE gives {sdxl['rps']:.1f}/s "
                     f"({need / sdxl['rps'] * 100:.0f}% busy), so `max_replicas: 2` leaves headroom; with PNG answers "
                     f"that is {need * (sdxl['bytes_in'] + sdxl['bytes_out']['png']) * 8 / 1e6:,.0f} Mbit/s in + out "
                     f"and {need * sdxl['h'] * sdxl['w'] / 1e6 * enc['png_s_per_mp']:.1f} CPU cores of PNG encoding.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hybrid_vae.bench.ray_capacity", description=__doc__.split("\n")[0])
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    enc = encoder_costs()
    text = render(compute(enc), enc)
    print(text)
    if not a.no_write:
        from hybrid_vae.bench.report import write_section

        print(f"wrote {write_section(NAME, text, doc=DOC)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
