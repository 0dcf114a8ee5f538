"""Exact Wan tiles (``extension/stream_wan.py``): frames equal diffusers' full decode, one halo short they do not;
the engine plans them only when lossless tiles are asked for; run_plan runs them."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hybrid_vae.extension.cli_local import psnr
from hybrid_vae.extension.executors import run_plan
from hybrid_vae.extension.fixture import build_tiny_vae
from hybrid_vae.extension.stream_wan import halo_latent, wan_exact_support, wan_exact_tiles
from hybrid_vae.policy import DecodeJob, DecodeSettings, decide, load_profiles, parse_simulation
from hybrid_vae.policy.errors import PlanError
from hybrid_vae.policy.learned import learn_path

P = load_profiles("")


@pytest.fixture(scope="module")
def wan() -> torch.nn.Module:
    return build_tiny_vae("wan")


@pytest.mark.parametrize(("batch", "frames", "hw", "tile"), [(1, 2, (24, 24), 6), (2, 3, (13, 9), 5),
                                                             (2, 1, (12, 10), 4), (1, 2, (10, 17), 8)])
def test_exact_wan_tiles_equal_the_full_decode(wan, batch, frames, hw, tile):
    """Several tile sizes, non-square frames, batch 2, one and several latent frames: >= 100 dB against
    diffusers' own decode of the same latent (float32, CPU), every frame and pixel in place."""
    z = torch.randn(batch, 16, frames, *hw, generator=torch.Generator().manual_seed(3))
    ledger: dict[str, int] = {}
    with torch.no_grad():
        full = wan.decode(z).sample
        got = wan_exact_tiles(wan, z, tile_latent=tile, ledger=ledger).clamp(-1, 1)
    assert got.shape == full.shape == (batch, 3, 1 + 4 * (frames - 1), hw[0] * 8, hw[1] * 8)
    assert psnr(got, full) >= 100, psnr(got, full)
    halo = halo_latent(wan.decoder)
    assert ledger["tiles"] == batch * math.ceil(hw[0] / tile) * math.ceil(hw[1] / tile)
    assert ledger["region_px"] <= min(max(hw), tile + 2 * halo)


def test_less_halo_than_the_receptive_field_is_not_exact(wan):
    """The halo is the receptive field after the mid block (9 latent px for the tiny decoder, 13 for Wan 2.1):
    three pixels less leaves visible seams, so the check above can fail."""
    from diffusers import AutoencoderKLWan

    z = torch.randn(1, 16, 2, 24, 24, generator=torch.Generator().manual_seed(3))
    halo = halo_latent(wan.decoder)
    assert halo == 9 and halo_latent(AutoencoderKLWan().decoder) == 13 == P.family("wan").tiling.exact_halo_latent
    with torch.no_grad():
        full = wan.decode(z).sample
        short = wan_exact_tiles(wan, z, tile_latent=6, halo=halo - 3).clamp(-1, 1)
    assert psnr(short, full) < 90


def test_exact_wan_tiles_refuse_what_they_cannot_run(wan):
    assert wan_exact_support(wan) is None
    assert "AutoencoderKLWan" in (wan_exact_support(build_tiny_vae("hunyuanvideo")) or "")
    with pytest.raises(PlanError, match="tile_latent=0"):
        wan_exact_tiles(wan, torch.zeros(1, 16, 1, 8, 8), tile_latent=0)
    with pytest.raises(PlanError, match="not diffusers' AutoencoderKLWan"):
        wan_exact_tiles(build_tiny_vae("sd15"), torch.zeros(1, 4, 1, 8, 8), tile_latent=4)


def test_the_engine_plans_exact_wan_tiles_only_when_lossless_tiles_are_asked_for(wan):
    """``tile_groupnorm`` exact/offload: Wan's tiled plans are exact (halo) tiles, priced as the regions they decode
    (more memory and time than local tiles of the same size); auto keeps the local ones; run_plan runs the plan."""
    job = DecodeJob("wan", 1280, 720, frames=61)
    g = parse_simulation("name=NVIDIA GeForce RTX 4090,free_gib=6")
    auto = decide(job, g, P)
    exact = decide(job, g, P, DecodeSettings(tile_groupnorm="exact"))
    assert all(p.groupnorm != "exact" for p in auto.plans)
    tiled = [p for p in exact.plans if p.path == "tiled"]
    assert tiled and all(p.groupnorm == "exact" and p.label.endswith("px exact") for p in tiled)
    assert exact.chosen.estimate.peak_bytes <= exact.budget_bytes
    local = {p.tile_px: p for o in auto.options for p in [o.plan] if p.path == "tiled"}
    same = [o.plan for o in exact.options if o.plan.path == "tiled" and o.plan.tile_px in local]
    assert len(same) > 5
    for p in same:  # the same tile decodes its halo too: more memory (and, small, more time)
        assert p.estimate.peak_bytes > local[p.tile_px].estimate.peak_bytes
        assert "px halo each side" in p.estimate.peak_source
    smallest = min(same, key=lambda p: p.tile_px or 0)
    assert smallest.estimate.seconds > 1.5 * local[smallest.tile_px].estimate.seconds
    assert decide(job, g, P, DecodeSettings(tile_groupnorm="offload")).chosen.label == exact.chosen.label
    assert learn_path(exact.chosen) == "tiled-halo"  # learned apart from image exact tiles (another model)

    # the executor: a tiny Wan through run_plan equals its full decode
    z = torch.randn(1, 16, 2, 12, 10, generator=torch.Generator().manual_seed(1))
    plan = dataclasses.replace(tiled[0], tile_px=32)
    fam = P.family("wan")
    with torch.no_grad():
        got = run_plan(plan, wan, z, family=fam)
        full = run_plan(dataclasses.replace(plan, path="full", tile_px=None, groupnorm="local"), wan, z, family=fam)
    assert psnr(got, full) >= 100
    with pytest.raises(PlanError, match="exact video tiles run on Wan and HunyuanVideo with a tile size only"):
        run_plan(dataclasses.replace(plan, tile_px=None), wan, z, family=fam)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_on_cuda_exact_wan_tiles_equal_the_full_decode_in_pinned_host_memory(cuda_peak):
    """On CUDA the mid-block features and finished frames go to host memory (pinned output); the frames equal the
    full decode on the same card, and the peak stays under the full decode's for a frame of several tiles."""
    vae = build_tiny_vae("wan").to("cuda")
    z = torch.randn(1, 16, 2, 48, 48, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    full, full_peak = cuda_peak(lambda: vae.decode(z).sample)
    full = full.cpu()
    got, peak = cuda_peak(lambda: wan_exact_tiles(vae, z, tile_latent=8))
    assert got.device.type == "cpu" and got.is_pinned()
    assert psnr(got.clamp(-1, 1), full) >= 100 and peak < full_peak, (peak, full_peak)


def test_the_orchestrator_decodes_a_wan_video_with_exact_tiles_when_asked(wan, tmp_path):
    """End to end: HybridDecoder on a simulated card with little memory and ``tile_groupnorm="exact"`` plans exact
    Wan tiles, runs them, and returns the frames of diffusers' full decode; the report says which plan ran."""
    from hybrid_vae.extension.latents import to_vae_space
    from hybrid_vae.extension.orchestrator import HybridDecoder

    fam = P.family("wan")
    z = torch.randn(1, 16, 2, 64, 80, generator=torch.Generator().manual_seed(4))  # 640x512: full does not fit
    dec = HybridDecoder(probe=lambda: parse_simulation("name=NVIDIA GeForce RTX 3070,free_gib=5"),
                        latent_dir=tmp_path, settings=DecodeSettings(tile_groupnorm="exact"))
    res = dec.decode(z, wan, family="wan")
    r = res.report
    assert r.ran.path == "tiled" and r.ran.groupnorm == "exact" and r.ran.label.endswith("px exact"), r.ran.label
    with torch.no_grad():
        full = wan.decode(to_vae_space(z, fam)).sample.clamp(-1, 1)
    assert psnr(res.tensor, full) >= 100


def test_a_vae_exact_wan_tiles_cannot_run_gets_local_tiles_not_a_failed_attempt(wan):
    """``tile_groupnorm="exact"`` with a Wan VAE the exact tiler refuses (ComfyUI's own WanVAE, Wan 2.2): the
    settings for that VAE ask for local tiles, so the chain never starts with plans that would fail."""
    from hybrid_vae.extension.stream import settings_for_vae

    fam, exact = P.family("wan"), DecodeSettings(tile_groupnorm="exact")
    assert settings_for_vae(exact, wan, fam).tile_groupnorm == "exact"
    other = settings_for_vae(exact, object(), fam)
    assert other.tile_groupnorm == "local" and other.video_host_output is False
    assert settings_for_vae(DecodeSettings(), object(), fam).tile_groupnorm == "auto"


def test_the_simulated_worlds_halo_is_counted_from_diffusers_decoder_not_the_profile():
    """The world's truth for exact Wan tiles uses its own halo, counted from diffusers' Wan 2.1 decoder (not the
    profile's ``exact_halo_latent``, which the engine reads); the world maps the engine's plan to it."""
    from diffusers import AutoencoderKLWan
    from hybrid_vae.bench import truth
    from hybrid_vae.bench.world import Exec

    assert truth.WAN_HALO == halo_latent(AutoencoderKLWan().decoder)
    plan = decide(DecodeJob("wan", 1280, 720, frames=61), parse_simulation("name=NVIDIA GeForce RTX 4090,free_gib=6"),
                  P, DecodeSettings(tile_groupnorm="exact")).chosen
    ex = Exec.from_plan(plan, P.family("wan"), 1)
    assert ex.kind == "tiled-halo" and ex.geometry == "halo" and "tiled-halo" in truth.KINDS
    assert truth._halo_axis(90, 32, 13) == [45, 58, 39]  # 0-45, 19-77, 51-90: the executor's regions
