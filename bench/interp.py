"""The simulated world's measured curves: memory and seconds interpolated from the measured rows.

Nothing here imports or copies :mod:`policy.estimate` or a constant of ``families.yaml``: the rows
(:func:`profiles.measurements.measured_rows`) are interpolated directly.

**Memory** (peak allocated bytes, H200 rows), piecewise linear in log(bytes) against log(pixels) through the
measured points (:func:`loglog`); beyond the first or last point, the slope of the nearest segment, clamped
to [0, 2]; a curve with one point uses the slope its caller states. Where several rows measured the same point
(repeats, or the SD 1.5/SDXL/Flux decoders at one size: they differ by up to 5%), the largest: the world errs
against the engine.

* ``full``: per dtype size (2: SD 1.5 fp16, SDXL fp16-fix, Flux bf16 and the memory-cap runs; 4: SDXL fp32 and
  the cap runs; the SD 1.5, SDXL and Flux decoders are one architecture), over output pixels.
* ``batch``: peak of B items at once / peak of one, measured at 1024 px (B = 2, 4; fp16 and bf16), linear in B
  between the measured B and beyond the last.
* ``tiled`` (diffusers' tiling, overlap factor 0.25; the 0.125 rows, up to 10% lower, are left out): per dtype
  size, over tile pixels at each measured image size (an image size with one tiled row: proportional to the
  tile's pixels), then across image sizes.
* ``video`` (HunyuanVideo; full, frame-wise and tiled rows): the rows less one 3-channel output copy
  (``3 * dtype * output voxels``, added back by the world with its own spread) give the decoder's own peak
  over (output frames decoded at once, pixels of the region decoded at once): over region pixels for each
  frame count (9, 17, 61; one point: slope 1), then across frame counts.

**Seconds** (H200 rows, medians of 3 runs): the full-decode curve piecewise linear in pixels per dtype size;
a per-tile overhead ``c0 + c1 * tile_MP`` fitted by least squares on every tiled image row; video
``a * decoded voxels + c * decoder calls`` fitted on the HunyuanVideo rows (diffusers' chunk and tile cuts).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence

from hybrid_vae.bench.geometry import diffusers_axis, video_geometry
from hybrid_vae.profiles.measurements import MeasuredRow, measured_rows

Points = Sequence[tuple[float, float]]
SLOPE_CLAMP = (0.0, 2.0)


def loglog(points: Points, x: float, *, single_slope: float = 1.0) -> float:
    """y at ``x`` on the piecewise log-log line through ``points`` ((x, y), x > 0, y > 0; any order)."""
    pts = sorted(points)
    if x <= 0:
        return 0.0
    if len(pts) == 1:
        x0, y0 = pts[0]
        return y0 * (x / x0) ** single_slope
    xs = [math.log(p[0]) for p in pts]
    ys = [math.log(p[1]) for p in pts]
    u = math.log(x)
    i = min(max(1, bisect.bisect_left(xs, u)), len(xs) - 1)
    slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
    if u < xs[0] or u > xs[-1]:
        slope = min(SLOPE_CLAMP[1], max(SLOPE_CLAMP[0], slope))
    return math.exp(ys[i - 1] + slope * (u - xs[i - 1]))


def grid2(curves: Mapping[float, Points], outer: float, inner: float, *, inner_slope: float = 1.0) -> float:
    """Two-level log-log interpolation: along ``inner`` on each curve, then across the curves' ``outer`` keys."""
    return loglog([(k, loglog(pts, inner, single_slope=inner_slope)) for k, pts in curves.items()], outer,
                  single_slope=0.0)


def _max_points(pairs: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    by: dict[float, list[float]] = defaultdict(list)
    for x, y in pairs:
        by[x].append(y)
    return [(x, max(v)) for x, v in sorted(by.items())]


def _piecewise(points: Mapping[int, float], px: float) -> float:
    """Seconds at ``px`` pixels: linear between the measured sizes, proportional below the first."""
    xs = sorted(points)
    ys = [points[x] for x in xs]
    if px <= xs[0]:
        return ys[0] * px / xs[0]
    i = min(max(1, bisect.bisect_left(xs, px)), len(xs) - 1)
    return ys[i - 1] + (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1]) * (px - xs[i - 1])


def _lsq2(xs: Sequence[tuple[float, float]], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares of y = a*x0 + b*x1, both coefficients kept >= 0."""
    s00 = sum(x[0] * x[0] for x in xs)
    s01 = sum(x[0] * x[1] for x in xs)
    s11 = sum(x[1] * x[1] for x in xs)
    t0 = sum(x[0] * y for x, y in zip(xs, ys, strict=True))
    t1 = sum(x[1] * y for x, y in zip(xs, ys, strict=True))
    det = s00 * s11 - s01 * s01
    a, b = (t0 * s11 - t1 * s01) / det, (s00 * t1 - s01 * t0) / det
    if a < 0:
        return 0.0, max(0.0, t1 / s11)
    if b < 0:
        return max(0.0, t0 / s00), 0.0
    return a, b


SD_TAGS = frozenset({"sd15", "sdxl", "sdxl_fp16", "flux", "tilesweep", "baseline", "cudnn_bench", "memcap"})


@dataclasses.dataclass(frozen=True)
class MemoryCurves:
    """Measured peak-bytes curves (see module docs). Keys: dtype size (2 or 4)."""

    full: Mapping[int, Points]
    batch: Points  # (items, peak(items) / peak(1)) at 1024 px, 2-byte dtypes
    tiled: Mapping[int, Mapping[float, Points]]  # dsize -> image px -> [(tile px, peak)]
    video: Mapping[float, Points]  # frames at once -> [(region px, decoder peak less one output copy)]

    def full_peak(self, dsize: int, px: float) -> float:
        return loglog(self.full.get(dsize) or self.full[2], px) * (dsize / 2 if dsize not in self.full else 1.0)

    def batch_ratio(self, items: int) -> float:
        if items <= 1:
            return 1.0
        pts = sorted([(1.0, 1.0), *self.batch])
        i = min(max(1, bisect.bisect_left([p[0] for p in pts], items)), len(pts) - 1)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return y0 + (y1 - y0) / (x1 - x0) * (items - x0)

    def tiled_peak(self, dsize: int, tile_px: float, image_px: float) -> float:
        curves = self.tiled.get(dsize) or self.tiled[2]
        scale = dsize / 2 if dsize not in self.tiled else 1.0
        # along tile pixels at each measured image size, then across image sizes (slope 0 outside)
        per_image = [(img, loglog(pts, tile_px)) for img, pts in curves.items()]
        return loglog(per_image, image_px, single_slope=0.0) * scale

    def video_peak(self, frames_at_once: float, region_px: float) -> float:
        return grid2(self.video, frames_at_once, region_px, inner_slope=1.0)


@dataclasses.dataclass(frozen=True)
class TimeFits:
    """Seconds fitted on the measured rows (see module docs)."""

    full16: Mapping[int, float]
    full32: Mapping[int, float]
    tile_c0: float
    tile_c1: float
    video_a: float
    video_c: float
    tiled_rows: int
    video_rows: int

    def full(self, dsize: int, px: float) -> float:
        """H200 seconds of a full decode of ``px`` pixels."""
        return _piecewise(self.full32 if dsize == 4 else self.full16, px)


def memory_curves(rows: Sequence[MeasuredRow]) -> MemoryCurves:
    sd = [r for r in rows if r.series in SD_TAGS and r.peak_bytes]
    full: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for r in sd:
        if r.mode == "full" and r.batch == 1:
            full[r.dsize].append((float(r.px), float(r.peak_bytes or 0)))
    one = {(r.dsize, r.px): max(y for x, y in full[r.dsize] if x == r.px) for r in sd
           if r.mode == "full" and r.batch == 1}
    ratios: dict[int, list[float]] = defaultdict(list)
    for r in sd:
        if r.mode == "full" and r.batch > 1 and (r.dsize, r.px) in one:
            ratios[r.batch].append((r.peak_bytes or 0) / one[(r.dsize, r.px)])
    tiled: dict[int, dict[float, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in sd:
        if r.mode == "tiled" and r.overlap == 0.25 and r.tile_px:
            tiled[r.dsize][float(r.px)].append((float(r.tile_px**2), float(r.peak_bytes or 0)))
    video: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r.family != "hunyuanvideo" or not r.peak_bytes:
            continue
        frames = r.frames or 1
        fr = frames if r.frame_chunk is None else min(frames, r.frame_chunk * 4 + 1)
        region = (r.tile_px or 0) ** 2 if r.mode == "tiled" else r.px
        video[float(fr)].append((float(region), r.peak_bytes - 3.0 * r.dsize * frames * r.px * r.batch))
    return MemoryCurves(
        full={d: _max_points(v) for d, v in full.items()},
        batch=[(float(b), max(v)) for b, v in sorted(ratios.items())],
        tiled={d: {img: _max_points(v) for img, v in per.items()} for d, per in tiled.items()},
        video={fr: _max_points(v) for fr, v in video.items()})


def time_fits(rows: Sequence[MeasuredRow]) -> TimeFits:
    full: dict[int, dict[int, list[float]]] = {2: {}, 4: {}}
    for r in rows:
        if r.series in ("sd15", "sdxl", "sdxl_fp16", "flux") and r.mode == "full" and r.batch == 1 and r.seconds:
            full[r.dsize].setdefault(r.px, []).append(r.seconds)
    f16 = {k: statistics.median(v) for k, v in full[2].items()}
    f32 = {k: statistics.median(v) for k, v in full[4].items()}
    # per-tile overhead: residual of tiled rows over the sum of their tiles' full-decode times
    xs, ys = [], []
    for r in rows:
        if r.series not in SD_TAGS or r.mode != "tiled" or not r.seconds or not r.tile_px:
            continue
        ax = diffusers_axis(r.width // 8, r.tile_px // 8, int(r.tile_px * r.overlap) // 8)
        pts = f32 if r.dsize == 4 else f16
        base = sum(_piecewise(pts, a * b * 64) for _, a in ax for _, b in ax)
        n = len(ax) ** 2
        mp = sum(a * b * 64 for _, a in ax for _, b in ax) / n / 2**20
        xs.append((n, n * mp))
        ys.append(r.seconds - base)
    c0, c1 = _lsq2(xs, ys)
    vx, vy = [], []
    for r in rows:
        if r.family != "hunyuanvideo" or not r.seconds:
            continue
        lat = ((r.frames or 1) - 1) // 4 + 1
        tile = 32 if r.mode == "tiled" else None
        vox, calls, _, _ = video_geometry(lat, r.height // 8, r.width // 8, chunk=r.frame_chunk, overlap=1, tile=tile,
                                          tile_overlap=8, tc=4)
        vx.append((vox * 64, calls))
        vy.append(r.seconds)
    va, vc = _lsq2(vx, vy)
    return TimeFits(f16, f32, c0, c1, va, vc, len(ys), len(vy))


@functools.lru_cache(maxsize=2)
def curves() -> tuple[MemoryCurves, TimeFits]:
    """The world's curves from the shipped measured rows (cached)."""
    rows = measured_rows()
    return memory_curves(rows), time_fits(rows)
