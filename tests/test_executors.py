"""Executors on real diffusers VAEs: full, the engine's tiler, video tiling, cpu, and restoring the VAE."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hybrid_vae.extension.executors import blend_weights, is_kl_like, run_plan, run_settings
from hybrid_vae.extension.fixture import build_tiny_vae, fixture_image, load_fixture_vae
from hybrid_vae.policy import PlanError, load_profiles
from hybrid_vae.policy.model import Estimate, Plan
from hybrid_vae.policy.tiles import axis_tiles, diffusers_axis
from hypothesis import given, settings
from hypothesis import strategies as st

EST = Estimate(peak_bytes=0, seconds=0.0, peak_source="test", seconds_source="test")


def plan(path="full", dtype="float32", **kw) -> Plan:
    return Plan(path=path, estimate=EST, dtype=dtype, **kw)


@pytest.fixture(scope="module")
def profiles():
    return load_profiles("")


@pytest.fixture(scope="module")
def fixture_vae():
    return load_fixture_vae()


@pytest.fixture(scope="module")
def astronaut_latent(fixture_vae):
    """The bundled picture at 512 px, encoded by the fixture (VAE space: not scaled)."""
    from PIL import Image

    img = fixture_image("astronaut", 256).resize((512, 512), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        return fixture_vae.encode(x).latent_dist.mode()


def psnr(a, b) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


class Recorder:
    """Counts the decoder's forward calls and the latent shapes they got; can raise on a call."""

    def __init__(self, module, raise_on: int | None = None, exc: BaseException | None = None):
        self.shapes: list[tuple[int, ...]] = []
        self.raise_on, self.exc = raise_on, exc
        self.handle = module.register_forward_pre_hook(self.hook)

    def hook(self, _m, inputs):
        self.shapes.append(tuple(inputs[0].shape))
        if self.raise_on is not None and len(self.shapes) == self.raise_on:
            raise self.exc

    def remove(self):
        self.handle.remove()


# ---- blending -----------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 300), tile=st.integers(2, 96), overlap=st.integers(0, 95), scale=st.sampled_from([1, 8]))
def test_blend_weights_are_a_partition_of_unity(length, tile, overlap, scale):
    if overlap >= tile:
        overlap = tile - 1
    tiles = axis_tiles(length, tile, overlap)
    ws = blend_weights(tiles, scale, dtype=torch.float64)
    total = torch.zeros(length * scale, dtype=torch.float64)
    for (s, n), w in zip(tiles, ws, strict=True):
        assert w.shape == (n * scale,)
        assert float(w.min()) > 0 and float(w.max()) <= 1 + 1e-12
        total[s * scale:(s + n) * scale] += w
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-12, rtol=0)


def test_blend_weights_ramp_linearly_over_the_overlap():
    tiles = [(0, 4), (2, 4)]  # overlap of 2 latent px = 16 output px
    w0, w1 = blend_weights(tiles, 8, dtype=torch.float64)
    assert torch.all(w0[:16] == 1) and torch.all(w1[16:] == 1)
    ramp = (torch.arange(16, dtype=torch.float64) + 0.5) / 16
    torch.testing.assert_close(w1[:16], ramp)
    torch.testing.assert_close(w0[16:], 1 - ramp)


# ---- the engine's tiler on AutoencoderKL ----------------------------------------------------------

def test_tiled_runs_exactly_the_axis_tiles_grid(profiles):
    vae = build_tiny_vae("sd15")
    z = torch.randn(2, 4, 16, 28, generator=torch.Generator().manual_seed(0))
    rec = Recorder(vae.decoder)
    calls = []
    try:
        out = run_plan(plan("tiled", tile_px=96, overlap_px=32, slice_batch=True), vae, z,
                       family=profiles.family("sd15"), progress=lambda d, n: calls.append((d, n)))
    finally:
        rec.remove()
    ty, tx = axis_tiles(16, 12, 4), axis_tiles(28, 12, 4)
    assert (len(ty), len(tx)) == (2, 3)
    expected = [(1, 4, yn, xn) for _ in range(2) for _, yn in ty for _, xn in tx]
    assert rec.shapes == expected  # one item at a time, equalised tiles, no thin edge tiles
    assert calls == [(i + 1, len(expected)) for i in range(len(expected))]
    assert out.shape == (2, 3, 128, 224) and out.dtype == torch.float32
    assert float(out.min()) >= -1 and float(out.max()) <= 1


@pytest.fixture(scope="module")
def full_decode(profiles, fixture_vae, astronaut_latent):
    return run_plan(plan("full"), fixture_vae, astronaut_latent, family=profiles.family("sd15"))


@pytest.mark.parametrize("tile_px", [128, 256, 384])
def test_exact_tiles_equal_the_full_decode(profiles, fixture_vae, astronaut_latent, full_decode, tile_px):
    """Exact tiling (the engine's tiled plan while it fits) reproduces the full decode on a real
    picture: far above the 40 dB target (measured ~140 dB: float32 rounding), at every tile size."""
    calls = []
    tiled = run_plan(plan("tiled", tile_px=tile_px, groupnorm="exact"), fixture_vae, astronaut_latent,
                     family=profiles.family("sd15"), progress=lambda d, n: calls.append((d, n)))
    quality = psnr(tiled, full_decode)
    assert quality >= 40.0, f"exact tile {tile_px}: {quality:.2f} dB"
    assert float((tiled - full_decode).abs().max()) < 1e-4
    assert calls and calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.parametrize("tile_px", [256, 384])
def test_local_groupnorm_tiles_are_as_faithful_as_full(profiles, fixture_vae, astronaut_latent, full_decode,
                                                       tile_px):
    """Per-tile GroupNorm drifts from the full decode (measured: ~20 dB on the fixture, see
    docs/tiling-quality.md) but stays as close to the picture as the full decode is."""
    from PIL import Image

    img = fixture_image("astronaut", 256).resize((512, 512), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    tiled = run_plan(plan("tiled", tile_px=tile_px, overlap_px=64), fixture_vae, astronaut_latent,
                     family=profiles.family("sd15"))
    assert psnr(tiled, x) >= psnr(full_decode, x) - 1.5
    assert 15.0 <= psnr(tiled, full_decode) < 40.0  # past 40 dB, local statistics would be enough


@pytest.mark.slow
def test_overlap_matters_for_local_tiles(profiles, fixture_vae, astronaut_latent, full_decode):
    """Without overlap the tile borders of local tiles show (the test can fail): 0 vs 128 px."""
    fam = profiles.family("sd15")
    seam = psnr(run_plan(plan("tiled", tile_px=384, overlap_px=0), fixture_vae, astronaut_latent, family=fam),
                full_decode)
    good = psnr(run_plan(plan("tiled", tile_px=384, overlap_px=128), fixture_vae, astronaut_latent, family=fam),
                full_decode)
    assert good > seam + 2


def test_exact_plan_on_an_unsupported_decoder_names_the_reason(profiles):
    vae = build_tiny_vae("sd15")
    vae.decoder.up_blocks[0].resnets[0].conv1 = torch.nn.Conv2d(16, 16, 5, padding=2)
    with pytest.raises(PlanError, match=r"up_blocks\[0\]\.resnets\[0\] convolutions are not 3x3"):
        run_plan(plan("tiled", tile_px=32, groupnorm="exact"), vae, torch.randn(1, 4, 8, 8),
                 family=profiles.family("sd15"))


def test_full_item_by_item_equals_whole_batch(profiles):
    vae = build_tiny_vae("sdxl")
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    whole = run_plan(plan("full"), vae, z, family=profiles.family("sdxl"))
    rec = Recorder(vae.decoder)
    try:
        sliced = run_plan(plan("full", slice_batch=True), vae, z, family=profiles.family("sdxl"))
    finally:
        rec.remove()
    assert [s[0] for s in rec.shapes] == [1, 1, 1]
    torch.testing.assert_close(sliced, whole, atol=1e-5, rtol=0)


# ---- restoring the VAE ----------------------------------------------------------------------------

@pytest.mark.parametrize("p", [plan("full", "float16"), plan("full", slice_batch=True),
                               plan("tiled", tile_px=64, overlap_px=16), plan("cpu")],
                         ids=["full", "full-sliced", "tiled", "cpu"])
def test_vae_restored_when_decode_raises(profiles, p):
    vae = build_tiny_vae("sd15").to(torch.bfloat16)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_overlap_factor = 1234, 0.3
    vae.use_slicing = True
    rec = Recorder(vae.decoder, raise_on=1, exc=RuntimeError("boom in decoder"))
    try:
        with pytest.raises(RuntimeError, match="boom in decoder"):
            run_plan(p, vae, torch.randn(2, 4, 16, 16), family=profiles.family("sd15"))
    finally:
        rec.remove()
    assert rec.shapes, "the decoder ran"
    assert all(q.dtype == torch.bfloat16 and q.device.type == "cpu" for q in vae.parameters())
    assert (vae.use_tiling, vae.use_slicing, vae.tile_sample_min_size, vae.tile_overlap_factor) == (True, True, 1234, 0.3)
    assert not vae.decoder._forward_hooks and not vae.decoder._forward_pre_hooks


def test_vae_restored_after_success_and_cpu_runs_float32(profiles):
    vae = build_tiny_vae("sd15").to(torch.bfloat16)
    dtypes = []
    h = vae.decoder.register_forward_pre_hook(lambda m, i: dtypes.append(i[0].dtype))
    try:
        out = run_plan(plan("cpu"), vae, torch.randn(1, 4, 8, 8, dtype=torch.bfloat16),
                       family=profiles.family("sd15"))
    finally:
        h.remove()
    assert dtypes == [torch.float32] and out.dtype == torch.float32
    assert all(q.dtype == torch.bfloat16 for q in vae.parameters())


def test_a_tiled_cpu_plan_runs_tiles_on_the_cpu_in_float32(profiles):
    vae = build_tiny_vae("sd15").to(torch.bfloat16)
    z = torch.randn(2, 4, 16, 16, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    rec = Recorder(vae.decoder)
    try:
        out = run_plan(plan("cpu", tile_px=64, overlap_px=16, slice_batch=True), vae, z, family=profiles.family("sd15"))
    finally:
        rec.remove()
    ty = axis_tiles(16, 8, 2)
    assert len(rec.shapes) == 2 * len(ty) ** 2 and all(s[2] <= 8 and s[3] <= 8 for s in rec.shapes)
    assert out.shape == (2, 3, 128, 128) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert all(q.dtype == torch.bfloat16 for q in vae.parameters())


def test_run_settings_never_narrows_the_weights():
    vae = build_tiny_vae("sd15").to(torch.bfloat16)
    assert run_settings(plan("full", "float32"), vae, "cuda") == (torch.device("cuda"), torch.float32)
    assert run_settings(plan("full", "float16"), vae, "cuda") == (torch.device("cuda"), torch.bfloat16)
    assert run_settings(plan("full", "bfloat16"), vae, "cuda") == (torch.device("cuda"), torch.bfloat16)
    assert run_settings(plan("full", "float16"), vae, None) == (torch.device("cpu"), torch.float32)
    assert run_settings(plan("cpu", "float16"), vae, "cuda") == (torch.device("cpu"), torch.float32)


def test_non_kl_vae_falls_back_to_its_own_tiling_and_is_restored(profiles):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4).eval()
    assert not is_kl_like(vae) and is_kl_like(build_tiny_vae("sd15"))
    before = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_overlap_factor)
    seen = []
    orig = vae.decode

    def spy(z, return_dict=True):
        seen.append((vae.use_tiling, vae.tile_sample_min_size))
        return orig(z, return_dict=return_dict)

    vae.decode = spy
    out = run_plan(plan("tiled", tile_px=64, overlap_px=16), vae, torch.randn(1, 4, 16, 16),
                   family=profiles.family("sd15"))
    assert seen == [(True, 64)] and out.shape == (1, 3, 128, 128)
    assert (vae.use_tiling, vae.tile_sample_min_size, vae.tile_overlap_factor) == before


def test_plan_errors(profiles):
    vae = build_tiny_vae("sd15")
    with pytest.raises(PlanError, match="remote plans go to the remote client"):
        run_plan(plan("remote", endpoint="http://127.0.0.1:1/", response_format="raw"), vae,
                 torch.randn(1, 4, 8, 8), family=profiles.family("sd15"))
    with pytest.raises(PlanError, match="5-D but family is image"):
        run_plan(plan("full"), vae, torch.randn(1, 4, 2, 8, 8), family=profiles.family("sd15"))
    with pytest.raises(PlanError, match="no tile size"):
        run_plan(plan("tiled"), vae, torch.randn(1, 4, 8, 8), family=profiles.family("sd15"))


# ---- video VAEs -----------------------------------------------------------------------------------

def test_hunyuan_full_and_tiled_with_temporal_chunks(profiles):
    fam = profiles.family("hunyuanvideo")
    vae = build_tiny_vae("hunyuanvideo")
    before = {k: getattr(vae, k) for k in ("use_tiling", "use_framewise_decoding", "tile_sample_min_height",
                                           "tile_sample_stride_height", "tile_sample_min_num_frames",
                                           "tile_sample_stride_num_frames")}
    z = torch.randn(1, 16, 4, 12, 12, generator=torch.Generator().manual_seed(2))
    rec = Recorder(vae.decoder)
    full = run_plan(plan("full"), vae, z, family=fam)
    assert len(rec.shapes) == 1 and rec.shapes[0][2] == 4  # framewise decoding off for a full plan
    rec.shapes.clear()
    calls = []
    p = plan("tiled", tile_px=64, overlap_px=16, frame_chunk=2, frame_overlap=1, slice_batch=True)
    tiled = run_plan(p, vae, z, family=fam, progress=lambda d, n: calls.append((d, n)))
    rec.remove()
    assert full.shape == tiled.shape == (1, 3, 13, 96, 96)
    n_sp = len(diffusers_axis(12, 8, 2)) ** 2
    n_t = len(range(0, 4, 1))
    assert len(rec.shapes) == n_sp * n_t == calls[-1][1] and calls[-1][0] == calls[-1][1]
    assert max(s[2] for s in rec.shapes) == 3  # chunk + 1 latent frames at a time
    assert max(s[3] for s in rec.shapes) == 8  # 64 px tiles
    assert {k: getattr(vae, k) for k in before} == before


@pytest.mark.parametrize("tile_px, chunk, overlap, frames", [(None, 2, 1, 4), (64, 2, 1, 5), (None, 3, 1, 7),
                                                            (64, 1, 0, 3), (None, 4, 2, 6)])
def test_hunyuan_chunks_to_host_equal_the_vaes_own_chunks(profiles, monkeypatch, tile_px, chunk, overlap, frames):
    """With host_output, HunyuanVideo's temporal chunks stream their finished frames to host memory; the frames
    are the VAE's own framewise decode with the same settings (diffusers' class, same weights and latent)."""
    from hybrid_vae.extension import executors

    streams = []
    real = executors._chunks_to_host
    monkeypatch.setattr(executors, "_chunks_to_host", lambda vae, z: streams.append(z.shape) or real(vae, z))
    fam = profiles.family("hunyuanvideo")
    vae = build_tiny_vae("hunyuanvideo")
    z = torch.randn(2, 16, frames, 12, 10, generator=torch.Generator().manual_seed(5))
    p = plan("tiled", tile_px=tile_px, overlap_px=16 if tile_px else 0, frame_chunk=chunk, frame_overlap=overlap)
    own = run_plan(p, vae, z, family=fam)
    calls = []
    streamed = run_plan(dataclasses.replace(p, host_output=True), vae, z, family=fam,
                        progress=lambda d, n: calls.append((d, n)))
    assert streamed.device.type == "cpu" and streamed.shape == own.shape == (2, 3, (frames - 1) * 4 + 1, 96, 80)
    assert len(streams) == 1  # the streamed path ran (the first decode was the VAE's own)
    torch.testing.assert_close(streamed, own, rtol=0, atol=0)
    assert calls[-1][0] == calls[-1][1]


@pytest.mark.parametrize("tile_px, overlap, hw, frames", [(64, 16, (12, 10), 2), (48, 16, (13, 9), 3),
                                                        (64, 0, (12, 12), 1), (32, 8, (9, 14), 2)])
def test_wan_tiles_to_host_equal_the_vaes_own_tiles(profiles, monkeypatch, tile_px, overlap, hw, frames):
    """With host_output, Wan's spatial tiles stream their finished regions to host memory; the frames are the
    VAE's own tiled decode with the same settings (diffusers' class, same weights and latent, batch 2)."""
    from hybrid_vae.extension import executors

    streams = []
    real = executors._tiles_to_host
    monkeypatch.setattr(executors, "_tiles_to_host", lambda vae, z: streams.append(z.shape) or real(vae, z))
    fam = profiles.family("wan")
    vae = build_tiny_vae("wan")
    z = torch.randn(2, 16, frames, *hw, generator=torch.Generator().manual_seed(7))
    p = plan("tiled", tile_px=tile_px, overlap_px=overlap)
    own = run_plan(p, vae, z, family=fam)
    calls = []
    streamed = run_plan(dataclasses.replace(p, host_output=True), vae, z, family=fam,
                        progress=lambda d, n: calls.append((d, n)))
    assert streamed.device.type == "cpu" and streamed.shape == own.shape == (2, 3, (frames - 1) * 4 + 1, hw[0] * 8,
                                                                               hw[1] * 8)
    assert len(streams) == 1  # the streamed path ran (the first decode was the VAE's own)
    torch.testing.assert_close(streamed, own, rtol=0, atol=0)
    assert calls[-1][0] == calls[-1][1]


def test_chunks_stream_only_on_diffusers_hunyuanvideo(profiles):
    from hybrid_vae.extension.executors import chunks_stream, tiles_stream
    from hybrid_vae.extension.stream import settings_for_vae
    from hybrid_vae.policy.model import DecodeSettings

    assert chunks_stream(build_tiny_vae("hunyuanvideo"))
    assert not chunks_stream(build_tiny_vae("wan")) and not chunks_stream(build_tiny_vae("sd15"))
    assert tiles_stream(build_tiny_vae("wan"))
    assert not tiles_stream(build_tiny_vae("hunyuanvideo")) and not tiles_stream(build_tiny_vae("sd15"))
    # the decision counts what will run: a HunyuanVideo VAE that cannot stream gets diffusers' loop's estimate
    fam = profiles.family("hunyuanvideo")
    assert settings_for_vae(DecodeSettings(), build_tiny_vae("hunyuanvideo"), fam).video_host_output
    other = torch.nn.Module()
    assert not settings_for_vae(DecodeSettings(), other, fam).video_host_output


def test_hunyuan_restored_when_tiled_decode_raises(profiles):
    vae = build_tiny_vae("hunyuanvideo")
    before = dict(vars(vae))
    before = {k: v for k, v in before.items() if k.startswith(("use_", "tile_"))}
    rec = Recorder(vae.decoder, raise_on=2, exc=torch.OutOfMemoryError("CUDA out of memory (test)"))
    with pytest.raises(torch.OutOfMemoryError):
        run_plan(plan("tiled", tile_px=64, overlap_px=16, frame_chunk=2, frame_overlap=1), vae,
                 torch.randn(1, 16, 3, 16, 16), family=profiles.family("hunyuanvideo"))
    rec.remove()
    assert {k: getattr(vae, k) for k in before} == before
    assert not vae.decoder._forward_hooks


def test_wan_full_and_tiled(profiles):
    fam = profiles.family("wan")
    vae = build_tiny_vae("wan")
    z = torch.randn(1, 16, 2, 12, 12, generator=torch.Generator().manual_seed(3))
    full = run_plan(plan("full"), vae, z, family=fam)
    calls = []
    tiled = run_plan(plan("tiled", tile_px=64, overlap_px=16), vae, z, family=fam,
                     progress=lambda d, n: calls.append((d, n)))
    assert full.shape == tiled.shape == (1, 3, 5, 96, 96)
    assert calls[-1] == (8, 8)  # 2x2 tiles x 2 latent frames (Wan decodes frame by frame)
    assert vae.use_tiling is False and vae.tile_sample_min_height == 256
    assert torch.isfinite(tiled).all() and float(tiled.abs().max()) <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_gpu_plan_moves_vae_and_back(profiles):
    vae = build_tiny_vae("sd15")
    out = run_plan(plan("tiled", "float16", tile_px=64, overlap_px=16), vae, torch.randn(1, 4, 16, 16),
                   family=profiles.family("sd15"), device="cuda")
    assert out.device.type == "cuda" and out.dtype == torch.float32  # fp32 VAE is never narrowed
    assert next(vae.parameters()).device.type == "cpu"
