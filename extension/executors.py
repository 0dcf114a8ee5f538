"""Run one :class:`~policy.model.Plan` on a diffusers VAE object.

``run_plan(plan, vae, z, family=fam)`` decodes latents that are already in VAE space (unpacked,
normalised: see :mod:`extension.latents`) and returns a float tensor in [-1, 1],
``[B, 3, H, W]`` or ``[B, 3, F, H, W]``, on the device the plan ran on.

* ``full``: ``vae.decode(z)`` at once (or item by item when ``plan.slice_batch``), with diffusers'
  own tiling, slicing and frame-wise decoding switched off.
* ``tiled``, image VAEs with ``post_quant_conv`` + ``decoder`` (``AutoencoderKL``): the engine's own
  tiler. Its grid is :func:`policy.tiles.axis_tiles` (equal tiles, the geometry the estimator
  assumed), tiles are blended with separable linear ramps that sum to one over every overlap, and
  accumulated in place into one preallocated output, one batch item at a time. We do not use
  diffusers' ``tiled_decode`` here: its fixed stride leaves thin edge tiles (wasted decoder passes,
  weak context at the border) and its memory/time is not the one the estimate describes.
  Other image VAEs fall back to their ``enable_tiling()`` with the plan's tile.
* ``tiled``, video VAEs (``AutoencoderKLHunyuanVideo``, ``AutoencoderKLWan``): diffusers'
  ``tiled_decode`` with the plan's spatial tile, stride ``tile - overlap``, and (HunyuanVideo)
  the plan's temporal chunk through ``tile_sample_min_num_frames`` / ``..._stride_num_frames``.
* ``cpu``: the VAE in float32 on the CPU, the whole item (video: in the plan's temporal chunks), or, when the
  plan has a tile, the tiled path above on the CPU (host memory bounded by the tile).

Every attribute, the device and the dtype of the VAE are restored afterwards, also when the decode
raises. The run dtype only ever widens the VAE's (float16/bfloat16 -> float32), so restoring is
lossless; on a CPU the decode always runs in float32 (half-precision convolutions there are slow
or missing). torch is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from hybrid_vae.extension.stream import compute_device, stream_decode
from hybrid_vae.extension.stream_hunyuan import hunyuan_exact_decode
from hybrid_vae.extension.stream_wan import wan_exact_tiles
from hybrid_vae.policy.errors import PlanError
from hybrid_vae.policy.tiles import axis_tiles, diffusers_axis

if TYPE_CHECKING:
    import torch
    from hybrid_vae.policy.model import Plan
    from hybrid_vae.policy.profiles import Family

log = logging.getLogger("hybrid_vae.executors")

ProgressFn = Callable[[int, int], None]
"""``progress(done, total)``: called after each tile, temporal chunk or batch item."""

__all__ = ["ProgressFn", "blend_weights", "is_kl_like", "run_plan", "run_settings", "vae_device_dtype"]

_MISSING = object()
_DTYPES = ("float16", "bfloat16", "float32")


def vae_device_dtype(vae: Any) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the VAE's first parameter (CPU/float32 for a parameterless module)."""
    import torch

    for p in vae.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def run_settings(plan: Plan, vae: Any,
                 device: str | torch.device | None = None) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype ``plan`` runs on ``vae``.

    Device: CPU for ``cpu`` plans, else ``device`` (default: where the VAE is). Dtype: float32 on a
    CPU; else the plan's dtype when it is the VAE's or float32 (a lossless upcast), otherwise the
    VAE's own dtype (never a lossy cast of the weights).
    """
    import torch

    vdev, vdtype = vae_device_dtype(vae)
    dev = torch.device("cpu") if plan.path == "cpu" else torch.device(device) if device is not None else vdev
    if dev.type == "cpu":
        return dev, torch.float32
    if plan.dtype not in _DTYPES:
        raise PlanError(f"plan dtype {plan.dtype!r} is not one of {', '.join(_DTYPES)}")
    want = getattr(torch, plan.dtype)
    if want == vdtype or want == torch.float32:
        return dev, want
    log.info("plan dtype %s would narrow the VAE's %s weights; decoding in %s", plan.dtype, vdtype, vdtype)
    return dev, vdtype


@contextlib.contextmanager
def _patched(obj: Any, attrs: Mapping[str, Any]) -> Iterator[None]:
    """Set attributes for the duration of the block; restore (or delete) them afterwards, even on error."""
    saved = {k: getattr(obj, k, _MISSING) for k in attrs}
    try:
        for k, v in attrs.items():
            setattr(obj, k, v)
        yield
    finally:
        for k, v in saved.items():
            if v is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(obj, k)
            else:
                setattr(obj, k, v)


@contextlib.contextmanager
def _placed(vae: Any, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Move/cast the VAE for the block and move it back (device and dtype) afterwards, even on error."""
    odev, odtype = vae_device_dtype(vae)
    moved = odev != device or odtype != dtype
    try:
        if moved:
            vae.to(device=device, dtype=dtype)
        yield
    finally:
        if moved:
            vae.to(device=odev, dtype=odtype)


@contextlib.contextmanager
def _counting(module: Any, on_call: Callable[[], None]) -> Iterator[None]:
    """Call ``on_call`` after every forward of ``module`` (progress for tiling that runs inside diffusers)."""
    handle = module.register_forward_hook(lambda *_: on_call())
    try:
        yield
    finally:
        handle.remove()


#: VAE classes that have ``decoder`` and ``post_quant_conv`` but whose decode is not ``decoder(pqc(z))``.
_NOT_KL_LIKE = frozenset({
    "AsymmetricAutoencoderKL", "AutoencoderKLTemporalDecoder", "AutoencoderKLHunyuanVideo",
    "AutoencoderKLWan", "AutoencoderKLCogVideoX", "AutoencoderKLLTXVideo", "AutoencoderKLMochi",
    "AutoencoderKLAllegro",
})


def is_kl_like(vae: Any) -> bool:
    """True when the engine's own tiler can run this VAE: an ``AutoencoderKL``-style image VAE whose
    decode is ``decoder(post_quant_conv(z))`` (``post_quant_conv`` may be ``None``)."""
    import torch

    dec = getattr(vae, "decoder", None)
    return (isinstance(dec, torch.nn.Module) and hasattr(vae, "post_quant_conv")
            and type(vae).__name__ not in _NOT_KL_LIKE)


def blend_weights(tiles: list[tuple[int, int]], scale: int, *, device: Any = None,
                  dtype: Any = None) -> list[torch.Tensor]:
    """Per-tile 1-D blend weights along one axis, in output pixels.

    Each tile gets a linear ramp over every overlap with a neighbour (rising where it overlaps the
    previous tile, falling where it overlaps the next), then the weights are divided by their sum
    at each pixel, so they form a partition of unity: overlapping weights sum to exactly one, also
    where more than two tiles overlap. The 2-D weight of a tile is the outer product of its y and x
    weights, which is again a partition of unity.

    Args:
        tiles (`list[tuple[int, int]]`): ``(start, size)`` in latent pixels, ordered, as from
            :func:`policy.tiles.axis_tiles`.
        scale (`int`): output pixels per latent pixel.

    Returns:
        list[torch.Tensor]: one 1-D tensor of ``size * scale`` weights per tile.
    """
    import torch

    length = max(s + n for s, n in tiles) * scale
    raw: list[torch.Tensor] = []
    total = torch.zeros(length, dtype=torch.float64)
    for i, (s, n) in enumerate(tiles):
        w = torch.ones(n * scale, dtype=torch.float64)
        start, end = s * scale, (s + n) * scale
        if i > 0:
            prev_end = (tiles[i - 1][0] + tiles[i - 1][1]) * scale
            o = min(prev_end, end) - start
            if o > 0:
                w[:o] = torch.minimum(w[:o], (torch.arange(o, dtype=torch.float64) + 0.5) / o)
        if i + 1 < len(tiles):
            next_start = tiles[i + 1][0] * scale
            o = end - max(next_start, start)
            if o > 0:
                w[n * scale - o:] = torch.minimum(w[n * scale - o:],
                                                  1.0 - (torch.arange(o, dtype=torch.float64) + 0.5) / o)
        raw.append(w)
        total[start:end] += w
    out = []
    for (s, n), w in zip(tiles, raw, strict=True):
        out.append((w / total[s * scale:(s + n) * scale]).to(device=device, dtype=dtype or torch.float32))
    return out


def _out_channels(vae: Any) -> int:
    cfg = getattr(vae, "config", None)
    return int(getattr(cfg, "out_channels", 3) or 3)


def _decode_call(vae: Any, z: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = vae.decode(z, return_dict=False)[0]
    return out


def _full(vae: Any, z: torch.Tensor, *, slice_batch: bool, progress: ProgressFn | None) -> torch.Tensor:

    attrs: dict[str, Any] = {}
    for k in ("use_tiling", "use_slicing", "use_framewise_decoding"):
        if hasattr(vae, k):
            attrs[k] = False
    with _patched(vae, attrs):
        if not slice_batch or z.shape[0] == 1:
            out = _decode_call(vae, z)
            if progress:
                progress(1, 1)
            return out
        return _items(vae, z, progress)


def _tiled_kl(vae: Any, z: torch.Tensor, plan: Plan, fam: Family, progress: ProgressFn | None) -> torch.Tensor:
    """The engine's local-GroupNorm tiler: equal tiles from ``axis_tiles``, each through the whole
    decoder, linear-ramp blending, in-place accumulation. GroupNorm sees only the tile, so colours
    drift from the full decode (exact plans run :func:`extension.stream.stream_decode` instead)."""
    import torch

    sc = fam.spatial_compression
    if plan.tile_px is None:
        raise PlanError(f"tiled plan {plan.label!r} has no tile size for an image VAE")
    b, _, h, w = z.shape
    ty = axis_tiles(h, plan.tile_px // sc, plan.overlap_px // sc)
    tx = axis_tiles(w, plan.tile_px // sc, plan.overlap_px // sc)
    wy = blend_weights(ty, sc, device=z.device, dtype=z.dtype)
    wx = blend_weights(tx, sc, device=z.device, dtype=z.dtype)
    out = torch.zeros((b, _out_channels(vae), h * sc, w * sc), dtype=z.dtype, device=z.device)
    pqc = getattr(vae, "post_quant_conv", None)
    total, done = b * len(ty) * len(tx), 0
    for i in range(b):
        zi = z[i:i + 1]
        if pqc is not None:
            zi = pqc(zi)
        for (ys, yn), wyt in zip(ty, wy, strict=True):
            for (xs, xn), wxt in zip(tx, wx, strict=True):
                t = vae.decoder(zi[:, :, ys:ys + yn, xs:xs + xn])
                t.mul_(wyt.view(-1, 1)).mul_(wxt.view(1, -1))
                out[i:i + 1, :, ys * sc:(ys + yn) * sc, xs * sc:(xs + xn) * sc].add_(t)
                del t
                done += 1
                if progress:
                    progress(done, total)
    return out


def _tiled_fallback(vae: Any, z: torch.Tensor, plan: Plan, fam: Family,
                    progress: ProgressFn | None) -> torch.Tensor:
    """An image VAE the engine cannot tile itself: its own ``enable_tiling()`` with the plan's tile."""
    tile = plan.tile_px
    if tile is None or not hasattr(vae, "use_tiling"):
        raise PlanError(f"{type(vae).__name__} has no decoder/post_quant_conv and no diffusers tiling; "
                        f"cannot run {plan.label!r} (use a full, remote or cpu plan)")
    sc = fam.spatial_compression
    cand: dict[str, Any] = {
        "use_tiling": True, "use_slicing": False,
        "tile_sample_min_size": tile, "tile_latent_min_size": tile // sc,
        "tile_overlap_factor": plan.overlap_px / tile,
        "tile_sample_min_height": tile, "tile_sample_min_width": tile,
        "tile_sample_stride_height": tile - plan.overlap_px,
        "tile_sample_stride_width": tile - plan.overlap_px,
    }
    attrs = {k: v for k, v in cand.items() if hasattr(vae, k)}
    with _patched(vae, attrs):
        return _items(vae, z, progress)


def _items(vae: Any, z: torch.Tensor, progress: ProgressFn | None) -> torch.Tensor:
    import torch

    b = z.shape[0]
    result: torch.Tensor | None = None
    for i in range(b):
        part = _decode_call(vae, z[i:i + 1])
        if result is None:
            result = torch.empty((b, *part.shape[1:]), dtype=part.dtype, device=part.device)
        result[i:i + 1].copy_(part)
        del part
        if progress:
            progress(i + 1, b)
    assert result is not None
    return result


def _video_calls(plan: Plan, fam: Family, arch: str, t: int, h: int, w: int) -> int:
    """Decoder forward calls diffusers makes for one item under the plan (for progress)."""
    sc = fam.spatial_compression
    tiles = 1
    if plan.tile_px is not None and (h > plan.tile_px // sc or w > plan.tile_px // sc):
        tl, ol = plan.tile_px // sc, plan.overlap_px // sc
        tiles = len(diffusers_axis(h, tl, ol)) * len(diffusers_axis(w, tl, ol))
    if arch == "wan":
        return tiles * t
    chunks = 1
    if plan.frame_chunk is not None and t > plan.frame_chunk:
        chunks = len(range(0, t, max(1, plan.frame_chunk - plan.frame_overlap)))
    return tiles * chunks


def _tiled_video(vae: Any, z: torch.Tensor, plan: Plan, fam: Family,
                 progress: ProgressFn | None) -> torch.Tensor:
    """Video VAEs: diffusers' own spatial tiling and (HunyuanVideo) temporal chunks, the plan's numbers; with
    ``plan.host_output`` HunyuanVideo's chunks (:func:`_chunks_to_host`) and Wan's tiles (:func:`_tiles_to_host`)
    stream their frames to host memory."""

    if not hasattr(vae, "use_tiling") or not hasattr(vae, "tile_sample_min_height"):
        raise PlanError(f"{type(vae).__name__} has no diffusers video tiling; cannot run {plan.label!r}")
    b, _, t, h, w = z.shape
    sc, tc = fam.spatial_compression, fam.temporal_compression
    tile_h = plan.tile_px if plan.tile_px is not None else h * sc
    tile_w = plan.tile_px if plan.tile_px is not None else w * sc
    attrs: dict[str, Any] = {
        "use_tiling": plan.tile_px is not None, "use_slicing": False,
        "tile_sample_min_height": tile_h, "tile_sample_min_width": tile_w,
        "tile_sample_stride_height": max(sc, tile_h - plan.overlap_px),
        "tile_sample_stride_width": max(sc, tile_w - plan.overlap_px),
    }
    if hasattr(vae, "use_framewise_decoding"):
        attrs["use_framewise_decoding"] = plan.frame_chunk is not None
        if plan.frame_chunk is not None:
            if plan.frame_overlap >= plan.frame_chunk:
                raise PlanError(f"frame_overlap ({plan.frame_overlap}) must be smaller than frame_chunk "
                                f"({plan.frame_chunk})")
            attrs["tile_sample_min_num_frames"] = plan.frame_chunk * tc
            attrs["tile_sample_stride_num_frames"] = (plan.frame_chunk - plan.frame_overlap) * tc
    arch = "wan" if fam.architecture == "wan" else "hunyuanvideo"
    per_item = _video_calls(plan, fam, arch, t, h, w)
    total, done = b * per_item, 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(min(done, total), total)

    chunks_to_host = (plan.host_output and plan.frame_chunk is not None and t > plan.frame_chunk
                      and chunks_stream(vae))
    tiles_to_host = plan.host_output and plan.tile_px is not None and tiles_stream(vae) \
        and (h * sc > tile_h or w * sc > tile_w)
    with _patched(vae, attrs), _counting(vae.decoder, tick):
        if chunks_to_host:
            result = _chunks_to_host(vae, z)
        elif tiles_to_host:
            result = _tiles_to_host(vae, z)
        else:
            result = _items(vae, z, None)
    if progress and done != total:
        log.debug("video tiling made %d decoder calls, expected %d", done, total)
        progress(total, total)
    return result


def chunks_stream(vae: Any) -> bool:
    """True when ``vae`` decodes temporal chunks the way :func:`_chunks_to_host` streams them: diffusers'
    ``AutoencoderKLHunyuanVideo`` (``post_quant_conv``, ``decoder``, ``tiled_decode``, ``blend_t``)."""
    return all(callable(getattr(vae, k, None)) for k in ("post_quant_conv", "decoder", "tiled_decode", "blend_t")) \
        and hasattr(vae, "tile_sample_stride_num_frames")


def _chunks_to_host(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """HunyuanVideo's temporal chunks with the finished frames in host memory (pinned on CUDA) as they come.

    The chunks are those of the VAE's framewise decoding with its current (patched) settings: ``chunk + 1``
    latent frames every ``stride`` latent frames, spatially tiled by the VAE's own ``tiled_decode`` when its
    tiling is on, each chunk after the first without its first frame and blended into the previous one over
    ``tile_sample_min_num_frames - tile_sample_stride_num_frames`` frames by the VAE's own ``blend_t``. So the
    frames are those of the VAE's own decode (a test checks it on diffusers' class), but the device holds one
    chunk and the blend frames of the previous one, never the whole video. Returns a CPU tensor."""
    import torch

    b, _, t, h, w = z.shape
    tc, sc = vae.temporal_compression_ratio, vae.spatial_compression_ratio
    size, stride = vae.tile_sample_min_num_frames, vae.tile_sample_stride_num_frames
    blend, lat_size, lat_stride = size - stride, size // tc, max(1, stride // tc)
    frames = (t - 1) * tc + 1
    spatial = vae.use_tiling and (w > vae.tile_sample_min_width // sc or h > vae.tile_sample_min_height // sc)
    out: torch.Tensor | None = None
    for item in range(b):
        tail, at = None, 0
        for k, i in enumerate(range(0, t, lat_stride)):
            part = z[item:item + 1, :, i:i + lat_size + 1]
            dec = vae.tiled_decode(part, return_dict=True).sample if spatial else vae.decoder(vae.post_quant_conv(part))
            if i > 0:
                dec = dec[:, :, 1:]
            if tail is not None:
                dec = vae.blend_t(tail, dec, blend)  # in place on dec's first frames, as the VAE's own loop does
            if out is None:
                out = torch.empty((b, dec.shape[1], frames, *dec.shape[3:]), dtype=dec.dtype,
                                  pin_memory=dec.device.type == "cuda")
            keep = dec[:, :, :min(stride + (k == 0), frames - at)]
            out[item:item + 1, :, at:at + keep.shape[2]].copy_(keep)
            at += keep.shape[2]
            tail = dec[:, :, -blend:].clone() if blend > 0 else None
            del dec, keep
            if at >= frames:
                break
    assert out is not None
    return out


def tiles_stream(vae: Any) -> bool:
    """True when ``vae`` decodes spatial tiles the way :func:`_tiles_to_host` streams them: diffusers'
    ``AutoencoderKLWan`` without patching (its frame cache protocol: ``clear_cache`` setting ``_feat_map``, a
    decoder taking ``feat_cache``/``feat_idx``/``first_chunk``; ``blend_v``/``blend_h``)."""
    import inspect

    if getattr(getattr(vae, "config", None), "patch_size", None) is not None:
        return False
    if not all(callable(getattr(vae, k, None)) for k in ("clear_cache", "blend_v", "blend_h", "post_quant_conv")):
        return False
    if not hasattr(vae, "tile_sample_stride_height"):
        return False
    try:
        params = inspect.signature(vae.decoder.forward).parameters
    except (TypeError, ValueError):
        return False
    return {"feat_cache", "feat_idx", "first_chunk"} <= set(params)


def _tile_video(vae: Any, part: torch.Tensor) -> torch.Tensor:
    """One spatial tile through every frame with Wan's frame cache, unclamped (as inside its ``tiled_decode``)."""
    import torch

    vae.clear_cache()
    frames = []
    for k in range(part.shape[2]):
        vae._conv_idx = [0]
        x = vae.post_quant_conv(part[:, :, k:k + 1])
        frames.append(vae.decoder(x, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=k == 0))
    vae.clear_cache()
    return torch.cat(frames, dim=2)


def _tiles_to_host(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """Wan's spatial tiles with each tile's finished region in host memory (pinned on CUDA) as it comes.

    The tiles are those of the VAE's ``tiled_decode`` with its current (patched) settings, each decoded through
    every frame and blended into the tile above and the tile to the left by the VAE's own ``blend_v`` and
    ``blend_h``; the device keeps the tile, the bottom blend strips of the row above and the right strip of the
    tile to the left, never the whole video. The frames equal the VAE's own tiled decode (a test checks it on
    diffusers' class; the clamp to [-1, 1] follows in :func:`run_plan`). Returns a CPU tensor."""
    import torch

    b, _, _, h, w = z.shape
    sc = vae.spatial_compression_ratio
    lat_h, lat_w = vae.tile_sample_min_height // sc, vae.tile_sample_min_width // sc
    step_h, step_w = vae.tile_sample_stride_height, vae.tile_sample_stride_width
    blend_h, blend_w = vae.tile_sample_min_height - step_h, vae.tile_sample_min_width - step_w
    out: torch.Tensor | None = None
    for item in range(b):  # one item at a time, as the executor's own path decodes a batch
        above: dict[int, torch.Tensor] = {}
        for i in range(0, h, step_h // sc):
            row: dict[int, torch.Tensor] = {}
            left: torch.Tensor | None = None
            for j in range(0, w, step_w // sc):
                tile = _tile_video(vae, z[item:item + 1, :, :, i:i + lat_h, j:j + lat_w])
                if j in above:
                    tile = vae.blend_v(above[j], tile, blend_h)  # in place on the tile's top rows
                if left is not None:
                    tile = vae.blend_h(left, tile, blend_w)  # in place on its left columns
                if out is None:
                    out = torch.empty((b, tile.shape[1], tile.shape[2], h * sc, w * sc), dtype=tile.dtype,
                                      pin_memory=tile.device.type == "cuda")
                y, x = i * sc, j * sc
                keep = tile[:, :, :, :min(step_h, h * sc - y), :min(step_w, w * sc - x)]
                out[item:item + 1, :, :, y:y + keep.shape[3], x:x + keep.shape[4]].copy_(keep)
                if blend_h > 0:  # copies: a view would keep the whole tile on the device
                    row[j] = tile[:, :, :, -blend_h:, :].clone()
                left = tile[:, :, :, :, -blend_w:].clone() if blend_w > 0 else None
                del tile, keep
            above = row
    assert out is not None
    return out


def run_plan(plan: Plan, vae: Any, latents: torch.Tensor, *, family: Family,
             device: str | torch.device | None = None, progress: ProgressFn | None = None) -> torch.Tensor:
    """Decode ``latents`` (VAE space, unpacked) with ``vae`` as ``plan`` says.

    Args:
        plan (`Plan`): a ``full``, ``tiled`` or ``cpu`` plan (remote plans run in the remote client).
            Tiled image plans run with ``plan.groupnorm``: ``exact`` through
            :func:`extension.stream.stream_decode` (output equals the full decode; with
            ``plan.device_budget`` set, its whole-image buffers beyond that budget live in host memory,
            and the result may come back on the CPU), ``local`` through
            the engine's overlap-and-blend tiler (GroupNorm per tile: colours drift, about 20 dB PSNR
            on the fixture VAE; docs/tiling-quality.md). Wan plans with ``exact`` run
            :func:`extension.stream_wan.wan_exact_tiles` (frames equal the full decode; on the CPU), HunyuanVideo
            plans with ``exact`` :func:`extension.stream_hunyuan.hunyuan_exact_decode` (likewise; whole-video
            buffers in host memory when ``plan.device_budget`` is set).
        vae: a diffusers VAE (``AutoencoderKL``, ``AutoencoderKLHunyuanVideo``, ``AutoencoderKLWan``,
            or another class with ``decode``).
        latents (`torch.Tensor`): ``[B, C, h, w]`` or ``[B, C, T, h, w]``; moved to the run device/dtype.
        family (`Family`): the family profile (compression factors, architecture).
        device (`str | torch.device | None`, defaults to the VAE's device): where GPU plans run.
            The orchestrator passes the probed device, or the device that exists when the GPU is
            simulated. ``cpu`` plans always run on the CPU (with a tile or, for video, chunks: tiled there; an
            ``exact`` one through :func:`extension.stream.stream_decode` with every whole-image buffer in host
            memory where the decoder computes elsewhere, ComfyUI's adapter).
        progress (`ProgressFn | None`): ``progress(done, total)`` after each tile, chunk or item.
    Returns:
        torch.Tensor: float in [-1, 1] on the run device (an offloaded exact plan's may be on the CPU),
        in the run dtype.

    Raises:
        PlanError: a remote plan, an unknown path, or a tiled plan this VAE cannot run (an exact
            plan on a decoder :func:`extension.stream.stream_support` rejects names the reason).
        torch.OutOfMemoryError and whatever the VAE raises: passed through (the VAE is restored).
    """
    import torch

    if plan.path not in ("full", "tiled", "cpu"):
        raise PlanError(f"run_plan cannot run a {plan.path!r} plan; remote plans go to the remote client")
    dev, dtype = run_settings(plan, vae, device)
    video = latents.dim() == 5
    if video != family.video:
        raise PlanError(f"latents are {latents.dim()}-D but family is {'video' if family.video else 'image'}")
    with torch.no_grad(), _placed(vae, dev, dtype):
        z = latents.to(device=dev, dtype=dtype)
        whole = plan.tile_px is None and (plan.frame_chunk is None or not video)
        if plan.path == "full" or (plan.path == "cpu" and whole):
            out = _full(vae, z, slice_batch=plan.slice_batch, progress=progress)
        elif video and plan.groupnorm == "exact":
            if plan.tile_px is None or family.architecture not in ("wan", "hunyuanvideo"):
                raise PlanError(f"exact video tiles run on Wan and HunyuanVideo with a tile size only, not {plan.label!r}")
            if family.architecture == "wan":
                out = wan_exact_tiles(vae, z, tile_latent=plan.tile_px // family.spatial_compression)
            else:
                frames = plan.tile_frames or family.tiling.exact_tile_frames or 16
                out = hunyuan_exact_decode(vae, z, tile_px=plan.tile_px, tile_frames=frames,
                                           buffers="host" if plan.offloaded else "device",
                                           device_budget=plan.device_budget or 0, progress=progress)
        elif video:
            out = _tiled_video(vae, z, plan, family, progress)
        elif plan.groupnorm == "exact":
            if plan.tile_px is None:
                raise PlanError(f"exact tiled plan {plan.label!r} has no tile size")
            # a cpu plan whose decoder computes elsewhere (ComfyUI's adapter runs ComfyUI's modules where ComfyUI
            # holds them): every buffer in host memory, the device holds one tile; on the CPU itself in memory
            # (as its host estimate: host buffers would add the copies and the un-narrowed schedule, ~1.3x)
            off_cpu = plan.path == "cpu" and compute_device(vae).type != "cpu"
            budget = 0 if off_cpu else plan.device_budget
            out = stream_decode(vae, z, tile_px=plan.tile_px, device_budget=budget, progress=progress)
        elif is_kl_like(vae):
            out = _tiled_kl(vae, z, plan, family, progress)
        else:
            out = _tiled_fallback(vae, z, plan, family, progress)
        del z
        return out.clamp_(-1.0, 1.0)
