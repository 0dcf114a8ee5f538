"""Exact tiled decode: tiles bound the memory, every GroupNorm still sees the whole image.

Why: tiling a VAE decode the usual way (each tile through the whole decoder) gives each tile its own
GroupNorm statistics, so tile colours drift from the full decode (about 20 dB PSNR on the fixture
VAE; diffusers documents "a difference in tone" between tiles), and the overlap that hides the seams
is decoded twice.

How: the decoder runs *layer by layer over the whole image* instead of tile by tile through all
layers. Between two GroupNorms of a diffusers ``Decoder`` there is exactly one 3x3 convolution
(plus pointwise work), so each step ("pass") runs tile by tile with one pixel of context, writes its
tiles into a whole-image buffer, and adds each tile's sums to the statistics of the next GroupNorm.
The next pass normalises every tile with those whole-image statistics. The result equals the full
decode up to floating-point summation order (tests: <= 1e-4 on float32).

Trade-offs (docs/tiling-quality.md, docs/benchmarks.md):
- Memory: one tile's working set plus two or three whole-image activations (for the SD decoder
  about 384 elements per output pixel at the widest point, ~1/3 of a full decode's peak) -- more
  than per-tile tiling, which needs nothing per image pixel. ``stream_buffer_elements`` gives the
  figure for any decoder config; the engine only picks this path when it fits.
- Time: no overlap is decoded twice; the extra work is the statistics (one reduction per pass) and
  GroupNorm applied outside PyTorch's fused kernel.
- The mid block (with its attention) runs once on the whole latent, as in a full decode.

Supports diffusers' ``Decoder`` made of ``UpDecoderBlock2D`` / ``ResnetBlock2D`` / ``Upsample2D``
(SD 1.x/2.x, SDXL, SD3, FLUX.1 VAEs and the fixture); :func:`stream_support` says why another is not.
A VAE of another library can offer a view of its decoder with those attribute names through a
``stream_view()`` method (ComfyUI's LDM decoder: :mod:`extension.stream_ldm`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hybrid_vae.policy.errors import PlanError
from hybrid_vae.policy.tiles import axis_tiles

if TYPE_CHECKING:
    import torch
    from hybrid_vae.policy.model import DecodeSettings
    from hybrid_vae.policy.profiles import Family

log = logging.getLogger("hybrid_vae.stream")

__all__ = ["settings_for_vae", "stream_buffer_elements", "stream_decode", "stream_support"]

ProgressFn = Callable[[int, int], None]
Region = tuple[int, int, int, int]  # y0, y1, x0, x1


def _conv3(m: Any) -> bool:
    import torch

    return (isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) == (3, 3) and tuple(m.stride) == (1, 1)
            and tuple(m.padding) == (1, 1) and tuple(m.dilation) == (1, 1) and m.groups == 1
            and m.padding_mode == "zeros")


def _conv1(m: Any) -> bool:
    import torch

    return (isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1)
            and tuple(m.padding) == (0, 0) and m.groups == 1)


def _own_view(vae: Any) -> tuple[Any, str | None] | None:
    """``vae.stream_view()`` -> ``(view or None, why not)`` when the VAE offers a diffusers-shaped view of its
    decoder (an object with ``decoder`` and ``post_quant_conv``, validated by whoever builds it), else None."""
    hook = getattr(vae, "stream_view", None)
    return hook() if callable(hook) else None  # type: ignore[no-any-return]


def stream_support(vae: Any) -> str | None:
    """None when :func:`stream_decode` can run ``vae`` exactly, else the reason it cannot."""
    import torch

    own = _own_view(vae)
    if own is not None:
        return own[1]
    dec = getattr(vae, "decoder", None)
    if dec is None or type(dec).__name__ != "Decoder":
        return f"{type(vae).__name__} has no diffusers Decoder"
    for a in ("conv_in", "mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out"):
        if getattr(dec, a, None) is None:
            return f"decoder has no {a}"
    if any(p.device.type == "meta" for p in dec.parameters()):
        return "decoder weights are offloaded (meta tensors, e.g. sequential CPU offload); exact tiling needs them resident"
    if not isinstance(dec.conv_norm_out, torch.nn.GroupNorm):
        return f"conv_norm_out is {type(dec.conv_norm_out).__name__}, not GroupNorm (spatial norm)"
    if not isinstance(dec.conv_act, torch.nn.SiLU) or not _conv3(dec.conv_out):
        return "conv_act/conv_out are not SiLU/3x3 convolution"
    for i, block in enumerate(dec.up_blocks):
        if type(block).__name__ != "UpDecoderBlock2D":
            return f"up_blocks[{i}] is {type(block).__name__}"
        for j, r in enumerate(block.resnets):
            where = f"up_blocks[{i}].resnets[{j}]"
            if type(r).__name__ != "ResnetBlock2D":
                return f"{where} is {type(r).__name__}"
            if r.up or r.down or r.time_emb_proj is not None or r.time_embedding_norm not in ("default", "group"):
                return f"{where} resamples or takes a time embedding"
            if not (isinstance(r.norm1, torch.nn.GroupNorm) and isinstance(r.norm2, torch.nn.GroupNorm)):
                return f"{where} norms are not GroupNorm"
            if not (_conv3(r.conv1) and _conv3(r.conv2)) or not isinstance(r.nonlinearity, torch.nn.SiLU):
                return f"{where} convolutions are not 3x3 or its activation is not SiLU"
            if r.conv_shortcut is not None and not _conv1(r.conv_shortcut):
                return f"{where} shortcut is not a 1x1 convolution"
        for j, u in enumerate(block.upsamplers or []):
            where = f"up_blocks[{i}].upsamplers[{j}]"
            if type(u).__name__ != "Upsample2D":
                return f"{where} is {type(u).__name__}"
            if u.use_conv_transpose or not u.use_conv or not u.interpolate or u.norm is not None:
                return f"{where} is not nearest x2 + convolution"
            conv = u.conv if u.name == "conv" else getattr(u, "Conv2d_0", None)
            if not _conv3(conv):
                return f"{where} convolution is not 3x3"
    return None


def settings_for_vae(settings: DecodeSettings, vae: Any, family: Family) -> DecodeSettings:
    """``settings`` for decoding with ``vae``: local tiles only when exact tiling cannot run it (so the
    engine never plans an exact attempt that would fail). Callers: the orchestrator, ``hybrid-vae serve``."""
    if settings.tile_groupnorm == "local" or family.video:
        return settings
    why = stream_support(vae)
    if why is None:
        return settings
    log.debug("hybrid-vae: no exact tiling for %s (%s); local tiles only", type(vae).__name__, why)
    return settings.model_copy(update={"tile_groupnorm": "local"})


def stream_buffer_elements(block_out_channels: list[int] | tuple[int, ...], layers_per_block: int,
                           out_channels: int = 3) -> float:
    """Whole-image buffer elements per OUTPUT pixel at the widest point of :func:`stream_decode` (one item).

    For an ``AutoencoderKL`` config (``block_out_channels``, ``layers_per_block``): the SD decoder
    (128, 256, 512, 512; 2) gives 387: the upsampled 256-channel activation at full resolution, one
    128-channel buffer and the 3-channel output. Multiply by the dtype size for bytes; one tile's
    working set comes on top.
    """
    rev = list(reversed(block_out_channels))
    n = len(rev)
    peak = 0.0
    ch = rev[0]  # channels of the stored activation (its storage: the widest of its life)
    area = 1 / 4 ** (n - 1)  # of the output, at the current resolution
    for i, out_ch in enumerate(rev):
        for _ in range(layers_per_block + 1):
            if out_ch <= ch:  # x (its storage) + h; the output goes into x's storage
                peak = max(peak, area * (ch + out_ch))
            else:  # a wider output needs its own buffer, which becomes x
                peak = max(peak, area * (ch + 2 * out_ch))
                ch = out_ch
        if i < n - 1:
            peak = max(peak, area * ch + 4 * area * out_ch)  # upsample: source + 2x buffer
            ch, area = out_ch, area * 4
    return peak + out_channels  # the output is allocated first and lives throughout


class _Stats:
    """Per-group statistics of one activation over the whole image, merged from tiles.

    Each tile contributes its count, mean and variance per group (``torch.var_mean`` in float32);
    the parallel-variance formula (Chan et al.) merges them in float64 at the end of the pass.
    """

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.parts: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def add(self, t: torch.Tensor) -> None:
        import torch

        b, c, h, w = t.shape
        v = t.view(b, self.groups, c // self.groups, h, w)  # a view even of a cropped tile: no copy
        if v.dtype == torch.float32:
            var, mean = torch.var_mean(v, dim=(0, 2, 3, 4), correction=0)
        else:  # half types: float32 statistics, a few groups at a time (the copy stays <= the tile's size)
            step = max(1, self.groups * t.element_size() // 4)
            parts = [torch.var_mean(v[:, g:g + step].float(), dim=(0, 2, 3, 4), correction=0)
                     for g in range(0, self.groups, step)]
            var, mean = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        self.parts.append((b * (c // self.groups) * h * w, mean, var))

    def affine(self, norm: Any, channels: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, shift) in ``dtype`` so that ``x * scale + shift`` is ``norm`` with these
        statistics (computed in float64, rounded once)."""
        import torch

        k = torch.tensor([p[0] for p in self.parts], dtype=torch.float64, device=self.parts[0][1].device)
        means = torch.stack([p[1] for p in self.parts]).double()  # [tiles, groups]
        variances = torch.stack([p[2] for p in self.parts]).double()
        n = k.sum()
        mean = (k[:, None] * means).sum(0) / n
        var = (k[:, None] * (variances + (means - mean) ** 2)).sum(0) / n
        rstd = (var + norm.eps).rsqrt()
        per = channels // self.groups
        scale = rstd.repeat_interleave(per)
        shift = -mean.repeat_interleave(per) * scale
        if norm.weight is not None:
            weight = norm.weight.detach().to(device=mean.device, dtype=torch.float64)
            bias = norm.bias.detach().to(device=mean.device, dtype=torch.float64)
            scale = scale * weight
            shift = shift * weight + bias
        return scale.to(dtype).view(1, -1, 1, 1), shift.to(dtype).view(1, -1, 1, 1)


def _norm_act(t: torch.Tensor, aff: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """GroupNorm with given statistics, then SiLU: one new tensor in ``t``'s dtype.

    ``x * scale + shift`` in one kernel (which computes half types in float32 internally); for half
    types scale and shift are rounded to the dtype first, so the result can differ from PyTorch's
    GroupNorm by about one unit in the last place -- the price of not holding a float32 copy of the tile.
    """
    import torch

    scale, shift = aff
    y = torch.addcmul(shift, t, scale)
    return torch.nn.functional.silu(y, inplace=True)


class _Grid:
    """Tiles of one resolution: a partition of the image into cores, plus 1-pixel context reads."""

    def __init__(self, h: int, w: int, tile: int) -> None:
        # axis_tiles with overlap 0 gives equal tiles whose starts are rounded: make them a partition
        self.ty = _partition(axis_tiles(h, tile, 0), h)
        self.tx = _partition(axis_tiles(w, tile, 0), w)

    def __len__(self) -> int:
        return len(self.ty) * len(self.tx)

    def cores(self) -> list[Region]:
        return [(ys, ys + yn, xs, xs + xn) for ys, yn in self.ty for xs, xn in self.tx]


def _partition(tiles: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    starts = [s for s, _ in tiles] + [length]
    return [(starts[i], starts[i + 1] - starts[i]) for i in range(len(tiles)) if starts[i + 1] > starts[i]]


def _read(buf: torch.Tensor, core: Region, halo: int) -> tuple[torch.Tensor, Region]:
    """The core plus ``halo`` pixels of context (clipped at the image edge) and the core's place in it."""
    y0, y1, x0, x1 = core
    h, w = buf.shape[-2:]
    a, b, c, d = max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo)
    return buf[:, :, a:b, c:d], (y0 - a, y1 - a, x0 - c, x1 - c)


class _Run:
    def __init__(self, tile_px: int, out_h: int, progress: ProgressFn | None,
                 on_buffers: Callable[[int], None] | None, keep: tuple[torch.Tensor, ...] = ()) -> None:
        self.tile_px, self.out_h = tile_px, out_h
        self.progress, self.total, self.done = progress, 0, 0
        self.on_buffers = on_buffers
        self.keep = keep  # buffers alive throughout (the output)

    def live(self, *bufs: torch.Tensor) -> None:
        """Report the bytes of the whole-image buffers alive together (distinct storages)."""
        if self.on_buffers is not None:
            seen = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in (*bufs, *self.keep)}
            self.on_buffers(sum(seen.values()))

    def grid(self, h: int, w: int) -> _Grid:
        return _Grid(h, w, max(8, round(self.tile_px * h / self.out_h)))

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)


def _total_steps(run: _Run, dec: Any, lh: int, lw: int) -> int:
    """Tile steps of one item: two passes per resnet and one per upsampler at each level, one final pass."""
    n = 0
    for i, block in enumerate(dec.up_blocks):
        tiles = len(run.grid(lh * 2 ** i, lw * 2 ** i))
        n += tiles * (2 * len(block.resnets) + len(block.upsamplers or []))
    last = len(dec.up_blocks) - 1
    return n + len(run.grid(lh * 2 ** last, lw * 2 ** last))


def _resnet(run: _Run, r: Any, x: torch.Tensor, aff_in: tuple[torch.Tensor, torch.Tensor],
            next_norm: Any) -> tuple[torch.Tensor, _Stats | None]:
    """One ResnetBlock2D over the whole image; returns its output (in x's storage) and its statistics."""
    import torch

    _, cin, h, w = x.shape
    cout = r.conv1.out_channels
    grid = run.grid(h, w)
    hbuf = torch.empty((1, cout, h, w), dtype=x.dtype, device=x.device)
    run.live(x, hbuf)
    st2 = _Stats(r.norm2.num_groups)
    for core in grid.cores():
        t, (a, b, c, d) = _read(x, core, 1)
        y = r.conv1(_norm_act(t, aff_in))[:, :, a:b, c:d]
        st2.add(y)
        hbuf[:, :, core[0]:core[1], core[2]:core[3]] = y
        del y, t
        run.tick()
    aff2 = st2.affine(r.norm2, cout, x.dtype)
    out = x[:, :cout] if cout <= cin else torch.empty((1, cout, h, w), dtype=x.dtype, device=x.device)
    run.live(x, hbuf, out)
    st_out = _Stats(next_norm.num_groups) if next_norm is not None else None
    for core in grid.cores():
        y0, y1, x0, x1 = core
        t, (a, b, c, d) = _read(hbuf, core, 1)
        y = r.conv2(r.dropout(_norm_act(t, aff2)))[:, :, a:b, c:d]
        res = x[:, :, y0:y1, x0:x1]
        if r.conv_shortcut is not None:
            res = r.conv_shortcut(res)
        y.add_(res)  # in place on the conv output: (input + hidden) / scale, as diffusers, without copies
        if r.output_scale_factor != 1:
            y.div_(r.output_scale_factor)
        if st_out is not None:
            st_out.add(y)
        out[:, :, y0:y1, x0:x1] = y  # x is only read at this core here, so writing into it is safe
        del y, t, res
        run.tick()
    del hbuf
    return out, st_out


def _upsample(run: _Run, u: Any, x: torch.Tensor, next_groups: int) -> tuple[torch.Tensor, _Stats]:
    import torch

    conv = u.conv if u.name == "conv" else u.Conv2d_0
    h, w = x.shape[-2:]
    out = torch.empty((1, conv.out_channels, 2 * h, 2 * w), dtype=x.dtype, device=x.device)
    run.live(x, out)
    st = _Stats(next_groups)
    for core in run.grid(h, w).cores():
        t, (a, b, cc, d) = _read(x, core, 1)
        up = torch.nn.functional.interpolate(t, scale_factor=2.0, mode="nearest")
        y = conv(up)[:, :, 2 * a:2 * b, 2 * cc:2 * d]
        del up
        st.add(y)
        out[:, :, 2 * core[0]:2 * core[1], 2 * core[2]:2 * core[3]] = y
        del y, t
        run.tick()
    return out, st


def stream_decode(vae: Any, z: torch.Tensor, *, tile_px: int, progress: ProgressFn | None = None,
                  on_buffers: Callable[[int], None] | None = None) -> torch.Tensor:
    """Decode VAE-space latents ``z`` ``[B, C, h, w]`` exactly, with tiles of at most ``tile_px``.

    Args:
        vae: a diffusers ``AutoencoderKL`` (see :func:`stream_support`), already on its device/dtype.
        z (`torch.Tensor`): latents on the VAE's device and dtype.
        tile_px (`int`): tile side in OUTPUT pixels (scaled down with the resolution of each layer);
            bounds the working set of one tile. No overlap: each pass reads one pixel of context.
        progress (`ProgressFn | None`): ``progress(done, total)`` after each tile of each pass.
        on_buffers (`Callable[[int], None] | None`): called with the bytes of the whole-image buffers
            alive together at each point where a pass allocates one (tests check
            :func:`stream_buffer_elements` with it).

    Returns:
        torch.Tensor: ``[B, out_channels, h * 8, w * 8]``, not clamped.

    Raises:
        PlanError: the VAE's decoder is not one this function supports (the reason is named).
    """
    import torch

    why = stream_support(vae)
    if why is not None:
        raise PlanError(f"exact tiling cannot run this VAE: {why}; use a local-GroupNorm tiled plan")
    if tile_px < 8:
        raise PlanError(f"tile_px={tile_px}: must be at least 8")
    own = _own_view(vae)
    if own is not None:
        vae = own[0]
    dec = vae.decoder
    pqc = getattr(vae, "post_quant_conv", None)
    b, _, lh, lw = z.shape
    scale = 2 ** (len(dec.up_blocks) - 1)
    up_dtype = next(iter(dec.up_blocks.parameters())).dtype
    result = torch.empty((b, dec.conv_out.out_channels, lh * scale, lw * scale), dtype=up_dtype, device=z.device)
    run = _Run(tile_px, lh * scale, progress, on_buffers, keep=(result,))
    run.total = b * _total_steps(run, dec, lh, lw)
    firsts = [blk.resnets[0].norm1 if len(blk.resnets) else None for blk in dec.up_blocks]
    for i in range(b):
        zi = z[i:i + 1]
        if pqc is not None:
            zi = pqc(zi)
        x = dec.mid_block(dec.conv_in(zi)).to(up_dtype)
        st: _Stats | None = _Stats((firsts[0] or dec.conv_norm_out).num_groups)
        assert st is not None
        st.add(x)
        for bi, block in enumerate(dec.up_blocks):
            # the GroupNorm that reads this block's output: the next block's first, or norm_out
            after = next((n for n in firsts[bi + 1:] if n is not None), dec.conv_norm_out)
            for ri, r in enumerate(block.resnets):
                if ri + 1 < len(block.resnets):
                    nxt = block.resnets[ri + 1].norm1
                else:
                    nxt = None if block.upsamplers else after
                assert st is not None
                x, st = _resnet(run, r, x, st.affine(r.norm1, x.shape[1], x.dtype), nxt)
            for u in block.upsamplers or []:
                x, st = _upsample(run, u, x, after.num_groups)
        assert st is not None
        aff = st.affine(dec.conv_norm_out, x.shape[1], x.dtype)
        run.live(x, result)
        for core in run.grid(x.shape[-2], x.shape[-1]).cores():
            t, (a, bb, c, d) = _read(x, core, 1)
            result[i:i + 1, :, core[0]:core[1], core[2]:core[3]] = dec.conv_out(_norm_act(t, aff))[:, :, a:bb, c:d]
            del t
            run.tick()
        del x
    if progress is not None and run.done < run.total:
        progress(run.total, run.total)
    return result
