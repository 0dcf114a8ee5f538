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
