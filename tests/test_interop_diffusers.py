"""diffusers' own ``remote_decode``, UNCHANGED, against ``hybrid-vae serve --demo`` on loopback.

The app is the one ``hybrid-vae serve --demo`` builds (:func:`server.cli.build_app`), under a real
uvicorn server on 127.0.0.1; one test also starts the real command in a subprocess.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from diffusers.utils.remote_utils import remote_decode
from diffusers.video_processor import VideoProcessor
from hybrid_vae.server.cli import demo_families
from hybrid_vae.server.testing import free_port
from PIL import Image

SD15 = 0.18215



@pytest.fixture(scope="module")
def local_sd15() -> torch.nn.Module:
    """A separate instance of the demo's sd15 VAE (same weights) for local reference decodes."""
    return demo_families()["sd15"]()


def _local_uint8(vae: torch.nn.Module, z: torch.Tensor, scaling: float = SD15) -> np.ndarray:
    with torch.no_grad():
        x = vae.decode(z.float() / scaling).sample.clamp(-1, 1)
    return ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()


def _latent(*shape: int, dtype: torch.dtype = torch.float16, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpg", "jpeg"), ("png", "png")])
def test_sd_latent_to_pil(demo: str, local_sd15: torch.nn.Module, fmt: str, pil_format: str) -> None:
    z = _latent(1, 4, 16, 16)
    img = remote_decode(f"{demo}/sd15", z, scaling_factor=SD15, image_format=fmt)
    assert isinstance(img, Image.Image) and img.size == (128, 128) and img.format == pil_format
    if fmt == "png":  # lossless: the very pixels of a local decode
        diff = np.abs(np.asarray(img).astype(int) - _local_uint8(local_sd15, z).astype(int))
        assert diff.max() <= 1


def test_pt_partial_postprocess(demo: str, local_sd15: torch.nn.Module) -> None:
    z = _latent(1, 4, 16, 16, dtype=torch.float32)
    t = remote_decode(f"{demo}/sd15", z, scaling_factor=SD15, output_type="pt", partial_postprocess=True,
                      return_type="pt")
    assert t.dtype == torch.uint8 and tuple(t.shape) == (1, 128, 128, 3)
    assert (t[0].numpy().astype(int) - _local_uint8(local_sd15, z).astype(int)).__abs__().max() <= 1
    img = remote_decode(f"{demo}/sd15", z, scaling_factor=SD15, output_type="pt", partial_postprocess=True,
                        return_type="pil")
    assert isinstance(img, Image.Image) and img.size == (128, 128)


def test_pt_without_partial_postprocess(demo: str, local_sd15: torch.nn.Module) -> None:
    z = _latent(1, 4, 16, 16, dtype=torch.float16)
    t = remote_decode(f"{demo}/sd15", z, scaling_factor=SD15, output_type="pt", partial_postprocess=False,
                      return_type="pt")
    assert t.dtype == torch.float16 and tuple(t.shape) == (1, 3, 128, 128)
    with torch.no_grad():
        want = local_sd15.decode(z.float() / SD15).sample.clamp(-1, 1)
    assert (t.float() - want).abs().max() < 2e-3  # float16 on the wire


@pytest.mark.slow
def test_flux_packed_1024(demo: str) -> None:
    z = _latent(1, 4096, 64, dtype=torch.bfloat16)
    img = remote_decode(f"{demo}/flux", z, scaling_factor=0.3611, shift_factor=0.1159, height=1024, width=1024)
    assert isinstance(img, Image.Image) and img.size == (1024, 1024)


def test_flux_packed_small_as_tensor(demo: str) -> None:
    z = _latent(1, 64, 64, dtype=torch.bfloat16)  # 128 x 128: (128 / 16) ** 2 tokens
    t = remote_decode(f"{demo}/flux", z, scaling_factor=0.3611, shift_factor=0.1159, height=128, width=128,
                      output_type="pt", partial_postprocess=True, return_type="pt")
    assert tuple(t.shape) == (1, 128, 128, 3) and t.dtype == torch.uint8


def test_video_mp4(demo: str) -> None:
    av = pytest.importorskip("av", reason="mp4 needs PyAV: pip install 'sdnext-hybrid-vae[server]'")

    z = _latent(1, 16, 3, 8, 8)
    data = remote_decode(f"{demo}/hunyuanvideo", z, output_type="mp4", return_type="mp4")
    assert isinstance(data, bytes) and data[4:8] == b"ftyp"
    with av.open(io.BytesIO(data)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)  # (3 - 1) * 4 + 1 frames


def test_video_frames_with_processor(demo: str) -> None:
    z = _latent(1, 16, 2, 4, 4)
    frames = remote_decode(f"{demo}/hunyuanvideo", z, processor=VideoProcessor(), output_type="pil",
                           scaling_factor=0.476986)
    assert isinstance(frames, list) and len(frames) == 5 and frames[0].size == (32, 32)


def test_error_reaches_diffusers_as_json(demo: str) -> None:
    """diffusers raises RuntimeError(response.json()): our errors must be JSON for that to work."""
    with pytest.raises(RuntimeError, match=r"channels|takes 4-D"):
        remote_decode(f"{demo}/sd15", _latent(1, 16, 8, 8), scaling_factor=SD15)


@pytest.mark.slow
def test_real_serve_command(tmp_path: Path) -> None:
    """`hybrid-vae serve --demo` as a user runs it: health, then one decode with remote_decode."""
    port = free_port()
    exe = Path(sys.executable).with_name("hybrid-vae")
    cmd = [str(exe), "serve", "--demo", "--device", "cpu", "--port", str(port)] if exe.exists() else \
        [sys.executable, "-m", "hybrid_vae.extension.cli", "serve", "--demo", "--device", "cpu", "--port", str(port)]
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        base, end = f"http://127.0.0.1:{port}", time.monotonic() + 180
        while True:
            try:
                h = requests.get(base + "/health", timeout=2).json()
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < end, (tmp_path / "serve.log").read_text()
                time.sleep(0.3)
        assert {"sd15", "sdxl", "flux", "hunyuanvideo"} <= set(h["families"])
        img = remote_decode(f"{base}/sdxl", _latent(1, 4, 8, 8), scaling_factor=0.13025)
        assert img.size == (64, 64)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
