"""Exact tiles for the LDM ``Decoder`` (ComfyUI's ``comfy.ldm.modules.diffusionmodules.model.Decoder``).

ComfyUI's SD1.x/SDXL/SD3/Flux VAEs decode with the original LDM network: ``conv_in``, ``mid.block_1`` /
``mid.attn_1`` / ``mid.block_2``, ``up[i].block[j]`` (``ResnetBlock``: ``norm1``, ``conv1``, ``norm2``, ``conv2``,
``nin_shortcut``) and ``up[i].upsample`` (nearest x2 + 3x3 convolution) from the lowest resolution
(``up[n-1]``) to the highest (``up[0]``), then ``norm_out`` / SiLU / ``conv_out``. That is the layer sequence of
diffusers' ``Decoder`` under other names, so :func:`ldm_steps` describes it as the exact tiler's steps
(:mod:`extension.stream`: ``ConvIn``, ``Resnet``, ``Attention``, ``Upsample``, ``Output``) holding ComfyUI's own
modules -- no weight is copied or moved, and ComfyUI's ops keep casting weights as they do (low-VRAM modes
included); float32 latents are cast to the weights' dtype on the way in.

::

    steps = ldm_steps(comfy_vae.first_stage_model)        # PlanError names what it cannot run
    x = decode_steps(steps, z, tile_px=256)                # equals first_stage_model.decode(z) up to float rounding

What is refused (the reason is named and the engine plans local tiles instead): attention inside up levels,
3-D (video) or causal decoders, ``tanh_out``, 3x3 shortcuts, time embeddings, GroupNorms whose weights
ComfyUI patches at run time (``weight_function``), offloaded (meta) weights.
"""

from __future__ import annotations

from typing import Any

from hybrid_vae.extension.stream import Attention, ConvIn, Output, Resnet, Step, Upsample, _conv1, _conv3
from hybrid_vae.policy.errors import PlanError

__all__ = ["ldm_steps", "ldm_support"]


def _is_group_norm(m: Any) -> bool:
    import torch

    return isinstance(m, torch.nn.GroupNorm) and not getattr(m, "weight_function", None) \
        and not getattr(m, "bias_function", None)


def _resnet(r: Any, where: str) -> Resnet:
    import torch

    if type(r).__name__ != "ResnetBlock":
        raise PlanError(f"{where} is {type(r).__name__}")
    if getattr(r, "temb_proj", None) is not None:
        raise PlanError(f"{where} takes a time embedding")
    if not (_is_group_norm(r.norm1) and _is_group_norm(r.norm2)):
        raise PlanError(f"{where} norms are not plain GroupNorm")
    if not (_conv3(r.conv1) and _conv3(r.conv2)) or not isinstance(getattr(r, "swish", None), torch.nn.SiLU):
        raise PlanError(f"{where} convolutions are not 2-D 3x3 or its activation is not SiLU")
    shortcut = None
    if r.in_channels != r.out_channels:
        if getattr(r, "use_conv_shortcut", False) or not _conv1(getattr(r, "nin_shortcut", None)):
            raise PlanError(f"{where} shortcut is not a 1x1 convolution (nin_shortcut)")
        shortcut = r.nin_shortcut
    return Resnet(r.norm1, r.conv1, r.norm2, r.conv2, shortcut, getattr(r, "dropout", None), 1.0)


def _attention(a: Any, where: str) -> Attention:
    import torch

    norm = getattr(a, "norm", None)
    if not _is_group_norm(norm):
        raise PlanError(f"{where} is not a GroupNorm self-attention")
    mods = [getattr(a, n, None) for n in ("q", "k", "v", "proj_out")]
    if not all(_conv1(m) or isinstance(m, torch.nn.Linear) for m in mods):
        raise PlanError(f"{where} projections are not 1x1 convolutions")
    return Attention(norm, *mods, heads=1, scale=None, residual=True, rescale=1.0)


def ldm_steps(model: Any) -> list[Step]:
    """The exact tiler's steps for a ComfyUI first-stage model whose ``decode`` is ``decoder(post_quant_conv(z))``
    or ``decoder(z)`` with the LDM ``Decoder``.

    Raises:
        PlanError: naming the first part exact tiling cannot run.
    """
    import torch

    dec = getattr(model, "decoder", None)
    if dec is None or type(dec).__name__ != "Decoder" or not hasattr(dec, "up") or not hasattr(dec, "mid"):
        raise PlanError(f"{type(model).__name__} has no LDM Decoder (mid/up)")
    if getattr(model, "bn", None) is not None or getattr(model, "max_batch_size", None) is not None:
        raise PlanError("the first-stage model renormalises or splits batches before its decoder")
    if getattr(dec, "carried", False) or getattr(dec, "tanh_out", False):
        raise PlanError("causal (video) decoder or tanh output")
    for a in ("conv_in", "norm_out", "conv_out"):
        if getattr(dec, a, None) is None:
            raise PlanError(f"decoder has no {a}")
    if any(p.device.type == "meta" for p in dec.parameters()):
        raise PlanError("decoder weights are offloaded (meta tensors); exact tiling needs them resident")
    if not isinstance(dec.conv_in, torch.nn.Conv2d) or not _conv3(dec.conv_in) or not _conv3(dec.conv_out) \
            or not _is_group_norm(dec.norm_out):
        raise PlanError("conv_in/conv_out/norm_out are not 2-D 3x3 convolutions and a plain GroupNorm")
    pqc = getattr(model, "post_quant_conv", None)
    if pqc is not None and not _conv1(pqc):
        raise PlanError("post_quant_conv is not a 1x1 convolution")
    for name in ("block_1", "attn_1", "block_2"):
        if getattr(dec.mid, name, None) is None:
            raise PlanError(f"decoder.mid has no {name}")
    steps: list[Step] = [ConvIn(dec.conv_in, pqc), _resnet(dec.mid.block_1, "mid.block_1"),
                         _attention(dec.mid.attn_1, "mid.attn_1"), _resnet(dec.mid.block_2, "mid.block_2")]
    for i in reversed(range(len(dec.up))):  # lowest resolution first, as the decoder runs them
        level = dec.up[i]
        if len(getattr(level, "attn", ())):
            raise PlanError(f"up[{i}] has attention blocks (the exact tiler has no pass for attention outside the "
                            "mid block)")
        steps += [_resnet(r, f"up[{i}].block[{j}]") for j, r in enumerate(level.block)]
        u = getattr(level, "upsample", None)
        if u is not None:
            sf = u.scale_factor
            if not getattr(u, "with_conv", False) or not _conv3(getattr(u, "conv", None)) \
                    or not (isinstance(sf, (int, float)) and float(sf) == 2.0):
                raise PlanError(f"up[{i}].upsample is not nearest x2 + 3x3 convolution")
            steps.append(Upsample(u.conv))
    steps.append(Output(dec.norm_out, dec.conv_out))
    return steps


def ldm_support(model: Any) -> str | None:
    """None when :func:`ldm_steps` accepts ``model``, else the reason it cannot."""
    try:
        ldm_steps(model)
    except PlanError as exc:
        return str(exc)
    return None
