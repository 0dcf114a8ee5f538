"""The simulated world of ``hybrid-vae bench --simulate``: what a decode *really* costs, from the data.

The engine's own estimates are not the ground truth here. The world is built from the H200
measurements (``tests/data/*.jsonl``, copied from ``shared/data``) and the seed's per-GPU tables:

* **Memory.** The engine's memory model is fitted to land +0..+10% above every measured peak. The
  world's true peak of any decode is that model's value divided by the estimate/measurement ratio
  of the *nearest measured row* of the same kind (architecture, full/tiled/chunked/batched; nearest
  in log pixels), jittered by U(0.98, 1.02) and kept in [1.00, 1.10]. Families without measurements
  (Wan) draw the ratio from U(1.00, 1.10). An attempt runs out of memory when its true peak exceeds
  the memory free at decode time (the probed free memory, less an optional random drift).
* **Seconds.** Image decoders: the measured H200 full-decode curve (median of sd15/sdxl-fp16/flux
  rows for 2-byte dtypes, sdxl rows for float32), piecewise linear in pixels; a tiled decode costs
  the full-decode time of each tile plus a per-tile overhead ``c0 + c1 * tile_MP`` fitted by least
  squares on the 64 measured tiled rows (diffusers tiling and the tile sweep); a batch decoded at once
  costs ``items * t * b(items)`` with the measured b(2)=1.00, b(4)=0.87. Video (HunyuanVideo):
  ``a * decoded voxels + c * decoder calls`` fitted on the 8 measured video rows, with decoded voxels
  counted as diffusers' framewise/tiled decoding really decodes them (overlaps included). Wan is not
  measured: the world uses the engine's assumption, so Wan scenarios carry no speed signal.
* **Cards.** A profiled card's time = the H200 time x the card/H200 ratio of the seed's rows at the
  same dtype (interpolated in log pixels between 512 and 1024 px, constant outside). The 4 GB and
  6 GB cards are not profiled; their true speed is an assumption stated in :data:`EXTRA_CARDS`.
* **Noise.** Lognormal factors on the times: per card (sigma 0.15: this user's card against the
  profile's card of the same name, clocks, drivers; the same for every decode on that card), per
  scenario (sigma 0.05, shared by its local decodes), per decode (sigma 0.03; the measured run-to-run
  spread is 1-2%), and per scenario on the network (sigma 0.15 on round trip and bandwidth). Draws
  are seeded by card, scenario and plan, so every strategy meets the same world (common random
  numbers).
* **Failures.** A failed attempt (OOM) costs U(0.70, 1.00) of the time of the largest single region
  it tried to decode (measured: a failed full fp32 2048 decode took 0.45-0.65 s of 0.64 s on an H200).
  A remote request fails (HTTP 503) with probability ``remote_failure`` (default 2%), after the round
  trip and the upload.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import math
import random
import statistics
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from hybrid_vae.policy.estimate import FORMAT_S_PER_MP, exact_peak_bytes, exact_tiles, latent_frames, peak_bytes, region_peak
from hybrid_vae.policy.gpu import GiB, GpuState
from hybrid_vae.policy.model import DecodeJob, NetworkStats, Plan
from hybrid_vae.policy.profiles import Family, Profiles, dtype_bytes
from hybrid_vae.policy.tiles import axis_tiles, diffusers_axis

DATA_DIR = Path(__file__).resolve().parent.parent / "tests" / "data"
MiB = 1024**2
Geometry = Literal["engine", "diffusers", "comfy", "tiledvae", "exact"]

#: Cards the engine has no profile for: (name as NVML reports it, total GiB, true speed vs an H200 at
#: 2 bytes, at 4 bytes). ASSUMED: an RTX 3070 measured 4.8x (fp16) / 6.8x (fp32) an H200 in the seed's
#: table; a 3060 Laptop is taken as 0.75x and a 3050 Laptop as 0.45x a 3070. The engine assumes 5x.
EXTRA_CARDS: tuple[tuple[str, float, float, float], ...] = (
    ("NVIDIA GeForce RTX 3050 Laptop GPU", 4.0, 10.6, 15.1),
    ("NVIDIA GeForce RTX 3060 Laptop GPU", 6.0, 6.3, 9.0),
)
SERVER_FACTOR = 2.0  # a hosted endpoint's GPU against an H200 (assumed, as the engine does)
CPU_S_PER_VOXEL = 4e-5  # assumed, as the engine does
PNG_BYTES_PER_PX = (1.0, 2.0)  # a photo's PNG: 1-2 MiB per megapixel
FORMAT_BYTES = {"raw": 3.0, "jpg": 0.35, "mp4": 0.08}


@dataclasses.dataclass(frozen=True)
class NetworkCase:
    """A link to the remote endpoint (symmetric bandwidth)."""

    name: str
    rtt_s: float
    mbit: float

    def stats(self) -> NetworkStats:
        """What the engine is told: the client's measured figures (no noise)."""
        bps = self.mbit * 1e6 / 8
        return NetworkStats(rtt_s=self.rtt_s, down_bytes_per_s=bps, up_bytes_per_s=bps, source="measured")


NETWORKS: tuple[NetworkCase | None, ...] = (None, NetworkCase("10 Mbit/s 150 ms", 0.150, 10.0),
                                            NetworkCase("500 Mbit/s 20 ms", 0.020, 500.0))


@dataclasses.dataclass(frozen=True)
class Card:
    name: str
    total_gib: float
    profiled: bool
    assumed_speed: tuple[float, float] | None = None  # (2-byte, 4-byte) x H200, unprofiled cards


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One decode in one situation."""

    variant: str  # label: sd15, sdxl, sdxl-fp16fix, flux, sd3, hunyuanvideo, wan
    family: str
    dtype: str
    width: int
    height: int
    batch: int
    frames: int | None
    card: Card
    free_frac: float
    network: NetworkCase | None

    @functools.cached_property
    def local_key(self) -> str:
        return (f"{self.variant}|{self.dtype}|{self.width}x{self.height}x{self.batch}x{self.frames}|"
                f"{self.card.name}|{self.free_frac:g}")

    @functools.cached_property
    def key(self) -> str:
        return f"{self.local_key}|{self.network.name if self.network else 'none'}"

    @property
    def size_label(self) -> str:
        s = f"{self.width}x{self.height}"
        if self.frames:
            s = f"{self.frames}x{s}"
        return s + (f" x{self.batch}" if self.batch > 1 else "")

    def job(self) -> DecodeJob:
        return DecodeJob(self.family, self.width, self.height, batch=self.batch, frames=self.frames,
                         dtype=self.dtype)

    def gpu(self) -> GpuState:
        total = int(self.card.total_gib * GiB)
        return GpuState(name=self.card.name, total_bytes=total, free_bytes=int(total * self.free_frac),
                        source="simulated", device="simulated", simulated=True)


@dataclasses.dataclass(frozen=True)
class Exec:
    """A concrete decode as the world runs it.

    ``path`` full: ``items`` batch items per decoder call (0: the whole batch). tiled: one pass per
    ``tiles`` entry (tile height, tile width in output px; ComfyUI runs three and averages them),
    cut by ``geometry``; ``frame_chunk``: latent frames per temporal chunk (video; None: all).
    """

    path: Literal["full", "tiled", "cpu", "remote"]
    items: int = 0
    tiles: tuple[tuple[int, int], ...] = ()
    overlap_px: int = 0
    geometry: Geometry = "engine"
    frame_chunk: int | None = None
    frame_overlap: int = 0
    fmt: str | None = None

    def __post_init__(self) -> None:  # one key per execution: no overlap without chunks
        if self.frame_chunk is None and self.frame_overlap:
            object.__setattr__(self, "frame_overlap", 0)

    @functools.cached_property
    def key(self) -> str:
        return (f"{self.path}|{self.items}|{self.tiles}|{self.overlap_px}|{self.geometry}|{self.frame_chunk}|"
                f"{self.fmt}")

    @classmethod
    def from_plan(cls, plan: Plan, fam: Family, batch: int) -> Exec:
        """The execution of one of the engine's plans."""
        if plan.path == "remote":
            return cls("remote", fmt=plan.response_format)
        if plan.path == "cpu":
            return cls("cpu")
        chunk = plan.frame_chunk if fam.video else None
        if plan.path == "full" or plan.tile_px is None:
            return cls("full", items=1 if plan.slice_batch else batch, frame_chunk=chunk,
                       frame_overlap=plan.frame_overlap if chunk else 0)
        if plan.groupnorm == "exact" and not fam.video:
            return cls("tiled", tiles=((plan.tile_px, plan.tile_px),), geometry="exact")
        geo: Geometry = "diffusers" if fam.video else "engine"
        return cls("tiled", tiles=((plan.tile_px, plan.tile_px),), overlap_px=plan.overlap_px, geometry=geo,
                   frame_chunk=chunk, frame_overlap=plan.frame_overlap)


@dataclasses.dataclass(frozen=True)
class Attempt:
    ok: bool
    seconds: float
    oom: bool = False
    error: str | None = None


# ---- measured data ------------------------------------------------------------------------------


def _data_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for f in sorted(DATA_DIR.glob("*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


def _piecewise(points: dict[int, float], px: float) -> float:
    xs = sorted(points)
    ys = [points[x] for x in xs]
    if px <= xs[0]:
        return ys[0] * px / xs[0]
    i = min(max(1, bisect.bisect_left(xs, px)), len(xs) - 1)
    return ys[i - 1] + (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1]) * (px - xs[i - 1])


def comfy_axis(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """ComfyUI's ``tiled_scale`` positions: stride ``tile - overlap`` up to ``length - overlap``, clipped."""
    if length <= tile:
        return [(0, length)]
    out = []
    for s in range(0, length - overlap, tile - overlap):
        s = max(0, min(length - overlap, s))
        out.append((s, min(tile, length - s)))
    return out


def tiledvae_axis(length: int, tile: int, pad: int) -> list[tuple[int, int]]:
    """Tiled VAE (A1111): ``ceil(length / tile)`` equal cores, each padded by ``pad`` on both sides (clipped)."""
    n = max(1, math.ceil(length / tile))
    core = math.ceil(length / n)
    out = []
    for i in range(n):
        a, b = max(0, i * core - pad), min(length, (i + 1) * core + pad)
        out.append((a, b - a))
    return out


@dataclasses.dataclass(frozen=True)
class Fits:
    """Constants fitted on the data (see module docs)."""

    full16: dict[int, float]
    full32: dict[int, float]
    tile_c0: float
    tile_c1: float
    video_a: float
    video_c: float
    mem_ratios: tuple[tuple[str, int, float, float], ...]  # (kind, dsize, px, estimate/measured)
    tiled_rows: int
    video_rows: int


def _video_geometry(frames_lat: int, h: int, w: int, *, chunk: int | None, overlap: int, tile: int | None,
                    tile_overlap: int, tc: int, causal_frames: bool = False) -> tuple[float, int, float]:
    """(decoded output frames x latent area, decoder calls, largest call's frames x latent area) of a video decode.

    diffusers' HunyuanVideo: temporal chunks of ``chunk + 1`` latent frames every ``chunk - overlap``
    (each decodes ``1 + tc * (k - 1)`` frames), and in each chunk spatial tiles on diffusers' stride.
    ``causal_frames`` (Wan): one latent frame per call with a cache, no frame decoded twice.
    """
    if tile is not None and (h > tile or w > tile):
        ty, tx = diffusers_axis(h, tile, tile_overlap), diffusers_axis(w, tile, tile_overlap)
    else:
        ty, tx = [(0, h)], [(0, w)]
    area = sum(s for _, s in ty) * sum(s for _, s in tx)
    big_area = max(s for _, s in ty) * max(s for _, s in tx)
    n_tiles = len(ty) * len(tx)
    if causal_frames:
        frames = 1 + tc * (frames_lat - 1)
        return float(frames * area), frames_lat * n_tiles, float(tc * big_area)
    if chunk is not None and frames_lat > chunk:
        chunks = [min(chunk + 1, frames_lat - i) for i in range(0, frames_lat, max(1, chunk - overlap))]
    else:
        chunks = [frames_lat]
    frames = sum(1 + tc * (k - 1) for k in chunks)
    return float(frames * area), len(chunks) * n_tiles, float((1 + tc * (max(chunks) - 1)) * big_area)


def fit(profiles: Profiles) -> Fits:
    """Fit the world's constants on ``tests/data`` (memory ratios use ``profiles``' memory model)."""
    rows = _data_rows()
    full: dict[int, dict[int, list[float]]] = {2: {}, 4: {}}
    for r in rows:
        if r.get("tag") in ("sd15", "sdxl", "sdxl_fp16", "flux") and r.get("mode") == "full" and r.get("batch", 1) == 1:
            ds = 4 if "float32" in str(r["dtype"]) else 2
            full[ds].setdefault(int(r["res"]) ** 2, []).append(float(r["median_s"]))
    f16 = {k: statistics.median(v) for k, v in full[2].items()}
    f32 = {k: statistics.median(v) for k, v in full[4].items()}
    # per-tile overhead: residual of tiled rows over the sum of their tiles' full-decode times
    xs, ys = [], []
    for r in rows:
        tag = r.get("tag")
        if tag in ("sd15", "sdxl", "sdxl_fp16", "flux") and r.get("mode") == "tiled":
            res, tile = int(r["res"]), int(r["tile"])
            ov, ds = tile // 4, 4 if "float32" in str(r["dtype"]) else 2
        elif tag == "tilesweep":
            res, tile = int(r["res"]), int(r["tile"])
            ov, ds = int(tile * float(r["overlap"])), 2
        else:
            continue
        ax = diffusers_axis(res // 8, tile // 8, ov // 8)
        pts = f32 if ds == 4 else f16
        base = sum(_piecewise(pts, a * b * 64) for _, a in ax for _, b in ax)
        n = len(ax) ** 2
        mp = sum(a * b * 64 for _, a in ax for _, b in ax) / n / 2**20
        xs.append((n, n * mp))
        ys.append(float(r["median_s"]) - base)
    c0, c1 = _lsq2(xs, ys)
    # video: a * decoded voxels + c * calls (HunyuanVideo rows)
    vx, vy = [], []
    for r in rows:
        if r.get("tag") != "hunyuan":
            continue
        fr, h, w = (int(v) for v in str(r["res"]).split("x"))
        lat = (fr - 1) // 4 + 1
        mode = str(r["mode"])
        tile = 32 if mode.startswith("tiled") else None
        chunk = 4 if mode != "full" else None
        vox, calls, _ = _video_geometry(lat, h // 8, w // 8, chunk=chunk, overlap=1, tile=tile, tile_overlap=8, tc=4)
        vx.append((vox * 64, calls))
        vy.append(float(r["median_s"]))
    va, vc = _lsq2(vx, vy)
    ratios = tuple(_mem_ratios(rows, profiles))
    return Fits(f16, f32, c0, c1, va, vc, ratios, len(ys), len(vy))


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


def _mem_ratios(rows: list[dict[str, Any]], profiles: Profiles, *, with_bytes: bool = False) -> list[tuple[Any, ...]]:
    """(kind, dsize, px per frame, estimate / measured[, estimate, measured]) for every measured decode row."""
    fam_of = {"sd15": "sd15", "sdxl": "sdxl", "sdxl_fp16": "sdxl", "flux": "flux", "tilesweep": "sd15",
              "baseline": "sd15", "cudnn_bench": "sd15", "hunyuan": "hunyuanvideo"}
    out = []
    for r in rows:
        tag = r.get("tag")
        if tag is None and "peak_alloc" in r:  # memory-cap runs: full decodes
            ds = 4 if "float32" in str(r["dtype"]) else 2
            res = int(r["res"])
            job = DecodeJob("sd15", res, res, dtype="float32" if ds == 4 else "float16")
            est = peak_bytes(job, profiles.family("sd15"), tile_px=None, overlap_px=0, frame_chunk=None, slice_batch=False)
            measured = float(int(r["peak_alloc"]) - int(r["base"]))
            out.append(("sd:full", ds, float(res * res), est / measured, est, measured))
            continue
        if tag not in fam_of or "peak_alloc_delta" not in r:
            continue
        fam_key = fam_of[str(tag)]
        fam = profiles.family(fam_key)
        dtype = str(r.get("dtype", "torch.float16")).replace("torch.", "")
        measured = float(r["peak_alloc_delta"])
        if fam.video:
            fr, h, w = (int(v) for v in str(r["res"]).split("x"))
            job = DecodeJob(fam_key, w, h, frames=fr, dtype="float16")
            mode = str(r["mode"])
            kw = {"full": (None, None), "framewise": (None, 4)}.get(mode, (256, 4))
            est = peak_bytes(job, fam, tile_px=kw[0], overlap_px=64 if kw[0] else 0, frame_chunk=kw[1], slice_batch=False)
            kind = "video:" + ("full" if mode == "full" else "chunk" if mode == "framewise" else "tiled")
            out.append((kind, 2, float(h * w), est / measured, est, measured))
            continue
        res = int(r["res"])
        batch = int(r.get("batch", 1))
        job = DecodeJob(fam_key, res, res, batch=batch, dtype=dtype)
        if tag == "tilesweep" or r.get("mode") == "tiled":
            tile = int(r["tile"])
            ov = int(tile * float(r["overlap"])) if tag == "tilesweep" else tile // 4
            est = peak_bytes(job, fam, tile_px=tile, overlap_px=ov, frame_chunk=None, slice_batch=False,
                             geometry="diffusers")
            out.append(("sd:tiled", dtype_bytes(dtype), float(tile * tile), est / measured, est, measured))
        else:
            est = peak_bytes(job, fam, tile_px=None, overlap_px=0, frame_chunk=None, slice_batch=False)
            out.append(("sd:batch" if batch > 1 else "sd:full", dtype_bytes(dtype), float(res * res), est / measured, est,
                        measured))
    return out if with_bytes else [r[:4] for r in out]


# ---- the world ----------------------------------------------------------------------------------


def _rng(*parts: object) -> random.Random:
    return random.Random(zlib.crc32("|".join(str(p) for p in parts).encode()))


class World:
    """Ground truth for scenarios. Deterministic for a given ``seed``.

    Args:
        profiles: the engine's profiles (families' memory models, seed GPU rows).
        seed (`int`, defaults to 0): changes every random draw.
        sigma_card / sigma_local / sigma_plan / sigma_net (`float`): lognormal noise (see module docs).
        remote_failure (`float`, defaults to 0.02): chance that a remote request fails (HTTP 503).
        drift_mib (`float`, defaults to 0): free memory may shrink by up to this much between the probe
            and the decode (other processes); 0 in the headline table, varied in the sensitivity runs.
        card_seed (`int | None`, defaults to ``seed``): seeds the per-card factors (a warm-up world for
            learned timings shares the cards with the scored world but not the other draws).
    """

    def __init__(self, profiles: Profiles, *, seed: int = 0, sigma_card: float = 0.15, sigma_local: float = 0.05,
                 sigma_plan: float = 0.03, sigma_net: float = 0.15, remote_failure: float = 0.02,
                 drift_mib: float = 0.0, card_seed: int | None = None) -> None:
        self.profiles, self.seed = profiles, seed
        self.card_seed = seed if card_seed is None else card_seed
        self.sigma_card, self.sigma_local, self.sigma_plan, self.sigma_net = sigma_card, sigma_local, sigma_plan, sigma_net
        self.remote_failure, self.drift = remote_failure, drift_mib * MiB
        self.fits = fit(profiles)
        self._card_cache: dict[tuple[str, int], tuple[float, float]] = {}
        self._cf_cache: dict[tuple[str, int, float], float] = {}
        self._near_cache: dict[tuple[str, int, float], float] = {}
        self._cache: dict[tuple[str, str], Attempt] = {}

    # -- cards --
    def cards(self) -> list[Card]:
        """Every profiled GPU and the unprofiled 4 GB and 6 GB cards."""
        out = [Card(g.name, g.total_gib, True) for g in self.profiles.gpus]
        out += [Card(n, t, False, (s16, s32)) for n, t, s16, s32 in EXTRA_CARDS]
        return out

    def card_factor(self, card: Card, dsize: int, px: float) -> float:
        """True time of ``card`` against the H200 for a region of ``px`` pixels."""
        ck = (card.name, dsize, px)
        got = self._cf_cache.get(ck)
        if got is None:
            got = self._cf_cache[ck] = self._card_factor(card, dsize, px)
        return got

    def _card_factor(self, card: Card, dsize: int, px: float) -> float:
        if card.assumed_speed is not None:
            return card.assumed_speed[0 if dsize == 2 else 1]
        ends = self._card_cache.get((card.name, dsize))
        if ends is None:
            prof = self.profiles.gpu(card.name)
            if prof is None or prof.name == "NVIDIA H200":
                self._card_cache[(card.name, dsize)] = (1.0, 1.0)
                return 1.0
            ref = self.fits.full32 if dsize == 4 else self.fits.full16
            pts: dict[int, float] = {}
            for r in prof.rows:
                rb = dtype_bytes(r.dtype) if r.dtype else (4 if r.model == "sdxl" else 2)
                if rb == dsize and r.size in (512, 1024):
                    pts[r.size] = r.time_s / ref[r.size * r.size]
            lo, hi = pts.get(512, pts.get(1024, 5.0)), pts.get(1024, pts.get(512, 5.0))
            ends = (lo, hi)
            self._card_cache[(card.name, dsize)] = ends
        lo, hi = ends
        x = min(1.0, max(0.0, math.log2(max(px, 1.0) / 512**2) / 2))
        return lo + (hi - lo) * x

    # -- memory --
    def mem_ratio(self, sc: Scenario, kind: str, px: float) -> float:
        fam = self.profiles.family(sc.family)
        rng = _rng(self.seed, "mem", sc.local_key, kind)
        if not fam.memory.measured:
            return rng.uniform(1.0, 1.10)
        dsize = dtype_bytes(sc.dtype)
        ck = (kind, dsize, px)
        near = self._near_cache.get(ck)
        if near is None:
            cands = [r for r in self.fits.mem_ratios if r[0] == kind] or \
                [r for r in self.fits.mem_ratios if r[0].split(":")[0] == kind.split(":")[0]]
            same = [r for r in cands if r[1] == dsize] or cands
            best = min(abs(math.log(r[2] / px)) for r in same)
            near = self._near_cache[ck] = statistics.fmean(
                [r[3] for r in same if abs(math.log(r[2] / px)) <= best + 1e-9])
        return min(1.10, max(1.0, near * rng.uniform(0.98, 1.02)))

    def true_peak(self, sc: Scenario, ex: Exec) -> float:
        """True peak allocated bytes of a local execution."""
        fam = self.profiles.family(sc.family)
        job = sc.job()
        ds = dtype_bytes(sc.dtype)
        arch = "video" if fam.video else "sd"
        frames_out = sc.frames or 1
        if ex.path == "full":
            items = sc.batch if ex.items in (0, sc.batch) else ex.items
            if items in (1, sc.batch):
                est = peak_bytes(job, fam, tile_px=None, overlap_px=0, frame_chunk=ex.frame_chunk,
                                 slice_batch=items == 1 and sc.batch > 1)
            else:  # ComfyUI's batch split: the output lives on the CPU
                fr = frames_out if ex.frame_chunk is None else min(frames_out, ex.frame_chunk * fam.temporal_compression + 1)
                est = region_peak(fam, ds, sc.height * sc.width, fr, items)
            kind = "chunk" if (fam.video and ex.frame_chunk) else "batch" if items > 1 else "full"
            return est / self.mem_ratio(sc, f"{arch}:{kind}", sc.height * sc.width)
        if ex.geometry == "exact":
            # no GPU data yet: the analytic model (no margin) x 1.00-1.10, the spread measured on the
            # CPU (profiler peak 1.01-1.07x the analytic figure, SD-width decoder; docs/estimator.md)
            return exact_peak_bytes(job, fam, ex.tiles[0][0], margin=1.0) * \
                _rng(self.seed, "exact", sc.local_key).uniform(1.0, 1.10)
        if ex.geometry in ("engine", "diffusers"):
            th, _tw = ex.tiles[0]
            est = peak_bytes(job, fam, tile_px=th, overlap_px=ex.overlap_px, frame_chunk=ex.frame_chunk,
                             slice_batch=True, geometry=ex.geometry)
            area = float(min(th, sc.height) * min(th, sc.width))
        else:
            m = fam.memory
            sc_ = fam.spatial_compression
            fr = frames_out if (not fam.video or ex.frame_chunk is None) else \
                min(frames_out, ex.frame_chunk * fam.temporal_compression + 1)
            if fam.tiling.always_chunked:
                fr = min(frames_out, fam.temporal_compression)
            est = 0.0
            area = 0.0
            for th, tw in ex.tiles:
                ty, tx = self._grid(sc, ex, th, tw)
                tile = max(s for _, s in ty) * max(s for _, s in tx) * sc_ * sc_
                bpv = m.tile_bytes_per_voxel or m.bytes_per_voxel
                items = sc.batch if ex.geometry == "tiledvae" else 1  # Tiled VAE decodes the batch per tile
                per = bpv * fr + m.extra_frame_voxels + (items - 1) * (m.batch_bytes_per_voxel * fr + m.extra_frame_voxels)
                p = ds * tile * per + m.tile_constant_bytes
                if tile >= m.tile_workspace_min_px:
                    p += m.tile_workspace_bytes
                if ex.geometry == "tiledvae":
                    p += ds * 3 * sc.batch * frames_out * sc.height * sc.width
                est, area = max(est, p), max(area, float(tile))
        return est / self.mem_ratio(sc, f"{arch}:tiled", area)

    def _grid(self, sc: Scenario, ex: Exec, th: int, tw: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        fam = self.profiles.family(sc.family)
        s = fam.spatial_compression
        h, w, o = sc.height // s, sc.width // s, ex.overlap_px // s
        if ex.geometry == "engine":
            return axis_tiles(h, th // s, o), axis_tiles(w, tw // s, o)
        if ex.geometry == "diffusers":
            return diffusers_axis(h, th // s, o), diffusers_axis(w, tw // s, o)
        if ex.geometry == "comfy":
            return comfy_axis(h, th // s, o), comfy_axis(w, tw // s, o)
        return tiledvae_axis(h, th // s, o), tiledvae_axis(w, tw // s, o)

    # -- seconds --
    def _img_full(self, sc: Scenario, px: float) -> float:
        ds = dtype_bytes(sc.dtype)
        pts = self.fits.full32 if ds == 4 else self.fits.full16
        return _piecewise(pts, px) * self.card_factor(sc.card, ds, px)

    def base_seconds(self, sc: Scenario, ex: Exec) -> tuple[float, float]:
        """(noise-free seconds of the whole execution, seconds of its largest single region)."""
        fam = self.profiles.family(sc.family)
        ds = dtype_bytes(sc.dtype)
        px = float(sc.height * sc.width)
        b = sc.batch
        if ex.path == "cpu":
            t = b * (sc.frames or 1) * px * CPU_S_PER_VOXEL * fam.timing.relative_cost
            return t, t / b
        if fam.video:
            return self._video_seconds(sc, ex, fam)
        if ex.path == "full":
            k = b if ex.items in (0, b) else ex.items
            one = self._img_full(sc, px)
            per_call = one * k * (1.0 if k <= 2 else max(0.87, 1.0 - 0.065 * (k - 2)))
            return per_call * math.ceil(b / k), per_call
        if ex.geometry == "exact":
            # full decode x 1.08 (CPU at SD width: 1.04-1.13x) + 0.15 ms per tile of each pass (assumed)
            ty, tx = exact_tiles(sc.job(), fam, ex.tiles[0][0])
            one = self._img_full(sc, px) * 1.08 + fam.timing.exact_passes * len(ty) * len(tx) * 0.00015 * \
                self.card_factor(sc.card, ds, px)
            return one * b, one
        total, biggest = 0.0, 0.0
        sc_ = fam.spatial_compression
        for th, tw in ex.tiles:
            ty, tx = self._grid(sc, ex, th, tw)
            cy, cx = Counter(s for _, s in ty), Counter(s for _, s in tx)
            for a, na in cy.items():
                for c, nc in cx.items():
                    tp = a * c * sc_ * sc_
                    t = self._img_full(sc, tp) + (self.fits.tile_c0 + self.fits.tile_c1 * tp / 2**20) * \
                        self.card_factor(sc.card, ds, tp)
                    total += t * na * nc
                    biggest = max(biggest, t)
        if ex.geometry == "tiledvae":  # fast mode's GroupNorm estimate: a decode of the 1/8-scale latent
            total += self._img_full(sc, px / 64)
        return total * b, biggest

    def _video_seconds(self, sc: Scenario, ex: Exec, fam: Family) -> tuple[float, float]:
        s, tc = fam.spatial_compression, fam.temporal_compression
        lat = latent_frames(sc.job(), fam)
        tile = ex.tiles[0][0] // s if ex.path == "tiled" and ex.tiles else None
        vox, calls, big = _video_geometry(lat, sc.height // s, sc.width // s, chunk=ex.frame_chunk,
                                          overlap=ex.frame_overlap, tile=tile, tile_overlap=ex.overlap_px // s, tc=tc,
                                          causal_frames=fam.tiling.always_chunked)
        if fam.memory.measured:
            a, c = self.fits.video_a, self.fits.video_c
        else:  # Wan: not measured; the engine's own assumption
            a, c = fam.timing.h200_seconds_per_voxel_fp16, fam.timing.per_tile_h200_s
        k = self.card_factor(sc.card, 2, 1024 * 1024)
        if dtype_bytes(sc.dtype) == 4:
            k *= fam.timing.fp32_factor
        t = (a * vox * s * s + c * calls) * k
        return t * sc.batch, (a * big * s * s + c) * k

    # -- attempts --
    def available(self, sc: Scenario) -> float:
        """Memory free at decode time: the probed free, less the drift."""
        drift = _rng(self.seed, "drift", sc.local_key).uniform(0, self.drift) if self.drift else 0.0
        return sc.gpu().available_bytes - drift

    def card_noise(self, card: Card) -> float:
        """This card's systematic speed factor against its profile (the same for every decode on it)."""
        return _rng(self.card_seed, "card", card.name).lognormvariate(0.0, self.sigma_card)

    def local_factor(self, sc: Scenario, ex: Exec) -> float:
        shared = _rng(self.seed, "local", sc.local_key).lognormvariate(0.0, self.sigma_local)
        own = _rng(self.seed, "plan", sc.local_key, ex.key).lognormvariate(0.0, self.sigma_plan)
        return self.card_noise(sc.card) * shared * own

    def attempt(self, sc: Scenario, ex: Exec) -> Attempt:
        """What happens when ``ex`` runs in scenario ``sc`` (cached; the same for every strategy)."""
        ck = (sc.key if ex.path == "remote" else sc.local_key, ex.key)
        got = self._cache.get(ck)
        if got is None:
            got = self._remote(sc, ex) if ex.path == "remote" else self._local(sc, ex)
            self._cache[ck] = got
        return got

    def _local(self, sc: Scenario, ex: Exec) -> Attempt:
        secs, biggest = self.base_seconds(sc, ex)
        f = self.local_factor(sc, ex)
        if ex.path == "cpu":
            return Attempt(True, secs * f)
        if self.true_peak(sc, ex) > self.available(sc):
            lost = biggest * f * _rng(self.seed, "oom", sc.local_key, ex.key).uniform(0.70, 1.00)
            return Attempt(False, lost, oom=True, error="out of memory")
        return Attempt(True, secs * f)

    def _remote(self, sc: Scenario, ex: Exec) -> Attempt:
        fam = self.profiles.family(sc.family)
        net = sc.network
        if net is None or not fam.endpoints:
            return Attempt(False, 0.0, error="no endpoint" if net is not None else "no network")
        rng = _rng(self.seed, "net", sc.key)
        rtt = net.rtt_s * rng.lognormvariate(0.0, self.sigma_net)
        bps = net.mbit * 1e6 / 8 / rng.lognormvariate(0.0, self.sigma_net)
        png = rng.uniform(*PNG_BYTES_PER_PX)
        failed = rng.random() < self.remote_failure
        job = sc.job()
        lat = job.batch * fam.latent_channels * latent_frames(job, fam) * (sc.height // fam.spatial_compression) \
            * (sc.width // fam.spatial_compression) * dtype_bytes(sc.dtype)
        up = rtt + lat / bps
        if failed:
            return Attempt(False, up, error="HTTP 503")
        vox = sc.batch * (sc.frames or 1) * sc.height * sc.width
        fmt = ex.fmt or "raw"
        per_px = png if fmt == "png" else FORMAT_BYTES[fmt]
        if fam.video:
            server = self.fits.video_a * vox * SERVER_FACTOR
        else:
            server = _piecewise(self.fits.full16, sc.height * sc.width) * sc.batch * SERVER_FACTOR
        own = _rng(self.seed, "fmt", sc.key, fmt).lognormvariate(0.0, self.sigma_plan)
        secs = (up + server + vox * per_px / bps + vox / 1e6 * FORMAT_S_PER_MP[fmt]) * own
        return Attempt(True, secs)
