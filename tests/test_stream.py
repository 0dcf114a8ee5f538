"""Exact tiling (extension/stream.py) on real diffusers decoders: equal to the full decode, buffers as
computed, every supported layout, and clear errors for the rest."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from hybrid_vae.extension.fixture import build_tiny_vae
from hybrid_vae.extension.stream import stream_buffer_elements, stream_decode, stream_support
from hybrid_vae.policy import PlanError


def kl(block_out_channels, layers_per_block=1, groups=4, latent_channels=4, **kw):
    torch.manual_seed(0)
    n = len(block_out_channels)
    return AutoencoderKL(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                         norm_num_groups=groups, latent_channels=latent_channels,
                         down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                         **kw).eval()


def full(vae, z):
    with torch.no_grad():
        return vae.decode(z).sample


CASES = {
    "sd-like": dict(block_out_channels=[8, 16, 32, 32], layers_per_block=2, groups=4),
    "widening": dict(block_out_channels=[32, 16, 8], layers_per_block=1, groups=4),  # decoder channels grow
    "flux-like": dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, groups=8, latent_channels=16,
                      use_quant_conv=False, use_post_quant_conv=False),
    "one-block": dict(block_out_channels=[16], layers_per_block=2, groups=4),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("tile_px", [16, 40, 1000])
def test_equals_the_full_decode(name, tile_px):
    vae = kl(**CASES[name])
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, vae.config.latent_channels, 7, 9, generator=g)  # odd sizes: uneven tiles
    ref = full(vae, z)
    with torch.no_grad():
        out = stream_decode(vae, z, tile_px=tile_px)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_buffers_are_what_stream_buffer_elements_says(name):
    cfg = CASES[name]
    vae = kl(**cfg)
    z = torch.randn(1, vae.config.latent_channels, 6, 8)
    seen: list[int] = []
    with torch.no_grad():
        out = stream_decode(vae, z, tile_px=24, on_buffers=seen.append)
    px = out.shape[-2] * out.shape[-1]
    expected = stream_buffer_elements(cfg["block_out_channels"], cfg["layers_per_block"])
    assert max(seen) == expected * px * 4  # float32


def test_sd_decoder_figure():
    """The SD decoder (128, 256, 512, 512; 2 layers) at its widest point: 256 + 128 + 3 elements/px."""
    assert stream_buffer_elements([128, 256, 512, 512], 2) == 387


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_stay_within_the_rounding_of_the_dtype(dtype):
    """In half types the exact tiler differs from diffusers' full decode by less than that full
    decode differs from float32 (scale/shift are rounded to the dtype; see _norm_act)."""
    vae = kl(**CASES["sd-like"])
    z = torch.randn(1, 4, 8, 8)
    ref32 = full(vae, z)
    half = vae.to(dtype)
    ref = full(half, z.to(dtype)).float()
    with torch.no_grad():
        out = stream_decode(half, z.to(dtype), tile_px=24).float()
    dtype_err = float((ref - ref32).abs().mean())
    assert float((out - ref).abs().mean()) <= 1.5 * dtype_err
    assert float((out - ref32).abs().mean()) <= 2.0 * dtype_err


def test_tiny_family_vaes_are_supported():
    for kind in ("sd15", "sdxl", "flux"):
        vae = build_tiny_vae(kind)
        assert stream_support(vae) is None, kind
        z = torch.randn(1, vae.config.latent_channels, 6, 6)
        with torch.no_grad():
            torch.testing.assert_close(stream_decode(vae, z, tile_px=16), full(vae, z), atol=2e-5, rtol=0)


def test_video_and_unknown_vaes_are_refused_with_the_reason():
    assert "no diffusers Decoder" in stream_support(build_tiny_vae("wan"))
    assert "no diffusers Decoder" in stream_support(torch.nn.Linear(2, 2))
    vae = build_tiny_vae("sd15")
    vae.decoder.up_blocks[1].upsamplers[0].conv = torch.nn.Conv2d(16, 16, 3, padding=1, stride=1, dilation=1,
                                                                  padding_mode="reflect")
    why = stream_support(vae)
    assert why == "up_blocks[1].upsamplers[0] convolution is not 3x3"
    with pytest.raises(PlanError, match="exact tiling cannot run this VAE: up_blocks"):
        stream_decode(vae, torch.randn(1, 4, 4, 4), tile_px=16)
    with pytest.raises(PlanError, match="tile_px=4"):
        stream_decode(build_tiny_vae("sd15"), torch.randn(1, 4, 4, 4), tile_px=4)


def test_progress_counts_every_tile_of_every_pass():
    vae = kl(**CASES["sd-like"])
    calls: list[tuple[int, int]] = []
    with torch.no_grad():
        stream_decode(vae, torch.randn(2, 4, 8, 8), tile_px=16, progress=lambda d, n: calls.append((d, n)))
    done = [d for d, _ in calls]
    assert done == list(range(1, len(calls) + 1)) and calls[-1][0] == calls[-1][1]


def test_an_error_mid_decode_leaves_the_vae_untouched():
    vae = kl(**CASES["sd-like"])
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    calls = {"n": 0}

    def boom(_m, _i, _o):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.cuda.OutOfMemoryError("injected")

    h = vae.decoder.up_blocks[2].resnets[0].conv2.register_forward_hook(boom)
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError), torch.no_grad():
            stream_decode(vae, torch.randn(1, 4, 8, 8), tile_px=16)
    finally:
        h.remove()
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    torch.testing.assert_close(stream_decode(vae, z := torch.randn(1, 4, 8, 8), tile_px=16).detach(), full(vae, z),
                               atol=2e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_on_cuda_equal_to_the_full_decode_and_under_its_peak(dtype, cuda_peak):
    vae = kl(block_out_channels=[32, 64, 128, 128], layers_per_block=2, groups=8).to("cuda", dtype)
    z = torch.randn(1, 4, 64, 64, device="cuda", dtype=dtype)
    ref, full_peak = cuda_peak(lambda: full(vae, z))
    out, peak = cuda_peak(lambda: stream_decode(vae, z, tile_px=128))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert float((out.float() - ref.float()).abs().max()) <= tol * 10 and float((out.float() - ref.float()).abs().mean()) <= tol
    assert peak < full_peak


# ---- the engine's model of it (policy.estimate) ----------------------------------------------------
def test_exact_estimate_matches_the_real_sd_decoder_and_behaves():
    from hybrid_vae.extension.stream import stream_buffer_elements
    from hybrid_vae.policy.estimate import exact_peak_bytes, exact_tiles, peak_bytes
    from hybrid_vae.policy.model import DecodeJob
    from hybrid_vae.policy.profiles import load_profiles

    p = load_profiles("")
    fam = p.family("sd15")
    # the families' figure is the SD decoder's, computed from its channels
    assert fam.memory.exact_buffer_elements == stream_buffer_elements([128, 256, 512, 512], 2)
    job = DecodeJob("sd15", 2048, 2048, dtype="float16")
    peaks = [exact_peak_bytes(job, fam, t) for t in (256, 512, 1024)]
    assert peaks == sorted(peaks)  # bigger tiles need more
    full = peak_bytes(job, fam, tile_px=None, overlap_px=0, frame_chunk=None, slice_batch=False)
    assert peaks[1] < 0.5 * full and peaks[-1] < 0.6 * full  # 512 px exact tiles: under half a full decode
    ty, tx = exact_tiles(job, fam, 700)
    assert sum(s for _, s in ty) >= 2048 and max(s for _, s in ty) <= 700 and len(tx) == 3
    # batches keep finished items; weights count when not resident
    assert exact_peak_bytes(DecodeJob("sd15", 2048, 2048, batch=2, dtype="float16"), fam, 512) > peaks[1]
    assert exact_peak_bytes(DecodeJob("sd15", 2048, 2048, dtype="float16", vae_resident=False), fam, 512) > peaks[1]
    with pytest.raises(ValueError, match="hunyuanvideo has no exact-tiling memory model"):
        exact_peak_bytes(DecodeJob("hunyuanvideo", 512, 320, frames=9), p.family("hunyuanvideo"), 256)


def test_offloaded_weights_are_refused_up_front():
    """Sequential CPU offload (accelerate) leaves meta tensors on the modules; exact tiling reads the
    GroupNorm weights directly, so it says it cannot run instead of failing mid-decode."""
    vae = build_tiny_vae("sd15")
    vae.decoder.up_blocks[0].resnets[0].norm1.weight = torch.nn.Parameter(torch.empty(16, device="meta"))
    assert "offloaded" in stream_support(vae)
