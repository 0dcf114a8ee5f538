"""Family from the VAE's whole geometry (policy/geometry.py, extension/geometry.py), and the local-only family of a VAE
whose geometry matches none: used by SD.Next, the orchestrator, the drop-in and the CLI alike."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hybrid_vae.extension.fixture import build_tiny_vae, load_fixture_vae
from hybrid_vae.extension.geometry import UNMATCHED, resolve_family, vae_geometry
from hybrid_vae.policy.decide import decide
from hybrid_vae.policy.errors import DecodeFailedError, LatentError, ProfileError
from hybrid_vae.policy.geometry import (
    UNMATCHED_MARGIN,
    geometry_from_config,
    match_family,
    unmatched_family,
    width_ratio,
)
from hybrid_vae.policy.gpu import parse_simulation
from hybrid_vae.policy.model import DecodeJob, DecodeSettings
from hybrid_vae.policy.profiles import load_profiles

PROFILES = load_profiles("")
SD15_VAE = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4, "scaling_factor": 0.18215}


def two_x_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "flux", "hunyuanvideo", "wan"])
def test_tiny_vaes_match_their_family(kind):
    assert match_family(vae_geometry(build_tiny_vae(kind)), PROFILES) == (kind, "")


def test_the_fixture_and_real_configs_match():
    assert match_family(vae_geometry(load_fixture_vae()), PROFILES)[0] == "sd15"
    for cfg, fam in ((SD15_VAE, "sd15"), ({**SD15_VAE, "scaling_factor": 0.13025}, "sdxl"),
                     ({**SD15_VAE, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609}, "sd3"),
                     ({**SD15_VAE, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159}, "flux")):
        assert match_family(geometry_from_config("AutoencoderKL", cfg), PROFILES) == (fam, ""), cfg
    wan = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "temperal_downsample": [False, True, True],
           "latents_mean": list(PROFILES.family("wan").latents_mean), "latents_std": list(PROFILES.family("wan").latents_std),
           "scale_factor_spatial": None, "scale_factor_temporal": None}
    g = geometry_from_config("AutoencoderKLWan", wan)
    assert (g.spatial_compression, g.temporal_compression, g.decoder_widths) == (8, 4, (96, 192, 384, 384))
    assert match_family(g, PROFILES) == ("wan", "")


@pytest.mark.parametrize(("cls", "cfg", "why"), [
    ("AutoencoderKL", {**SD15_VAE, "block_out_channels": [32, 64]}, "2x spatial, scaling 0.18215 matches no family "
                                                                   "(nearest sd15 has 8x spatial)"),
    ("AutoencoderKL", {**SD15_VAE, "shift_factor": 0.5}, "(nearest sd15 has shift 0)"),
    ("AutoencoderKL", {**SD15_VAE, "latent_channels": 8}, "8 channels"),
    ("AutoencoderKL", {**SD15_VAE, "scaling_factor": 0.5}, "(nearest sd15 has scaling 0.18215)"),
    ("AutoencoderKLHunyuanVideo", {"latent_channels": 16, "spatial_compression_ratio": 8, "temporal_compression_ratio": 8,
                                   "scaling_factor": 0.476986}, "(nearest hunyuanvideo has 4x temporal)"),
    ("AutoencoderTiny", {"latent_channels": 4}, "AutoencoderTiny is not a VAE class hybrid-vae decodes"),
])
def test_geometry_that_matches_no_family(cls, cfg, why):
    key, text = match_family(geometry_from_config(cls, cfg), PROFILES)
    assert key is None and why in text, text


def test_unmatched_family_scales_memory_from_the_config_and_is_never_remote():
    g = geometry_from_config("AutoencoderKL", {**SD15_VAE, "block_out_channels": [32, 64]}, decoder_params=1000)
    _, why = match_family(g, PROFILES)
    fam = unmatched_family(g, PROFILES, why)
    base = PROFILES.family("sd15")
    ratio = (32 + 64) / (128 + 256)
    assert width_ratio((32, 64), (128, 256, 512, 512)) == pytest.approx(ratio)
    assert fam.memory.bytes_per_voxel == pytest.approx(base.memory.bytes_per_voxel * ratio * UNMATCHED_MARGIN)
    assert fam.memory.exact_buffer_elements == pytest.approx(base.memory.exact_buffer_elements * ratio * UNMATCHED_MARGIN)
    assert (fam.spatial_compression, fam.scaling_factor, fam.endpoints, fam.weights_bytes_fp16) == (2, 0.18215, (), 2000)
    assert fam.memory.measured is False and "assumed" in fam.memory.source and fam.inferred.startswith(why)
    profiles = PROFILES.model_copy(update={"families": {**PROFILES.families, UNMATCHED: fam}})
    # remote allowed, an endpoint configured for it, custom VAEs allowed, remote forced: still never remote
    s = DecodeSettings(mode="remote", allow_remote=True, allow_remote_custom_vae=True,
                       endpoints={UNMATCHED: "https://gpu.example/x", "sd15": "https://gpu.example/sd15"})
    d = decide(DecodeJob(UNMATCHED, 256, 256), parse_simulation("name=NVIDIA GeForce RTX 3070,free_gib=1"), profiles, s)
    assert all(p.path != "remote" for p in d.plans)
    assert "remote requested but never remote for a VAE whose geometry matches no family" in d.reason
    assert "decoded locally with a memory model scaled from its config, never remote" in d.reason
    assert d.summary.endswith("VAE matches no family: local only")


def test_resolve_family():
    vae = two_x_vae()
    key, profiles, how = resolve_family(vae, PROFILES)
    assert key == UNMATCHED and UNMATCHED in profiles.families and "nearest sd15" in how
    with pytest.raises(LatentError, match=r"family='sd15', but the VAE is AutoencoderKL: 4 channels, 2x spatial.*"
                                          r"\(sd15 has 8x spatial\); leave the family unset"):
        resolve_family(vae, PROFILES, "sd15")  # the structure contradicts the given family
    assert resolve_family(build_tiny_vae("sdxl"), PROFILES, "sd15")[0] == "sd15"  # same structure: the caller's word
    from diffusers import AutoencoderTiny

    assert resolve_family(AutoencoderTiny(), PROFILES, "sd15")[0] == "sd15"  # a class we do not know: not judged
    with pytest.raises(ProfileError, match="AutoencoderTiny is not a VAE class"):
        resolve_family(AutoencoderTiny(), PROFILES)


def test_orchestrator_dropin_and_cli_use_the_geometry(tmp_path, monkeypatch):
    from hybrid_vae.extension.dropin import hybrid_decode, infer_family
    from hybrid_vae.extension.orchestrator import HybridDecoder

    vae = two_x_vae()
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.18215

    class StableDiffusionPipelineLike:  # a pipeline whose class name says SD1.5, with a 2x VAE swapped in
        pass

    StableDiffusionPipelineLike.__name__ = "StableDiffusionPipeline"
    pipe = StableDiffusionPipelineLike()
    pipe.vae = vae
    assert infer_family(z, vae=vae, pipeline=pipe, profiles=PROFILES)[0] == UNMATCHED
    monkeypatch.delenv("HYBRID_VAE_SIMULATE_GPU", raising=False)
    reports = []
    out = hybrid_decode(tensor=z, pipeline=pipe, output_type="pt", return_type="pt", endpoint="http://127.0.0.1:9/sd15",
                        on_report=reports.append)
    assert tuple(out.shape) == (1, 3, 64, 64)  # 2x: decoded locally, the endpoint never asked
    (report,) = reports
    assert len(report.attempts) == 1 and report.ran.path != "remote" and "never remote" in report.reason
    with torch.no_grad():
        ref = vae.decode(z / 0.18215).sample.clamp(-1, 1)
    assert float((out - ref).abs().max()) < 1e-4
    # every plan fails: the saved latent says "unmatched" and the VAE class; the CLI decodes it with the VAE's folder

    def oom(_plan):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    with pytest.raises(DecodeFailedError) as info:
        HybridDecoder(latent_dir=tmp_path / "latents", before_plan=oom).decode(z, vae)
    vae.save_pretrained(tmp_path / "vae")
    png = tmp_path / "out.png"
    run = subprocess.run([sys.executable, "-m", "hybrid_vae.extension.cli", "decode", str(info.value.latent_path),
                          "--vae", str(tmp_path / "vae"), "-o", str(png)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "VAE matches no family: local only" in run.stdout
    from PIL import Image

    assert Image.open(png).size == (64, 64)
