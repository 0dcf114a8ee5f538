"""Exact tiles for diffusers' ``AutoencoderKLHunyuanVideo``: every frame equals the VAE's full decode.

"Full decode" means ``vae.decoder(vae.post_quant_conv(z))`` over the whole video. Note that diffusers'
``vae.decode`` is *not* that for videos of more than 4 latent frames unless ``use_framewise_decoding`` is off
(it is on by default): it then decodes temporal chunks, each with its own GroupNorm statistics, and blends them
(the engine's ``full`` plan turns it off; its chunked plans turn it on).

HunyuanVideo's decoder is the SD decoder made 3-D and causal: every GroupNorm normalises over C x T x H x W
of the whole video, and between two GroupNorms there is one causal 3x3x3 convolution (replicate padding: one
pixel on each side, two frames before, none after). So image exact tiling's pass structure
(:mod:`extension.stream`) holds with tiles in (frames, rows, columns): the decoder runs *layer by layer over
the whole video*; each pass decodes its tiles with one pixel and two earlier frames of context, writes them
into a whole-video buffer and adds their sums to the next GroupNorm's statistics, which the next pass
normalises with. The replicate padding is an index clamp at the video's edges (a pointwise norm commutes
with it); the upsampler's first frame is upsampled in space only, the others in time too, which is an index
map from the upsampled video into the source buffer; the mid block's attention is frame-causal (a query sees
every position of its own and earlier frames: with keys in frame order that is a prefix of the keys), run
query tile by query tile against key/value chunks with a running softmax.

Where the whole-video buffers live (``buffers``): ``"host"`` (ordinary, pageable CPU memory, as the image
executor's buffers and for its reasons: a strided tile of a pinned tensor is copied through a pageable temporary
anyway, and PyTorch's pinned allocator would keep up to twice the buffers page-locked; the GPU then holds the
weights, one tile's region and its output, the mid block's keys and values and the statistics: bounded by the
tile, not the video) or ``"device"`` (the VAE's device: no copies, but the buffers of a 33-frame 544x960 video
are 16.4 GiB at their widest in bfloat16, :mod:`policy.video_exact`). With ``"host"`` buffers, ``device_budget``
keeps some of them on the device: those that would move the most per byte (the latent-rate ones, whose tiles read
the most context), placed by :func:`policy.video_exact.hunyuan_counts` as the engine's estimate counts them; the
finished video is in host memory whatever the budget. The copies go through the image
executor's mover (:mod:`extension.stream_store`): on CUDA a copy stream and pinned staging, the next tile's span
requested while this tile computes, finished tiles written into the host buffers one tile late and all of them
before the next pass (which reads them on the CPU); elsewhere plain copies.

Trade-offs: the output equals a full decode (float rounding apart; ``tests/test_stream_hunyuan.py`` checks
>= 100 dB float32 and that a wrong clamp is caught), and no overlap is decoded twice; but each tile reads two
frames and a pixel of context per convolution (with 16-frame tiles at the output resolution: 1.1x the
frames there, 1.5x at the latent resolution), GroupNorm is applied outside PyTorch's fused kernel, and with
``"host"`` buffers every pass moves its input and output over the host link. diffusers' own tiles (spatial
tiles blended over an overlap, temporal chunks blended over frames) are faster and drift.

::

    video = hunyuan_exact_decode(vae, z, tile_px=256, tile_frames=16)  # (B, 3, 1 + 4 (T - 1), 8 H, 8 W)
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from hybrid_vae.extension.stream import _attend, _attention_step, _norm, _project, _Stats
from hybrid_vae.extension.stream_store import CudaMover, Mover, Ticket, sweep
from hybrid_vae.policy.errors import PlanError
from hybrid_vae.policy.video_exact import VideoExactCounts, hunyuan_counts, hunyuan_passes

if TYPE_CHECKING:
    import torch

__all__ = ["hunyuan_exact_decode", "hunyuan_exact_support"]

ProgressFn = Callable[[int, int], None]
Box = tuple[int, int, int, int, int, int]  # t0, t1, y0, y1, x0, x1 of an output tile at a pass's resolution

#: Key/value rows per chunk of the mid block's attention (one chunk's logits exist at a time).
_KV_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class _Conv:
    """A causal 3x3x3 convolution (``ctx``: 2 frames before, 1 pixel each side, replicated) or a pointwise one."""

    conv: Any  # the inner nn.Conv3d, run without padding
    ctx: bool


@dataclasses.dataclass(frozen=True)
class _Res:
    norm1: Any
    conv1: _Conv
    norm2: Any
    conv2: _Conv
    shortcut: _Conv | None


@dataclasses.dataclass(frozen=True)
class _Up:
    conv: _Conv
    factor: tuple[int, int, int]  # time, height, width


def _causal(m: Any, where: str, *, kernel: int) -> _Conv:
    import torch

    conv = getattr(m, "conv", None)
    if type(m).__name__ != "HunyuanVideoCausalConv3d" or not isinstance(conv, torch.nn.Conv3d):
        raise PlanError(f"{where} is {type(m).__name__}, not a HunyuanVideoCausalConv3d")
    k = kernel
    pad = (k // 2, k // 2, k // 2, k // 2, k - 1, 0)
    if (tuple(conv.kernel_size) != (k, k, k) or tuple(conv.stride) != (1, 1, 1) or tuple(conv.padding) != (0, 0, 0)
            or tuple(conv.dilation) != (1, 1, 1) or conv.groups != 1 or tuple(m.time_causal_padding) != pad
            or (k > 1 and m.pad_mode != "replicate")):
        raise PlanError(f"{where} is not a {k}x{k}x{k} causal convolution with replicate padding")
    return _Conv(conv, ctx=k > 1)


def _res(r: Any, where: str) -> _Res:
    import torch

    if type(r).__name__ != "HunyuanVideoResnetBlockCausal3D":
        raise PlanError(f"{where} is {type(r).__name__}")
    if not (isinstance(r.norm1, torch.nn.GroupNorm) and isinstance(r.norm2, torch.nn.GroupNorm)):
        raise PlanError(f"{where} norms are not GroupNorm")
    if not isinstance(r.nonlinearity, torch.nn.SiLU):
        raise PlanError(f"{where} activation is not SiLU")
    short = None if r.conv_shortcut is None else _causal(r.conv_shortcut, f"{where}.conv_shortcut", kernel=1)
    return _Res(r.norm1, _causal(r.conv1, f"{where}.conv1", kernel=3), r.norm2,
                _causal(r.conv2, f"{where}.conv2", kernel=3), short)


def _steps(vae: Any) -> list[Any]:
    """The decoder as steps (``_Conv`` for conv_in, ``_Res``, the attention, ``_Up``, then ``(norm, _Conv)``
    for the output). Raises :class:`PlanError` naming the first part these tiles cannot run."""
    import torch

    dec = getattr(vae, "decoder", None)
    if type(vae).__name__ != "AutoencoderKLHunyuanVideo" or type(dec).__name__ != "HunyuanVideoDecoder3D":
        raise PlanError(f"{type(vae).__name__} is not diffusers' AutoencoderKLHunyuanVideo")
    if any(p.device.type == "meta" for p in dec.parameters()):
        raise PlanError("decoder weights are offloaded (meta tensors); exact tiles need them resident")
    pqc = getattr(vae, "post_quant_conv", None)
    if not (isinstance(pqc, torch.nn.Conv3d) and tuple(pqc.kernel_size) == (1, 1, 1)):
        raise PlanError("post_quant_conv is not a 1x1x1 convolution")
    if dec.training:
        raise PlanError("the decoder is in training mode (dropout); call vae.eval()")
    steps: list[Any] = [_causal(dec.conv_in, "conv_in", kernel=3)]
    mid = dec.mid_block
    steps.append(_res(mid.resnets[0], "mid_block.resnets[0]"))
    for j, (attn, r) in enumerate(zip(mid.attentions, mid.resnets[1:], strict=True)):
        if attn is not None:
            steps.append(_attention_step(attn, f"mid_block.attentions[{j}]"))
        steps.append(_res(r, f"mid_block.resnets[{j + 1}]"))
    for i, block in enumerate(dec.up_blocks):
        for j, r in enumerate(block.resnets):
            steps.append(_res(r, f"up_blocks[{i}].resnets[{j}]"))
        for j, u in enumerate(block.upsamplers or []):
            where = f"up_blocks[{i}].upsamplers[{j}]"
            if type(u).__name__ != "HunyuanVideoUpsampleCausal3D":
                raise PlanError(f"{where} is {type(u).__name__}")
            factor = tuple(int(f) for f in u.upsample_factor)
            if len(factor) != 3 or any(f not in (1, 2) for f in factor):
                raise PlanError(f"{where} upsamples by {u.upsample_factor}, not 1 or 2 per axis")
            steps.append(_Up(_causal(u.conv, f"{where}.conv", kernel=3), (factor[0], factor[1], factor[2])))
    if not isinstance(dec.conv_norm_out, torch.nn.GroupNorm) or not isinstance(dec.conv_act, torch.nn.SiLU):
        raise PlanError("conv_norm_out/conv_act are not GroupNorm/SiLU")
    steps.append((dec.conv_norm_out, _causal(dec.conv_out, "conv_out", kernel=3)))
    return steps


def hunyuan_exact_support(vae: Any) -> str | None:
    """None when :func:`hunyuan_exact_decode` can run ``vae``; else why not (one line)."""
    try:
        _steps(vae)
    except PlanError as e:
        return str(e)
    return None


def _next_groups(steps: list[Any], i: int) -> int:
    """Groups of the GroupNorm that reads step ``i``'s output."""
    for s in steps[i + 1:]:
        norm = s.norm1 if isinstance(s, _Res) else s[0] if isinstance(s, tuple) else getattr(s, "norm", None)
        if norm is not None:
            return int(norm.num_groups)
    raise AssertionError("no GroupNorm after the last step")


def _axis(lo: int, hi: int, before: int, after: int, n: int) -> torch.Tensor:
    """Indices ``lo - before .. hi + after - 1`` clamped into ``[0, n)``: replicate padding."""
    import torch

    return torch.arange(lo - before, hi + after).clamp_(0, n - 1)


@dataclasses.dataclass
class _Video:
    """One item's decode: where buffers live, the compute device and dtype, tile sizes, the copies (``mover``:
    None when the buffers live on the compute device), progress, accounting.

    ``hosted``: the indices (in the order the passes make them, :func:`policy.video_exact.hunyuan_counts`'
    numbering) of the whole-video buffers that live in host memory (``home``); the others live on the compute
    device. The buffers in host memory are known by their storage (on a CPU "device" both sides are CPU tensors),
    and the ledger counts what each side holds and what crosses between them."""

    home: torch.device
    device: torch.device
    dtype: torch.dtype
    tile_px: int
    tile_frames: int
    out_frames: int
    out_px: int  # the output's height (tiles are sized at each pass's scale from it)
    ledger: dict[str, int]
    progress: ProgressFn | None
    passes: int
    mover: Mover | None
    hosted: frozenset[int]
    done: int = 0
    made: int = 0  # buffers made so far
    alive: dict[bool, int] = dataclasses.field(default_factory=lambda: {True: 0, False: 0})  # elements, by hosted
    host_ptrs: set[int] = dataclasses.field(default_factory=set)

    def empty(self, c: int, t: int, h: int, w: int) -> torch.Tensor:
        """The next whole-video buffer, where the placement puts it (counted while it is alive)."""
        import torch

        hosted = self.made in self.hosted
        self.made += 1
        buf = torch.empty((1, c, t, h, w), dtype=self.dtype, device=self.home if hosted else self.device)
        n = buf.numel()
        self.alive[hosted] += n
        key = "host_buffer_elements" if hosted else "device_buffer_elements"
        self.ledger[key] = max(self.ledger.get(key, 0), self.alive[hosted])
        if hosted:
            ptr = buf.untyped_storage().data_ptr()
            self.host_ptrs.add(ptr)
            weakref.finalize(buf, self._free, True, n, ptr)
        else:
            weakref.finalize(buf, self._free, False, n, 0)
        return buf

    def _free(self, hosted: bool, n: int, ptr: int) -> None:
        self.alive[hosted] -= n
        self.host_ptrs.discard(ptr)

    def _hosted(self, view: torch.Tensor) -> bool:
        return view.untyped_storage().data_ptr() in self.host_ptrs

    def fetch(self, view: torch.Tensor) -> tuple[Ticket, None]:
        """``view`` of a whole-video buffer (or of the latents, already on the compute device) on its way to the
        compute device (counted as moved; over the host link when the buffer is in host memory), as
        :func:`extension.stream_store.sweep` takes a read."""
        self.moved(view.numel())
        if self.mover is None or not self._hosted(view):
            return Ticket(view), None
        self.ledger["host_moved_elements"] = self.ledger.get("host_moved_elements", 0) + view.numel()
        return self.mover.fetch(view), None

    def put(self, view: torch.Tensor, tile: torch.Tensor) -> None:
        """``tile`` into ``view`` of a whole-video buffer (counted as moved); on CUDA into host memory the copy
        finishes later (when :func:`extension.stream_store.sweep` settles and drains the mover)."""
        self.moved(tile.numel())
        if self.mover is None or not self._hosted(view):
            view.copy_(tile)
        else:
            self.ledger["host_moved_elements"] = self.ledger.get("host_moved_elements", 0) + tile.numel()
            self.mover.put(view, tile)

    def boxes(self, t: int, h: int, w: int) -> list[Box]:
        """Output tiles of a pass at ``t`` frames, ``h`` x ``w`` pixels."""
        scale = self.out_px / h
        tf = max(1, math.ceil(self.tile_frames * t / self.out_frames))
        ts = max(1, int(self.tile_px / scale))
        return [(a, min(a + tf, t), y, min(y + ts, h), x, min(x + ts, w))
                for a in range(0, t, tf) for y in range(0, h, ts) for x in range(0, w, ts)]

    def count(self, *tensors: torch.Tensor) -> None:
        n = sum(t.numel() for t in tensors)
        self.ledger["tile_elements"] = max(self.ledger.get("tile_elements", 0), n)

    def moved(self, n: int) -> None:
        """Elements copied between the buffers' home and the compute device (counted when they are one too)."""
        self.ledger["moved_elements"] = self.ledger.get("moved_elements", 0) + n

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.passes)


def _box(t: torch.Tensor, box: Box) -> torch.Tensor:
    t0, t1, y0, y1, x0, x1 = box
    return t[:, :, t0:t1, y0:y1, x0:x1]


Reads = list[tuple["torch.Tensor", None]]


def _sweep(v: _Video, boxes: list[Box], request: Callable[[Box], list[tuple[Ticket, None]]],
           body: Callable[[Box, Reads], None]) -> None:
    """One pass over ``boxes`` (:func:`extension.stream_store.sweep`: the next tile's reads requested before this
    one computes, every write in place at the end), then its progress tick."""
    sweep(boxes, request, body, v.mover)
    v.tick()


def _expand(span: torch.Tensor, idx: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The tile's region from the span its (monotone) frame, row and column indices cover: repeats (the replicate
    padding, the upsampling) made on the span's device."""
    for dim, i in zip((2, 3, 4), idx, strict=True):
        if i.numel() != span.shape[dim]:  # repeats: not the plain span
            span = span.index_select(dim, (i - i[0]).to(span.device))
    return span


def _conv_pass(v: _Video, src: torch.Tensor, conv: _Conv, aff: tuple[torch.Tensor, torch.Tensor] | None,
               groups: int | None, *, up: tuple[int, int, int] = (1, 1, 1),
               residual: tuple[torch.Tensor, _Conv | None] | None = None) -> tuple[torch.Tensor, _Stats]:
    """``conv(silu(norm(src)))`` (no norm when ``aff`` is None), ``src`` first upsampled by ``up`` (time: all
    frames but the first), plus ``residual`` (a whole-video buffer, through its shortcut convolution when there
    is one) at the same place; returns the whole-video result and its statistics (for the next GroupNorm's
    ``groups``; None: no GroupNorm follows)."""
    import torch

    _, _, t, h, w = src.shape
    ft, fh, fw = up
    tu, hu, wu = 1 + ft * (t - 1), fh * h, fw * w
    out = v.empty(conv.conv.out_channels, tu, hu, wu)
    st = _Stats(groups or 1)
    b4, side = (2, 1) if conv.ctx else (0, 0)

    def indices(box: Box) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t0, t1, y0, y1, x0, x1 = box
        it = _axis(t0, t1, b4, 0, tu)
        it = torch.where(it == 0, 0, 1 + torch.div(it - 1, ft, rounding_mode="floor"))
        iy = torch.div(_axis(y0, y1, side, side, hu), fh, rounding_mode="floor")
        ix = torch.div(_axis(x0, x1, side, side, wu), fw, rounding_mode="floor")
        return it, iy, ix

    def request(box: Box) -> list[tuple[Ticket, None]]:
        """The span the tile's indices cover (copied once; repeats are made on the device), and the residual."""
        (t0, t1), (y0, y1), (x0, x1) = ((int(i[0]), int(i[-1]) + 1) for i in indices(box))
        got = [v.fetch(src[:, :, t0:t1, y0:y1, x0:x1])]
        if residual is not None:
            got.append(v.fetch(_box(residual[0], box)))
        return got

    def body(box: Box, reads: Reads) -> None:
        region = _expand(reads[0][0], indices(box))
        x = region if aff is None else _norm(region, aff)
        y = conv.conv(x)
        del x
        if residual is not None:
            short = residual[1]
            y = y + (reads[1][0] if short is None else short.conv(reads[1][0]))
        v.count(region, y)
        del region
        if groups is not None:
            st.add(y)
        v.put(_box(out, box), y)

    _sweep(v, v.boxes(tu, hu, wu), request, body)
    return out, st


def _affine(st: _Stats, norm: Any, channels: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    scale, shift = st.affine(norm, channels, dtype)
    return scale.view(1, -1, 1, 1, 1), shift.view(1, -1, 1, 1, 1)


def _resnet(v: _Video, x: torch.Tensor, xs: _Stats, r: _Res, groups: int) -> tuple[torch.Tensor, _Stats]:
    c = x.shape[1]
    aff1 = _affine(xs, r.norm1, c, v.dtype)
    h, hs = _conv_pass(v, x, r.conv1, aff1, int(r.norm2.num_groups))
    aff2 = _affine(hs, r.norm2, h.shape[1], v.dtype)
    return _conv_pass(v, h, r.conv2, aff2, groups, residual=(x, r.shortcut))


def _attention(v: _Video, x: torch.Tensor, xs: _Stats, a: Any, groups: int) -> tuple[torch.Tensor, _Stats]:
    """Frame-causal self-attention over every position of the video (mid block, latent resolution). Keys and
    values stay on the compute device (latent resolution: 2 x frames x H x W x C elements, counted in the
    ledger's ``kv_elements``); the queries run tile by tile, frame by frame."""
    import torch

    _, c, t, h, w = x.shape
    aff = _affine(xs, a.norm, c, v.dtype)
    keys = torch.empty((t, h, w, c), dtype=v.dtype, device=v.device)
    vals = torch.empty_like(keys)
    v.ledger["kv_elements"] = max(v.ledger.get("kv_elements", 0), 2 * keys.numel())
    boxes = v.boxes(t, h, w)

    def request(box: Box) -> list[tuple[Ticket, None]]:
        return [v.fetch(_box(x, box))]

    def project(box: Box, reads: Reads) -> None:
        t0, t1, y0, y1, x0, x1 = box
        n = _norm(reads[0][0], aff, act=False)[0].permute(1, 2, 3, 0)  # [t, h, w, C]
        keys[t0:t1, y0:y1, x0:x1] = _project(a.k, n)
        vals[t0:t1, y0:y1, x0:x1] = _project(a.v, n)

    _sweep(v, boxes, request, project)
    kv = keys.view(-1, c), vals.view(-1, c)
    heads = a.heads
    scale = a.scale if a.scale is not None else (c // heads) ** -0.5
    out = v.empty(c, t, h, w)
    st = _Stats(groups)

    def chunks(rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for r0 in range(0, rows, _KV_CHUNK):
            r1 = min(rows, r0 + _KV_CHUNK)
            yield kv[0][r0:r1], kv[1][r0:r1]

    def attend(box: Box, reads: Reads) -> None:
        t0, t1, y0, y1, x0, x1 = box
        part = reads[0][0]
        n = _norm(part, aff, act=False)[0].permute(1, 2, 3, 0)  # [tt, hh, ww, C]
        ys = []
        for f in range(t1 - t0):  # frame t0 + f sees frames 0 .. t0 + f: a prefix of the keys
            q = (_project(a.q, n[f].reshape(-1, c)).float() * scale).view(-1, heads, c // heads).transpose(0, 1)
            o = _attend(q, chunks((t0 + f + 1) * h * w))
            ys.append(_project(a.proj, o.transpose(0, 1).reshape(-1, c).to(v.dtype)))
        y = torch.stack(ys).view(t1 - t0, y1 - y0, x1 - x0, c).permute(3, 0, 1, 2).unsqueeze(0)
        if a.dropout is not None:
            y = a.dropout(y)
        if a.residual:
            y = y + part
        if a.rescale != 1:
            y = y / a.rescale
        v.count(part, y)
        st.add(y)
        v.put(_box(out, box), y)

    _sweep(v, boxes, request, attend)
    return out, st


def _passes(steps: list[Any]) -> int:
    """Passes over the video: one per convolution step, two per resnet and per attention (keys/values, output)."""
    return sum(1 if isinstance(s, (_Conv, _Up, tuple)) else 2 for s in steps)


def _placement(vae: Any, z: torch.Tensor, tile_px: int, tile_frames: int, budget: int) -> VideoExactCounts:
    """The counts (and placement) of :mod:`policy.video_exact` for this VAE's decoder over one item of ``z``, with
    ``budget`` elements of buffers on the device."""
    cfg = vae.config
    t, h, w = z.shape[2:]
    sc, tc = int(vae.spatial_compression_ratio), int(vae.temporal_compression_ratio)
    ps = hunyuan_passes(tuple(cfg.block_out_channels), int(cfg.layers_per_block), latent_channels=int(z.shape[1]),
                        latent=(t, h, w), temporal_compression=tc, spatial_compression=sc,
                        mid_attention=bool(getattr(cfg, "mid_block_add_attention", True)),
                        out_channels=int(cfg.out_channels))
    return hunyuan_counts(ps, tile_px=tile_px, tile_frames=tile_frames, out=(1 + tc * (t - 1), sc * h, sc * w),
                          device_budget=budget)


def hunyuan_exact_decode(vae: Any, z: torch.Tensor, *, tile_px: int, tile_frames: int = 16,
                         buffers: Literal["host", "device"] = "host", device_budget: int = 0,
                         progress: ProgressFn | None = None, ledger: dict[str, int] | None = None) -> torch.Tensor:
    """Decode HunyuanVideo latents ``z`` (B, C, T, H, W) with exact 3-D tiles; the frames equal the full decode's
    (``vae.decoder(vae.post_quant_conv(z))``; ``vae.decode`` with ``use_framewise_decoding`` off).

    Args:
        vae: diffusers' ``AutoencoderKLHunyuanVideo`` (in eval mode, weights resident on the compute device).
        z (`torch.Tensor`): latents, unscaled (as ``vae.decode`` takes them).
        tile_px (`int`): the tiles' side in output pixels (at a pass of lower resolution, proportionally fewer).
        tile_frames (`int`, defaults to 16): output frames per tile (proportionally fewer at lower frame rates).
        buffers (`"host"` or `"device"`, defaults to ``"host"``): where the whole-video activations live.
        device_budget (`int`, defaults to 0): with ``"host"`` buffers, bytes of them that may stay on the compute
            device at any pass (per item): those that would move the most per byte stay there, as
            :func:`policy.video_exact.hunyuan_counts` places them (fewer copies, more device memory); the
            finished video is in host memory whatever the budget. 0: every buffer in host memory.
        progress (`Callable[[int, int], None]`, *optional*): called after each pass with (done, passes).
        ledger (`dict`, *optional*): filled with ``tile_elements`` (the most elements of one tile's region and
            output on the compute device: bounded by the tile, not the video), ``kv_elements`` (the mid block's
            keys and values, on the compute device: latent resolution), ``buffer_elements`` (the most elements of
            whole-video buffers alive at once, where ``buffers`` says, one item) and ``moved_elements`` (elements
            copied between the buffers and the compute device, all items; with ``"device"`` buffers the copies
            are within the device), ``device_buffer_elements``/``host_buffer_elements`` (the most buffer elements
            alive at once on each side) and ``host_moved_elements`` (elements copied over the host link).
            :mod:`policy.video_exact` counts the same from the decoder config.

    Returns:
        `torch.Tensor`: the video, (B, 3, 1 + 4 (T - 1), 8 H, 8 W), unclamped, where ``buffers`` says.

    Raises:
        PlanError: the VAE is not one these tiles can run (the message names the part).
        ValueError: ``tile_px``, ``tile_frames`` or ``buffers`` is out of range, naming the value.
    """
    import torch

    if tile_px < 8:
        raise ValueError(f"tile_px={tile_px}: give at least 8 (one latent pixel)")
    if tile_frames < 1:
        raise ValueError(f"tile_frames={tile_frames}: give at least 1")
    if buffers not in ("host", "device"):
        raise ValueError(f"buffers={buffers!r}: give 'host' or 'device'")
    if device_budget < 0 or (device_budget and buffers != "host"):
        raise ValueError(f"device_budget={device_budget}: give 0 or more bytes, with buffers='host' only")
    if z.dim() != 5:
        raise ValueError(f"z has shape {tuple(z.shape)}: give (batch, channels, frames, height, width)")
    steps = _steps(vae)
    device, dtype = vae.post_quant_conv.weight.device, vae.post_quant_conv.weight.dtype
    home = torch.device("cpu") if buffers == "host" else device
    mover: Mover | None = None
    if buffers == "host":  # the image executor's copies: on CUDA a copy stream, one tile ahead of the compute
        mover = CudaMover(device, None) if device.type == "cuda" else Mover(device, None)
    ledger = ledger if ledger is not None else {}
    sc, tc = int(vae.spatial_compression_ratio), int(vae.temporal_compression_ratio)
    n_out = 1 + tc * (z.shape[2] - 1)
    counted = _placement(vae, z, tile_px, tile_frames, device_budget // dtype.itemsize) if buffers == "host" else None
    hosted = counted.host if counted is not None else frozenset()
    items = []
    live = 0
    for b in range(z.shape[0]):
        v = _Video(home, device, dtype, tile_px, tile_frames, n_out, sc * z.shape[3], ledger, progress,
                   _passes(steps) * z.shape[0], mover, hosted, done=b * _passes(steps))
        with torch.no_grad():
            zz = vae.post_quant_conv(z[b:b + 1].to(device=device, dtype=dtype))
            x, xs = _conv_pass(v, zz, steps[0], None, _next_groups(steps, 0))
            del zz
            live = max(live, x.numel())
            for i, s in enumerate(steps[1:], start=1):
                before = x.numel()
                if isinstance(s, tuple):  # conv_out(silu(conv_norm_out(x))): the video
                    norm, conv = s
                    x, xs = _conv_pass(v, x, conv, _affine(xs, norm, x.shape[1], dtype), None)
                    live = max(live, before + x.numel())
                elif isinstance(s, _Res):  # x, the hidden activation and the output
                    x, xs = _resnet(v, x, xs, s, _next_groups(steps, i))
                    live = max(live, before + x.numel() // x.shape[1] * s.conv1.conv.out_channels + x.numel())
                elif isinstance(s, _Up):
                    x, xs = _conv_pass(v, x, s.conv, None, _next_groups(steps, i), up=s.factor)
                    live = max(live, before + x.numel())
                else:  # x and the output (keys and values are on the compute device)
                    x, xs = _attention(v, x, xs, s, _next_groups(steps, i))
                    live = max(live, 2 * before)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # every kernel done before the caller reads the result
        if counted is not None and v.made != counted.buffers:
            raise RuntimeError(f"the decode made {v.made} whole-video buffers where its placement counted "
                               f"{counted.buffers}: policy.video_exact's passes differ from this decoder's")
        items.append(x)
    ledger["buffer_elements"] = live
    return items[0] if len(items) == 1 else torch.cat(items)
