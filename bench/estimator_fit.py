"""Estimate vs measured peak memory for every row of tests/data (the H200 measurements).

Run: ``python -m hybrid_vae.bench.estimator_fit``; writes its section of docs/benchmarks.md. The test
``tests/test_estimator_data.py`` asserts the same +0..+10% band row by row.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

from hybrid_vae.policy import load_profiles
from hybrid_vae.policy.estimate import peak_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    from test_estimator_data import ROWS, _case  # the same row parsing as the test

    profiles = load_profiles("")
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for _where, r in ROWS:
        job, kw, measured = _case(r)
        kw.setdefault("overlap_px", 0)
        kw.setdefault("frame_chunk", None)
        est = peak_bytes(job, profiles.family(job.family), slice_batch=False, **kw)
        kind = "full" if kw.get("tile_px") is None and kw.get("frame_chunk") is None else (
            "tiled" if kw.get("tile_px") else "temporal chunks")
        fam = "SD decoder" if job.family != "hunyuanvideo" else "HunyuanVideo"
        groups[f"{fam}, {kind}, {job.dtype}"].append(est / measured - 1)
    lines = ["## Memory estimate vs measured (H200 data)", "",
             "`python -m hybrid_vae.bench.estimator_fit`: every row of `tests/data/*.jsonl` (copied from the H200 "
             "measurements), estimate = `policy.estimate.peak_bytes` with the geometry the row used.", "",
             "| rows | count | min over | median over | max over |", "|---|---|---|---|---|"]
    allr: list[float] = []
    for k in sorted(groups):
        v = sorted(groups[k])
        allr += v
        lines.append(f"| {k} | {len(v)} | {v[0]:+.1%} | {v[len(v) // 2]:+.1%} | {v[-1]:+.1%} |")
    allr.sort()
    lines += ["", f"All {len(allr)} rows: {allr[0]:+.2%} .. {allr[-1]:+.2%} (target +0% .. +10%)."]
    text = "\n".join(lines)
    print(text)
    from hybrid_vae.bench.report import write_section

    write_section("bench/estimator_fit.py", text)


if __name__ == "__main__":
    main()
