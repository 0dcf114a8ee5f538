"""The pass schedule of exact tiling, built from a decoder's layers: pure Python, shared by the executor
(``extension/stream.py`` runs it) and the estimates (``policy/estimate.py`` costs it).

Exact tiling runs the decoder *layer by layer over the whole image*: between two GroupNorms there is
one 3x3 convolution, so each step ("pass") goes over the image tile by tile with one pixel of context
and writes its tiles into a whole-image buffer, while the statistics of the next GroupNorm are summed
(docs/exact-tiling.md). A :class:`Schedule` lists those passes in order: the whole-image buffers each
pass reads (and with how much context), the buffers it writes, which buffers are allocated before it
and freed after it.

The whole-image buffers may live on the compute device or in host memory ("offloaded" exact tiling).
:func:`placement` chooses, for a byte budget on the device, which buffers go to the host: the buffers
that would move the most bytes per byte of their size stay on the device, as long as they fit during
their whole life. :func:`costs` then counts what the executor will hold on each side and the bytes it
will move between them. The executor calls the same :func:`placement`, so the estimate describes what
runs; tests/test_offload.py checks the executor's own counts against :func:`costs`.

Units: a buffer of ``channels`` at resolution ``level`` holds ``channels * H_l * W_l`` elements, level 0
being the latent and each upsampler doubling both sides; the last level is the output.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Literal

from hybrid_vae.policy.tiles import partition

Kind = Literal["conv_in", "resnet", "attention", "upsample", "out"]
Part = Literal["conv_in", "resnet1", "resnet2", "attn_kv", "attn_out", "upsample", "out"]
Role = Literal["activation", "hidden", "tokens", "output"]

#: Attention passes tile their queries with blocks this many times ``tile_px`` scaled to their resolution
#: (per side): every query block reads all keys and values, so larger blocks re-read them fewer times.
ATTENTION_TILE = 2
#: Keys and values stream through attention this many positions at a time (the float32 logits of a query
#: block then take ``ATTENTION_TILE^2 * KV_CHUNK / 16`` elements per pixel of ``tile_px``^2: 32 per pixel).
KV_CHUNK = 256
#: Smallest tile side (pixels at the pass's resolution) of any pass.
MIN_TILE = 8


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer of a decoder as exact tiling sees it.

    Attributes:
        kind: ``conv_in`` (the latent -> first activation; a pointwise ``post_quant_conv`` may come first),
            ``resnet`` (GroupNorm-SiLU-conv3x3 twice plus a shortcut), ``attention`` (GroupNorm, then
            single-scale self-attention over all positions, plus the input), ``upsample`` (nearest x2 then
            conv3x3), ``out`` (GroupNorm-SiLU-conv3x3 into the image).
        cin, cout: channels in and out.
        level: resolution of its input (0: the latent).
    """

    kind: Kind
    cin: int
    cout: int
    level: int


@dataclasses.dataclass(frozen=True)
class Buffer:
    """A whole-image buffer. ``tokens`` buffers hold attention keys or values, ``[positions, channels]``."""

    id: int
    role: Role
    channels: int
    level: int

    @property
    def per_item(self) -> bool:
        """False for the output, one buffer for the whole batch; True for buffers of one batch item."""
        return self.role != "output"


@dataclasses.dataclass(frozen=True)
class Access:
    """``channels`` of ``buffer`` read or written by a pass; ``halo``: pixels of context read around each tile."""

    buffer: int
    channels: int
    halo: int = 0


@dataclasses.dataclass(frozen=True)
class Pass:
    """One sweep over the image: ``layer``'s ``part``, tiled at resolution ``level``."""

    layer: int
    part: Part
    level: int
    reads: tuple[Access, ...]
    writes: tuple[Access, ...]
    alloc: tuple[int, ...] = ()
    free: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The passes of one batch item in order, and every buffer they use (``output`` is shared by the batch)."""

    layers: tuple[Layer, ...]
    buffers: tuple[Buffer, ...]
    passes: tuple[Pass, ...]
    levels: int
    output: int
    level_channels: tuple[int, ...] = ()  # the widest activation at each resolution
    halvings: tuple[int, ...] = ()  # tile_px is halved this often at each resolution (see tile_side)
    life: tuple[tuple[int, int], ...] = ()  # first and last pass of each buffer (see lifetimes)
    groups: tuple[Pass, ...] = ()  # one pass of each (resolution, tiling) kind: they share their tile grid
    group_of: tuple[int, ...] = ()  # the group of each pass


@dataclasses.dataclass(frozen=True)
class Costs:
    """What exact tiling of one decode holds and moves (bytes), for one placement of its buffers.

    Attributes:
        buffer_bytes: peak bytes of the whole-image buffers alive together, wherever they live.
        device_bytes / host_bytes: peak bytes of those on the compute device / in host memory.
        h2d_bytes / d2h_bytes: bytes copied host -> device / device -> host during the decode.
        steps: tile steps over all passes and batch items (each one a few kernel launches).
        passes: passes over all batch items.
        host: ids of the buffers in host memory.
    """

    buffer_bytes: int
    device_bytes: int
    host_bytes: int
    h2d_bytes: int
    d2h_bytes: int
    steps: int
    passes: int
    host: frozenset[int]

    @property
    def moved_bytes(self) -> int:
        return self.h2d_bytes + self.d2h_bytes


def decoder_layers(block_out_channels: Sequence[int], layers_per_block: int, *, latent_channels: int = 4,
                   out_channels: int = 3, mid_attention: bool = True) -> tuple[Layer, ...]:
    """The layers of a diffusers ``Decoder`` (``UpDecoderBlock2D`` blocks) from an ``AutoencoderKL`` config.

    The SD decoder is ``(128, 256, 512, 512)``, 2 layers per block: conv_in, the mid block (resnet,
    attention, resnet) at 512 channels, four up blocks of three resnets (upsampling after the first
    three), then GroupNorm-SiLU-conv_out.
    """
    if not block_out_channels or layers_per_block < 0:
        raise ValueError(f"block_out_channels={list(block_out_channels)}, layers_per_block={layers_per_block}: "
                         "give at least one block and layers_per_block >= 0")
    rev = list(reversed(block_out_channels))
    top = rev[0]
    layers = [Layer("conv_in", latent_channels, top, 0), Layer("resnet", top, top, 0)]
    if mid_attention:
        layers.append(Layer("attention", top, top, 0))
    layers.append(Layer("resnet", top, top, 0))
    ch = top
    for i, out_ch in enumerate(rev):
        for _ in range(layers_per_block + 1):
            layers.append(Layer("resnet", ch, out_ch, i))
            ch = out_ch
        if i < len(rev) - 1:
            layers.append(Layer("upsample", ch, ch, i))
    layers.append(Layer("out", ch, out_channels, len(rev) - 1))
    return tuple(layers)


def schedule(layers: Sequence[Layer], *, narrow_in_place: bool = True) -> Schedule:
    """The passes that run ``layers`` exactly, and their buffers.

    Rules (extension/stream.py follows them): conv_in writes a new activation ``x``. A resnet's first pass
    reads ``x`` with one pixel of context and writes its hidden activation ``h`` (a new buffer); the second
    reads ``h`` with context and ``x`` at the tile only (the shortcut), and writes into ``x``'s own storage
    when the output is not wider than the input, else into a new buffer (``x`` is then freed). Attention
    writes keys and values (two ``tokens`` buffers) from ``x``, then, query block by query block, reads
    all of them and writes into ``x``. An upsampler reads ``x`` with context and writes a buffer at twice
    the resolution (``x`` is freed). The last layer writes the output, which is allocated first and lives
    throughout.

    ``narrow_in_place`` (default True, the least memory): a resnet that narrows the channels writes into
    ``x``'s storage, which stays as wide as it was. False: into a new, narrower buffer (``x`` is freed after
    the pass), which moves fewer bytes when the wide one lives in host memory (offloaded plans use it).

    Raises:
        ValueError: layers that do not start with conv_in, end with out, or chain their channels.
    """
    if len(layers) < 2 or layers[0].kind != "conv_in" or layers[-1].kind != "out":
        raise ValueError("a decoder's layers start with conv_in and end with out")
    if any(a.cout != b.cin for a, b in itertools.pairwise(layers)):
        raise ValueError("each layer's input channels must be the previous layer's output channels")
    buffers: list[Buffer] = []
    passes: list[Pass] = []

    def new(role: Role, channels: int, level: int) -> int:
        buffers.append(Buffer(len(buffers), role, channels, level))
        return len(buffers) - 1

    levels = layers[-1].level + 1
    out = new("output", layers[-1].cout, layers[-1].level)
    x = -1
    for i, ly in enumerate(layers):
        lv = ly.level
        if ly.kind == "conv_in":
            x = new("activation", ly.cout, lv)
            passes.append(Pass(i, "conv_in", lv, (), (Access(x, ly.cout),), alloc=(x,)))
        elif ly.kind == "resnet":
            h = new("hidden", ly.cout, lv)
            passes.append(Pass(i, "resnet1", lv, (Access(x, ly.cin, 1),), (Access(h, ly.cout),), alloc=(h,)))
            if ly.cout == ly.cin or (narrow_in_place and ly.cout < ly.cin):  # into x's own storage
                passes.append(Pass(i, "resnet2", lv, (Access(h, ly.cout, 1), Access(x, ly.cin)),
                                   (Access(x, ly.cout),), free=(h,)))
            else:
                o = new("activation", ly.cout, lv)
                passes.append(Pass(i, "resnet2", lv, (Access(h, ly.cout, 1), Access(x, ly.cin)),
                                   (Access(o, ly.cout),), alloc=(o,), free=(h, x)))
                x = o
        elif ly.kind == "attention":
            k, v = new("tokens", ly.cout, lv), new("tokens", ly.cout, lv)
            passes.append(Pass(i, "attn_kv", lv, (Access(x, ly.cin),), (Access(k, ly.cout), Access(v, ly.cout)),
                               alloc=(k, v)))
            passes.append(Pass(i, "attn_out", lv, (Access(x, ly.cin), Access(k, ly.cout), Access(v, ly.cout)),
                               (Access(x, ly.cout),), free=(k, v)))
        elif ly.kind == "upsample":
            o = new("activation", ly.cout, lv + 1)
            passes.append(Pass(i, "upsample", lv, (Access(x, ly.cin, 1),), (Access(o, ly.cout),), alloc=(o,),
                               free=(x,)))
            x = o
        else:  # out
            passes.append(Pass(i, "out", lv, (Access(x, ly.cin, 1),), (Access(out, ly.cout),), free=(x,)))
    widest = [0] * levels
    for ly in layers:
        widest[ly.level] = max(widest[ly.level], ly.cin if ly.kind != "conv_in" else ly.cout,
                               ly.cout if ly.kind != "upsample" else 0)
        if ly.kind == "upsample":
            widest[ly.level + 1] = max(widest[ly.level + 1], ly.cout)
    halve = tuple(math.ceil(math.log2(c / widest[-1]) / 2) if c > widest[-1] else 0 for c in widest)
    last = len(passes) - 1
    start, end = [0] * len(buffers), [last] * len(buffers)  # the output: throughout
    for i, p in enumerate(passes):
        for b in p.alloc:
            start[b] = i
        for b in p.free:
            end[b] = i
    keys: dict[tuple[int, str], int] = {}
    for p in passes:
        keys.setdefault(_grid_key(p), len(keys))
    groups = {i: p for p in reversed(passes) for k, i in keys.items() if k == _grid_key(p)}
    return Schedule(tuple(layers), tuple(buffers), tuple(passes), levels, out, tuple(widest), halve,
                    tuple(zip(start, end, strict=True)), tuple(groups[i] for i in range(len(keys))),
                    tuple(keys[_grid_key(p)] for p in passes))


def _grid_key(p: Pass) -> tuple[int, str]:
    """Passes with the same key have the same tile grid (see :func:`tile_side`)."""
    return p.level, p.part if p.part in ("upsample", "attn_kv", "attn_out") else ""


def _side(sched: Schedule, tile_px: int, level: int) -> int:
    return max(MIN_TILE, tile_px >> sched.halvings[level])


def tile_side(sched: Schedule, tile_px: int, p: Pass) -> int:
    """Tile side of pass ``p`` in pixels of its own resolution (at least :data:`MIN_TILE`).

    ``tile_px`` at the output's resolution; at a lower one, ``tile_px`` halved as often as needed for the
    tile to hold no more elements than the output's (``C_level / C_out`` more channels: ``ceil(log2(ratio)
    / 2)`` halvings, C the widest activation at that resolution). The tile's working set stays bounded by
    ``tile_px`` while the low-resolution passes take far fewer steps than with ``tile_px`` scaled by the
    resolution (SD decoder: ``tile_px / 2`` at 1/2, 1/4 and 1/8 resolution instead of 1/2, 1/4, 1/8 of
    it), and every side is ``tile_px`` times a power of two, so an image that is a multiple of ``tile_px``
    splits into equal tiles at every resolution. An upsampler's tiles are half its output resolution's
    side (its output tile is that resolution's tile). Attention passes tile their queries by
    :data:`ATTENTION_TILE` x ``tile_px`` scaled to their resolution (keys and values are streamed).
    """
    if p.part in ("attn_kv", "attn_out"):
        return ATTENTION_TILE * max(MIN_TILE, round(tile_px / (1 << (sched.levels - 1 - p.level))))
    if p.part == "upsample":
        return max(MIN_TILE // 2, round(_side(sched, tile_px, p.level + 1) / 2))
    return _side(sched, tile_px, p.level)


def grid(sched: Schedule, lh: int, lw: int, tile_px: int, p: Pass) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The tiles of pass ``p`` (rows, columns) for a latent of ``lh x lw``: a partition, no overlap."""
    side = tile_side(sched, tile_px, p)
    return partition(lh << p.level, side), partition(lw << p.level, side)


def buffer_bytes(sched: Schedule, lh: int, lw: int, dsize: int, batch: int) -> list[int]:
    """Bytes of each buffer (the output holds the whole batch)."""
    return [b.channels * (lh << b.level) * (lw << b.level) * dsize * (1 if b.per_item else batch)
            for b in sched.buffers]


def lifetimes(sched: Schedule) -> list[tuple[int, int]]:
    """For each buffer, the first and last pass (indices into ``sched.passes``) during which it is alive."""
    return list(sched.life)


def counts(sched: Schedule, lh: int, lw: int, tile_px: int, p: Pass) -> tuple[int, int]:
    """How many tiles :func:`grid` cuts pass ``p`` into along each axis (without cutting it)."""
    side = tile_side(sched, tile_px, p)
    return -(-(lh << p.level) // side), -(-(lw << p.level) // side)


def traffic(sched: Schedule, lh: int, lw: int, tile_px: int) -> list[tuple[int, int]]:
    """Elements each buffer would move per batch item if it lived in host memory: (host -> device, device -> host).

    A read with ``halo`` h of a pass with ny x nx tiles moves ``channels x (H + 2h(ny-1)) x (W + 2h(nx-1))``
    (context clipped at the image edges); attention's keys and values are read whole by every query block;
    a write moves the buffer's ``channels x H x W``.
    """
    out = [(0, 0)] * len(sched.buffers)
    per_group = [counts(sched, lh, lw, tile_px, g) for g in sched.groups]
    for p, gi in zip(sched.passes, sched.group_of, strict=True):
        ny, nx = per_group[gi]
        h, w = lh << p.level, lw << p.level
        for a in p.reads:
            if sched.buffers[a.buffer].role == "tokens":
                n = a.channels * h * w * ny * nx
            else:
                n = a.channels * (h + 2 * a.halo * (ny - 1)) * (w + 2 * a.halo * (nx - 1))
            up, down = out[a.buffer]
            out[a.buffer] = (up + n, down)
        for a in p.writes:
            lv = sched.buffers[a.buffer].level
            up, down = out[a.buffer]
            out[a.buffer] = (up, down + a.channels * (lh << lv) * (lw << lv))
    return out


def steps(sched: Schedule, lh: int, lw: int, tile_px: int) -> int:
    """Tile steps of one batch item (the executor's progress total)."""
    tiles = [a * b for a, b in (counts(sched, lh, lw, tile_px, g) for g in sched.groups)]
    return sum(tiles[gi] for gi in sched.group_of)


def placement(sched: Schedule, lh: int, lw: int, tile_px: int, dsize: int, batch: int,
              device_budget: int | None, *, moves: list[tuple[int, int]] | None = None) -> frozenset[int]:
    """The buffers that live in host memory when the whole-image buffers on the device may use at most
    ``device_budget`` bytes at any time (``None``: no limit, all on the device; 0: all in host memory), as
    :func:`greedy_host` places them."""
    if device_budget is None:
        return frozenset()
    size = buffer_bytes(sched, lh, lw, dsize, batch)
    moved = [(u + d) * dsize * batch for u, d in (moves or traffic(sched, lh, lw, tile_px))]
    return greedy_host(size, sched.life, moved, device_budget)


def greedy_host(size: Sequence[int], life: Sequence[tuple[int, int]], moved: Sequence[int], device_budget: int, *,
                host: frozenset[int] = frozenset()) -> frozenset[int]:
    """The buffers (indices) that go to host memory when those on the device may hold at most ``device_budget``
    (in ``size``'s unit) at any pass: buffer ``i`` is alive from pass ``life[i][0]`` to ``life[i][1]`` (inclusive)
    and would move ``moved[i]`` between host and device if it lived in host memory; ``host``: buffers that live
    there whatever the budget (a video's finished frames).

    Greedy and deterministic: buffers in order of bytes they would move per byte of their size (most first;
    ties: the larger mover, then the earlier buffer) go to the device when they fit there for their whole
    life, beside the ones already placed; the rest go to the host. Shared by exact image tiles
    (:func:`placement`) and exact HunyuanVideo tiles (:mod:`policy.video_exact`).
    """
    order = sorted(range(len(size)), key=lambda i: (-moved[i] / max(1, size[i]), -moved[i], i))
    used = [0] * (1 + max((b for _, b in life), default=0))
    out: set[int] = set(host)
    for i in order:
        if i in host:
            continue
        a, b = life[i]
        if max(used[a:b + 1]) + size[i] <= device_budget:
            for p in range(a, b + 1):
                used[p] += size[i]
        else:
            out.add(i)
    return frozenset(out)


def costs(sched: Schedule, lh: int, lw: int, tile_px: int, dsize: int, batch: int = 1,
          device_budget: int | None = None, *, moves: list[tuple[int, int]] | None = None) -> Costs:
    """Bytes held and moved by exact tiling of a ``batch`` of ``lh x lw`` latents with tiles of ``tile_px``
    output pixels, ``dsize`` bytes per element, buffers placed by :func:`placement` (``moves``: this tile's
    :func:`traffic`, when the caller has it)."""
    moves = moves or traffic(sched, lh, lw, tile_px)
    host = placement(sched, lh, lw, tile_px, dsize, batch, device_budget, moves=moves)
    size = buffer_bytes(sched, lh, lw, dsize, batch)
    on_dev, on_host = [0] * len(sched.passes), [0] * len(sched.passes)
    for i, (a, b) in enumerate(sched.life):
        side = on_host if i in host else on_dev
        for p in range(a, b + 1):
            side[p] += size[i]
    peak = max(d + h for d, h in zip(on_dev, on_host, strict=True))
    dev, hst = max(on_dev), max(on_host)
    up = down = 0
    for i, (u, d) in enumerate(moves):
        if i in host:  # every item reads and writes its own part of the output too
            up, down = up + u * batch * dsize, down + d * batch * dsize
    return Costs(buffer_bytes=peak, device_bytes=dev, host_bytes=hst, h2d_bytes=up, d2h_bytes=down,
                 steps=steps(sched, lh, lw, tile_px) * batch, passes=len(sched.passes) * batch, host=host)


def peak_elements(sched: Schedule) -> float:
    """Whole-image buffer elements per OUTPUT pixel at the widest point, all buffers alive together (one item)."""
    last = sched.levels - 1
    per = [b.channels / (1 << 2 * (last - b.level)) for b in sched.buffers]
    life = sched.life
    return max(sum(per[i] for i, (a, b) in enumerate(life) if a <= p <= b) for p in range(len(sched.passes)))
