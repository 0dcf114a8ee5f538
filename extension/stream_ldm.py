"""Exact tiles for the LDM ``Decoder`` (ComfyUI's ``comfy.ldm.modules.diffusionmodules.model.Decoder``).

ComfyUI's SD1.x/SDXL/SD3/Flux VAEs decode with the original LDM network: ``conv_in``, ``mid.block_1`` /
``mid.attn_1`` / ``mid.block_2``, ``up[i].block[j]`` (``ResnetBlock``: ``norm1``, ``conv1``, ``norm2``, ``conv2``,
``nin_shortcut``) and ``up[i].upsample`` (nearest x2 + 3x3 convolution) from the lowest resolution
(``up[n-1]``) to the highest (``up[0]``), then ``norm_out`` / SiLU / ``conv_out``. That is the pass structure of
diffusers' ``Decoder`` under other names, so the exact tiler of :mod:`extension.stream` runs it unchanged
through a *view*: small modules with diffusers' attribute names (``up_blocks[k].resnets[j].conv1``, ...) that
hold ComfyUI's own modules -- no weight is copied or moved, and ComfyUI's ops keep casting weights as they do
(low-VRAM modes included).

::

    view, why = ldm_stream_view(comfy_vae.first_stage_model)
    if view is not None:
        x = stream_decode(view, z, tile_px=256)   # equals first_stage_model.decode(z) up to float rounding

What is refused (the reason is named and the engine plans local tiles instead): attention inside up levels,
3-D (video) or causal decoders, ``tanh_out``, 3x3 shortcuts, time embeddings, GroupNorms whose weights
ComfyUI patches at run time (``weight_function``), offloaded (meta) weights.
"""

from __future__ import annotations

from typing import Any

from hybrid_vae.extension.stream import _conv1, _conv3

__all__ = ["LdmStreamView", "ldm_stream_view", "ldm_support"]


def _is_group_norm(m: Any) -> bool:
    import torch

    return isinstance(m, torch.nn.GroupNorm) and not getattr(m, "weight_function", None) \
        and not getattr(m, "bias_function", None)


def _resnet_support(r: Any, where: str) -> str | None:
    import torch

    if type(r).__name__ != "ResnetBlock":
        return f"{where} is {type(r).__name__}"
    if getattr(r, "temb_proj", None) is not None:
        return f"{where} takes a time embedding"
    if not (_is_group_norm(r.norm1) and _is_group_norm(r.norm2)):
        return f"{where} norms are not plain GroupNorm"
    if not (_conv3(r.conv1) and _conv3(r.conv2)) or not isinstance(getattr(r, "swish", None), torch.nn.SiLU):
        return f"{where} convolutions are not 2-D 3x3 or its activation is not SiLU"
    if r.in_channels != r.out_channels:
        if getattr(r, "use_conv_shortcut", False) or not _conv1(getattr(r, "nin_shortcut", None)):
            return f"{where} shortcut is not a 1x1 convolution (nin_shortcut)"
    return None


def ldm_support(model: Any) -> str | None:
    """None when :func:`ldm_stream_view` can run ``model`` (a ComfyUI first-stage model whose ``decode`` is
    ``decoder(post_quant_conv(z))`` or ``decoder(z)``) exactly, else the reason it cannot."""
    import torch

    dec = getattr(model, "decoder", None)
    if dec is None or type(dec).__name__ != "Decoder" or not hasattr(dec, "up") or not hasattr(dec, "mid"):
        return f"{type(model).__name__} has no LDM Decoder (mid/up)"
    if getattr(model, "bn", None) is not None or getattr(model, "max_batch_size", None) is not None:
        return "the first-stage model renormalises or splits batches before its decoder"
    if getattr(dec, "carried", False) or getattr(dec, "tanh_out", False):
        return "causal (video) decoder or tanh output"
    for a in ("conv_in", "norm_out", "conv_out"):
        if getattr(dec, a, None) is None:
            return f"decoder has no {a}"
    if any(p.device.type == "meta" for p in dec.parameters()):
        return "decoder weights are offloaded (meta tensors); exact tiling needs them resident"
    if not isinstance(dec.conv_in, torch.nn.Conv2d) or not _conv3(dec.conv_out) or not _is_group_norm(dec.norm_out):
        return "conv_in/conv_out/norm_out are not 2-D convolutions and a plain GroupNorm"
    pqc = getattr(model, "post_quant_conv", None)
    if pqc is not None and not _conv1(pqc):
        return "post_quant_conv is not a 1x1 convolution"
    for name in ("block_1", "attn_1", "block_2"):
        if getattr(dec.mid, name, None) is None:
            return f"decoder.mid has no {name}"
    for i, level in enumerate(dec.up):
        if len(getattr(level, "attn", ())):
            return f"up[{i}] has attention blocks (the exact tiler has no pass for attention outside the mid block)"
        for j, r in enumerate(level.block):
            why = _resnet_support(r, f"up[{i}].block[{j}]")
            if why is not None:
                return why
        u = getattr(level, "upsample", None)
        if u is not None:
            sf = u.scale_factor
            if not getattr(u, "with_conv", False) or not _conv3(getattr(u, "conv", None)) \
                    or not (isinstance(sf, (int, float)) and float(sf) == 2.0):
                return f"up[{i}].upsample is not nearest x2 + 3x3 convolution"
    return None


def _view_classes() -> dict[str, Any]:
    """The view module classes (defined per call: torch is imported inside functions only)."""
    import torch

    class CastIn(torch.nn.Module):
        """``inner(x)`` with ``x`` cast to ``inner``'s weight dtype (ComfyUI may keep the VAE in bfloat16 while
        the engine hands float32 latents)."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.inner.weight
            out: torch.Tensor = self.inner(x.to(dtype=w.dtype) if w.dtype != x.dtype else x)
            return out

    class ResnetView(torch.nn.Module):
        """diffusers ``ResnetBlock2D`` names over an LDM ``ResnetBlock``'s modules."""

        def __init__(self, r: Any) -> None:
            super().__init__()
            self.norm1, self.conv1, self.norm2, self.conv2 = r.norm1, r.conv1, r.norm2, r.conv2
            self.dropout = r.dropout
            self.nonlinearity = r.swish
            self.conv_shortcut = r.nin_shortcut if r.in_channels != r.out_channels else None
            self.output_scale_factor = 1.0

    class UpsampleView(torch.nn.Module):
        name = "conv"

        def __init__(self, u: Any) -> None:
            super().__init__()
            self.conv = u.conv

    class BlockView(torch.nn.Module):
        def __init__(self, level: Any) -> None:
            super().__init__()
            self.resnets = torch.nn.ModuleList(ResnetView(r) for r in level.block)
            u = getattr(level, "upsample", None)
            self.upsamplers = torch.nn.ModuleList([UpsampleView(u)]) if u is not None else None

    class MidView(torch.nn.Module):
        """The LDM mid block on the whole latent, as in a full decode."""

        def __init__(self, mid: Any) -> None:
            super().__init__()
            self.mid = mid

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.mid.block_2(self.mid.attn_1(self.mid.block_1(x, None)), None)
            return out

    class DecoderView(torch.nn.Module):
        """diffusers ``Decoder`` names: ``up_blocks[k]`` is LDM ``up[n-1-k]`` (lowest resolution first)."""

        def __init__(self, dec: Any) -> None:
            super().__init__()
            self.conv_in = CastIn(dec.conv_in)
            self.mid_block = MidView(dec.mid)
            self.up_blocks = torch.nn.ModuleList(BlockView(dec.up[i]) for i in reversed(range(len(dec.up))))
            self.conv_norm_out = dec.norm_out
            self.conv_act = torch.nn.SiLU()
            self.conv_out = dec.conv_out

    return {"CastIn": CastIn, "DecoderView": DecoderView}


class LdmStreamView:
    """What :func:`extension.stream.stream_decode` reads from a VAE: ``decoder`` (diffusers-shaped) and
    ``post_quant_conv`` (ComfyUI's, or None for models without one, e.g. the Flux/SD3 VAE)."""

    def __init__(self, model: Any) -> None:
        classes = _view_classes()
        pqc = getattr(model, "post_quant_conv", None)
        self.decoder = classes["DecoderView"](model.decoder)
        self.post_quant_conv = classes["CastIn"](pqc) if pqc is not None else None

    def stream_view(self) -> tuple[LdmStreamView, None]:
        return self, None


def ldm_stream_view(model: Any) -> tuple[LdmStreamView | None, str | None]:
    """``(view, None)`` for a first-stage model :func:`ldm_support` accepts, else ``(None, reason)``."""
    why = ldm_support(model)
    return (LdmStreamView(model), None) if why is None else (None, why)
