"""Exact HunyuanVideo tiles (``extension/stream_hunyuan.py``): frames equal diffusers' full decode, a wrong
context does not; the device-side working set is bounded by the tile, the host buffers grow with the video."""

from __future__ import annotations

import pytest
import torch
from hybrid_vae.extension import stream_hunyuan
from hybrid_vae.extension.cli_local import psnr
from hybrid_vae.extension.fixture import build_tiny_vae
from hybrid_vae.extension.stream_hunyuan import hunyuan_exact_decode, hunyuan_exact_support


@pytest.fixture(scope="module")
def hv() -> torch.nn.Module:
    return build_tiny_vae("hunyuanvideo")


def _z(batch: int, frames: int, h: int, w: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 16, frames, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("batch", "frames", "hw", "tile_px", "tile_frames"),
                         [(1, 3, (6, 6), 16, 4), (2, 2, (5, 7), 24, 5), (1, 1, (7, 4), 8, 1), (1, 3, (4, 9), 32, 2),
                          (2, 3, (6, 5), 1024, 64)])
def test_exact_hunyuan_tiles_equal_the_full_decode(hv, batch, frames, hw, tile_px, tile_frames):
    """Several tile sizes and frame counts, non-square frames, batch 2, one to three latent frames, and one tile
    covering everything: >= 100 dB against diffusers' own decode of the same latent (float32, CPU)."""
    z = _z(batch, frames, *hw)
    with torch.no_grad():
        full = hv.decode(z).sample
    got = hunyuan_exact_decode(hv, z, tile_px=tile_px, tile_frames=tile_frames)
    assert got.shape == full.shape == (batch, 3, 1 + 4 * (frames - 1), hw[0] * 8, hw[1] * 8)
    assert psnr(got, full) >= 100, psnr(got, full)


def test_long_videos_equal_the_full_decode_not_diffusers_framewise_default(hv):
    """Beyond 4 latent frames diffusers' ``vae.decode`` decodes blended temporal chunks by default
    (``use_framewise_decoding``), each with its own statistics; exact tiles equal the full decode, which is
    ``vae.decode`` with that off (six latent frames, 21 output frames)."""
    z = _z(1, 6, 4, 5)
    got = hunyuan_exact_decode(hv, z, tile_px=16, tile_frames=8)
    assert hv.use_framewise_decoding  # diffusers' default
    try:
        with torch.no_grad():
            chunked = hv.decode(z).sample
            hv.use_framewise_decoding = False
            full = hv.decode(z).sample
    finally:
        hv.use_framewise_decoding = True
    assert got.shape == full.shape == (1, 3, 21, 32, 40)
    assert psnr(got, full) >= 100, psnr(got, full)
    assert psnr(chunked, full) < 60  # the default's chunks differ: the reference must be the full decode


@pytest.mark.parametrize("wrong", ["no frames before the tile", "zero padding at the edges"])
def test_a_wrong_context_is_not_exact(hv, monkeypatch, wrong):
    """The check above can fail: tiles whose causal context repeats their own first frame instead of reading the
    two frames before them, or zeros instead of the replicated edge, give visibly different frames (< 90 dB)."""
    z = _z(1, 3, 6, 6)
    with torch.no_grad():
        full = hv.decode(z).sample
    axis = stream_hunyuan._axis
    if wrong == "no frames before the tile":
        def tile_local(lo: int, hi: int, before: int, after: int, n: int) -> torch.Tensor:
            idx = axis(lo, hi, before, after, n)
            return idx.clamp_(min=lo) if before == 2 else idx  # the time axis (space reads 1 before, 1 after)

        monkeypatch.setattr(stream_hunyuan, "_axis", tile_local)
    else:
        expand = stream_hunyuan._expand

        def zero_edges(span, idx):
            out = expand(span, idx)
            iy = idx[1]
            if int(iy[0]) == int(iy[1]) and iy.numel() > 2:  # the top edge was replicated: zero it instead
                out[:, :, :, 0] = 0
            return out

        monkeypatch.setattr(stream_hunyuan, "_expand", zero_edges)
    got = hunyuan_exact_decode(hv, z, tile_px=16, tile_frames=4)
    assert psnr(got, full) < 90, psnr(got, full)


@pytest.mark.parametrize(("frames", "hw", "tile_px", "tile_frames", "budget"),
                         [(3, (6, 6), 16, 4, 0), (3, (6, 6), 16, 4, 400_000), (2, (5, 7), 1024, 64, 0)])
def test_copies_that_land_late_as_on_cuda_still_equal_the_full_decode(hv, monkeypatch, lagging_mover, frames, hw,
                                                                       tile_px, tile_frames, budget):
    """Host buffers through a mover ordered as the CUDA one (reads requested a tile ahead, writes landing a tile
    late, every write in place at the end of a pass): still the full decode, also with some buffers on the device
    (``device_budget``: reads and writes of those stay on the device, the others go through the mover). With a
    pass that ends one write short, the next pass reads a stale buffer (one tile per pass: the tile it reads first
    is the one still pending)."""
    z = _z(1, frames, *hw)
    with torch.no_grad():
        full = hv.decoder(hv.post_quant_conv(z))
    lagging = lagging_mover()
    monkeypatch.setattr(stream_hunyuan, "Mover", lagging)
    ledger: dict[str, int] = {}
    got = hunyuan_exact_decode(hv, z, tile_px=tile_px, tile_frames=tile_frames, buffers="host",
                               device_budget=budget, ledger=ledger)
    assert psnr(got, full) >= 100, psnr(got, full)
    assert len(lagging.made) == 1 and lagging.made[0].late > 0 and lagging.made[0].h2d > 0
    assert lagging.made[0].h2d + lagging.made[0].d2h == ledger["host_moved_elements"] * 4
    assert (ledger.get("device_buffer_elements", 0) > 0) == (budget > 0) and ledger["host_buffer_elements"] > 0
    if tile_px >= 1024:
        monkeypatch.setattr(stream_hunyuan, "Mover", lagging_mover(lazy_drain=True))
        bad = hunyuan_exact_decode(hv, z, tile_px=tile_px, tile_frames=tile_frames, buffers="host")
        assert not bool(((bad.double() - full.double()).abs() <= 1e-3).all())  # stale (or never written): differs


def test_the_device_working_set_is_bounded_by_the_tile_and_the_buffers_grow_with_the_video(hv):
    """The implementation's own accounting: the most elements one tile's region and output hold on the compute
    device are the same for a 3-frame 48x48 video and a 5-frame 96x96 one (same tile), while the whole-video
    buffers (host memory) grow with the video."""
    small, large = {}, {}
    hunyuan_exact_decode(hv, _z(1, 3, 6, 6), tile_px=16, tile_frames=4, ledger=small)
    hunyuan_exact_decode(hv, _z(1, 5, 12, 12), tile_px=16, tile_frames=4, ledger=large)
    assert small["tile_elements"] == large["tile_elements"] > 0
    assert large["buffer_elements"] > 3 * small["buffer_elements"]


def test_progress_counts_every_pass_of_every_item(hv):
    seen: list[tuple[int, int]] = []
    hunyuan_exact_decode(hv, _z(2, 2, 4, 4), tile_px=16, progress=lambda d, t: seen.append((d, t)))
    total = seen[-1][1]
    assert [d for d, _ in seen] == list(range(1, total + 1)) and all(t == total for _, t in seen)


def test_exact_hunyuan_tiles_refuse_what_they_cannot_run_naming_why(hv):
    assert hunyuan_exact_support(hv) is None
    assert "AutoencoderKLHunyuanVideo" in (hunyuan_exact_support(build_tiny_vae("wan")) or "")
    assert "AutoencoderKLHunyuanVideo" in (hunyuan_exact_support(build_tiny_vae("sd15")) or "")
    hv.train()
    try:
        assert "training mode" in (hunyuan_exact_support(hv) or "")
    finally:
        hv.eval()
    z = _z(1, 2, 4, 4)
    for kw, field in [({"tile_px": 4}, "tile_px=4"), ({"tile_px": 16, "tile_frames": 0}, "tile_frames=0"),
                      ({"tile_px": 16, "buffers": "disk"}, "buffers='disk'"),
                      ({"tile_px": 16, "device_budget": -1}, "device_budget=-1"),
                      ({"tile_px": 16, "buffers": "device", "device_budget": 8}, "device_budget=8")]:
        with pytest.raises(ValueError, match=field):
            hunyuan_exact_decode(hv, z, **kw)
    with pytest.raises(ValueError, match="frames, height, width"):
        hunyuan_exact_decode(hv, z[:, :, 0], tile_px=16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_on_cuda_exact_hunyuan_tiles_equal_the_full_decode_with_host_buffers(cuda_peak):
    """On a GPU: the frames equal the full decode, the result is in host memory, and the CUDA peak is
    under the full decode's."""
    vae = build_tiny_vae("hunyuanvideo").to("cuda")
    z = torch.randn(1, 16, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    full, full_peak = cuda_peak(lambda: vae.decode(z).sample)
    full = full.cpu()
    got, peak = cuda_peak(lambda: hunyuan_exact_decode(vae, z, tile_px=64, tile_frames=4))
    assert got.device.type == "cpu" and psnr(got, full) >= 100
    assert peak < full_peak, (peak, full_peak)
    ledger: dict[str, int] = {}  # some buffers on the GPU: still the full decode, in host memory, more GPU memory
    part, part_peak = cuda_peak(lambda: hunyuan_exact_decode(vae, z, tile_px=64, tile_frames=4, device_budget=2**20,
                                                             ledger=ledger))
    assert part.device.type == "cpu" and psnr(part, full) >= 100
    assert ledger["device_buffer_elements"] > 0 and part_peak >= peak, (part_peak, peak)


def test_the_benchmarks_gpu_table_names_peaks_and_estimates():
    """bench/hunyuan_exact.py on a GPU (not runnable here): its table has the measured peak beside the engine's
    estimate for each exact plan, and says seconds are wall seconds; the CPU table has neither column."""
    from hybrid_vae.bench.hunyuan_exact import markdown

    g = 2**30
    rows = [{"name": "full", "seconds": 0.5, "psnr_db": float("inf"), "moved": None, "buffers": None, "peak": 9 * g,
             "est_peak": None, "est_s": None},
            {"name": "exact host", "seconds": 2.0, "psnr_db": 131.0, "moved": 2 * 10**10, "buffers": 3 * 10**9,
             "peak": 1.2 * g, "est_peak": 1.5 * g, "est_s": 2.4}]
    gpu = markdown({"size": 320, "width": 512, "frames": 9, "tile": 256, "repeat": 1, "rows": rows,
                    "device": "NVIDIA H200", "dtype": "bfloat16"})
    assert "wall s (synchronised)" in gpu and "33 frames of 512x320" in gpu and "NVIDIA H200" in gpu
    assert "| exact host | 2.00 | 4.00x | 131.0 dB | 6.00 | 40.00 | 1.20 | 1.50 | 2.40 |" in gpu
    cpu = markdown({"size": 320, "width": 512, "frames": 9, "tile": 256, "repeat": 1, "rows": rows,
                    "device": "CPU", "dtype": "float32"})
    assert "est. peak" not in cpu and "CPU seconds" in cpu
