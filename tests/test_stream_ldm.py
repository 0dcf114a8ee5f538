"""Exact tiles over the LDM ``Decoder`` (ComfyUI's module layout; extension/stream_ldm.py), on the stand-in of
``comfy.ldm.modules.diffusionmodules.model`` (tests/comfy_stub) built over the fixture's diffusers modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hybrid_vae.extension.fixture import load_fixture_vae
from hybrid_vae.extension.stream import Resnet, decode_steps
from hybrid_vae.extension.stream_ldm import ldm_steps, ldm_support
from hybrid_vae.policy.errors import PlanError

STUB = Path(__file__).resolve().parent / "comfy_stub" / "comfy" / "ldm" / "modules" / "diffusionmodules" / "model.py"


@pytest.fixture(scope="module")
def ldm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stub_ldm_model", STUB)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["stub_ldm_model"] = mod
    spec.loader.exec_module(mod)
    return mod


class _KL(torch.nn.Module):
    """ComfyUI's AutoencoderKL shape: decode(z) = decoder(post_quant_conv(z))."""

    def __init__(self, ldm: ModuleType, dvae: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = ldm.ldm_decoder_from_diffusers(dvae)
        self.post_quant_conv = dvae.post_quant_conv
        self.bn = None
        self.max_batch_size = None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def test_exact_tiles_equal_the_ldm_full_decode(ldm: ModuleType) -> None:
    dvae = load_fixture_vae()
    model = _KL(ldm, dvae)
    z = torch.randn(2, 4, 20, 28, generator=torch.Generator().manual_seed(0)) * 3
    assert ldm_support(model) is None
    steps = ldm_steps(model)
    with torch.no_grad():
        full = model.decode(z)
        ref = dvae.decode(z).sample  # the same weights through diffusers' own Decoder
        out = decode_steps(steps, z, tile_px=64)
        host = decode_steps(steps, z, tile_px=64, device_budget=0)  # every whole-image buffer in host memory
    assert out.shape == full.shape == (2, 3, 160, 224)
    assert (out - full).abs().max().item() < 1e-4
    assert (host - full).abs().max().item() < 1e-4
    assert (full - ref).abs().max().item() < 1e-4  # the stand-in decodes like diffusers (same modules)
    # nothing was copied: the steps hold ComfyUI's own modules, lowest resolution first
    first_up = next(s for s in steps[4:] if isinstance(s, Resnet))
    assert first_up.conv1 is model.decoder.up[-1].block[0].conv1
    assert steps[-1].conv is model.decoder.conv_out and steps[0].pre is model.post_quant_conv


def test_bfloat16_weights_take_float32_latents(ldm: ModuleType) -> None:
    """ComfyUI may keep the VAE in bfloat16: float32 latents are cast on the way in, and the tiles are as close
    to the float32 decode as ComfyUI's own bfloat16 full decode is."""
    model = _KL(ldm, load_fixture_vae(dtype=torch.bfloat16))
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = decode_steps(ldm_steps(model), z, tile_px=48)
        full = model.decode(z.to(torch.bfloat16))
        ref = _KL(ldm, load_fixture_vae()).decode(z)
    assert out.dtype == torch.bfloat16
    err_tiles, err_full = (out.float() - ref).abs().mean().item(), (full.float() - ref).abs().mean().item()
    assert err_tiles <= 1.5 * err_full + 1e-3, (err_tiles, err_full)


def test_what_the_exact_tiler_refuses_is_named(ldm: ModuleType) -> None:
    model = _KL(ldm, load_fixture_vae())
    assert ldm_support(torch.nn.Module()) is not None
    model.decoder.up[1].attn.append(torch.nn.Identity())
    assert "attention blocks" in (ldm_support(model) or "")
    model = _KL(ldm, load_fixture_vae())
    model.decoder.norm_out.weight_function = [lambda w: w]  # a weight ComfyUI patches at run time
    assert "plain GroupNorm" in (ldm_support(model) or "")
    model = _KL(ldm, load_fixture_vae())
    model.decoder.tanh_out = True
    assert "tanh" in (ldm_support(model) or "")
    model = _KL(ldm, load_fixture_vae())
    blk = next(b for lvl in model.decoder.up for b in lvl.block if b.in_channels != b.out_channels)
    blk.use_conv_shortcut = True
    assert "nin_shortcut" in (ldm_support(model) or "")
    with pytest.raises(PlanError, match="nin_shortcut"):
        ldm_steps(model)
