"""The truth of each plan kind: what one execution really needs (GPU and host bytes) and costs (seconds).

One function per kind, registered in :data:`KINDS` under :attr:`bench.world.Exec.kind`. A kind returns the
bare :class:`Truth` of an execution; the world then adds what a real machine adds (cuDNN workspace, block
rounding, fragmentation, free memory moving, noise) and decides whether the attempt fits.

Adding a plan kind (for instance an offloaded exact-tile plan):

1. write ``def my_kind(world, sc, ex) -> Truth`` from what is *measured* about that kind (the curves of
   :mod:`bench.interp`, or new rows in ``profiles/measured/``), or, where nothing is, an explicit assumption
   with its own spread drawn per installation (add a field to :class:`bench.world.Install`) so the truth can
   fall on either side of the engine's estimate; never call :mod:`policy.estimate`;
2. ``register("my-kind", my_kind)``;
3. map the engine's plan to ``Exec(..., kind="my-kind")`` in :meth:`bench.world.Exec.from_plan`;
4. say in docs/benchmarks.md (the world's truth table) whether its memory and seconds are measured,
   interpolated or assumed.

Sources of each kind's numbers (m = measured rows interpolated, a = assumed):

======================  =========================================================  ==========================
kind                    GPU / host bytes                                           seconds
======================  =========================================================  ==========================
full (SD decoder)       m: H200 full and batch rows                                m: H200 full-decode curve
full (HunyuanVideo)     m: H200 video rows less one output copy, + a: copies       m: fitted on video rows
                        (chunks streamed to host: one chunk + its blend frames;    (+ the frames' copies at
                        the frames in host memory)                                 the link's rate)
full/tiled (Wan)        i: CPU rows of Wan's decoder / a CPU/GPU ratio U(0.72,      a: 1.5x HunyuanVideo's
                        0.88) (measured 0.74-0.86 on the SD and HunyuanVideo      (+ streamed tiles' copies at
                        decoders, widened by 0.02 each side); tiles streamed to     the link's rate)
                        host: one tile's video + blend strips
tiled-local diffusers   m: H200 tiled rows (tile x image size)                     m: tiles + fitted per-tile
tiled-local engine      m: diffusers' rows x a: U(0.88, 1.12) (its own tiler)      as diffusers'
tiled-exact             a: U(0.26, 0.42) x full peak + U(0.45, 0.85) x a full      a: full x 1.08 + 0.15 ms
                        decode of one tile (CPU measured 0.95-1.03 of the          per tile step (steps counted
                        analytic figure, no GPU row)                               from the executor's schedule)
tiled-offload           counted (policy.passes): buffers on the device / in host   as tiled-exact + a: copies at
(bench/world_offload)   + a: tiled-exact's working set x U(1.2, 1.7)               public PCIe rates, staging,
                                                                                   overlap
tiled-halo (Wan)        i: Wan's region decode (as full/tiled Wan) at the largest   as Wan's: the regions'
                        region, tile + the halo counted from diffusers' decoder    frames x area (counted from
                        (13 latent px) clipped to the frame, + one call's frames;  the tiles) + a: whole-frame
                        a: the whole-frame mid block's peak 0.1x a one-latent-     mid block 0.1x a full
                        frame full decode's; frames in host memory                 decode's time + copies
tiled-exact3d           counted (policy.video_exact, diffusers' defaults): buffers  full x 1.08 + per-step cost
(bench/world_exact3d)   in host memory (or on the GPU) + keys/values + a: the      + counted copies at the link
                        counted tile x U(1.5, 3.0) (+ one counted tile in flight   and staging rates, a:
                        with host buffers)                                         55-95% of the shorter hidden
cpu                     m: CPU rows (host bytes); tiles, video a: the GPU truth    m: CPU rows x a: user CPU
                        at float32 x the measured CPU/GPU ratio at 512 px (SD      0.15-0.6x; exact tiles x a:
                        decoder; video: HunyuanVideo's); exact tiles: tiled-exact  U(0.96, 1.36) (the CPU runs'
                        at float32 x that ratio                                    measured range)
======================  =========================================================  ==========================
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from hybrid_vae.bench.geometry import axis_tiles, grid, video_geometry
from hybrid_vae.bench.interp import loglog
from hybrid_vae.policy.profiles import Family, dtype_bytes
from hybrid_vae.profiles.measurements import measured_rows

if TYPE_CHECKING:
    from hybrid_vae.bench.world import Exec, Scenario, World

EXACT_PASSES = 28  # passes of exact tiling without decoder layers in the profile (the SD decoder's up blocks)
EXACT_STEP_S = 0.00015  # H200 seconds per tile step (assumed: kernel launches)
EXACT_TIME = 1.08  # exact tiling / full decode seconds (assumed; the CPU measured 0.96-1.13x)
WAN_TIME = 1.5  # Wan's seconds per voxel / HunyuanVideo's (assumed)
VIDEO_FP32 = 1.32  # 4-byte / 2-byte seconds: the measured SD decoder ratio at 1 MP (H200: 0.117 s / 0.089 s)
#: Wan's CPU/GPU peak ratio, drawn per installation (no GPU has measured Wan's decoder): the range measured on
#: the two decoders measured on both (SD decoder 0.74-0.80, cpu-sd-decode rows against the H200 rows;
#: HunyuanVideo 0.85-0.86, cpu-video-decode rows against the H200 rows), widened by 0.02 on each side (assumed).
WAN_CPU_GPU = (0.72, 0.88)
#: Exact tiles on the CPU / the CPU's full decode, seconds (assumed per installation: the range this project's CPU
#: runs measured, 0.96-1.13x and 1.03-1.36x).
CPU_EXACT = (0.96, 1.36)
CPU_VIDEO = 2.0  # a video decoder's CPU seconds per voxel / the SD decoder's (assumed: 3-D convolutions)
#: Exact Wan tiles' halo in latent pixels: counted from diffusers' ``AutoencoderKLWan()`` decoder by
#: ``extension.stream_wan.halo_latent`` (a test keeps them equal); not the profile's ``exact_halo_latent``.
WAN_HALO = 13
#: Exact Wan tiles' first stage (post_quant_conv, conv_in, mid block over whole frames at the latent resolution):
#: its peak and its seconds as a share of a one-latent-frame full decode's (assumed: 1/64 of the pixels at up to
#: 4x the top level's channels, plus the attention's working set).
WAN_MID_SHARE = 0.1


@dataclasses.dataclass(frozen=True)
class Truth:
    """The bare truth of one execution.

    Attributes:
        gpu_bytes: peak allocated bytes on the GPU (0: none). host_bytes: peak host bytes (CPU decodes).
        seconds: noise-free seconds of the whole execution on this card.
        biggest_s: seconds of its largest single region (what a failing attempt burns).
        source: ``measured`` (interpolated rows), ``assumed`` or a mix, for the report.
    """

    gpu_bytes: float
    host_bytes: float
    seconds: float
    biggest_s: float
    source: str


TruthFn = Callable[["World", "Scenario", "Exec"], Truth]
KINDS: dict[str, TruthFn] = {}


def register(kind: str, fn: TruthFn) -> TruthFn:
    """Register the truth of a plan kind (see the module docs)."""
    KINDS[kind] = fn
    return fn


def of(world: World, sc: Scenario, ex: Exec) -> Truth:
    """The truth of ``ex``: its kind's function."""
    try:
        fn = KINDS[ex.kind]
    except KeyError:
        raise ValueError(f"no truth registered for plan kind {ex.kind!r}; known: {', '.join(sorted(KINDS))}") from None
    return fn(world, sc, ex)


# ---- shared pieces -----------------------------------------------------------------------------------------


def _fam(world: World, sc: Scenario) -> Family:
    return world.profiles.family(sc.family)


def _img_seconds(world: World, sc: Scenario, px: float) -> float:
    ds = dtype_bytes(sc.dtype)
    return world.time.full(ds, px) * world.card_factor(sc.card, ds, px)


def _out_bytes(world: World, sc: Scenario, voxels: float, copies: float | None = None) -> float:
    """3-channel output voxels held on the GPU in the decode dtype: ``copies`` of them (None: the installation's
    assumed count, for stitching inside diffusers; the engine's executors preallocate one output buffer)."""
    return 3.0 * dtype_bytes(sc.dtype) * voxels * (world.install(sc.card).out_copies if copies is None else copies)


def _lat_frames(sc: Scenario, fam: Family) -> int:
    return ((sc.frames or 1) - 1) // fam.temporal_compression + 1 if fam.video else 1


def _frames_at_once(sc: Scenario, fam: Family, chunk: int | None) -> int:
    frames = sc.frames or 1
    if fam.tiling.always_chunked:
        return min(frames, fam.temporal_compression)
    return frames if chunk is None else min(frames, chunk * fam.temporal_compression + 1)


def _video_gpu(world: World, sc: Scenario, fam: Family, region_px: float, frames_at_once: int) -> tuple[float, str]:
    """A video decoder's own peak for ``region_px`` pixels x ``frames_at_once`` frames, and its source."""
    inst = world.install(sc.card)
    ds = dtype_bytes(sc.dtype)
    if fam.architecture == "wan":
        one, four = _wan_cpu_per_px()
        per_px = one if frames_at_once == 1 else four
        return per_px / 4 * ds * region_px / inst.wan_cpu_gpu * inst.conv3d, "interpolated"
    return world.mem.video_peak(frames_at_once, region_px) * ds / 2 * inst.conv3d, "measured"


def _video_out(world: World, sc: Scenario, ex: Exec, fam: Family) -> tuple[float, float, float]:
    """A video decode's output: (bytes on the GPU, bytes in host memory, seconds of copies). diffusers' loop keeps
    every frame on the GPU (the installation's stitching copies); the engine's chunks streamed to host
    (``ex.host_out``, HunyuanVideo with more latent frames than a chunk) keep one chunk and the previous chunk's
    blend frames there, its tiles streamed to host (Wan) one tile's video and the blend strips of the row above
    and the tile to the left; the frames go over this installation's link (``world_offload.link``)."""
    px = float(sc.height * sc.width)
    every = sc.batch * (sc.frames or 1) * px
    chunk = ex.frame_chunk
    if ex.host_out and chunk is not None and _lat_frames(sc, fam) > chunk:  # HunyuanVideo's chunks
        on_gpu = _out_bytes(world, sc, (_frames_at_once(sc, fam, chunk) + ex.frame_overlap * fam.temporal_compression)
                            * px)
    elif ex.host_out and chunk is None and ex.tiles and fam.architecture == "wan":  # Wan's tiles, item by item
        s = fam.spatial_compression
        ty, tx = grid("diffusers", sc.height // s, sc.width // s, ex.tiles[0][0] // s, ex.tiles[0][0] // s,
                      ex.overlap_px // s)
        th, tw = max(v for _, v in ty) * s, max(v for _, v in tx) * s
        frames = sc.frames or 1
        on_gpu = _out_bytes(world, sc, frames * th * tw) + _out_bytes(world, sc, frames * ex.overlap_px
                                                                      * (sc.width + tw), 1.0)
    else:
        return _out_bytes(world, sc, every), 0.0, 0.0
    from hybrid_vae.bench.world_offload import link

    host = 3.0 * dtype_bytes(sc.dtype) * every
    return on_gpu, host, host / (link(world, sc.card.name).link_gbs * 1e9)


def _video_seconds(world: World, sc: Scenario, ex: Exec, fam: Family) -> tuple[float, float]:
    s, tc = fam.spatial_compression, fam.temporal_compression
    tile = ex.tiles[0][0] // s if ex.path == "tiled" and ex.tiles else None
    vox, calls, big, _ = video_geometry(_lat_frames(sc, fam), sc.height // s, sc.width // s, chunk=ex.frame_chunk,
                                        overlap=ex.frame_overlap, tile=tile, tile_overlap=ex.overlap_px // s, tc=tc,
                                        causal_frames=fam.tiling.always_chunked)
    a, c = world.time.video_a, world.time.video_c
    if fam.architecture == "wan":
        a *= WAN_TIME
    k = world.card_factor(sc.card, 2, 1024 * 1024) * (VIDEO_FP32 if dtype_bytes(sc.dtype) == 4 else 1.0)
    t = (a * vox * s * s + c * calls) * k
    return t * sc.batch, (a * big * s * s + c) * k


# ---- kinds -------------------------------------------------------------------------------------------------


def full(world: World, sc: Scenario, ex: Exec) -> Truth:
    """A whole-region decode of ``ex.items`` items at once (video: ``ex.frame_chunk`` latent frames per chunk)."""
    fam = _fam(world, sc)
    ds = dtype_bytes(sc.dtype)
    px = float(sc.height * sc.width)
    k = sc.batch if ex.items in (0, sc.batch) else ex.items
    if fam.video:
        fr = _frames_at_once(sc, fam, ex.frame_chunk)
        one, src = _video_gpu(world, sc, fam, px, fr)
        out, host, copy_s = _video_out(world, sc, ex, fam)
        secs, big = _video_seconds(world, sc, ex, fam)
        return Truth(one * world.mem.batch_ratio(k) + out, host, secs + copy_s, big, src)
    gpu = world.mem.full_peak(ds, px) * world.mem.batch_ratio(k)
    if k < sc.batch and ex.geometry != "comfy":  # the engine's output buffer for every item (ComfyUI: on the host)
        gpu += _out_bytes(world, sc, sc.batch * px, 1.0)
    one = _img_seconds(world, sc, px)
    per_call = one * k * (1.0 if k <= 2 else max(0.87, 1.0 - 0.065 * (k - 2)))  # measured: b(2)=1.00, b(4)=0.87
    return Truth(gpu, 0.0, per_call * math.ceil(sc.batch / k), per_call, "measured")


def tiled_local(world: World, sc: Scenario, ex: Exec) -> Truth:
    """Tiles through the whole decoder (per-tile GroupNorm), cut by ``ex.geometry``, one pass per ``ex.tiles``."""
    fam = _fam(world, sc)
    ds = dtype_bytes(sc.dtype)
    s = fam.spatial_compression
    px = float(sc.height * sc.width)
    inst = world.install(sc.card)
    if fam.video:
        th = ex.tiles[0][0]
        ty, tx = grid("diffusers", sc.height // s, sc.width // s, th // s, th // s, ex.overlap_px // s)
        region = float(max(v for _, v in ty) * max(v for _, v in tx) * s * s)
        one, src = _video_gpu(world, sc, fam, region, _frames_at_once(sc, fam, ex.frame_chunk))
        out, host, copy_s = _video_out(world, sc, ex, fam)
        secs, big = _video_seconds(world, sc, ex, fam)
        return Truth(one + out, host, secs + copy_s, big, src)
    gpu, total, biggest = 0.0, 0.0, 0.0
    for th, tw in ex.tiles:
        ty, tx = grid(ex.geometry, sc.height // s, sc.width // s, th // s, tw // s, ex.overlap_px // s)
        tile = float(max(v for _, v in ty) * max(v for _, v in tx) * s * s)
        peak = world.mem.tiled_peak(ds, tile, px)
        if ex.geometry == "engine":  # the engine's own tiler: not measured; diffusers' rows x an assumed factor
            peak = peak * inst.tiler + _out_bytes(world, sc, (sc.batch - 1) * px, 1.0)
        elif ex.geometry == "tiledvae":  # the batch per tile and the output on the GPU
            peak = peak * world.mem.batch_ratio(sc.batch) + _out_bytes(world, sc, sc.batch * px, 1.0)
        gpu = max(gpu, peak)
        cy, cx = Counter(v for _, v in ty), Counter(v for _, v in tx)
        for a, na in cy.items():
            for c, nc in cx.items():
                tp = a * c * s * s
                t = _img_seconds(world, sc, tp) + (world.time.tile_c0 + world.time.tile_c1 * tp / 2**20) * \
                    world.card_factor(sc.card, ds, tp)
                total += t * na * nc
                biggest = max(biggest, t)
    if ex.geometry == "tiledvae":  # fast mode's GroupNorm estimate: a decode of the 1/8-scale latent
        total += _img_seconds(world, sc, px / 64)
    src = "measured x assumed tiler factor" if ex.geometry == "engine" else "measured"
    return Truth(gpu, 0.0, total * sc.batch, biggest, src)


def _halo_axis(n: int, tile: int, halo: int) -> list[int]:
    """Sizes of the regions exact Wan tiles decode along one axis: each ``tile`` plus ``halo`` on both sides,
    clipped to the frame (the executor's loop, ``extension.stream_wan``)."""
    return [min(n, i + tile + halo) - max(0, i - halo) for i in range(0, n, tile)]


def tiled_halo(world: World, sc: Scenario, ex: Exec) -> Truth:
    """Exact Wan tiles: the whole-frame mid block, then each tile's region through the up path, frames to host."""
    fam = _fam(world, sc)
    s, tc = fam.spatial_compression, fam.temporal_compression
    h, w, t = sc.height // s, sc.width // s, ex.tiles[0][0] // s
    ry, rx = _halo_axis(h, t, WAN_HALO), _halo_axis(w, t, WAN_HALO)
    big = float(max(ry) * max(rx) * s * s)
    fr = _frames_at_once(sc, fam, None)
    region, src = _video_gpu(world, sc, fam, big, fr)
    whole, _ = _video_gpu(world, sc, fam, float(sc.height * sc.width), fr)
    gpu = max(region + _out_bytes(world, sc, fr * big, 1.0), WAN_MID_SHARE * whole)
    frames, lat = sc.frames or 1, _lat_frames(sc, fam)
    a = world.time.video_a * WAN_TIME
    k = world.card_factor(sc.card, 2, 1024 * 1024) * (VIDEO_FP32 if dtype_bytes(sc.dtype) == 4 else 1.0)
    tiles = len(ry) * len(rx)
    secs = (a * frames * sum(ry) * sum(rx) * s * s + world.time.video_c * lat * tiles) * k
    secs += WAN_MID_SHARE * a * frames * sc.height * sc.width * k
    from hybrid_vae.bench.world_offload import link

    host = 3.0 * dtype_bytes(sc.dtype) * sc.batch * frames * sc.height * sc.width
    copy_s = host / (link(world, sc.card.name).link_gbs * 1e9)
    biggest = (a * tc * big + world.time.video_c) * k
    return Truth(gpu, host, secs * sc.batch + copy_s, biggest, f"{src}; halo counted, mid block assumed")


def tiled_exact(world: World, sc: Scenario, ex: Exec) -> Truth:
    """Exact tiling (``extension/stream.py``): whole-image buffers plus one tile's working set, one item at a
    time. No GPU has measured it: both parts are assumed fractions of measured full decodes (module docs)."""
    ds = dtype_bytes(sc.dtype)
    px = float(sc.height * sc.width)
    inst = world.install(sc.card)
    tile = ex.tiles[0][0]
    ty, tx = axis_tiles(sc.height, tile, 0), axis_tiles(sc.width, tile, 0)
    tile_px = float((max(v for _, v in ty) + 2) * (max(v for _, v in tx) + 2))
    gpu = inst.exact_buf * world.mem.full_peak(ds, px) + inst.exact_tile * world.mem.full_peak(ds, tile_px) \
        + _out_bytes(world, sc, (sc.batch - 1) * px, 1.0)
    one = _img_seconds(world, sc, px) * EXACT_TIME + _exact_steps(world, sc, tile, len(ty) * len(tx)) * \
        EXACT_STEP_S * world.card_factor(sc.card, ds, px)
    return Truth(gpu, 0.0, one * sc.batch, one, "assumed fractions of measured full decodes")


def _exact_steps(world: World, sc: Scenario, tile: int, tiles: int) -> int:
    """Tile steps of exact tiling: counted from the pass schedule the executor runs (policy.passes) when the
    family has its decoder layers, else ``EXACT_PASSES`` x the output's tiles."""
    fam = _fam(world, sc)
    if fam.decoder is None or fam.decoder_widths is None:
        return EXACT_PASSES * tiles
    from hybrid_vae.bench.world_offload import exact_steps

    return exact_steps(fam, sc, tile)


@functools.lru_cache(maxsize=1)
def _wan_cpu_per_px() -> tuple[float, float]:
    """Wan's measured float32 CPU peak bytes per output-frame pixel: (one frame at once, four frames at once;
    the decoder takes one latent frame, four output frames, per step), the largest of the rows."""
    rows = [r for r in measured_rows(device="cpu") if r.series == "cpu_video" and r.family == "wan" and r.peak_bytes]
    one = [(r.peak_bytes or 0) / r.px for r in rows if r.frames == 1]
    four = [(r.peak_bytes or 0) / r.px for r in rows if (r.frames or 1) > 1]
    if not one or not four:
        raise FileNotFoundError("no Wan CPU rows in profiles/measured (cpu-video-decode-*.jsonl); run "
                                "bench/video_cpu_memory.py")
    return max(one), max(four)


def video_cpu_gpu_ratio(world: World) -> float:
    """HunyuanVideo's measured CPU/GPU peak ratio: its float32 CPU rows against the world's H200 curve at
    float32 (the median of the rows)."""
    rows = [r for r in measured_rows(device="cpu") if r.series == "cpu_video" and r.family == "hunyuanvideo"
            and r.peak_bytes]
    if not rows:
        raise FileNotFoundError("no HunyuanVideo CPU rows in profiles/measured (cpu-video-decode-*.jsonl); run "
                                "bench/video_cpu_memory.py")
    ratios = sorted((r.peak_bytes or 0) / (world.mem.video_peak(r.frames or 1, r.px) * 2) for r in rows)
    return ratios[len(ratios) // 2]


@functools.lru_cache(maxsize=1)
def _cpu_points() -> tuple[list[tuple[float, float]], list[tuple[float, float]], float]:
    """(host peak points, seconds points) of one float32 CPU decode by pixels, and the batch-2 peak ratio."""
    rows = [r for r in measured_rows(device="cpu") if r.series == "cpu_full"]
    one = [r for r in rows if r.batch == 1]
    if not one:
        raise FileNotFoundError("no CPU rows in profiles/measured (cpu-sd-decode-*.jsonl); run bench/cpu_memory.py")
    peaks = [(float(r.px), float(r.peak_bytes or 0)) for r in one]
    secs = [(float(r.px), float(r.seconds or 0)) for r in one]
    pairs = [(r, next((o for o in one if o.px == r.px), None)) for r in rows if r.batch == 2]
    ratio = [(r.peak_bytes or 0) / (o.peak_bytes or 1) for r, o in pairs if o is not None]
    return peaks, secs, (max(ratio) if ratio else 2.0)


def cpu(world: World, sc: Scenario, ex: Exec) -> Truth:
    """The engine's ``cpu`` plans, float32 on the host: the batch at once or item by item (``ex.items`` 1), whole
    frames or in tiles (``ex.tiles``), video in the plan's temporal chunks.

    Images, whole: the measured CPU rows. Everything else (tiles, video) is the GPU truth of the same decode at
    float32 scaled by a measured CPU/GPU peak ratio (assumed to carry over): the SD decoder's at 512 px, for
    video HunyuanVideo's (:func:`video_cpu_gpu_ratio`)."""
    fam = _fam(world, sc)
    peaks, secs, b2 = _cpu_points()
    px = float(sc.height * sc.width)
    inst = world.install(sc.card)
    ratio = video_cpu_gpu_ratio(world) if fam.video else loglog(peaks, 512 * 512) / world.mem.full_peak(4, 512 * 512)
    k = sc.batch if ex.items in (0, sc.batch) else ex.items
    out = 4.0 * 3 * sc.batch * (sc.frames or 1) * px  # the float32 output of every item
    as_gpu = dataclasses.replace(sc, dtype="float32")
    if ex.tiles and ex.geometry == "exact":  # exact tiles on the CPU: the world's exact truth in float32 x the ratio
        host = tiled_exact(world, as_gpu, dataclasses.replace(ex, path="tiled", kind="tiled-exact")).gpu_bytes * ratio
        from hybrid_vae.bench.world import _rng

        grow = _rng(world.seed, "cpu-exact", sc.card.name).uniform(*CPU_EXACT)
    elif ex.tiles:
        gpu_ex = dataclasses.replace(ex, path="tiled", kind="tiled-local")
        host = tiled_local(world, as_gpu, gpu_ex).gpu_bytes * ratio
        grid_ = grid(ex.geometry, sc.height // fam.spatial_compression, sc.width // fam.spatial_compression,
                     ex.tiles[0][0] // fam.spatial_compression, ex.tiles[0][1] // fam.spatial_compression,
                     ex.overlap_px // fam.spatial_compression)
        grow = sum(v for _, v in grid_[0]) * sum(v for _, v in grid_[1]) * fam.spatial_compression**2 / px
    elif fam.video:
        host = full(world, as_gpu, dataclasses.replace(ex, path="full", kind="full")).gpu_bytes * ratio
        grow = 1.0
    else:
        host = loglog(peaks, px) * (1.0 + (b2 - 1.0) * (k - 1)) + (out if k < sc.batch else 0.0)
        grow = 1.0
    t = loglog(secs, px) * grow * (sc.frames or 1) * (CPU_VIDEO if fam.video else 1.0) * sc.batch * inst.cpu_speed
    src = "measured (CPU rows)" if not (ex.tiles or fam.video) else "assumed from measured CPU and GPU rows"
    if ex.tiles and ex.geometry == "exact":
        src = "assumed: the world's exact tiling x the measured CPU/GPU ratio; CPU exact/full seconds assumed"
    return Truth(0.0, host, t, t / sc.batch, src)


def server_seconds(world: World, sc: Scenario) -> float:
    """An H200's seconds for the whole job (the remote endpoint's speed factor is applied by the world)."""
    fam = _fam(world, sc)
    vox = sc.batch * (sc.frames or 1) * sc.height * sc.width
    if fam.video:
        return world.time.video_a * vox * (WAN_TIME if fam.architecture == "wan" else 1.0)
    return world.time.full(2, sc.height * sc.width) * sc.batch


register("full", full)
register("tiled-local", tiled_local)
register("tiled-exact", tiled_exact)
register("tiled-halo", tiled_halo)
register("cpu", cpu)
