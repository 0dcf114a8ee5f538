"""Latent checks, Flux packing, normalisation, and the saved-latent file format."""

from __future__ import annotations

import json

import pytest
import torch
from hybrid_vae.extension.latents import (
    FORMAT,
    load_latent,
    pack_flux,
    save_latent,
    to_vae_space,
    unpack_flux,
    validate_latents,
)
from hybrid_vae.policy import LatentError, load_profiles
from safetensors import safe_open


@pytest.fixture(scope="module")
def profiles():
    return load_profiles("")


def _check(profiles, z, family, **kw):
    validate_latents(z, profiles.family(family), family_name=family, families=profiles.families, **kw)


# ---- validate_latents ---------------------------------------------------------------------------

def test_valid_latents_pass(profiles):
    _check(profiles, torch.randn(2, 4, 8, 8), "sd15")
    _check(profiles, torch.randn(1, 16, 8, 8, dtype=torch.bfloat16), "flux")
    _check(profiles, torch.randn(1, 4 * 8, 64), "flux", height=64, width=128)
    _check(profiles, torch.randn(1, 16, 3, 8, 8), "hunyuanvideo")


def test_wrong_channels_names_value_and_fix(profiles):
    with pytest.raises(LatentError) as e:
        _check(profiles, torch.randn(1, 16, 8, 8), "sd15")
    msg = str(e.value)
    assert "16 channels" in msg and "sd15 expects 4" in msg
    assert "--family flux or sd3" in msg
    with pytest.raises(LatentError, match="4 channels; family flux expects 16 — pass --family sd15 or sdxl"):
        _check(profiles, torch.randn(1, 4, 8, 8), "flux")
    with pytest.raises(LatentError, match="family wan expects 16"):
        _check(profiles, torch.randn(1, 4, 2, 8, 8), "wan")


@pytest.mark.parametrize("value, word", [(float("nan"), "1 NaN"), (float("inf"), "1 inf"),
                                         (float("-inf"), "1 inf")])
def test_nan_and_inf_rejected(profiles, value, word):
    z = torch.randn(1, 4, 8, 8)
    z[0, 1, 2, 3] = value
    with pytest.raises(LatentError, match=word):
        _check(profiles, z, "sd15")


def test_packed_needs_height_and_width(profiles):
    z = torch.randn(1, 16, 64)
    with pytest.raises(LatentError, match="give height and width"):
        _check(profiles, z, "flux")
    with pytest.raises(LatentError, match="give height and width"):
        _check(profiles, z, "flux", height=64)
    with pytest.raises(LatentError, match="16 tokens but height=64, width=128 give 32"):
        _check(profiles, z, "flux", height=64, width=128)
    with pytest.raises(LatentError, match="width=72: packed flux latents need a positive multiple of 16"):
        _check(profiles, z, "flux", height=64, width=72)
    with pytest.raises(LatentError, match="packed latents have 16 features; family flux expects 64"):
        _check(profiles, torch.randn(1, 16, 16), "flux", height=64, width=64)


@pytest.mark.parametrize("shape, family, text", [
    ((4, 8, 8), "sd15", "3-D); family sd15 expects 4-D [B, C, h, w] — family sd15 has no packed layout"),
    ((1, 4, 2, 8, 8), "sd15", "a video latent? pass a video family"),
    ((1, 16, 8, 8), "hunyuanvideo", "expects 5-D [B, C, T, h, w] — an image latent?"),
    ((8, 8), "sdxl", "(2-D)"),
])
def test_wrong_rank(profiles, shape, family, text):
    with pytest.raises(LatentError) as e:
        _check(profiles, torch.randn(*shape), family)
    assert text in str(e.value)


def test_dtype_empty_and_type(profiles):
    with pytest.raises(LatentError, match="dtype is int64; a VAE decodes floating-point"):
        _check(profiles, torch.zeros(1, 4, 8, 8, dtype=torch.long), "sd15")
    with pytest.raises(LatentError, match="empty"):
        _check(profiles, torch.zeros(0, 4, 8, 8), "sd15")
    with pytest.raises(LatentError, match=r"must be a torch\.Tensor, got list"):
        _check(profiles, [[1.0]], "sd15")


def test_latent_error_is_value_error():
    assert issubclass(LatentError, ValueError)


# ---- Flux packing -------------------------------------------------------------------------------

def _diffusers_pack(latents, batch_size, num_channels_latents, height, width):
    # verbatim from diffusers FluxPipeline._pack_latents (0.42.1)
    latents = latents.view(batch_size, num_channels_latents, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch_size, (height // 2) * (width // 2), num_channels_latents * 4)


def _diffusers_unpack(latents, height, width, vae_scale_factor):
    # verbatim from diffusers FluxPipeline._unpack_latents (0.42.1)
    batch_size, _num_patches, channels = latents.shape
    height = 2 * (int(height) // (vae_scale_factor * 2))
    width = 2 * (int(width) // (vae_scale_factor * 2))
    latents = latents.view(batch_size, height // 2, width // 2, channels // 4, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch_size, channels // (2 * 2), height, width)


def test_pack_unpack_match_diffusers_layout():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 16, 6, 10, generator=g)
    packed = pack_flux(z)
    assert packed.shape == (2, 15, 64)
    assert torch.equal(packed, _diffusers_pack(z, 2, 16, 6, 10))
    assert torch.equal(unpack_flux(packed, 48, 80), _diffusers_unpack(packed, 48, 80, 8))
    assert torch.equal(unpack_flux(packed, 48, 80), z)


def test_pack_odd_size_and_bad_unpack():
    with pytest.raises(LatentError, match="even"):
        pack_flux(torch.randn(1, 16, 5, 4))
    with pytest.raises(LatentError, match="cannot unpack"):
        unpack_flux(torch.randn(1, 15, 64), 64, 64)


# ---- normalisation ------------------------------------------------------------------------------

def test_to_vae_space_scaling_and_shift(profiles):
    z = torch.randn(1, 16, 4, 4)
    flux = profiles.family("flux")
    torch.testing.assert_close(to_vae_space(z, flux), z / 0.3611 + 0.1159)
    sd = profiles.family("sd15")
    z4 = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(to_vae_space(z4, sd), z4 / 0.18215)
    assert to_vae_space(z4, sd) is not z4


def test_to_vae_space_wan_matches_wan_pipeline(profiles):
    wan = profiles.family("wan")
    z = torch.randn(1, 16, 2, 4, 4)
    # diffusers WanPipeline: latents_std = 1.0 / std; latents = latents / latents_std + latents_mean
    mean = torch.tensor(wan.latents_mean).view(1, 16, 1, 1, 1)
    std_inv = 1.0 / torch.tensor(wan.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(to_vae_space(z, wan), z / std_inv + mean)


# ---- save / load --------------------------------------------------------------------------------

def test_save_load_roundtrip_keeps_bits_and_metadata(tmp_path, profiles):
    z = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    path = save_latent(z, tmp_path / "new" / "dir", family="flux", profile=profiles.family("flux"),
                       meta={"height": 64, "width": 64, "vae_id": "black-forest-labs/FLUX.1-dev",
                             "reason": "every plan failed", "frames": None})
    assert path.parent == tmp_path / "new" / "dir" and path.suffix == ".safetensors"
    assert path.name.startswith("latent-") and "-flux-" in path.name
    back, meta = load_latent(path)
    assert back.dtype == torch.bfloat16 and torch.equal(back, z)
    assert meta["format"] == FORMAT and meta["family"] == "flux"
    assert meta["shape"] == [1, 16, 64] and meta["dtype"] == "bfloat16"
    assert meta["height"] == 64 and meta["width"] == 64 and "frames" not in meta
    assert meta["scaling_factor"] == pytest.approx(0.3611) and meta["shift_factor"] == pytest.approx(0.1159)
    assert meta["vae_id"] == "black-forest-labs/FLUX.1-dev" and meta["reason"] == "every plan failed"
    assert meta["created"].endswith("Z")
    # other tools see plain string metadata
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    assert json.loads(raw["shape"]) == [1, 16, 64]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_wan_metadata_and_unique_names(tmp_path, profiles):
    z = torch.zeros(1, 16, 2, 4, 4)
    paths = {save_latent(z, tmp_path, family="wan", profile=profiles.family("wan"), meta={"frames": 5})
             for _ in range(3)}
    assert len(paths) == 3
    _, meta = load_latent(next(iter(paths)))
    assert meta["latents_mean"][0] == pytest.approx(-0.7571) and len(meta["latents_std"]) == 16
    assert meta["frames"] == 5


def test_load_errors(tmp_path):
    with pytest.raises(LatentError, match="not found"):
        load_latent(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(LatentError, match=r"not a readable \.safetensors latent"):
        load_latent(bad)
    from safetensors.torch import save_file

    two = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(1), "b": torch.zeros(1)}, str(two))
    with pytest.raises(LatentError, match="expected one tensor named 'latents'"):
        load_latent(two)
    one = tmp_path / "one.safetensors"
    save_file({"x": torch.ones(1, 4, 2, 2)}, str(one))
    t, meta = load_latent(one)
    assert t.shape == (1, 4, 2, 2) and meta == {}
