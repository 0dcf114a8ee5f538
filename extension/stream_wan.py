"""Exact spatial tiles for diffusers' ``AutoencoderKLWan`` (Wan 2.1): every frame equals the VAE's full decode.

Wan's decoder has no statistics across positions (its RMS norm is per position), so what makes a tile differ
from the full decode is only context: the mid block's attention sees every position of a frame, and every
convolution reads its neighbours. Hence two stages, both on the VAE's own modules and its frame-cache protocol
(``feat_cache`` / ``feat_idx`` / ``first_chunk``):

1. ``post_quant_conv``, ``conv_in`` and the mid block (attention included) over whole frames, one latent frame at
   a time with one frame cache, at the latent resolution (the decoder's cheapest part); each frame's result is
   kept in host memory when the decode runs on a GPU (one latent frame's mid-block features per frame).
2. The up blocks, ``norm_out`` and ``conv_out`` per output tile through every frame with the tile's own frame
   cache, on the tile's region widened by a halo that covers the receptive field of that path
   (:func:`halo_latent`: each spatial convolution's padding at the scale it runs); the halo is cropped away.
   At the frame's edges the region stops where the frame does, so the zero padding is the full decode's.

Trade-off: no whole-frame buffer on the device at the output resolution, and the frames equal a full decode
(float rounding apart; ``tests/test_stream_wan.py`` checks >= 100 dB and that one halo pixel less is not exact),
but each tile recomputes its halo: Wan 2.1's is 13 latent pixels (104 output pixels) per side, so a 256 px tile
decodes a region up to 464 px (3.3x its area) and a 512 px tile up to 720 px (2.0x), against the 1.3-1.8x of
diffusers' overlapping (drifting) tiles. Wan 2.2's decoder (``patch_size``, residual up blocks) is refused.

::

    out = wan_exact_tiles(vae, z, tile_latent=64)  # (B, 3, 1 + 4 (T - 1), 8 H, 8 W), unclamped, on the CPU
"""

from __future__ import annotations

import math
from typing import Any

from hybrid_vae.policy.errors import PlanError

__all__ = ["halo_latent", "wan_exact_support", "wan_exact_tiles"]

#: Frames a Wan causal convolution keeps in its cache (diffusers' ``CACHE_T``).
_CACHE_T = 2


def wan_exact_support(vae: Any) -> str | None:
    """None when :func:`wan_exact_tiles` can run ``vae``; else why not (one line)."""
    import inspect

    dec = getattr(vae, "decoder", None)
    if type(vae).__name__ != "AutoencoderKLWan" or dec is None:
        return f"{type(vae).__name__} is not diffusers' AutoencoderKLWan"
    if getattr(getattr(vae, "config", None), "patch_size", None) is not None:
        return "Wan 2.2's decoder (patch_size) is not supported by exact tiles"
    missing = [k for k in ("conv_in", "mid_block", "up_blocks", "norm_out", "nonlinearity", "conv_out")
               if getattr(dec, k, None) is None]
    if missing or not callable(getattr(vae, "post_quant_conv", None)):
        return f"the Wan decoder lacks {', '.join(missing) or 'post_quant_conv'}"
    try:
        params = set(inspect.signature(dec.up_blocks[0].forward).parameters)
    except (TypeError, ValueError, IndexError):
        return "the Wan decoder's up blocks cannot be inspected"
    if not {"feat_cache", "feat_idx", "first_chunk"} <= params:
        return "the Wan decoder's up blocks do not take feat_cache/feat_idx/first_chunk"
    return None


def halo_latent(decoder: Any) -> int:
    """Latent pixels of context the path after the mid block reads beyond a region: the sum, over the spatial
    convolutions of the up blocks and ``conv_out``, of each one's padding divided by the scale it runs at (an
    ``nn.Upsample`` multiplies the scale by its factor), rounded up."""
    from torch import nn

    scale, spread = 1.0, 0.0
    for root in (decoder.up_blocks, decoder.conv_out):
        for m in root.modules():
            if isinstance(m, nn.Upsample):
                f = m.scale_factor
                scale *= float(f[-1] if isinstance(f, (tuple, list)) else f)  # type: ignore[arg-type]
            elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
                spread += (m.kernel_size[-1] - 1) / 2 / scale
    return math.ceil(spread - 1e-9)


def _cached(conv: Any, x: Any, cache: list[Any], idx: list[int]) -> Any:
    """One causal convolution under Wan's frame-cache protocol: the last ``_CACHE_T`` frames of its input
    (with the previous call's last frame when this call has one) are cached for the next call."""
    import torch

    i = idx[0]
    keep = x[:, :, -_CACHE_T:].clone()
    if keep.shape[2] < _CACHE_T and cache[i] is not None:
        keep = torch.cat([cache[i][:, :, -1:].to(keep.device), keep], dim=2)
    x = conv(x, cache[i])
    cache[i] = keep
    idx[0] += 1
    return x


def wan_exact_tiles(vae: Any, z: Any, *, tile_latent: int, halo: int | None = None,
                    ledger: dict[str, int] | None = None) -> Any:
    """Decode ``z`` (``(B, C, T, H, W)``, VAE space) with exact spatial tiles of ``tile_latent`` latent pixels.

    Args:
        vae: diffusers' ``AutoencoderKLWan`` (Wan 2.1; see :func:`wan_exact_support`).
        z (`torch.Tensor`): the latent, on the device the VAE runs on.
        tile_latent (`int`): the output tile's side in latent pixels (x8 output pixels); the region decoded is
            that plus ``halo`` on every side inside the frame.
        halo (`int`, defaults to :func:`halo_latent`): latent pixels of context; less than the receptive field
            is not exact (tests use it to show the check can fail).
        ledger (`dict[str, int] | None`): when given, ``ledger["region_px"]`` is set to the largest region's
            side in latent pixels and ``ledger["tiles"]`` to the tile count (what a decode reads for its
            accounting).

    Returns:
        `torch.Tensor`: ``(B, 3, 1 + 4 (T - 1), 8 H, 8 W)``, unclamped, on the CPU (pinned on CUDA).

    Raises:
        PlanError: the VAE is not one this can run, or ``tile_latent`` < 1.
    """
    import torch

    why = wan_exact_support(vae)
    if why is not None:
        raise PlanError(f"exact Wan tiles: {why}")
    if tile_latent < 1:
        raise PlanError(f"exact Wan tiles: tile_latent={tile_latent} must be at least 1")
    dec = vae.decoder
    halo = halo_latent(dec) if halo is None else halo
    b, _, t, h, w = z.shape
    sc = vae.spatial_compression_ratio
    slots = sum(1 for _ in dec.modules())  # at least one cache slot per causal convolution
    on_gpu = z.device.type == "cuda"
    out: torch.Tensor | None = None
    ntiles, region = 0, 0
    for item in range(b):
        cache: list[Any] = [None] * slots
        mids = []
        for k in range(t):  # stage 1: whole frames at the latent resolution
            idx = [0]
            x = _cached(dec.conv_in, vae.post_quant_conv(z[item:item + 1, :, k:k + 1]), cache, idx)
            x = dec.mid_block(x, feat_cache=cache, feat_idx=idx)
            mids.append(x.to("cpu", non_blocking=False) if on_gpu else x)
        del cache
        for i0 in range(0, h, tile_latent):  # stage 2: each tile and its halo through every frame
            for j0 in range(0, w, tile_latent):
                i1, j1 = min(h, i0 + tile_latent), min(w, j0 + tile_latent)
                a0, a1, c0, c1 = max(0, i0 - halo), min(h, i1 + halo), max(0, j0 - halo), min(w, j1 + halo)
                ntiles, region = ntiles + 1, max(region, a1 - a0, c1 - c0)
                cache, frames = [None] * slots, []
                for k in range(t):
                    idx = [0]
                    x = mids[k][:, :, :, a0:a1, c0:c1].to(z.device)
                    for up in dec.up_blocks:
                        x = up(x, feat_cache=cache, feat_idx=idx, first_chunk=k == 0)
                    x = _cached(dec.conv_out, dec.nonlinearity(dec.norm_out(x)), cache, idx)
                    keep = x[:, :, :, (i0 - a0) * sc:(i1 - a0) * sc, (j0 - c0) * sc:(j1 - c0) * sc]
                    frames.append(keep.to("cpu") if on_gpu else keep)  # the device keeps no finished frame
                    del x, keep
                del cache
                tile = torch.cat(frames, dim=2)
                if out is None:
                    out = torch.empty((b, tile.shape[1], tile.shape[2], h * sc, w * sc), dtype=tile.dtype,
                                      pin_memory=on_gpu)
                out[item:item + 1, :, :, i0 * sc:i1 * sc, j0 * sc:j1 * sc].copy_(tile)
                del frames, tile
        del mids
    if ledger is not None:
        ledger.update(region_px=region, tiles=ntiles)
    assert out is not None
    return out
