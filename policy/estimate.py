"""Peak bytes and seconds of each way to decode, with the source of every number.

Memory (see ``MemoryModel``): linear in output voxels and dtype size, fitted on H200 peak
*allocated* bytes (docs/estimator.md; tests/test_estimator.py checks every row of the data:
each estimate lies within +0% .. +10% of the measurement).

Seconds: from the card's GPU profile when it has rows for this decoder (interpolated by pixel
count), else the family's H200 figure scaled by the card's speed (from its profile, or
``settings.generic_speed_factor`` for an unknown card).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

from hybrid_vae.policy import passes
from hybrid_vae.policy.errors import LatentError
from hybrid_vae.policy.model import DecodeJob, DecodeSettings, Estimate, NetworkStats, ResponseFormat
from hybrid_vae.policy.profiles import Dtype, Family, GpuProfile, GpuRow, dtype_bytes
from hybrid_vae.policy.tiles import axis_tiles, diffusers_axis, temporal_chunks

H200_SD15_1MP_S = 0.0885  # full decode, 1024x1024 fp16, H200 (shared/data)
MAX_FRAMES = 100_000  # output frames of one video decode (~1 hour at 24 fps); beyond it, plans are not built
CPU_SECONDS_PER_VOXEL = 4e-5  # float32 SD decoder on a few CPU cores (assumed; calibrate to refine)
#: Host bytes of a float32 CPU decode per byte of this estimator's float32 GPU figure for the same decode, measured:
#: 0.74-0.80 on the SD decoder at 256-768 px, batch 1 and 2 (bench/cpu_memory.py, profiles/measured/cpu-sd-decode-
#: 2026-12-02.jsonl: 242, 542, 962, 2162 MiB at batch 1 against 304, 684, 1252, 2772 MiB), 0.85-0.86 on HunyuanVideo's
#: decoder at 9 frames (bench/video_cpu_memory.py, cpu-video-decode-2026-12-02.jsonl), 0.73-0.74 on Wan's (whose GPU
#: figure is derived from those rows); the top of that range, assumed to carry over to tiles and chunks.
CPU_HOST_PER_GPU_BYTE = 0.86
#: Seconds of exact tiles on the CPU (float32, whole-image buffers in host memory) per second of the CPU's full decode,
#: measured on this project's CPU runs: 1.20x at 256x256 (bench/tiled_speed.py cpu, docs/benchmarks.md), 1.03x at
#: 512x640 and 1.25-1.36x on the SD decoder config (issue 15's side-by-side runs); the top of that range. Local tiles
#: on the CPU measured 1.65-1.67x in the same run as the 1.20x.
CPU_EXACT_FACTOR = 1.36
REMOTE_SPEED_FACTOR = 2.0  # a hosted endpoint's GPU against an H200 (assumed)
# Response bytes per output pixel and extra seconds per megapixel (encode + decode) per format.
FORMAT_BYTES_PER_PX: dict[str, float] = {"raw": 3.0, "png": 1.6, "jpg": 0.35, "mp4": 0.08}
FORMAT_S_PER_MP: dict[str, float] = {"raw": 0.0, "png": 0.12, "jpg": 0.03, "mp4": 0.05}
Geometry = Literal["engine", "diffusers"]
#: Host<->device copy bandwidth (GB/s, pinned memory, one direction at a time) of an x16 link per PCI
#: Express generation: about what NVIDIA's bandwidthTest reports on such links (3.0: 12-13, 4.0: 24-26,
#: 5.0: 50-55 GB/s), rounded down; fewer lanes scale it. A profile's measured ``host_link_gbs`` wins.
PCIE_GBS: dict[int, float] = {1: 3.0, 2: 6.0, 3: 12.0, 4: 24.0, 5: 48.0, 6: 96.0, 7: 192.0}
UNPROFILED_PCIE_GEN = 3  # an unprofiled card's link: PCI Express 3.0 x16 (assumed; the common floor)
#: The CPU's side of offloaded exact tiling: gathering tiles from pageable whole-image buffers into pinned
#: staging and scattering finished tiles back (GB/s, assumed: a multi-threaded strided copy on desktop
#: DDR4/DDR5). The copies run at the slower of this and the link.
HOST_COPY_GBS = 16.0
#: Offloaded exact tiling: the share of the shorter of compute and copies that is not hidden behind the
#: other (the first tile of each pass, the last write, synchronisation; assumed).
OVERLAP_LOSS = 0.2


def decode_dtype(job: DecodeJob, fam: Family) -> Dtype:
    """The dtype the VAE runs in: the job's, else the family's default."""
    return job.dtype or fam.default_dtype


def upcast_dtype(requested: Dtype | None, force_upcast: bool) -> tuple[Dtype | None, str | None]:
    """The dtype a decode really runs in, and why it differs from ``requested``.

    A VAE whose config sets ``force_upcast`` (the stock SDXL VAE) overflows to NaN (a black image) in
    float16, so float16 is raised to float32, as diffusers' pipelines and SD.Next's upcast setting do;
    bfloat16 has float32's range and is kept. ``force_upcast`` is the VAE config's flag when the VAE is
    at hand, else the family's (an fp16-fix VAE's config says false).

    Returns:
        ``(dtype, note)``: ``note`` is None when nothing changed.
    """
    if requested == "float16" and force_upcast:
        return "float32", ("float16 asked for, decoded in float32: this VAE sets force_upcast (it overflows to "
                           "NaN, a black image, in float16; an fp16-fix VAE such as madebyollin/sdxl-vae-fp16-fix "
                           "decodes in float16)")
    return requested, None


def latent_frames(job: DecodeJob, fam: Family) -> int:
    """Latent frames of a video job (1 for images)."""
    if not fam.video:
        return 1
    frames = job.frames or 1
    return (frames - 1) // fam.temporal_compression + 1


def check_job(job: DecodeJob, fam: Family) -> None:
    """Raise :class:`LatentError` naming the field when the job cannot describe a decode of ``fam``."""
    for name, v in (("width", job.width), ("height", job.height)):
        if v <= 0 or v % fam.spatial_compression:
            raise LatentError(f"{name}={v}: must be a positive multiple of {fam.spatial_compression} for {job.family}")
        if v > 65536:
            raise LatentError(f"{name}={v}: larger than 65536 px")
    if job.batch < 1 or job.batch > 1024:
        raise LatentError(f"batch={job.batch}: must be between 1 and 1024")
    if job.frames is not None and job.frames > MAX_FRAMES:
        raise LatentError(f"frames={job.frames}: more than {MAX_FRAMES} frames; decode the video in parts")
    if fam.video:
        if job.frames is None or job.frames < 1:
            raise LatentError(f"frames={job.frames}: {job.family} is a video family; give the output frame count")
        if (job.frames - 1) % fam.temporal_compression:
            raise LatentError(f"frames={job.frames}: must be 1 + a multiple of {fam.temporal_compression} for {job.family}")
    elif job.frames not in (None, 1):
        raise LatentError(f"frames={job.frames}: {job.family} is an image family; leave frames unset")


def _frames_per_chunk(fam: Family, chunk_lat: int | None, frames_out: int) -> int:
    """Output frames decoded at once."""
    if not fam.video:
        return 1
    if fam.tiling.always_chunked:
        return min(frames_out, fam.temporal_compression)
    if chunk_lat is None:
        return frames_out
    # diffusers decodes chunk + 1 latent frames per temporal tile
    return min(frames_out, chunk_lat * fam.temporal_compression + 1)


def spatial_tiles(job: DecodeJob, fam: Family, tile_px: int, overlap_px: int, *,
                  geometry: Geometry = "engine") -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Latent tiles along height and width as the executor will run them.

    Images use the engine's equalised tiles; video VAEs (and ``geometry="diffusers"``) tile the way
    diffusers does (fixed stride, clipped edge tiles).
    """
    sc = fam.spatial_compression
    cut = diffusers_axis if (fam.video or geometry == "diffusers") else axis_tiles
    return cut(job.height // sc, tile_px // sc, overlap_px // sc), cut(job.width // sc, tile_px // sc, overlap_px // sc)


def region_peak(fam: Family, dsize: int, px: int, frames: int, items: int) -> float:
    """Peak bytes of a full decode of ``items`` regions of ``px`` pixels x ``frames`` output frames."""
    m = fam.memory
    one = m.bytes_per_voxel * frames + m.extra_frame_voxels
    many = items * (m.batch_bytes_per_voxel * frames + m.extra_frame_voxels)
    peak = dsize * px * max(one, many)
    if px >= m.workspace_min_px:
        peak += m.constant_bytes
    return peak


def peak_bytes(job: DecodeJob, fam: Family, *, tile_px: int | None, overlap_px: int,
               frame_chunk: int | None, slice_batch: bool, geometry: Geometry = "engine",
               host_output: bool = False) -> int:
    """Peak allocated bytes of a local decode (weights added when the VAE is not resident).

    Args:
        tile_px: spatial tile cap in output pixels (None: whole frames).
        overlap_px: output pixels shared by neighbouring tiles.
        frame_chunk: latent frames per temporal chunk (video), None: all frames at once.
        slice_batch: one batch item at a time.
        geometry: ``engine`` (the engine's tiler for images) or ``diffusers`` (diffusers' own tiling,
            as in the calibration data).
        host_output: video whose finished frames stream to host memory (``extension.executors``): temporal
            chunks (``frame_chunk`` set, HunyuanVideo) count one chunk and the previous chunk's blend frames,
            spatial tiles (no ``frame_chunk``, Wan) one tile's video and the blend strips next to it, instead of
            the whole video (diffusers' own loops keep every chunk and every tile until the end).
    """
    m = fam.memory
    dsize = dtype_bytes(decode_dtype(job, fam))
    sc = fam.spatial_compression
    frames_out = job.frames or 1
    out_vox = job.batch * frames_out * job.height * job.width
    fr = _frames_per_chunk(fam, frame_chunk, frames_out)
    chunked = fam.video and (fam.tiling.always_chunked or frame_chunk is not None) and fr < frames_out
    held_frames = job.batch * frames_out  # output frames the GPU holds at once
    if host_output and chunked and frame_chunk is not None:
        blend = min(fam.tiling.frame_chunk_overlap, frame_chunk - 1) * fam.temporal_compression
        held_frames = fr + blend
    held_vox = held_frames * job.height * job.width
    if tile_px is None:
        items = 1 if (slice_batch or chunked) else job.batch
        peak = region_peak(fam, dsize, job.height * job.width, fr, items)
        if chunked or (slice_batch and job.batch > 1):
            peak += dsize * m.stitch_bytes_per_voxel * held_vox
            if not fam.video:  # finished items wait in the output
                peak += dsize * 3 * out_vox
    else:
        ty, tx = spatial_tiles(job, fam, tile_px, overlap_px, geometry=geometry)
        tile = max(s for _, s in ty) * max(s for _, s in tx) * sc * sc
        decoded = sum(s for _, s in ty) * sum(s for _, s in tx) * sc * sc
        bpv = m.tile_bytes_per_voxel or m.bytes_per_voxel
        peak = dsize * tile * (bpv * fr + m.extra_frame_voxels) + m.tile_constant_bytes
        if tile >= m.tile_workspace_min_px:
            peak += m.tile_workspace_bytes
        if fam.video and host_output and frame_chunk is None:
            # spatial tiles streamed to host one item at a time (Wan): the tile's video, the blend strips of the
            # row above (the frame's width) and of the tile to the left
            tile_w = max(s for _, s in tx) * sc
            peak += dsize * m.stitch_bytes_per_voxel * frames_out * (tile + overlap_px * (job.width + tile_w))
        elif fam.video or geometry == "diffusers":
            peak += dsize * (m.overlap_bytes_per_voxel * max(0, decoded - job.height * job.width) * held_frames
                             + m.stitch_bytes_per_voxel * held_vox)
        else:  # engine tiler: the output buffer plus one weighted tile (3 channels each)
            peak += dsize * 3 * (out_vox + 2 * tile)
    if not job.vae_resident:
        peak += fam.weights_bytes_fp16 * dsize / 2
    return int(peak)


def exact_tiles(job: DecodeJob, fam: Family, tile_px: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Output-pixel tiles (no overlap) of exact tiling at full resolution, as extension/stream.py cuts them."""
    return axis_tiles(job.height, tile_px, 0), axis_tiles(job.width, tile_px, 0)


def exact_peak_bytes(job: DecodeJob, fam: Family, tile_px: int, *, margin: float | None = None) -> int:
    """Peak bytes of exact tiling (extension/stream.py), one item at a time.

    ``margin * (whole-image buffers + one tile's working set with its 1 px context + workspace)``,
    plus the finished items of a batch and the weights when not resident. Analytic (from the
    decoder's channels), so ``margin`` (default: the family's ``exact_margin``) > 1 until a GPU run
    measures it; benchmarks pass ``margin=1.0`` for the bare figure.

    Raises:
        ValueError: the family has no exact-tiling model (``memory.exact_buffer_elements`` unset).
    """
    m = fam.memory
    if m.exact_buffer_elements is None:
        raise ValueError(f"{job.family} has no exact-tiling memory model (memory.exact_buffer_elements)")
    dsize = dtype_bytes(decode_dtype(job, fam))
    px = job.height * job.width
    ty, tx = exact_tiles(job, fam, tile_px)
    tile = (max(s for _, s in ty) + 2) * (max(s for _, s in tx) + 2)
    peak = dsize * m.exact_buffer_elements * px + tile * (m.exact_tile_elements * dsize + m.exact_tile_f32_elements * 4)
    if tile >= m.tile_workspace_min_px:
        peak += m.tile_workspace_bytes
    peak = peak * (m.exact_margin if margin is None else margin) + dsize * 3 * px * (job.batch - 1)
    if not job.vae_resident:
        peak += fam.weights_bytes_fp16 * dsize / 2
    return int(peak)


def exact_seconds(job: DecodeJob, fam: Family, speed: SpeedModel, tile_px: int, *,
                  sched: passes.Schedule | None = None) -> float:
    """Seconds of exact tiling: a full decode's time x ``exact_time_factor`` plus a fixed cost per tile step
    (launches): the steps of the family's pass schedule (:func:`policy.passes.steps`, ``sched`` when the
    caller has it), else ``exact_passes`` x the output's tiles."""
    t = fam.timing
    sched = sched or exact_schedule(fam, offload=False)
    if sched is not None:
        sc = fam.spatial_compression
        steps = passes.steps(sched, job.height // sc, job.width // sc, tile_px)
    else:
        ty, tx = exact_tiles(job, fam, tile_px)
        steps = t.exact_passes * len(ty) * len(tx)
    return job.batch * (speed.full(job.height * job.width) * t.exact_time_factor
                        + steps * t.exact_step_h200_s * speed.card_factor)


def exact_schedule(fam: Family, *, offload: bool) -> passes.Schedule | None:
    """The pass schedule of exact tiling for the family's decoder (None: no decoder config). Offloaded
    plans write a narrowing resnet's output into a new buffer (fewer bytes moved), in-memory ones into its
    input's storage (less memory)."""
    d = fam.decoder
    if d is None or fam.decoder_widths is None:
        return None
    return _schedule(tuple(fam.decoder_widths), d.layers_per_block, fam.latent_channels, d.out_channels, d.mid_attention,
                     offload)


@functools.lru_cache(maxsize=64)
def _schedule(block_out_channels: tuple[int, ...], layers_per_block: int, latent_channels: int, out_channels: int,
              mid_attention: bool, offload: bool) -> passes.Schedule:
    """A pure function of the decoder config, memoised (decide() needs it for every plan it costs)."""
    layers = passes.decoder_layers(block_out_channels, layers_per_block, latent_channels=latent_channels,
                                   out_channels=out_channels, mid_attention=mid_attention)
    return passes.schedule(layers, narrow_in_place=not offload)


def link_gbs(gp: GpuProfile | None) -> tuple[float, str]:
    """Host<->device GB/s of the card and where the figure comes from."""
    if gp is not None and gp.host_link_gbs is not None:
        return gp.host_link_gbs, f"{gp.name}: measured {gp.host_link_gbs:g} GB/s"
    gen = gp.pcie_gen if gp is not None and gp.pcie_gen is not None else UNPROFILED_PCIE_GEN
    lanes = gp.pcie_lanes if gp is not None else 16
    gbs = PCIE_GBS[gen] * lanes / 16
    who = f"{gp.name}: " if gp is not None and gp.pcie_gen is not None else "unprofiled link assumed "
    return gbs, f"{who}PCIe {gen}.0 x{lanes}, {gbs:g} GB/s"


def offload_tile_bytes(job: DecodeJob, fam: Family, tile_px: int) -> int:
    """Device working set of offloaded exact tiling with tiles of ``tile_px``: the tile with its context,
    the next tile's inputs copied ahead and the finished tile on its way out (no margin).

    Raises:
        ValueError: the family has no offloaded model (``memory.exact_offload_tile_elements`` unset).
    """
    m = fam.memory
    if m.exact_offload_tile_elements is None:
        raise ValueError(f"{job.family} has no offloaded exact-tiling model (memory.exact_offload_tile_elements)")
    ty, tx = exact_tiles(job, fam, tile_px)
    tile = (max(s for _, s in ty) + 2) * (max(s for _, s in tx) + 2)
    out = tile * m.exact_offload_tile_elements * dtype_bytes(decode_dtype(job, fam))
    if tile >= m.tile_workspace_min_px:
        out += m.tile_workspace_bytes
    return int(out)


def offload_costs(job: DecodeJob, fam: Family, tile_px: int, budget_bytes: float, *,
                  sched: passes.Schedule | None = None,
                  moves: list[tuple[int, int]] | None = None) -> tuple[int, passes.Costs]:
    """(device budget of the whole-image buffers, bytes held and moved) of offloaded exact tiling that must
    fit ``budget_bytes`` of device memory: the buffers get what the tile's working set, the margin and (when
    not resident) the weights leave; :func:`policy.passes.placement` puts the rest in host memory.

    Raises:
        ValueError: the family has no decoder config or offloaded model.
    """
    sched = sched or exact_schedule(fam, offload=True)
    if sched is None:
        raise ValueError(f"{job.family} has no decoder config (decoder) for offloaded exact tiling")
    weights = 0 if job.vae_resident else fam.weights_bytes_fp16 * dtype_bytes(decode_dtype(job, fam)) / 2
    room = (budget_bytes - weights) / fam.memory.exact_margin - offload_tile_bytes(job, fam, tile_px)
    sc, room = fam.spatial_compression, max(0, int(room))
    return room, passes.costs(sched, job.height // sc, job.width // sc, tile_px, dtype_bytes(decode_dtype(job, fam)),
                              job.batch, room, moves=moves)


def offload_peak_bytes(job: DecodeJob, fam: Family, tile_px: int, costs: passes.Costs, *,
                       margin: float | None = None) -> int:
    """Peak device bytes of offloaded exact tiling: ``margin * (buffers on the device + tile working set)``,
    plus the weights when not resident."""
    m = fam.memory
    peak = (costs.device_bytes + offload_tile_bytes(job, fam, tile_px)) * (m.exact_margin if margin is None else margin)
    if not job.vae_resident:
        peak += fam.weights_bytes_fp16 * dtype_bytes(decode_dtype(job, fam)) / 2
    return int(peak)


def offload_seconds(job: DecodeJob, fam: Family, speed: SpeedModel, tile_px: int, costs: passes.Costs,
                    gp: GpuProfile | None, *, sched: passes.Schedule | None = None) -> tuple[float, float, str]:
    """(seconds, copy seconds, source) of offloaded exact tiling: exact tiling's compute (:func:`exact_seconds`)
    and the copies (bytes moved at the slower of the card's link and the CPU's staging copies) overlap, and
    :data:`OVERLAP_LOSS` of the shorter of the two shows."""
    compute = exact_seconds(job, fam, speed, tile_px, sched=sched)
    rate, src = host_copy_rate(gp)
    copy = costs.moved_bytes / rate
    return overlapped(compute, copy), copy, f"{costs.moved_bytes / 1e9:.1f} GB moved at {src}, overlapped with the compute"


def overlapped(compute: float, copy: float) -> float:
    """Seconds of compute and copies that overlap (the exact tilers' copy stream, one tile ahead): the longer of
    the two plus :data:`OVERLAP_LOSS` of the shorter."""
    return max(compute, copy) + OVERLAP_LOSS * min(compute, copy)


def host_copy_rate(gp: GpuProfile | None) -> tuple[float, str]:
    """(bytes per second, source) of host<->device copies: the slower of the card's link and the CPU's staging
    copies (:data:`HOST_COPY_GBS`, assumed)."""
    gbs, src = link_gbs(gp)
    rate = min(gbs, HOST_COPY_GBS) * 1e9
    return rate, f"{rate / 1e9:g} GB/s ({src}; CPU staging {HOST_COPY_GBS:g} GB/s assumed)"


def _rows_for(gp: GpuProfile, dsize: int) -> list[GpuRow]:
    """Rows usable for the SD decoder at ``dsize`` bytes (seed: sd15 = fp16, sdxl = stock fp32)."""
    out = []
    for r in gp.rows:
        rb = dtype_bytes(r.dtype) if r.dtype else (4 if r.model == "sdxl" else 2)
        if rb == dsize and r.model in ("sd15", "sdxl", "sdxl_fp16", "flux", "sd3"):
            out.append(r)
    return out


def _interp(rows: Sequence[GpuRow], px: float) -> float:
    """Full-decode seconds at ``px`` pixels from rows: piecewise linear in pixels, proportional below."""
    pts: dict[int, list[float]] = {}
    for r in rows:
        pts.setdefault(r.size * r.size, []).append(r.time_s)
    xs = sorted(pts)
    ys = [sorted(pts[x])[len(pts[x]) // 2] for x in xs]
    if px <= xs[0] or len(xs) == 1:
        return ys[0] * px / xs[0]
    for i in range(1, len(xs)):
        if px <= xs[i] or i == len(xs) - 1:
            slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
            return max(ys[i - 1] + slope * (px - xs[i - 1]), ys[0] * px / xs[0] * 0.5)
    raise AssertionError("unreachable")


class SpeedModel:
    """Seconds of local decodes on one card for one family, with its source."""

    def __init__(self, fam: Family, gp: GpuProfile | None, dsize: int, settings: DecodeSettings) -> None:
        self.fam, self.dsize = fam, dsize
        t = fam.timing
        self.rows: list[GpuRow] = []
        self.rows_scale = 1.0
        if gp is not None and t.profile_model == "sd":
            self.rows = _rows_for(gp, dsize)
            if not self.rows:
                other = _rows_for(gp, 2 if dsize == 4 else 4)
                if other:
                    self.rows = other
                    self.rows_scale = t.fp32_factor if dsize == 4 else 1 / t.fp32_factor
        # card speed against an H200, from the profile's fp16 SD rows at 1 MP
        card: float | None = None
        if gp is not None:
            fp16 = _rows_for(gp, 2)
            fp32 = _rows_for(gp, 4)
            if fp16:
                card = _interp(fp16, 1024 * 1024) / H200_SD15_1MP_S
            elif fp32:
                card = _interp(fp32, 1024 * 1024) / t.fp32_factor / H200_SD15_1MP_S
        if card is not None and gp is not None:
            self.card_factor, self.card_source = card, f"{gp.name} profile ({card:.2f}x an H200)"
        else:
            self.card_factor = settings.generic_speed_factor
            self.card_source = f"unprofiled card assumed {settings.generic_speed_factor:g}x slower than an H200"
        if self.rows and gp is not None:
            scale = "" if self.rows_scale == 1.0 else f", scaled x{self.rows_scale:.2f} for dtype"
            self.source = f"{gp.name} profile rows ({len(self.rows)}), interpolated by pixels{scale}"
        else:
            self.source = f"generic: {fam.architecture} H200 measurement x {self.card_source}"

    def full(self, voxels: float) -> float:
        if self.rows:
            return _interp(self.rows, voxels) * self.rows_scale * self.fam.timing.relative_cost
        t = self.fam.timing
        per = t.h200_seconds_per_voxel_fp16 * (t.fp32_factor if self.dsize == 4 else 1.0)
        return voxels * per * self.card_factor

    def per_tile(self) -> float:
        return self.fam.timing.per_tile_h200_s * self.card_factor


def decoded_work(job: DecodeJob, fam: Family, *, tile_px: int | None, overlap_px: int, frame_chunk: int | None,
                 frame_overlap: int) -> tuple[int, int, int]:
    """``(voxels decoded per item, tiles, chunks)`` of a local plan: overlapping tiles and chunks decode
    some pixels and frames more than once, which is why smaller tiles and shorter chunks are slower."""
    sc = fam.spatial_compression
    tiles = 1
    if tile_px is None:
        area = job.height * job.width
    else:
        ty, tx = spatial_tiles(job, fam, tile_px, overlap_px)
        area = sum(s for _, s in ty) * sum(s for _, s in tx) * sc * sc
        tiles = len(ty) * len(tx)
    frames_out = job.frames or 1
    decoded_frames = frames_out
    chunks = 1
    if fam.video and frame_chunk is not None and not fam.tiling.always_chunked:
        lat = latent_frames(job, fam)
        ch = temporal_chunks(lat, frame_chunk + 1, frame_overlap + 1)
        chunks = len(ch)
        decoded_frames = sum((s - 1) * fam.temporal_compression + 1 for _, s in ch) if chunks > 1 else frames_out
    return area * decoded_frames, tiles, chunks


def local_seconds(job: DecodeJob, fam: Family, speed: SpeedModel, *, tile_px: int | None, overlap_px: int,
                  frame_chunk: int | None, frame_overlap: int, slice_batch: bool) -> float:
    """Seconds of a local GPU decode: decoded voxels (overlaps counted) plus a fixed cost per tile/chunk."""
    voxels, tiles, chunks = decoded_work(job, fam, tile_px=tile_px, overlap_px=overlap_px, frame_chunk=frame_chunk,
                                         frame_overlap=frame_overlap)
    one = speed.full(voxels)
    per_item = one + (tiles * chunks - (1 if tiles * chunks == 1 else 0)) * speed.per_tile()
    if slice_batch or tile_px is not None:
        return per_item * job.batch
    # whole batch at once: 2 images cost 2x one (H200: 0.176 s vs 2 x 0.088 s), 4 cost 3.5x (0.308 s)
    return per_item * job.batch * (1.0 if job.batch <= 2 else 0.87)


def cpu_host_bytes(job: DecodeJob, fam: Family, *, tile_px: int | None, overlap_px: int, frame_chunk: int | None,
                   slice_batch: bool) -> int:
    """Host bytes of a float32 CPU decode: the same decode's float32 GPU estimate (:func:`peak_bytes`, weights
    excluded: they are in host memory already) x :data:`CPU_HOST_PER_GPU_BYTE`."""
    j32 = dataclasses.replace(job, dtype="float32", vae_resident=True)
    gpu = peak_bytes(j32, fam, tile_px=tile_px, overlap_px=overlap_px, frame_chunk=frame_chunk,
                     slice_batch=slice_batch, geometry="diffusers" if fam.video else "engine")
    return int(gpu * CPU_HOST_PER_GPU_BYTE)


def cpu_exact_host_bytes(job: DecodeJob, fam: Family, tile_px: int) -> int:
    """Host bytes of exact tiles on the CPU (float32): :func:`exact_peak_bytes` of the same decode, weights
    excluded (the CPU measured 0.95-1.03x the analytic figure that estimate multiplies by the family's margin)."""
    return exact_peak_bytes(dataclasses.replace(job, dtype="float32", vae_resident=True), fam, tile_px)


def cpu_seconds(job: DecodeJob, fam: Family) -> float:
    return job.batch * (job.frames or 1) * job.height * job.width * CPU_SECONDS_PER_VOXEL * fam.timing.relative_cost


def remote_estimate(job: DecodeJob, fam: Family, net: NetworkStats, fmt: ResponseFormat) -> Estimate:
    """Seconds of a remote decode: round trip + upload + server decode + download + encode/decode."""
    lat_bytes = job.batch * fam.latent_channels * latent_frames(job, fam) * (job.height // fam.spatial_compression) \
        * (job.width // fam.spatial_compression) * dtype_bytes(job.dtype or fam.default_dtype)
    px = job.batch * (job.frames or 1) * job.height * job.width
    down = int(px * FORMAT_BYTES_PER_PX[fmt])
    if net.server_seconds_per_voxel is not None:
        server = px * net.server_seconds_per_voxel
        ssrc = "server speed inferred from earlier replies" if net.server_inferred else "measured server speed"
    else:
        server = px * fam.timing.h200_seconds_per_voxel_fp16 * REMOTE_SPEED_FACTOR
        ssrc = f"server assumed {REMOTE_SPEED_FACTOR:g}x slower than an H200"
    secs = net.rtt_s + lat_bytes / net.up_bytes_per_s + server + down / net.down_bytes_per_s \
        + px / 1e6 * FORMAT_S_PER_MP[fmt]
    src = f"network {net.source} (rtt {net.rtt_s * 1000:.0f} ms, {net.down_bytes_per_s * 8 / 1e6:.0f} Mbit/s down); {ssrc}"
    return Estimate(peak_bytes=0, seconds=secs, peak_source="remote: no local GPU memory", seconds_source=src,
                    bytes_up=int(lat_bytes), bytes_down=down)
