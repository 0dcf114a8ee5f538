"""Fit the engine's memory constants on the measured rows, validate them on rows left out, write the report.

Run ``python -m hybrid_vae.bench.estimator_fit [--no-write]``: fits the SD decoder's and HunyuanVideo's memory
coefficients (``profiles/families.yaml``, ``memory:``) on (a) the rows of two held-out splits' training halves
and (b) all rows, prints the estimate's error on each split's *held-out* rows, and writes the report to
``docs/estimator.md`` (between its ``BEGIN/END bench/estimator_fit.py`` marks) and the all-rows check to
``docs/benchmarks.md``. The constants the engine ships are the all-rows fit (``tests/test_estimator_data.py``
checks that ``families.yaml`` holds them, and that every row lies within +0..+10% of its estimate).

The fit (per model, least squares, then lifted so no training row is under-estimated):

* SD decoder, full, one item: ``peak = a * d * px + c`` (d = dtype bytes, px = output pixels; ``c`` counted
  from ``workspace_min_px``, which is not fitted: no full decode below 512 px was measured). For each slope
  ``a`` the intercept ``c`` is the smallest value that puts every training row at or under its estimate;
  ``a`` is the slope whose worst over-estimate is smallest (a search over +-10% of the median bytes per
  pixel).
* SD decoder, batch of B at once: ``peak = B * b * d * px + c``: ``b`` the smallest value covering every
  training batch row.
* SD decoder, diffusers' tiling: ``peak = d * (t * tile_px + o * (decoded_px - px)) + W [tile_px > 256^2] + k``:
  for each ``t``, ``o`` by least squares of the relative error (clamped >= 0), then ``k`` lifted to cover the
  training tiles of 256^2 px and less, and ``W`` to cover the larger ones; ``t`` the one with the smallest
  worst over-estimate, as for ``a``.
* HunyuanVideo: ``peak = d * region_px * (v * F + e) + d * s * output_voxels [chunked]`` (F = output frames
  decoded at once): ``v, e, s`` by least squares (clamped >= 0), then all three scaled by the smallest factor
  that covers every training row.

Held-out splits (distinct decodes; repeats of one decode stay together):

* ``sizes``: train on images up to 1536 px (video: 320x512), hold out 2048 px (video: 544x960, 720x1280):
  extrapolation to larger decodes than any training row.
* ``alternate``: within each (family, dtype, mode) group ordered by size and tile, train on every other
  decode, hold out the rest: interpolation between training rows.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from hybrid_vae.policy.estimate import peak_bytes
from hybrid_vae.policy.model import DecodeJob
from hybrid_vae.policy.profiles import Profiles, load_profiles
from hybrid_vae.profiles.measurements import MeasuredRow, measured_rows

DOC = Path(__file__).resolve().parent.parent / "docs" / "estimator.md"
TOLERANCE = 0.10  # every row within +0% .. +10% of its estimate
#: (family key in families.yaml, memory field) -> rounding step of the shipped value
ROUND = {"bytes_per_voxel": 1, "batch_bytes_per_voxel": 1, "constant_bytes": 100_000, "tile_bytes_per_voxel": 1,
         "tile_workspace_bytes": 100_000, "tile_constant_bytes": 100_000, "overlap_bytes_per_voxel": 0.1,
         "extra_frame_voxels": 1, "stitch_bytes_per_voxel": 0.1}


# ---- the engine's estimate for a measured row ----------------------------------------------------------


def plan_kwargs(row: MeasuredRow) -> dict[str, Any]:
    """``peak_bytes`` keyword arguments describing the decode the row measured."""
    if row.mode == "full":
        return {"tile_px": None, "overlap_px": 0, "frame_chunk": None}
    if row.mode == "chunked":
        return {"tile_px": None, "overlap_px": 0, "frame_chunk": row.frame_chunk}
    assert row.tile_px is not None
    return {"tile_px": row.tile_px, "overlap_px": int(row.tile_px * row.overlap), "frame_chunk": row.frame_chunk,
            "geometry": "diffusers"}


def job_of(row: MeasuredRow) -> DecodeJob:
    return DecodeJob(row.family, row.width, row.height, batch=row.batch, frames=row.frames,
                     dtype=row.dtype)  # type: ignore[arg-type]


def estimate_for(row: MeasuredRow, profiles: Profiles) -> int:
    """The engine's peak estimate (``policy.estimate.peak_bytes``) for the decode a row measured."""
    return peak_bytes(job_of(row), profiles.family(row.family), slice_batch=False, **plan_kwargs(row))


def kind_of(row: MeasuredRow) -> str:
    arch = "HunyuanVideo" if row.family == "hunyuanvideo" else "SD decoder"
    kind = {"full": "full" if row.batch == 1 else "batch", "tiled": "tiled", "chunked": "temporal chunks"}[row.mode]
    return f"{arch}, {kind}, {row.dtype}"


# ---- fitting ------------------------------------------------------------------------------------------


def _lsq(xs: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Least squares of the *relative* error (rows weighted 1/y, so a 0.15 GiB tile counts as much as a 19 GiB
    decode), every coefficient >= 0 (a negative one is dropped and the rest refitted)."""
    import numpy as np

    active = list(range(len(xs[0])))
    w = np.array([1.0 / y for y in ys], dtype=float)
    while True:
        a = np.array([[x[j] for j in active] for x in xs], dtype=float) * w[:, None]
        sol = np.linalg.lstsq(a, np.array(ys, dtype=float) * w, rcond=None)[0] if active else np.zeros(0)
        neg = [j for j, v in zip(active, sol, strict=True) if v < 0]
        if not neg:
            out = [0.0] * len(xs[0])
            for j, v in zip(active, sol, strict=True):
                out[j] = float(v)
            return out
        active.remove(neg[0])


def _distinct(rows: Iterable[MeasuredRow]) -> list[MeasuredRow]:
    """One row per distinct decode: the largest measured peak among its repeats."""
    best: dict[tuple[Any, ...], MeasuredRow] = {}
    for r in rows:
        k = r.key
        if k not in best or (r.peak_bytes or 0) > (best[k].peak_bytes or 0):
            best[k] = r
    return list(best.values())


def _out_voxels(r: MeasuredRow) -> int:
    return r.batch * (r.frames or 1) * r.px


def _decoded_px(r: MeasuredRow) -> int:
    from hybrid_vae.policy.tiles import diffusers_axis

    assert r.tile_px is not None
    s = 8
    ov = int(r.tile_px * r.overlap) // s
    ty, tx = diffusers_axis(r.height // s, r.tile_px // s, ov), diffusers_axis(r.width // s, r.tile_px // s, ov)
    return sum(v for _, v in ty) * sum(v for _, v in tx) * s * s


def _minimax(slopes: Sequence[float], cover: Callable[[float], tuple[float, float]]) -> float:
    """The slope from ``slopes`` (refined once around the best) whose lifted fit has the smallest worst
    over-estimate; ``cover(slope) -> (worst over-estimate, lifted intercept)``."""
    best = min(slopes, key=lambda a: cover(a)[0])
    step = (slopes[1] - slopes[0]) if len(slopes) > 1 else best * 1e-3
    fine = [best + step * (i / 50 - 1) for i in range(101)]
    return min(fine, key=lambda a: cover(a)[0])


def fit_sd(rows: Sequence[MeasuredRow], workspace_min_px: int = 200_000) -> dict[str, float]:
    """SD-decoder memory coefficients from full, batch and diffusers-tiled rows (see module docs)."""
    rows = [r for r in rows if r.family != "hunyuanvideo" and r.peak_bytes]
    full = [r for r in rows if r.mode == "full" and r.batch == 1 and r.px >= workspace_min_px]

    def full_cover(a: float) -> tuple[float, float]:
        c = max(0.0, max(float(r.peak_bytes or 0) - a * r.dsize * r.px for r in full))
        return max((a * r.dsize * r.px + c) / (r.peak_bytes or 1) for r in full), c

    a0 = statistics.median((r.peak_bytes or 0) / (r.dsize * r.px) for r in full)
    a = _minimax([a0 * (0.9 + 0.002 * i) for i in range(101)], full_cover)
    c = full_cover(a)[1]
    out = {"bytes_per_voxel": a, "constant_bytes": c}
    batch = [r for r in rows if r.mode == "full" and r.batch > 1]
    out["batch_bytes_per_voxel"] = max(((r.peak_bytes or 0) - c) / (r.batch * r.dsize * r.px) for r in batch) \
        if batch else a
    tiled = [r for r in rows if r.mode == "tiled"]
    if not tiled:
        return out

    def feats(r: MeasuredRow) -> tuple[float, float, float]:
        tp = (r.tile_px or 0) ** 2
        return r.dsize * tp, r.dsize * max(0, _decoded_px(r) - r.px), 1.0 if tp > 65536 else 0.0

    tdist = _distinct(tiled)

    def rest(t: float) -> tuple[float, float, float]:
        """(overlap, workspace, constant) for a tile slope: the overlap by least squares of the residual, then the
        constant lifted to cover the tiles without workspace and the workspace to cover the larger tiles."""
        o, _, _ = _lsq([(f[1], 1.0 - f[2], f[2]) for f in map(feats, tdist)],
                       [float(r.peak_bytes or 0) - t * feats(r)[0] for r in tdist])
        res = [(f[2], float(r.peak_bytes or 0) - t * f[0] - o * f[1]) for r in tiled for f in [feats(r)]]
        k = max([v for big, v in res if not big] or [0.0])
        w = max([v for big, v in res if big] or [k]) - k
        if w < 0:  # the larger tiles need less than the constant: no workspace term
            k, w = max(v for _, v in res), 0.0
        return o, w, max(0.0, k)

    def tile_cover(t: float) -> tuple[float, float]:
        o, w, k = rest(t)
        return max((t * f[0] + o * f[1] + w * f[2] + k) / (r.peak_bytes or 1) for r in tiled for f in [feats(r)]), k

    t0 = statistics.median(((r.peak_bytes or 0) / feats(r)[0]) for r in tiled)
    t = _minimax([t0 * (0.9 + 0.002 * i) for i in range(101)], tile_cover)
    o, w, k = rest(t)
    out.update(tile_bytes_per_voxel=t, overlap_bytes_per_voxel=o, tile_workspace_bytes=w, tile_constant_bytes=k)
    return out


def fit_video(rows: Sequence[MeasuredRow]) -> dict[str, float]:
    """HunyuanVideo memory coefficients (see module docs); ``rows``: its full/chunked/tiled rows."""
    rows = [r for r in rows if r.family == "hunyuanvideo" and r.peak_bytes]

    def feats(r: MeasuredRow) -> tuple[float, float, float]:
        frames = r.frames or 1
        fr = frames if r.frame_chunk is None else min(frames, r.frame_chunk * 4 + 1)
        region = (r.tile_px or 0) ** 2 if r.mode == "tiled" else r.px
        stitched = 1.0 if (r.mode == "tiled" or fr < frames) else 0.0
        return r.dsize * region * fr, r.dsize * region, stitched * r.dsize * _out_voxels(r)

    dist = _distinct(rows)
    v, e, s = _lsq([feats(r) for r in dist], [float(r.peak_bytes or 0) for r in dist])
    scale = max(float(r.peak_bytes or 0) / (v * f[0] + e * f[1] + s * f[2]) for r in rows for f in [feats(r)])
    scale = max(1.0, scale)
    return {"bytes_per_voxel": v * scale, "batch_bytes_per_voxel": v * scale, "extra_frame_voxels": e * scale,
            "stitch_bytes_per_voxel": s * scale}


def rounded(consts: dict[str, float]) -> dict[str, float]:
    """Constants rounded up to the step they are shipped with (rounding up keeps the estimate >= the data)."""
    out = {}
    for k, v in consts.items():
        step = ROUND.get(k, 1)
        out[k] = round(math.ceil(v / step - 1e-9) * step, 6)
    return out


def fit(rows: Sequence[MeasuredRow]) -> dict[str, dict[str, float]]:
    """Rounded constants per memory model: ``{"sd": {...}, "hunyuanvideo": {...}}``."""
    return {"sd": rounded(fit_sd(rows)), "hunyuanvideo": rounded(fit_video(rows))}


def with_constants(profiles: Profiles, consts: dict[str, dict[str, float]]) -> Profiles:
    """``profiles`` with the memory constants replaced (SD-architecture families take ``consts["sd"]``)."""
    fams = {}
    for key, fam in profiles.families.items():
        c = consts.get("sd") if fam.architecture == "sd" else consts.get(key)
        fams[key] = fam.model_copy(update={"memory": fam.memory.model_copy(update=c)}) if c else fam
    return profiles.model_copy(update={"families": fams})


# ---- held-out validation ----------------------------------------------------------------------------------


def _size_rank(r: MeasuredRow) -> tuple[int, int, float]:
    return ((r.frames or 1) * r.px, r.tile_px or 0, r.overlap)


def split_sizes(r: MeasuredRow) -> bool:
    """True: training row of the ``sizes`` split (images <= 1536 px, video 320x512)."""
    return r.px <= 320 * 512 if r.family == "hunyuanvideo" else max(r.width, r.height) <= 1536


def split_alternate(rows: Sequence[MeasuredRow]) -> Callable[[MeasuredRow], bool]:
    """Every other distinct decode of each (family, dtype, mode, batch>1) group, ordered by size and tile."""
    groups: dict[tuple[Any, ...], list[tuple[Any, ...]]] = collections.defaultdict(list)
    for r in _distinct(rows):
        groups[(r.family, r.dtype, r.mode, r.batch > 1, r.series == "memcap")].append(r.key)
    train: set[tuple[Any, ...]] = set()
    for g, keys in groups.items():
        ordered = sorted(keys, key=lambda k: (k[6] or 1, k[4] * k[5], k[9] or 0, k[10]))
        train |= set(ordered[0::2])
        del g
    return lambda r: r.key in train


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Errors (estimate / measured - 1) of one split's held-out rows under the constants fitted on its training rows."""

    name: str
    train: int
    test: int
    consts: dict[str, dict[str, float]]
    errors: dict[str, list[float]]

    @property
    def all_errors(self) -> list[float]:
        return sorted(e for v in self.errors.values() for e in v)


def held_out(name: str, rows: Sequence[MeasuredRow], is_train: Callable[[MeasuredRow], bool],
             base: Profiles) -> HeldOut:
    train = [r for r in rows if is_train(r)]
    test = [r for r in rows if not is_train(r)]
    consts = fit(train)
    profiles = with_constants(base, consts)
    errors: dict[str, list[float]] = collections.defaultdict(list)
    for r in _distinct(test):
        errors[kind_of(r)].append(estimate_for(r, profiles) / (r.peak_bytes or 1) - 1)
    return HeldOut(name, len(_distinct(train)), len(_distinct(test)), consts, dict(errors))


def errors_all(rows: Sequence[MeasuredRow], profiles: Profiles) -> dict[str, list[float]]:
    out: dict[str, list[float]] = collections.defaultdict(list)
    for r in rows:
        out[kind_of(r)].append(estimate_for(r, profiles) / (r.peak_bytes or 1) - 1)
    return dict(out)


# ---- report -----------------------------------------------------------------------------------------------


def _band(v: Sequence[float]) -> str:
    v = sorted(v)
    return f"{v[0]:+.1%} | {statistics.median(v):+.1%} | {v[-1]:+.1%}"


def _table(errors: dict[str, list[float]]) -> list[str]:
    lines = ["| rows | count | min | median | max | under-estimates |", "|---|---|---|---|---|---|"]
    for k in sorted(errors):
        v = errors[k]
        lines.append(f"| {k} | {len(v)} | {_band(v)} | {sum(1 for e in v if e < 0)} |")
    return lines


def _consts_table(splits: Sequence[HeldOut], final: dict[str, dict[str, float]], shipped: Profiles) -> list[str]:
    names = [s.name for s in splits]
    lines = ["| model | constant | " + " | ".join(f"fit on `{n}` training rows" for n in names)
             + " | fit on all rows | shipped (`families.yaml`) |", "|---|---|" + "---|" * (len(names) + 2)]
    for model in ("sd", "hunyuanvideo"):
        mem = shipped.family("sd15" if model == "sd" else model).memory
        for k in final[model]:
            if k == "batch_bytes_per_voxel" and model == "hunyuanvideo":
                continue
            cells = [f"{s.consts[model][k]:g}" for s in splits]
            lines.append(f"| {model} | {k} | " + " | ".join(cells) + f" | {final[model][k]:g} | {getattr(mem, k):g} |")
    return lines


def report(rows: Sequence[MeasuredRow] | None = None, profiles: Profiles | None = None) -> dict[str, Any]:
    """The held-out splits, the all-rows fit and the shipped constants' errors on every row."""
    rows = list(rows if rows is not None else measured_rows())
    shipped = profiles or load_profiles("")
    splits = [held_out("sizes", rows, split_sizes, shipped),
              held_out("alternate", rows, split_alternate(rows), shipped)]
    return {"rows": len(rows), "distinct": len(_distinct(rows)), "splits": splits, "final": fit(rows),
            "shipped_errors": errors_all(rows, shipped), "shipped": shipped}


def markdown(rep: dict[str, Any]) -> str:
    lines = ["## Held-out validation of the memory constants", "",
             f"`python -m hybrid_vae.bench.estimator_fit`: {rep['rows']} measured rows "
             f"(`profiles/measured/h200-*.jsonl`, one NVIDIA H200; {rep['distinct']} distinct decodes: the memory-cap "
             "runs repeat 8 decodes 8 times). The constants are fitted on a split's training rows by the procedure "
             "in the script's docstring (least squares, then lifted so no *training* row is under-estimated); the "
             "tables give estimate / measured - 1 on the rows that were **left out** of that fit. A negative value "
             "is an under-estimate: on a card with exactly that much free memory the decode would run out of "
             "memory.", ""]
    for s in rep["splits"]:
        v = s.all_errors
        under = sum(1 for e in v if e < 0)
        what = {"sizes": "trained on images up to 1536 px and video at 320x512; held out: 2048 px images, "
                         "544x960 and 720x1280 video (extrapolation)",
                "alternate": "trained on every other decode of each (family, dtype, mode) group ordered by size "
                             "and tile; held out: the others (interpolation)"}[s.name]
        lines += [f"### Split `{s.name}`: {what}", "",
                  f"{s.train} training decodes, {s.test} held out: error {v[0]:+.1%} .. {v[-1]:+.1%}, median "
                  f"{statistics.median(v):+.1%}; {under} under-estimate{'s' if under != 1 else ''}"
                  + (f" (worst {v[0]:+.1%})" if under else "") + ".", "", *_table(s.errors), ""]
    lines += ["### Constants: per split, on all rows, shipped", "",
              *_consts_table(rep["splits"], rep["final"], rep["shipped"]), "",
              "The engine ships the all-rows fit (`tests/test_estimator_data.py` checks `families.yaml` against it). "
              "With those constants, every row of the data (the same rows the fit saw, so this is a fit check, not "
              "a validation):", "", *_table(rep["shipped_errors"])]
    allv = sorted(e for v in rep["shipped_errors"].values() for e in v)
    lines += ["", f"All {len(allv)} rows: {allv[0]:+.2%} .. {allv[-1]:+.2%} (target +0% .. +10%)."]
    return "\n".join(lines)


def write_doc_section(text: str, *, doc: Path = DOC) -> None:
    """Replace the report between ``<!-- BEGIN bench/estimator_fit.py -->`` and its END mark in docs/estimator.md."""
    from hybrid_vae.bench.report import write_section

    write_section("bench/estimator_fit.py", text, doc=doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ as they are")
    args = ap.parse_args(argv)
    rep = report()
    text = markdown(rep)
    print(text)
    if not args.no_write:
        write_doc_section(text)
        from hybrid_vae.bench.report import write_section

        allv = sorted(e for v in rep["shipped_errors"].values() for e in v)
        write_section("bench/estimator_fit.py", "\n".join([
            "## Memory estimate vs measured (H200 data)", "",
            f"All {len(allv)} measured rows (`profiles/measured/h200-*.jsonl`) against the shipped constants: "
            f"{allv[0]:+.2%} .. {allv[-1]:+.2%} (target +0% .. +10%; these are the rows the constants were fitted "
            "on). Errors on rows held out of the fit, and the per-split constants: `docs/estimator.md`."]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
