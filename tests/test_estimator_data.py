"""The estimator against every measured row (profiles/measured, the H200 measurements), and the constants it ships.

Each memory estimate must lie within +0% .. +10% of the measured peak allocated bytes, and the constants in
profiles/families.yaml must be bench/estimator_fit.py's fit on all rows (whose held-out errors are in
docs/estimator.md).
"""

from __future__ import annotations

import pytest
from hybrid_vae.bench.estimator_fit import estimate_for, fit, split_alternate, split_sizes
from hybrid_vae.policy import load_profiles
from hybrid_vae.profiles.measurements import measured_rows

PROFILES = load_profiles("")
ROWS = measured_rows()


def test_data_is_all_there():
    assert len(ROWS) == 165  # 78 + 29 + 64 lines, less channels_last, oom_retry, info and end
    assert {r.family for r in ROWS} == {"sd15", "sdxl", "flux", "hunyuanvideo"}
    assert sum(r.family == "hunyuanvideo" for r in ROWS) == 9
    assert all(r.peak_bytes and r.peak_bytes > 0 for r in ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.where for r in ROWS])
def test_estimate_within_0_to_10_percent(row):
    est = estimate_for(row, PROFILES)
    ratio = est / row.peak_bytes
    assert 1.0 <= ratio <= 1.10, (
        f"{row.where}: estimate {est / 2**30:.3f} GiB vs measured {row.peak_bytes / 2**30:.3f} GiB ({ratio - 1:+.1%})")


def test_shipped_constants_are_the_fit_on_all_rows():
    """families.yaml holds what `python -m hybrid_vae.bench.estimator_fit` fits on every row (rounded up)."""
    consts = fit(ROWS)
    for model, fam_key in (("sd", "sd15"), ("sd", "sdxl"), ("sd", "flux"), ("sd", "sd3"),
                           ("hunyuanvideo", "hunyuanvideo")):
        mem = PROFILES.family(fam_key).memory
        for k, v in consts[model].items():
            assert getattr(mem, k) == pytest.approx(v, rel=1e-9, abs=1e-9), (fam_key, k)


def test_held_out_splits_leave_rows_out():
    """Both splits train on a part of the rows and hold out the rest; the `sizes` split holds out every 2048 px
    image and the larger videos."""
    for is_train in (split_sizes, split_alternate(ROWS)):
        train = [r for r in ROWS if is_train(r)]
        assert 0 < len(train) < len(ROWS)
        assert {r.family for r in train} == {r.family for r in ROWS}
    held = [r for r in ROWS if not split_sizes(r)]
    assert {max(r.width, r.height) for r in held if r.family != "hunyuanvideo"} == {2048}
    assert {(r.width, r.height) for r in held if r.family == "hunyuanvideo"} == {(960, 544), (1280, 720)}


# ---- Wan: interpolated from its CPU rows (no GPU row) -------------------------------------------------------

CPU_VIDEO = [r for r in measured_rows(device="cpu") if r.series == "cpu_video"]
WAN_CPU_GPU = 0.74  # the smallest CPU/GPU peak ratio measured (SD decoder; HunyuanVideo's is checked below)


def _wan_estimate(row):
    from hybrid_vae.policy.estimate import peak_bytes
    from hybrid_vae.policy.model import DecodeJob

    job = DecodeJob(family="wan", height=row.height, width=row.width, frames=row.frames, dtype="float32",
                    vae_resident=True)
    return peak_bytes(job, PROFILES.family("wan"), tile_px=None, overlap_px=0, frame_chunk=None, slice_batch=False)


def test_cpu_video_rows_are_there():
    assert {(r.family, r.frames) for r in CPU_VIDEO} >= {("wan", 1), ("wan", 9), ("wan", 17), ("hunyuanvideo", 9)}
    assert all(r.dtype == "float32" and r.peak_bytes for r in CPU_VIDEO)


@pytest.mark.parametrize("row", [r for r in CPU_VIDEO if r.family == "wan"], ids=lambda r: r.where)
def test_wan_estimate_is_its_cpu_peak_over_the_smallest_measured_ratio(row):
    """The shipped Wan constants: each CPU row / 0.74 within 0 .. +3% (the estimate's stitching term and the
    largest row's rounding); a change to the rows or the constants that breaks this must update both."""
    ratio = _wan_estimate(row) / (row.peak_bytes / WAN_CPU_GPU)
    assert 1.0 <= ratio <= 1.03, f"{row.where}: estimate / (CPU peak / {WAN_CPU_GPU}) = {ratio:.3f}"


def test_hunyuanvideo_cpu_gpu_ratio_is_inside_the_range_the_wan_estimate_assumes():
    """HunyuanVideo's CPU rows against its H200 rows (same decode, float16 x 2): the ratio must not fall below
    0.74, or the Wan estimate (CPU / 0.74) would not be the largest GPU peak the measured ratios allow."""
    gpu = {(r.frames, r.px): r.peak_bytes * 2 / r.px for r in ROWS
           if r.family == "hunyuanvideo" and r.mode == "full" and r.dtype == "float16"}
    cpu = [r for r in CPU_VIDEO if r.family == "hunyuanvideo"]
    assert cpu
    for r in cpu:
        per_px = [v for (f, _), v in gpu.items() if f == r.frames]
        assert per_px, f"{r.where}: no H200 HunyuanVideo row with {r.frames} frames"
        ratio = (r.peak_bytes / r.px) / per_px[0]
        assert WAN_CPU_GPU <= ratio <= 0.9, f"{r.where}: CPU/GPU {ratio:.3f}"


def test_video_cpu_memory_writes_rows_the_loader_reads(tmp_path, capsys):
    """bench/video_cpu_memory.py on a tiny latent: one row, parsed by the shared loader as a Wan CPU decode."""
    from hybrid_vae.bench import video_cpu_memory
    from hybrid_vae.profiles.measurements import measured_rows as rows_in

    out = tmp_path / "cpu-video-decode-test.jsonl"
    assert video_cpu_memory.main(["--shapes", "wan:1x4x4", "--out", str(out)]) == 0
    (row,) = rows_in(tmp_path, device="cpu")
    assert (row.series, row.family, row.frames, row.width, row.height) == ("cpu_video", "wan", 1, 32, 32)
    assert row.peak_bytes and row.peak_bytes > 0
    with pytest.raises(SystemExit):
        video_cpu_memory.main(["--shapes", "wan:1x4", "--out", str(out)])
    assert "'wan:1x4': give model:TxHxW" in capsys.readouterr().err
