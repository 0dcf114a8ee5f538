"""Exact tiled decode: tiles bound the memory, every GroupNorm still sees the whole image.

Why: tiling a VAE decode the usual way (each tile through the whole decoder) gives each tile its own
GroupNorm statistics, so tile colours drift from the full decode (about 20 dB PSNR on the fixture
VAE; diffusers documents "a difference in tone" between tiles), and the overlap that hides the seams
is decoded twice.

How: the decoder runs *layer by layer over the whole image* instead of tile by tile through all
layers. Between two GroupNorms of a diffusers ``Decoder`` there is exactly one 3x3 convolution
(plus pointwise work), so each step ("pass") runs tile by tile with one pixel of context, writes its
tiles into a whole-image buffer, and adds each tile's sums to the statistics of the next GroupNorm.
The next pass normalises every tile with those whole-image statistics. The mid block's attention runs
query block by query block over keys and values of the whole image (a streaming softmax). The result
equals the full decode up to floating-point summation order (tests: <= 2e-5 on float32).

Where the whole-image buffers live: on the compute device (``device_budget=None``), or split between
the device and host memory (``device_budget`` bytes on the device; 0: all in host memory, so device
memory is bounded by the tile, not the image). :func:`hybrid_vae.policy.passes.placement` chooses
which buffers go to the host; the passes copy each tile's context in and each finished tile out. On
CUDA the copies run on a copy stream through pinned staging buffers, one tile ahead of the compute
(double buffering), so they overlap it; elsewhere they are plain copies.

The interface for other decoders (e.g. ComfyUI's LDM ``Decoder``): describe the decoder as a list of
steps (:class:`ConvIn`, :class:`Resnet`, :class:`Attention`, :class:`Upsample`, :class:`Output`, in the
order the decoder runs them) and call :func:`decode_steps`, or give the VAE object a ``stream_steps()``
method returning them (:func:`steps_of`). :func:`diffusers_steps` builds that list
for diffusers' ``Decoder`` made of ``UpDecoderBlock2D`` / ``ResnetBlock2D`` / ``Upsample2D`` (SD 1.x/2.x,
SDXL, SD3, FLUX.1 VAEs and the fixture); :func:`stream_support` says why another is not supported.

Trade-offs (docs/exact-tiling.md, docs/benchmarks.md):
- Memory: one tile's working set plus the whole-image buffers (for the SD decoder 387 elements per
  output pixel at the widest point, ~1/3 of a full decode's peak) on the device, or as many of them as
  the budget allows, the rest in host memory.
- Time: no overlap is decoded twice; the extra work is the statistics (one reduction per pass),
  GroupNorm applied outside PyTorch's fused kernel, and, when offloaded, the host copies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from hybrid_vae.extension.stream_store import CudaMover, Ledger, Mover, Region, Store, sweep
from hybrid_vae.policy import passes as P
from hybrid_vae.policy.errors import PlanError

if TYPE_CHECKING:
    import torch
    from hybrid_vae.policy.model import DecodeSettings
    from hybrid_vae.policy.profiles import Family

log = logging.getLogger("hybrid_vae.stream")

__all__ = ["Attention", "ConvIn", "Ledger", "Output", "Resnet", "Step", "Upsample", "decode_steps",
           "diffusers_steps", "settings_for_vae", "step_layers", "steps_of", "stream_buffer_elements", "stream_decode",
           "stream_support"]

ProgressFn = Callable[[int, int], None]


# ---- the decoder as a list of steps ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvIn:
    """``conv(pre(z))``: ``pre`` a pointwise (1x1) convolution or None (diffusers' ``post_quant_conv``),
    ``conv`` the 3x3 ``conv_in``."""

    conv: Any
    pre: Any = None


@dataclasses.dataclass(frozen=True)
class Resnet:
    """``(shortcut(x) + conv2(dropout(silu(norm2(conv1(silu(norm1(x))))))) / scale``; ``shortcut`` a 1x1
    convolution or None (identity), convolutions 3x3, norms GroupNorm."""

    norm1: Any
    conv1: Any
    norm2: Any
    conv2: Any
    shortcut: Any = None
    dropout: Any = None
    scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class Attention:
    """Self-attention over all positions: ``(x + proj(softmax(q k^T * scale) v)) / rescale`` with
    ``q, k, v = q(n), k(n), v(n)``, ``n = norm(x)`` (GroupNorm, no activation); ``q``/``k``/``v``/``proj``
    are ``nn.Linear`` or 1x1 ``nn.Conv2d``; ``heads`` split the channels."""

    norm: Any
    q: Any
    k: Any
    v: Any
    proj: Any
    heads: int = 1
    scale: float | None = None
    residual: bool = True
    rescale: float = 1.0
    dropout: Any = None


@dataclasses.dataclass(frozen=True)
class Upsample:
    """Nearest x2, then the 3x3 ``conv``."""

    conv: Any


@dataclasses.dataclass(frozen=True)
class Output:
    """``conv(silu(norm(x)))`` into the image."""

    norm: Any
    conv: Any


Step = ConvIn | Resnet | Attention | Upsample | Output


def _conv3(m: Any) -> bool:
    import torch

    return (isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) == (3, 3) and tuple(m.stride) == (1, 1)
            and tuple(m.padding) == (1, 1) and tuple(m.dilation) == (1, 1) and m.groups == 1
            and m.padding_mode == "zeros")


def _conv1(m: Any) -> bool:
    import torch

    return (isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1)
            and tuple(m.padding) == (0, 0) and m.groups == 1)


def _resnet_step(r: Any, where: str) -> Resnet:
    import torch

    if type(r).__name__ != "ResnetBlock2D":
        raise PlanError(f"{where} is {type(r).__name__}")
    if r.up or r.down or r.time_emb_proj is not None or r.time_embedding_norm not in ("default", "group"):
        raise PlanError(f"{where} resamples or takes a time embedding")
    if not (isinstance(r.norm1, torch.nn.GroupNorm) and isinstance(r.norm2, torch.nn.GroupNorm)):
        raise PlanError(f"{where} norms are not GroupNorm")
    if not (_conv3(r.conv1) and _conv3(r.conv2)) or not isinstance(r.nonlinearity, torch.nn.SiLU):
        raise PlanError(f"{where} convolutions are not 3x3 or its activation is not SiLU")
    if r.conv_shortcut is not None and not _conv1(r.conv_shortcut):
        raise PlanError(f"{where} shortcut is not a 1x1 convolution")
    return Resnet(r.norm1, r.conv1, r.norm2, r.conv2, r.conv_shortcut, r.dropout, float(r.output_scale_factor))


def _attention_step(a: Any, where: str) -> Attention:
    import torch

    if type(a).__name__ != "Attention" or not isinstance(getattr(a, "group_norm", None), torch.nn.GroupNorm):
        raise PlanError(f"{where} is not a GroupNorm self-attention")
    if a.spatial_norm is not None or a.norm_q is not None or a.norm_k is not None or a.is_cross_attention:
        raise PlanError(f"{where} has a spatial/q/k norm or cross-attention")
    if not all(isinstance(m, torch.nn.Linear) for m in (a.to_q, a.to_k, a.to_v, a.to_out[0])):
        raise PlanError(f"{where} projections are not linear")
    return Attention(a.group_norm, a.to_q, a.to_k, a.to_v, a.to_out[0], heads=int(a.heads),
                     scale=float(a.scale) if getattr(a, "scale_qk", True) else 1.0,
                     residual=bool(a.residual_connection), rescale=float(a.rescale_output_factor),
                     dropout=a.to_out[1] if len(a.to_out) > 1 else None)


def diffusers_steps(vae: Any) -> list[Step]:
    """The steps of a diffusers ``AutoencoderKL``-style VAE's ``post_quant_conv`` + ``Decoder``.

    Raises:
        PlanError: naming the first part that exact tiling cannot run.
    """
    import torch

    dec = getattr(vae, "decoder", None)
    if dec is None or type(dec).__name__ != "Decoder":
        raise PlanError(f"{type(vae).__name__} has no diffusers Decoder")
    for a in ("conv_in", "mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out"):
        if getattr(dec, a, None) is None:
            raise PlanError(f"decoder has no {a}")
    if any(p.device.type == "meta" for p in dec.parameters()):
        raise PlanError("decoder weights are offloaded (meta tensors, e.g. sequential CPU offload); "
                        "exact tiling needs them resident")
    pqc = getattr(vae, "post_quant_conv", None)
    if pqc is not None and not _conv1(pqc):
        raise PlanError("post_quant_conv is not a 1x1 convolution")
    if not _conv3(dec.conv_in):
        raise PlanError("conv_in is not a 3x3 convolution")
    if not isinstance(dec.conv_norm_out, torch.nn.GroupNorm):
        raise PlanError(f"conv_norm_out is {type(dec.conv_norm_out).__name__}, not GroupNorm (spatial norm)")
    if not isinstance(dec.conv_act, torch.nn.SiLU) or not _conv3(dec.conv_out):
        raise PlanError("conv_act/conv_out are not SiLU/3x3 convolution")
    mid = dec.mid_block
    if type(mid).__name__ != "UNetMidBlock2D":
        raise PlanError(f"mid_block is {type(mid).__name__}")
    steps: list[Step] = [ConvIn(dec.conv_in, pqc), _resnet_step(mid.resnets[0], "mid_block.resnets[0]")]
    for j, (attn, r) in enumerate(zip(mid.attentions, mid.resnets[1:], strict=True)):
        if attn is not None:
            steps.append(_attention_step(attn, f"mid_block.attentions[{j}]"))
        steps.append(_resnet_step(r, f"mid_block.resnets[{j + 1}]"))
    for i, block in enumerate(dec.up_blocks):
        if type(block).__name__ != "UpDecoderBlock2D":
            raise PlanError(f"up_blocks[{i}] is {type(block).__name__}")
        for j, r in enumerate(block.resnets):
            steps.append(_resnet_step(r, f"up_blocks[{i}].resnets[{j}]"))
        for j, u in enumerate(block.upsamplers or []):
            where = f"up_blocks[{i}].upsamplers[{j}]"
            if type(u).__name__ != "Upsample2D":
                raise PlanError(f"{where} is {type(u).__name__}")
            if u.use_conv_transpose or not u.use_conv or not u.interpolate or u.norm is not None:
                raise PlanError(f"{where} is not nearest x2 + convolution")
            conv = u.conv if u.name == "conv" else getattr(u, "Conv2d_0", None)
            if not _conv3(conv):
                raise PlanError(f"{where} convolution is not 3x3")
            steps.append(Upsample(conv))
    steps.append(Output(dec.conv_norm_out, dec.conv_out))
    return steps


def steps_of(vae: Any) -> list[Step]:
    """The decoder steps of ``vae``: what its own ``stream_steps()`` returns when it has one (a decoder of
    another library, e.g. an adapter for ComfyUI's LDM ``Decoder``; it raises :class:`PlanError` naming what it
    cannot run), else :func:`diffusers_steps`.

    Raises:
        PlanError: the reason exact tiling cannot run this VAE.
    """
    hook = getattr(vae, "stream_steps", None)
    if callable(hook):
        return list(hook())
    return diffusers_steps(vae)


def stream_support(vae: Any) -> str | None:
    """None when :func:`stream_decode` can run ``vae`` exactly, else the reason it cannot."""
    try:
        steps_of(vae)
    except PlanError as exc:
        return str(exc)
    return None


def settings_for_vae(settings: DecodeSettings, vae: Any, family: Family) -> DecodeSettings:
    """``settings`` for decoding with ``vae``: local tiles only when exact tiling cannot run it (so the
    engine never plans an exact attempt that would fail; video: exact Wan tiles need diffusers' Wan 2.1 class,
    :func:`extension.stream_wan.wan_exact_support`, exact HunyuanVideo tiles diffusers' class,
    :func:`extension.stream_hunyuan.hunyuan_exact_support`); video: no host output when the VAE cannot stream its
    chunks or tiles (``extension.executors.chunks_stream`` / ``tiles_stream``: so the estimate counts the VAE's
    own loop). Callers: the orchestrator, ``hybrid-vae serve``."""
    if family.video:
        from hybrid_vae.extension.executors import chunks_stream, tiles_stream
        from hybrid_vae.extension.stream_hunyuan import hunyuan_exact_support
        from hybrid_vae.extension.stream_wan import wan_exact_support

        can = {"hunyuanvideo": chunks_stream, "wan": tiles_stream}.get(family.architecture)
        if settings.video_host_output and (can is None or not can(vae)):
            settings = settings.updated(video_host_output=False)
        support = {"wan": wan_exact_support, "hunyuanvideo": hunyuan_exact_support}.get(family.architecture)
        if settings.tile_groupnorm in ("exact", "offload") and support is not None \
                and (why := support(vae)) is not None:  # e.g. ComfyUI's WanVAE, Wan 2.2: their own tiles
            log.debug("hybrid-vae: no exact video tiles for %s (%s); local tiles", type(vae).__name__, why)
            settings = settings.updated(tile_groupnorm="local")
        return settings
    if settings.tile_groupnorm == "local":
        return settings
    why = stream_support(vae)
    if why is None:
        return settings
    log.debug("hybrid-vae: no exact tiling for %s (%s); local tiles only", type(vae).__name__, why)
    return settings.updated(tile_groupnorm="local")


def _channels(m: Any, attr: str) -> int:
    return int(getattr(m, attr, None) or m.weight.shape[0 if attr == "out_channels" else 1])


def step_layers(steps: Sequence[Step], latent_channels: int) -> tuple[P.Layer, ...]:
    """The :class:`~hybrid_vae.policy.passes.Layer` list of ``steps`` (what the schedule is built from).

    Raises:
        PlanError: steps that do not start with :class:`ConvIn` and end with :class:`Output`.
    """
    layers: list[P.Layer] = []
    level, ch = 0, latent_channels
    for s in steps:
        if isinstance(s, ConvIn):
            if s.pre is not None and _channels(s.pre, "out_channels") != latent_channels:
                raise PlanError("the pointwise convolution before conv_in changes the latent's channels")
            layers.append(P.Layer("conv_in", _channels(s.conv, "in_channels"), _channels(s.conv, "out_channels"), level))
        elif isinstance(s, Resnet):
            layers.append(P.Layer("resnet", _channels(s.conv1, "in_channels"), _channels(s.conv2, "out_channels"), level))
        elif isinstance(s, Attention):
            layers.append(P.Layer("attention", ch, ch, level))
        elif isinstance(s, Upsample):
            layers.append(P.Layer("upsample", _channels(s.conv, "in_channels"), _channels(s.conv, "out_channels"), level))
            level += 1
        else:
            layers.append(P.Layer("out", _channels(s.conv, "in_channels"), _channels(s.conv, "out_channels"), level))
        ch = layers[-1].cout
    try:
        P.schedule(layers)
    except ValueError as exc:
        raise PlanError(f"cannot tile these decoder steps exactly: {exc}") from None
    return tuple(layers)


def stream_buffer_elements(block_out_channels: list[int] | tuple[int, ...], layers_per_block: int,
                           out_channels: int = 3) -> float:
    """Whole-image buffer elements per OUTPUT pixel at the widest point of :func:`stream_decode` (one item).

    For an ``AutoencoderKL`` config (``block_out_channels``, ``layers_per_block``): the SD decoder
    (128, 256, 512, 512; 2) gives 387: the upsampled 256-channel activation at full resolution, one
    128-channel buffer and the 3-channel output. Multiply by the dtype size for bytes; one tile's
    working set comes on top. (:func:`hybrid_vae.policy.passes.peak_elements` of its schedule.)
    """
    return P.peak_elements(P.schedule(P.decoder_layers(block_out_channels, layers_per_block,
                                                       out_channels=out_channels)))


# ---- statistics and normalisation ------------------------------------------------------------------


class _Stats:
    """Per-group mean and variance of one activation over the whole image, merged tile by tile.

    Each tile gives its count, mean and variance per group (``torch.var_mean`` in float32; half types a
    few groups at a time, so the float32 copy stays within the tile's size); they are merged into a running
    float64 mean and sum of squared deviations (Chan et al.), so the statistics take the same memory
    whatever the number of tiles.
    """

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, t: torch.Tensor) -> None:
        import torch

        b, c = t.shape[:2]  # [B, C, H, W] or, for video, [B, C, T, H, W]
        v = t.reshape(b, self.groups, c // self.groups, *t.shape[2:])  # a view even of a cropped tile: no copy
        dims = (0, *range(2, v.dim()))
        if v.dtype == torch.float32:
            var, mean = torch.var_mean(v, dim=dims, correction=0)
        else:
            step = max(1, self.groups * t.element_size() // 4)
            parts = [torch.var_mean(v[:, g:g + step].float(), dim=dims, correction=0)
                     for g in range(0, self.groups, step)]
            var, mean = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        k = t.numel() // self.groups
        mean64, m2 = mean.double(), var.double() * k
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = k, mean64, m2
            return
        n = self.n + k
        delta = mean64 - self.mean
        self.mean = self.mean + delta * (k / n)
        self.m2 = self.m2 + m2 + delta * delta * (self.n * k / n)
        self.n = n

    def affine(self, norm: Any, channels: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, shift) in ``dtype`` so that ``x * scale + shift`` is ``norm`` with these
        statistics (computed in float64, rounded once)."""
        import torch

        assert self.mean is not None and self.m2 is not None, "statistics of an empty activation"
        rstd = (self.m2 / self.n + norm.eps).rsqrt()
        per = channels // self.groups
        scale = rstd.repeat_interleave(per)
        shift = -self.mean.repeat_interleave(per) * scale
        if norm.weight is not None:
            weight = norm.weight.detach().to(device=scale.device, dtype=torch.float64)
            bias = norm.bias.detach().to(device=scale.device, dtype=torch.float64)
            scale = scale * weight
            shift = shift * weight + bias
        return scale.to(dtype).view(1, -1, 1, 1), shift.to(dtype).view(1, -1, 1, 1)


def _norm(t: torch.Tensor, aff: tuple[torch.Tensor, torch.Tensor], *, act: bool = True) -> torch.Tensor:
    """GroupNorm with given statistics (then SiLU when ``act``): one new tensor in ``t``'s dtype.

    ``x * scale + shift`` in one kernel (which computes half types in float32 internally); for half
    types scale and shift are rounded to the dtype first, so the result can differ from PyTorch's
    GroupNorm by about one unit in the last place -- the price of not holding a float32 copy of the tile.
    """
    import torch

    scale, shift = aff
    y = torch.addcmul(shift, t, scale)
    return torch.nn.functional.silu(y, inplace=True) if act else y


def _project(m: Any, tokens: torch.Tensor) -> torch.Tensor:
    """A pointwise projection of ``[n, C]`` tokens by an ``nn.Linear`` or a 1x1 ``nn.Conv2d``."""
    import torch

    if isinstance(m, torch.nn.Conv2d):
        return torch.nn.functional.linear(tokens, m.weight.view(m.weight.shape[0], -1), m.bias)
    out: torch.Tensor = m(tokens)
    return out


# ---- the passes -------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    sched: P.Schedule
    steps: Sequence[Step]
    store: Store
    tile_px: int
    progress: ProgressFn | None
    total: int
    done: int = 0
    x_stats: _Stats | None = None  # statistics of the current activation, for the next GroupNorm
    h_stats: _Stats | None = None  # of a resnet's hidden activation

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)

    def cores(self, p: P.Pass) -> list[Region]:
        ty, tx = P.grid(self.sched, self.store.lh, self.store.lw, self.tile_px, p)
        return [(ys, ys + yn, xs, xs + xn) for ys, yn in ty for xs, xn in tx]

    def next_groups(self, layer: int) -> int | None:
        """Groups of the first GroupNorm after ``layer`` (None when no GroupNorm follows)."""
        for s in self.steps[layer + 1:]:
            norm = s.norm1 if isinstance(s, Resnet) else s.norm if isinstance(s, (Attention, Output)) else None
            if norm is not None:
                return int(norm.num_groups)
        return None

    def sweep(self, p: P.Pass, body: Callable[[Region, list[tuple[torch.Tensor, Region]]], None]) -> None:
        """Run ``body(core, reads)`` over the tiles of ``p`` (:func:`extension.stream_store.sweep`: the next
        tile's reads requested before this one computes)."""
        reads = [a for a in p.reads if self.sched.buffers[a.buffer].role != "tokens"]
        sweep(self.cores(p), lambda core: [self.store.fetch(a, core) for a in reads], body, self.store.mover,
              self.tick)


def _crop(t: torch.Tensor, inner: Region, k: int = 1) -> torch.Tensor:
    a, b, c, d = inner
    return t[:, :, k * a:k * b, k * c:k * d]


def _conv_in(run: _Run, p: P.Pass, s: ConvIn, z: torch.Tensor) -> None:
    out = p.writes[0].buffer
    st = _Stats(run.next_groups(p.layer) or 1)
    store = run.store
    for core in run.cores(p):
        y0, y1, x0, x1 = core
        h, w = z.shape[-2:]
        r = (max(0, y0 - 1), min(h, y1 + 1), max(0, x0 - 1), min(w, x1 + 1))
        t = z[:, :, r[0]:r[1], r[2]:r[3]]
        if t.device != store.device:
            t = store.mover.fetch(t).take()
        t = t.to(store.dtype)
        if s.pre is not None:
            t = s.pre(t)
        y = _crop(s.conv(t), (y0 - r[0], y1 - r[0], x0 - r[2], x1 - r[2]))
        st.add(y)
        store.write(out, core, y)
        del y, t
        store.mover.settle()
        run.tick()
    store.mover.drain()
    run.x_stats = st


def _resnet1(run: _Run, p: P.Pass, s: Resnet) -> None:
    assert run.x_stats is not None
    aff = run.x_stats.affine(s.norm1, p.reads[0].channels, run.store.dtype)
    st = _Stats(int(s.norm2.num_groups))
    out = p.writes[0].buffer

    def body(core: Region, got: list[tuple[torch.Tensor, Region]]) -> None:
        (t, inner), = got
        y = _crop(s.conv1(_norm(t, aff)), inner)
        st.add(y)
        run.store.write(out, core, y)

    run.sweep(p, body)
    run.h_stats = st


def _resnet2(run: _Run, p: P.Pass, s: Resnet) -> None:
    assert run.h_stats is not None
    aff = run.h_stats.affine(s.norm2, p.reads[0].channels, run.store.dtype)
    groups = run.next_groups(p.layer)
    st = _Stats(groups) if groups is not None else None
    out = p.writes[0].buffer

    def body(core: Region, got: list[tuple[torch.Tensor, Region]]) -> None:
        (t, inner), (res, _) = got
        h = _norm(t, aff)
        if s.dropout is not None:
            h = s.dropout(h)
        y = _crop(s.conv2(h), inner)
        del h
        if s.shortcut is not None:
            res = s.shortcut(res)
        y.add_(res)  # in place on the conv output: (input + hidden) / scale, as diffusers, without copies
        if s.scale != 1:
            y.div_(s.scale)
        if st is not None:
            st.add(y)
        run.store.write(out, core, y)  # x is only read at this core here, so writing into it is safe

    run.sweep(p, body)
    run.x_stats = st


def _attn_kv(run: _Run, p: P.Pass, s: Attention) -> None:
    """Keys and values of every position into two tokens buffers, tile after tile (rows in tile order)."""
    assert run.x_stats is not None
    aff = run.x_stats.affine(s.norm, p.reads[0].channels, run.store.dtype)
    kb, vb = (a.buffer for a in p.writes)
    row = 0

    def body(core: Region, got: list[tuple[torch.Tensor, Region]]) -> None:
        nonlocal row
        (t, _), = got
        n = _norm(t, aff, act=False).flatten(2).transpose(1, 2)[0]  # [positions, C]
        run.store.write_rows(kb, row, _project(s.k, n))
        run.store.write_rows(vb, row, _project(s.v, n))
        row += n.shape[0]

    run.sweep(p, body)


def _attend(q: torch.Tensor, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``softmax(q k^T) v`` of scaled queries ``[heads, nq, d]`` (float32) over keys and values given chunk by
    chunk as ``[n, heads * d]`` rows, with a running maximum and mass (float32): only one chunk's logits
    exist at a time. Returns ``[heads, nq, d]``."""
    import torch

    heads, _, d = q.shape
    acc = torch.zeros_like(q)
    top = torch.full((*q.shape[:2], 1), -torch.inf, dtype=torch.float32, device=q.device)
    mass = torch.zeros_like(top)
    for k, v in pairs:
        k = k.float().view(-1, heads, d).transpose(0, 1)
        v = v.float().view(-1, heads, d).transpose(0, 1)
        logits = torch.bmm(q, k.transpose(1, 2))
        new_top = torch.maximum(top, logits.amax(-1, keepdim=True))
        logits.sub_(new_top).exp_()
        fade = (top - new_top).exp_()
        mass.mul_(fade).add_(logits.sum(-1, keepdim=True))
        acc.mul_(fade).baddbmm_(logits, v)
        top = new_top
        del k, v, logits
    return acc.div_(mass)


def _attn_out(run: _Run, p: P.Pass, s: Attention) -> None:
    """Each query block against every key/value chunk with a running softmax (float32), then the output
    projection and the input, into x's storage."""

    assert run.x_stats is not None
    store = run.store
    aff = run.x_stats.affine(s.norm, p.reads[0].channels, store.dtype)
    kb, vb = p.reads[1].buffer, p.reads[2].buffer
    n_tokens = store.bufs[kb].shape[0]
    chunk = P.KV_CHUNK
    groups = run.next_groups(p.layer)
    st = _Stats(groups) if groups is not None else None
    out = p.writes[0].buffer
    heads = s.heads
    scale = s.scale if s.scale is not None else (p.reads[0].channels // heads) ** -0.5

    def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        starts = list(range(0, n_tokens, chunk))
        nxt = (store.fetch_rows(kb, 0, chunk), store.fetch_rows(vb, 0, chunk))
        for j in range(len(starts)):
            k, v = (t.take() for t in nxt)
            if j + 1 < len(starts):  # the next chunk's copy overlaps this chunk's compute
                b = starts[j + 1]
                nxt = (store.fetch_rows(kb, b, b + chunk), store.fetch_rows(vb, b, b + chunk))
            yield k, v

    def body(core: Region, got: list[tuple[torch.Tensor, Region]]) -> None:
        (x, _), = got
        c, hh, ww = x.shape[1:]
        n = _norm(x, aff, act=False).flatten(2).transpose(1, 2)[0]
        q = (_project(s.q, n).float() * scale).view(-1, heads, c // heads).transpose(0, 1)  # [heads, nq, d]
        del n
        acc = _attend(q, chunks())
        del q
        y = _project(s.proj, acc.transpose(0, 1).reshape(-1, c).to(x.dtype))
        del acc
        if s.dropout is not None:
            y = s.dropout(y)
        y = y.t().reshape(1, c, hh, ww)
        if s.residual:
            y = y + x
        if s.rescale != 1:
            y = y / s.rescale
        if st is not None:
            st.add(y)
        store.write(out, core, y)

    run.sweep(p, body)
    run.x_stats = st


def _upsample(run: _Run, p: P.Pass, s: Upsample) -> None:
    import torch

    groups = run.next_groups(p.layer)
    st = _Stats(groups) if groups is not None else None
    out = p.writes[0].buffer

    def body(core: Region, got: list[tuple[torch.Tensor, Region]]) -> None:
        (t, inner), = got
        up = torch.nn.functional.interpolate(t, scale_factor=2.0, mode="nearest")
        y = _crop(s.conv(up), inner, 2)
        del up
        if st is not None:
            st.add(y)
        run.store.write(out, tuple(2 * v for v in core), y)  # type: ignore[arg-type]

    run.sweep(p, body)
    run.x_stats = st


def _output(run: _Run, p: P.Pass, s: Output) -> None:
    assert run.x_stats is not None
    aff = run.x_stats.affine(s.norm, p.reads[0].channels, run.store.dtype)
    out = p.writes[0].buffer

    def body(core: Region, got: list[tuple[torch.Tensor, Region]]) -> None:
        (t, inner), = got
        run.store.write(out, core, _crop(s.conv(_norm(t, aff)), inner))

    run.sweep(p, body)


def compute_device(vae: Any) -> torch.device:
    """The device exact tiles of ``vae`` compute on: its decoder's (:func:`steps_of`; a VAE with ``stream_steps()``
    may hold them elsewhere than its own parameters say).

    Raises:
        PlanError: the VAE's decoder is not one exact tiles run.
    """
    return _compute_device_dtype(steps_of(vae))[0]


def _compute_device_dtype(steps: Sequence[Step]) -> tuple[torch.device, torch.dtype]:
    last = steps[-1]
    w = last.conv.weight if isinstance(last, Output) else None
    if w is None:
        raise PlanError("the last decoder step must be Output")
    return w.device, w.dtype


def decode_steps(steps: Sequence[Step], z: torch.Tensor, *, tile_px: int, device_budget: int | None = None,
                 progress: ProgressFn | None = None, on_buffers: Callable[[int], None] | None = None,
                 ledger: Ledger | None = None) -> torch.Tensor:
    """Decode ``z`` ``[B, C, h, w]`` exactly through ``steps`` (see the module docstring), tile by tile.

    Args:
        steps: the decoder as :class:`ConvIn`, mid/up :class:`Resnet` / :class:`Attention` /
            :class:`Upsample` steps in order, and :class:`Output`; modules already on their device/dtype.
        z (`torch.Tensor`): latents (VAE space); on the compute device, or on the CPU (its tiles are copied in).
        tile_px (`int`): tile side in OUTPUT pixels (scaled down with the resolution of each pass);
            bounds the working set of one tile. No overlap: each pass reads one pixel of context.
        device_budget (`int | None`, defaults to None): bytes the whole-image buffers may use on the
            compute device; None: all on the device (in-memory exact tiling); 0: all in host memory (the
            output too: the result is then a CPU tensor). See :func:`hybrid_vae.policy.passes.placement`.
        progress (`ProgressFn | None`): ``progress(done, total)`` after each tile of each pass.
        on_buffers (`Callable[[int], None] | None`): called with the bytes of the whole-image buffers
            alive together (device and host) each time one is allocated.
        ledger (`Ledger | None`): counts the device working set and the copies (tests, benchmarks).

    Returns:
        torch.Tensor: ``[B, out_channels, h * 2^k, w * 2^k]``, not clamped, on the compute device
        (or on the CPU when the output buffer was placed in host memory).

    Raises:
        PlanError: steps that cannot be tiled exactly, or ``tile_px < 8``.
    """
    import torch

    if tile_px < 8:
        raise PlanError(f"tile_px={tile_px}: must be at least 8")
    device, dtype = _compute_device_dtype(steps)
    b, cz, lh, lw = z.shape
    layers = step_layers(steps, int(cz))
    sched = P.schedule(layers, narrow_in_place=device_budget is None)
    esize = torch.empty((), dtype=dtype).element_size()
    host = P.placement(sched, lh, lw, tile_px, esize, b, device_budget)
    mover: Mover = CudaMover(device, ledger) if device.type == "cuda" and host else Mover(device, ledger)
    store = Store(sched, lh, lw, b, device, dtype, host, mover, ledger, on_buffers)
    run = _Run(sched, steps, store, tile_px, progress, P.steps(sched, lh, lw, tile_px) * b)
    with ledger if ledger is not None else contextlib.nullcontext():
        store.alloc(sched.output)
        for item in range(b):
            store.item = item
            _run_item(run, z[item:item + 1])
        result = store.bufs[sched.output]
        store.bufs.clear()
    if progress is not None and run.done < run.total:
        progress(run.total, run.total)
    return result


def _run_item(run: _Run, z: torch.Tensor) -> None:
    for p in run.sched.passes:
        for bid in p.alloc:
            run.store.alloc(bid)
        s = run.steps[p.layer]
        if p.part == "conv_in":
            assert isinstance(s, ConvIn)
            _conv_in(run, p, s, z)
        elif p.part == "resnet1":
            assert isinstance(s, Resnet)
            _resnet1(run, p, s)
        elif p.part == "resnet2":
            assert isinstance(s, Resnet)
            _resnet2(run, p, s)
        elif p.part == "attn_kv":
            assert isinstance(s, Attention)
            _attn_kv(run, p, s)
        elif p.part == "attn_out":
            assert isinstance(s, Attention)
            _attn_out(run, p, s)
        elif p.part == "upsample":
            assert isinstance(s, Upsample)
            _upsample(run, p, s)
        else:
            assert isinstance(s, Output)
            _output(run, p, s)
        for bid in p.free:
            run.store.free(bid)


def stream_decode(vae: Any, z: torch.Tensor, *, tile_px: int, device_budget: int | None = None,
                  progress: ProgressFn | None = None, on_buffers: Callable[[int], None] | None = None,
                  ledger: Ledger | None = None) -> torch.Tensor:
    """Decode VAE-space latents ``z`` ``[B, C, h, w]`` of a diffusers ``AutoencoderKL`` (or a VAE with
    ``stream_steps()``, see :func:`steps_of`) exactly, with tiles of at most ``tile_px`` (see
    :func:`decode_steps` for the arguments).

    Raises:
        PlanError: the VAE's decoder is not one this function supports (the reason is named).
    """
    try:
        steps = steps_of(vae)
    except PlanError as exc:
        raise PlanError(f"exact tiling cannot run this VAE: {exc}; use a local-GroupNorm tiled plan") from None
    return decode_steps(steps, z, tile_px=tile_px, device_budget=device_budget, progress=progress,
                        on_buffers=on_buffers, ledger=ledger)
