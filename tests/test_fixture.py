"""Tests for extension.fixture: the trained fixture VAE, the sample picture and the tiny random VAEs."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from hybrid_vae.extension import fixture  # noqa: E402
from hybrid_vae.extension.fixture import build_tiny_vae, fixture_image, load_fixture_vae  # noqa: E402

#: Achieved PSNR on the held-out 256 px astronaut (see extension/fixture/weights/training_log.txt)
#: minus 2 dB, rounded down.
MIN_PSNR_256 = 16.0

TINY_SHAPES = {
    "sd15": ((1, 4, 8, 8), (1, 3, 64, 64)),
    "sdxl": ((1, 4, 8, 8), (1, 3, 64, 64)),
    "flux": ((1, 16, 8, 8), (1, 3, 64, 64)),
    "hunyuanvideo": ((1, 16, 2, 8, 8), (1, 3, 5, 64, 64)),
    "wan": ((1, 16, 2, 8, 8), (1, 3, 5, 64, 64)),
}


@pytest.fixture(scope="module")
def vae():
    return load_fixture_vae()


def test_module_import_does_not_import_torch():
    code = "import sys, extension.fixture; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_fixture_files_small():
    files = {p.name: p.stat().st_size for p in fixture.FIXTURE_DIR.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "training_log.txt"} <= set(files)
    assert sum(files.values()) <= 5_000_000


def test_fixture_is_sd_like_autoencoderkl(vae):
    from diffusers import AutoencoderKL

    assert isinstance(vae, AutoencoderKL)
    assert vae.config.latent_channels == 4
    assert len(vae.config.block_out_channels) == 4  # 3 downsamples: 8x
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    assert not vae.training
    x = torch.zeros(1, 3, 64, 96)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
    assert z.shape == (1, 4, 8, 12)
    assert y.shape == x.shape


def test_fixture_dtype_and_device():
    v = load_fixture_vae(dtype=torch.float16, device="cpu")
    assert next(v.parameters()).dtype == torch.float16


def test_fixture_reconstructs_astronaut(vae):
    img = fixture_image("astronaut", 256)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    mse = ((y - x) / 2).pow(2).mean().item()
    assert 10 * math.log10(1.0 / mse) >= MIN_PSNR_256


def test_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setattr(fixture, "FIXTURE_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"nowhere.*python -m hybrid_vae\.extension\.fixture\.train"):
        fixture.load_fixture_vae()


def test_fixture_image_bundled_png():
    img = fixture_image()
    assert img.mode == "RGB" and img.size == (256, 256)
    small = fixture_image("astronaut", 64)
    assert small.size == (64, 64)


def test_fixture_image_other_name():
    pytest.importorskip("skimage")
    img = fixture_image("coffee", 128)
    assert img.mode == "RGB" and img.size == (128, 128)
    with pytest.raises(ValueError, match="nope"):
        fixture_image("nope")


@pytest.mark.parametrize("kind", sorted(TINY_SHAPES))
def test_tiny_vae_decodes(kind):
    latent_shape, out_shape = TINY_SHAPES[kind]
    v = build_tiny_vae(kind, seed=0)
    z = torch.randn(*latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = v.decode(z).sample
    assert tuple(y.shape) == out_shape
    assert torch.isfinite(y).all()


def test_tiny_vae_configs():
    assert build_tiny_vae("sd15").config.scaling_factor == pytest.approx(0.18215)
    assert build_tiny_vae("sdxl").config.scaling_factor == pytest.approx(0.13025)
    flux = build_tiny_vae("flux")
    assert flux.config.scaling_factor == pytest.approx(0.3611)
    assert flux.config.shift_factor == pytest.approx(0.1159)
    assert flux.quant_conv is None and flux.post_quant_conv is None


def test_tiny_vae_seeded():
    a, b, c = build_tiny_vae("sd15", seed=1), build_tiny_vae("sd15", seed=1), build_tiny_vae("sd15", seed=2)
    pa, pb, pc = (next(m.decoder.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_tiny_vae_unknown_kind():
    with pytest.raises(ValueError, match=r"'nope'.*flux.*hunyuanvideo.*wan.*sd15.*sdxl"):
        build_tiny_vae("nope")
