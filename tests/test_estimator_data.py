"""The estimator against every measured row of the H200 data (tests/data, copied from shared/data).

Each memory estimate must lie within +0% .. +10% of the measured peak allocated bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hybrid_vae.policy import DecodeJob, load_profiles
from hybrid_vae.policy.estimate import peak_bytes

DATA = Path(__file__).parent / "data"
PROFILES = load_profiles("")
FAMILY = {"sd15": "sd15", "sdxl": "sdxl", "sdxl_fp16": "sdxl", "flux": "flux", "hunyuan": "hunyuanvideo",
          "tilesweep": "sd15", "baseline": "sd15", "cudnn_bench": "sd15"}
# rows that do not describe a decode the engine runs: channels_last (a memory format the engine does
# not use; 26% less memory, 45-55% slower), oom_retry (no peak), info/end (metadata)
SKIP = {"channels_last", "oom_retry", "info", "end"}


def _rows() -> list[tuple[str, dict]]:
    out = []
    for f in sorted(DATA.glob("*.jsonl")):
        for i, line in enumerate(f.read_text().splitlines()):
            r = json.loads(line)
            if r.get("tag") in SKIP:
                continue
            out.append((f"{f.stem}:{i + 1}", r))
    return out


ROWS = _rows()


def _case(r: dict) -> tuple[DecodeJob, dict, int]:
    """(job, plan kwargs, measured bytes) for one data row."""
    tag = r.get("tag")
    dtype = str(r.get("dtype", "torch.float16")).replace("torch.", "")
    if tag is None:  # memory-cap runs (file 3): full decodes, absolute peak minus the weights before
        job = DecodeJob("sd15", r["res"], r["res"], dtype=dtype)
        return job, {"tile_px": None}, r["peak_alloc"] - r["base"]
    fam = FAMILY[tag]
    measured = r["peak_alloc_delta"]
    if fam == "hunyuanvideo":
        res = r["res"]
        frames, h, w = (int(x) for x in res.split("x"))
        job = DecodeJob(fam, w, h, frames=frames, dtype="float16")
        mode = r["mode"]
        if mode == "full":
            return job, {"tile_px": None, "frame_chunk": None}, measured
        if mode == "framewise":
            return job, {"tile_px": None, "frame_chunk": 4}, measured
        return job, {"tile_px": 256, "overlap_px": 64, "frame_chunk": 4}, measured
    res = r["res"]
    job = DecodeJob(fam, res, res, batch=r.get("batch", 1), dtype=dtype)
    if tag == "tilesweep":
        tile = r["tile"]
        return job, {"tile_px": tile, "overlap_px": int(tile * r["overlap"]), "geometry": "diffusers"}, measured
    if r.get("mode") == "tiled":
        tile = r["tile"]
        return job, {"tile_px": tile, "overlap_px": tile // 4, "geometry": "diffusers"}, measured
    return job, {"tile_px": None}, measured


def test_data_is_all_there():
    assert len(ROWS) >= 150  # 78 + 29 + 64 lines, less the skipped ones


@pytest.mark.parametrize(("where", "row"), ROWS, ids=[w for w, _ in ROWS])
def test_estimate_within_0_to_10_percent(where, row):
    job, kw, measured = _case(row)
    fam = PROFILES.family(job.family)
    kw.setdefault("overlap_px", 0)
    kw.setdefault("frame_chunk", None)
    est = peak_bytes(job, fam, slice_batch=False, **kw)
    ratio = est / measured
    assert 1.0 <= ratio <= 1.10, (
        f"{where}: estimate {est / 2**30:.3f} GiB vs measured {measured / 2**30:.3f} GiB ({ratio - 1:+.1%})")
