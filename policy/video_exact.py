"""What exact HunyuanVideo tiles (``extension/stream_hunyuan.py``) hold and move, counted from the decoder config.

Pure and analytic: the decoder's passes (conv_in; per resnet two; the mid block's attention two; per upsampler
one; the output one) at the resolutions the config gives, and the executor's tile grid over each pass. The
counts equal the executor's own ledger (``tests/test_video_exact.py`` decodes and compares):

- ``buffer_elements``: the most whole-video buffer elements alive at once (one item, wherever they live);
- ``device_buffer_elements``/``host_buffer_elements``: the same on each side, for a placement: a device budget
  keeps the buffers that would move the most per byte on the device (:func:`policy.passes.greedy_host`, as image
  exact tiles), the rest and the finished video in host memory;
- ``tile_elements``: the most elements one tile's region (with its context) and output hold on the device;
- ``kv_elements``: the mid block's keys and values, kept on the device (latent resolution);
- ``moved_elements``: elements read from and written to the buffers (and the latent) in one decode (one item);
  ``host_moved_elements``: those of the buffers in host memory, which cross the host link;
- ``steps``: tile steps (one per tile per pass).

The convolutions compute no more than a full decode's: a tile's context is read, not decoded (unlike
overlapping tiles); what costs time is the copies, the statistics and many smaller kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from hybrid_vae.policy.estimate import host_copy_rate, latent_frames, overlapped
from hybrid_vae.policy.model import Estimate
from hybrid_vae.policy.passes import greedy_host

if TYPE_CHECKING:
    from hybrid_vae.policy.estimate import SpeedModel
    from hybrid_vae.policy.model import DecodeJob
    from hybrid_vae.policy.profiles import Family, GpuProfile

__all__ = ["VideoExactCounts", "VideoPass", "hunyuan_counts", "hunyuan_passes", "video_exact_counts",
           "video_exact_estimate", "video_exact_room"]

THW = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class VideoPass:
    """One pass: ``c_in`` channels at ``src`` (frames, height, width) in, ``c_out`` at ``dst`` out; ``ctx``: a
    causal 3x3x3 convolution (2 frames before, 1 pixel each side); ``up``: the upsampling before it;
    ``residual``: channels of the resnet input read back for the shortcut; ``kind`` names it."""

    kind: str
    c_in: int
    c_out: int
    src: THW
    dst: THW
    ctx: bool = True
    up: THW = (1, 1, 1)
    residual: int = 0


@dataclasses.dataclass(frozen=True)
class VideoExactCounts:
    """Elements one item's decode holds and copies (see the module's docs); ``device_buffer_elements`` and
    ``host_buffer_elements``: the most whole-video buffer elements alive at once on each side (the placement of
    :func:`hunyuan_counts`' ``device_budget``); ``host_moved_elements``: those copied over the host link (reads and
    writes of the buffers in host memory)."""

    buffer_elements: int
    tile_elements: int
    kv_elements: int
    moved_elements: int
    steps: int
    device_buffer_elements: int = 0
    host_buffer_elements: int = 0
    host_moved_elements: int = 0
    buffers: int = 0  # whole-video buffers made (one per pass but the keys/values one)
    host: frozenset[int] = frozenset()  # those in host memory (numbered as made)


def hunyuan_passes(widths: tuple[int, ...], layers_per_block: int, *, latent_channels: int, latent: THW,
                   temporal_compression: int = 4, spatial_compression: int = 8, mid_attention: bool = True,
                   out_channels: int = 3) -> list[VideoPass]:
    """The passes of diffusers' ``HunyuanVideoDecoder3D`` with ``block_out_channels=widths`` over ``latent``
    (frames, height, width); its up blocks upsample space while ``i < log2(spatial)``, and time in the
    ``log2(temporal)`` blocks before the last (the class's rule for a temporal compression of 4).

    Raises:
        ValueError: a temporal compression other than 4 (the class refuses it too).
    """
    if temporal_compression != 4:
        raise ValueError(f"temporal_compression={temporal_compression}: HunyuanVideo's decoder takes 4 only")
    rev = list(reversed(widths))
    c = rev[0]
    ps = [VideoPass("conv_in", latent_channels, c, latent, latent)]
    at = latent

    def resnet(cin: int, cout: int, where: THW) -> None:
        ps.append(VideoPass("res1", cin, cout, where, where))
        ps.append(VideoPass("res2", cout, cout, where, where, residual=cin))

    resnet(c, c, at)
    if mid_attention:
        ps.append(VideoPass("attn_kv", c, c, at, at, ctx=False))
        ps.append(VideoPass("attn", c, c, at, at, ctx=False))
    resnet(c, c, at)
    n = len(widths)
    n_sp, n_t = int(math.log2(spatial_compression)), int(math.log2(temporal_compression))
    for i in range(n):
        cout = rev[i]
        for j in range(layers_per_block + 1):
            resnet(c if j == 0 else cout, cout, at)
        c = cout
        fs = 2 if i < n_sp else 1
        ft = 2 if (i >= n - 1 - n_t and i != n - 1) else 1
        if fs > 1 or ft > 1:
            dst = (1 + ft * (at[0] - 1), fs * at[1], fs * at[2])
            ps.append(VideoPass("up", c, c, at, dst, up=(ft, fs, fs)))
            at = dst
    ps.append(VideoPass("out", c, out_channels, at, at))
    return ps


def _boxes(n: int, tile: int) -> list[tuple[int, int]]:
    return [(a, min(a + tile, n)) for a in range(0, n, tile)]


def _span(boxes: list[tuple[int, int]], before: int, after: int, n_dst: int, f: int, *, time: bool) -> int:
    """The sum of the source spans a pass copies along one axis (its context clamped at the edges, mapped
    through the upsampling)."""
    span = 0
    for lo, hi in boxes:
        first, last = max(0, lo - before), min(n_dst - 1, hi + after - 1)
        if time:
            src = [0 if u == 0 else 1 + (u - 1) // f for u in (first, last)]
        else:
            src = [u // f for u in (first, last)]
        span += src[1] - src[0] + 1
    return span


def hunyuan_counts(ps: list[VideoPass], *, tile_px: int, tile_frames: int, out: THW,
                   device_budget: int | None = 0) -> VideoExactCounts:
    """What the executor holds and moves for one item decoded over ``ps`` with tiles of ``tile_px`` output pixels
    and ``tile_frames`` output frames (``out``: the output's frames, height, width).

    ``device_budget``: elements of whole-video buffers that may live on the device at any pass (0: all in host
    memory; None: all on the device). Each pass but the keys/values one writes one buffer, alive until its last
    reader; :func:`policy.passes.greedy_host` places them, as the image executor's buffers, and the finished video
    (the last pass's buffer) stays in host memory whatever the budget. The executor places them the same way."""
    tile = kv = moved = steps = 0
    size: list[int] = []
    life: list[list[int]] = []
    traffic: list[int] = []
    cur: int | None = None  # the buffer holding the activation (None: the latent, on the device)
    res_in: int | None = None  # a resnet's input (its second pass reads it back for the shortcut)

    def read(b: int | None, n: int, at: int) -> None:
        if b is not None:
            traffic[b] += n
            life[b][1] = at

    def write(n: int, at: int) -> int:
        size.append(n)
        life.append([at, at])
        traffic.append(n)
        return len(size) - 1

    for i, p in enumerate(ps):
        t, h, w = p.dst
        scale = out[1] / h
        tf = max(1, math.ceil(tile_frames * t / out[0]))
        ts = max(1, int(tile_px / scale))
        bt, by, bx = _boxes(t, tf), _boxes(h, ts), _boxes(w, ts)
        n_boxes = len(bt) * len(by) * len(bx)
        steps += n_boxes
        src_n = p.c_in * p.src[0] * p.src[1] * p.src[2]
        dst_n = p.c_out * t * h * w
        if p.kind in ("attn_kv", "attn"):
            kv = max(kv, 2 * src_n)
            moved += src_n + (dst_n if p.kind == "attn" else 0)
            read(cur, src_n, i)
            if p.kind == "attn":
                big = max(a - b for b, a in bt) * max(a - b for b, a in by) * max(a - b for b, a in bx)
                tile = max(tile, 2 * p.c_in * big)
                cur = write(dst_n, i)
            continue
        before, side = (2, 1) if p.ctx else (0, 0)
        st, sy, sx = (_span(bt, before, 0, t, p.up[0], time=True), _span(by, side, side, h, p.up[1], time=False),
                      _span(bx, side, side, w, p.up[2], time=False))
        span = p.c_in * st * sy * sx
        moved += span + dst_n + (p.residual * t * h * w if p.residual else 0)
        read(cur, span, i)
        if p.kind == "res1":
            res_in = cur
        if p.residual:
            read(res_in, p.residual * t * h * w, i)
        big_t, big_y, big_x = (max(a - b for b, a in bs) for bs in (bt, by, bx))
        tile = max(tile, p.c_in * (big_t + before) * (big_y + 2 * side) * (big_x + 2 * side)
                   + p.c_out * big_t * big_y * big_x)
        cur = write(dst_n, i)
    spans = [(a, b) for a, b in life]
    if device_budget is None:
        host: frozenset[int] = frozenset()
    else:
        host = greedy_host(size, spans, traffic, device_budget, host=frozenset({len(size) - 1}))

    def widest(which: Callable[[int], bool]) -> int:
        return max(sum(n for j, (n, (a, b)) in enumerate(zip(size, spans, strict=True)) if a <= q <= b and which(j))
                   for q in range(len(ps)))

    return VideoExactCounts(buffer_elements=widest(lambda j: True), tile_elements=tile, kv_elements=kv,
                            moved_elements=moved, steps=steps,
                            device_buffer_elements=widest(lambda j: j not in host),
                            host_buffer_elements=widest(lambda j: j in host),
                            host_moved_elements=sum(traffic[j] for j in host), buffers=len(size), host=host)


@functools.lru_cache(maxsize=256)
def _counts(widths: tuple[int, ...], layers_per_block: int, latent_channels: int, latent: THW, mid_attention: bool,
            out_channels: int, tile_px: int, tile_frames: int, out: THW, device_budget: int | None) -> VideoExactCounts:
    ps = hunyuan_passes(widths, layers_per_block, latent_channels=latent_channels, latent=latent,
                        mid_attention=mid_attention, out_channels=out_channels)
    return hunyuan_counts(ps, tile_px=tile_px, tile_frames=tile_frames, out=out, device_budget=device_budget)


def video_exact_counts(job: DecodeJob, fam: Family, tile_px: int, tile_frames: int | None = None, *,
                       device_budget: int | None = 0) -> VideoExactCounts:
    """:func:`hunyuan_counts` of one item of ``job`` (memoised: a pure function of the config and the sizes), with
    ``tile_frames`` output frames per tile (None: the family's ``tiling.exact_tile_frames``) and ``device_budget``
    elements of whole-video buffers on the device (0: all in host memory; None: all on the device).

    Raises:
        ValueError: the family has no decoder config or no ``tiling.exact_tile_frames``.
    """
    if fam.decoder is None or fam.decoder_widths is None or fam.tiling.exact_tile_frames is None:
        raise ValueError(f"{job.family} has no exact video tiles (decoder, decoder_widths, tiling.exact_tile_frames)")
    sc, lat = fam.spatial_compression, latent_frames(job, fam)
    return _counts(tuple(fam.decoder_widths), fam.decoder.layers_per_block, fam.latent_channels,
                   (lat, job.height // sc, job.width // sc), fam.decoder.mid_attention, fam.decoder.out_channels,
                   tile_px, tile_frames or fam.tiling.exact_tile_frames,
                   (1 + fam.temporal_compression * (lat - 1), job.height, job.width), device_budget)


def _tile_bytes(job: DecodeJob, fam: Family, c: VideoExactCounts, tile_px: int, dsize: int, *, host_buffers: bool) -> float:
    """Device bytes of the tile's working set (before the margin): the counted tile x 2, x 3 with host buffers (one
    more in flight on the copy stream), the keys and values, and the tile workspace."""
    device = float(((3 if host_buffers else 2) * c.tile_elements + c.kv_elements) * dsize)
    if tile_px * tile_px >= fam.memory.tile_workspace_min_px:
        device += fam.memory.tile_workspace_bytes
    return device


def video_exact_room(job: DecodeJob, fam: Family, tile_px: int, dsize: int, budget_bytes: float, *,
                     tile_frames: int | None = None) -> int:
    """Bytes of whole-video buffers that may stay on the device (per item) beside exact video tiles with host
    buffers within ``budget_bytes`` of device memory: what the margin, the weights (when not resident) and the
    tile's working set leave (0 when nothing is left)."""
    c = video_exact_counts(job, fam, tile_px, tile_frames)
    weights = 0 if job.vae_resident else fam.weights_bytes_fp16 * dsize / 2
    room = (budget_bytes - weights) / fam.memory.exact_margin - _tile_bytes(job, fam, c, tile_px, dsize,
                                                                           host_buffers=True)
    return max(0, int(room))


def video_exact_estimate(job: DecodeJob, fam: Family, speed: SpeedModel, gp: GpuProfile | None, tile_px: int,
                         dsize: int, *, host_buffers: bool = True, tile_frames: int | None = None,
                         device_budget: int = 0) -> Estimate:
    """Peak, host memory and seconds of exact video tiles of ``tile_px`` pixels and ``tile_frames`` output frames
    (None: the family's ``tiling.exact_tile_frames``) with the whole-video buffers in host memory
    (``host_buffers``; ``device_budget`` bytes of them may stay on the device, placed as :func:`hunyuan_counts`
    places them: 0, all in host memory) or all on the device. Fewer frames per tile: a smaller tile on the device,
    more tile steps, and more copies (each tile reads two earlier frames of context). Buffers on the device: fewer
    copies, more device memory.

    - Device: the tile's region and output, the region's normalised copy and the convolution's output
      (2 x the counted tile elements, assumed: the CPU measured 1.35-1.60x, ``bench/hunyuan_exact.py --memory``),
      with ``host_buffers`` one more counted tile in flight (the copy stream uploads the next tile's region, and
      for a resnet's second pass its residual, while this one computes, and the last output is on its way out:
      about 1.4x the counted tile, which with the CPU's measured 1.35-1.60x stays under 3 x 1.15), the mid
      block's keys and values (counted), the tile workspace, and the buffers on the device at their widest
      (counted; all of them and the batch's finished videos when not ``host_buffers``), x ``memory.exact_margin``;
      the weights when not resident.
    - Host (``host_buffers``): the buffers in host memory at their widest (counted) and the batch's finished videos.
    - Seconds: a full decode's x ``exact_time_factor`` (assumed, as image exact tiles), a fixed cost per tile
      step, and (``host_buffers``) the counted copies of the buffers in host memory at the slower of the card's
      link and the CPU's staging copies, overlapped with the compute as the image executor's
      (:func:`policy.estimate.overlapped`; the same copy stream, :class:`extension.stream_store.CudaMover`).
    """
    c = video_exact_counts(job, fam, tile_px, tile_frames,
                           device_budget=device_budget // dsize if host_buffers else None)
    m, t = fam.memory, fam.timing
    frames = 1 + fam.temporal_compression * (latent_frames(job, fam) - 1)
    device = _tile_bytes(job, fam, c, tile_px, dsize, host_buffers=host_buffers)
    out_elems = (fam.decoder.out_channels if fam.decoder else 3) * frames * job.height * job.width
    buffers = (c.host_buffer_elements + (job.batch - 1) * out_elems) * dsize
    if not host_buffers:
        buffers = (c.buffer_elements + (job.batch - 1) * out_elems) * dsize
        device += buffers
    else:
        device += c.device_buffer_elements * dsize
    peak = device * m.exact_margin + (0 if job.vae_resident else fam.weights_bytes_fp16 * dsize / 2)
    compute = (speed.full(frames * job.height * job.width) * t.exact_time_factor
               + c.steps * t.exact_step_h200_s * speed.card_factor) * job.batch
    if not host_buffers:
        where = f"whole-video buffers {buffers / 2**30:.1f} GiB on the GPU"
    elif c.device_buffer_elements:
        where = (f"whole-video buffers {c.device_buffer_elements * dsize / 2**30:.1f} GiB on the GPU, "
                 f"{buffers / 2**30:.1f} GiB in host memory")
    else:
        where = f"whole-video buffers {buffers / 2**30:.1f} GiB in host memory"
    frames_per_tile = tile_frames or fam.tiling.exact_tile_frames
    peak_source = (f"{job.family} exact video tiles (counted from the decoder config): tile {tile_px} px x "
                   f"{frames_per_tile} frames with context, keys/values, {where}, x{m.exact_margin:g} margin")
    seconds_source = f"{speed.source}; exact tiling x{t.exact_time_factor:g} (assumed) + {c.steps} tile steps"
    if not host_buffers:
        return Estimate(peak_bytes=int(peak), seconds=compute, peak_source=peak_source, seconds_source=seconds_source)
    rate, src = host_copy_rate(gp)
    moved = c.host_moved_elements * dsize * job.batch
    copy = moved / rate
    return Estimate(
        peak_bytes=int(peak), seconds=overlapped(compute, copy), peak_source=peak_source,
        seconds_source=f"{seconds_source}; {moved / 1e9:.1f} GB copied at {src}, overlapped with the compute",
        host_bytes=int(buffers), transfer_bytes=int(moved), transfer_seconds=copy)
