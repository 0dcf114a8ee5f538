"""SD.Next adapter parts: settings parsing, model inspection, video pipeline hooks, remote decode from SD.Next."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "sdnext_stub"))
import stubtools
from hybrid_vae.extension.fixture import build_tiny_vae
from hybrid_vae.extension.latents import to_vae_space
from hybrid_vae.extension.sdnext_ui import (
    PREFIX,
    detect_custom,
    detect_family,
    from_vae_space,
    opts_getter,
    parse_endpoints,
    read_config,
    resolve_settings,
    token_endpoints,
)
from hybrid_vae.policy import ProfileError, load_profiles
from hybrid_vae.policy.model import DecodeSettings

FAMILIES = ("sd15", "sdxl", "sd3", "flux", "hunyuanvideo", "wan")


def options(**values):
    """The settings SD.Next's options ``hybrid_vae_<name>=value`` give (the rest: defaults)."""
    return read_config(lambda k, d: {PREFIX + n: v for n, v in values.items()}.get(k, d), families=FAMILIES)


@pytest.fixture(scope="module")
def profiles():
    return load_profiles("")


@pytest.fixture
def sd(tmp_path, monkeypatch):
    monkeypatch.delenv("HYBRID_VAE_SIMULATE_GPU", raising=False)
    monkeypatch.delenv("HYBRID_VAE_PROFILE", raising=False)
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("SD_STUB_DATA_DIR", str(tmp_path / "data"))
    ns = stubtools.fresh_sdnext(tmp_path / "data")
    ns.data = tmp_path / "data"
    yield ns
    ns.script_callbacks.script_unloaded_callback()
    stubtools.purge()


def decisions(sd) -> list[dict]:
    path = sd.data / "hybrid-vae" / "decisions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# ---- settings ----------------------------------------------------------------------------------------
def test_parse_endpoints_strictly():
    got = parse_endpoints(" sdxl=https://a.example/decode,\nflux = http://127.0.0.1:8000/flux ,", FAMILIES)
    assert got == {"sdxl": "https://a.example/decode", "flux": "http://127.0.0.1:8000/flux"}
    assert parse_endpoints("", FAMILIES) == {}
    pool = parse_endpoints("sd15=https://a.example/sd15 | http://127.0.0.1:8000/sd15, sdxl=https://c.example/x", FAMILIES)
    assert pool == {"sd15": "https://a.example/sd15|http://127.0.0.1:8000/sd15", "sdxl": "https://c.example/x"}
    bad = {
        "sdxl:https://a.example": "expected family=url",
        "sdx=https://a.example": "unknown family 'sdx'; known families: flux, hunyuanvideo, sd15",
        "sdxl=ftp://a.example": "http(s)://host",
        "sdxl=https://": "http(s)://host",
        "sdxl=https://a.example, sdxl=https://b.example": "given twice",
        "sdxl=https://a.example|ftp://b.example": "join them with |",
        "sdxl=https://a.example|": "http(s)://host",
        "sdxl=https://a.example/x|https://a.example/x": "listed twice",
    }
    for text, msg in bad.items():
        with pytest.raises(ProfileError, match="hybrid_vae_endpoints") as info:
            parse_endpoints(text, FAMILIES)
        assert msg in str(info.value) and "SD.Next settings" in str(info.value)


def test_read_config_uses_defaults_for_bad_values_and_reads_secrets():
    class Opts:
        data: ClassVar[dict] = {
            "hybrid_vae_mode": "fastest", "hybrid_vae_reserve_mib": "lots", "hybrid_vae_tile_overlap_px": 60.0,
            "hybrid_vae_endpoints": "sdxl=nope", "hybrid_vae_allow_remote": "yes please",
            "hybrid_vae_profile_path": "  ", "hybrid_vae_hf_token": "not-here", "hybrid_vae_tile_groupnorm": "best"}
        secrets: ClassVar[dict] = {"hybrid_vae_hf_token": " hf_abc "}

    cfg = read_config(opts_getter(Opts()), families=FAMILIES)
    default_reserve = DecodeSettings().reserve_bytes // 2**20
    s = cfg.settings
    assert (s.mode, s.reserve_bytes // 2**20, s.tile_overlap_px, s.endpoints, s.allow_remote) == \
        ("auto", default_reserve, 56, {}, False)
    assert cfg.token == "hf_abc" and cfg.profile_path is None
    assert len(cfg.problems) == 6 and s.tile_groupnorm == "auto" and "sdxl=nope" in cfg.endpoint_error
    text = " | ".join(cfg.problems)
    for part in ("hybrid_vae_mode='fastest'", "hybrid_vae_reserve_mib='lots'", "not a multiple of 8",
                 "hybrid_vae_tile_groupnorm='best' is not one of auto, exact, offload, local",
                 "hybrid_vae_endpoints", "hybrid_vae_allow_remote='yes please'"):
        assert part in text


def test_resolve_settings_modes():
    s, notes = resolve_settings(options(mode="full", reserve_mib=512, tile_overlap_px=32))
    assert (s.mode, s.reserve_bytes, s.tile_overlap_px, s.allow_remote, notes) == ("full", 512 * 2**20, 32, False, [])
    assert resolve_settings(options(mode="full"), override="tiled")[0].mode == "tiled"
    assert resolve_settings(options(tile_groupnorm="local"))[0].tile_groupnorm == "local"
    assert resolve_settings(options(mode="full"), override="as in settings")[0].mode == "full"
    assert resolve_settings(options(mode="full"), override="settings default")[0].mode == "full"  # the old name
    s, notes = resolve_settings(options(), vae_type="Remote")
    assert s.mode == "auto" and "remote decode is off" in notes[0]
    s, notes = resolve_settings(options(allow_remote=True, remote_custom_vae=True), vae_type="Remote")
    assert (s.mode, s.allow_remote, s.allow_remote_custom_vae, notes) == ("remote", True, True, [])


def test_token_goes_only_to_https_hugging_face_hosts():
    # the whole policy, with look-alikes, is tested in tests/test_trust.py
    urls = ["https://x2dmsqunjd6k9prw.us-east-1.aws.endpoints.huggingface.cloud/", "http://a.huggingface.cloud/",
            "https://my-server.example/decode", "https://evilhuggingface.cloud.example/", "https://me-vae.hf.space/",
            "https://evilhuggingface.co/"]
    assert token_endpoints(urls) == [urls[0]]


def test_a_typo_in_the_endpoints_turns_remote_off_for_every_family():
    """``sd15=ftp://bad, foo=http://x`` with remote allowed and the built-in endpoints on: no family goes remote,
    not to the built-in endpoints either, and the notes say why (the infotext carries them)."""
    opts = {"hybrid_vae_allow_remote": True, "hybrid_vae_builtin_endpoints": True,
            "hybrid_vae_endpoints": "sd15=ftp://bad, foo=http://x", "hybrid_vae_mode": "remote"}
    cfg = read_config(lambda k, d: opts.get(k, d), families=FAMILIES)
    assert cfg.endpoint_error is not None and "ftp://bad" in cfg.endpoint_error
    assert any("remote decode is off for every family until this setting is fixed" in p for p in cfg.problems)
    profiles = load_profiles("")
    from hybrid_vae.policy.decide import decide
    from hybrid_vae.policy.gpu import parse_simulation
    from hybrid_vae.policy.model import DecodeJob

    for vae_type in ("Full", "Remote"):
        settings, notes = resolve_settings(cfg, vae_type=vae_type)
        assert settings.allow_remote is False
        for fam in ("sd15", "sdxl", "flux", "hunyuanvideo"):
            d = decide(DecodeJob(fam, 512, 512, frames=5 if fam == "hunyuanvideo" else None),
                       parse_simulation("name=NVIDIA GeForce RTX 3070,free_gib=0.2"), profiles, settings)
            assert all(p.path != "remote" for p in d.plans), fam
            assert "remote requested but remote decode is off" in d.reason
    assert "until the endpoint setting is fixed" in notes[0]  # SD.Next's own "Remote" VAE type, refused
    fixed = read_config(lambda k, d: {**opts, "hybrid_vae_endpoints": "sd15=https://gpu.example/sd15"}.get(k, d),
                        families=FAMILIES)
    assert fixed.endpoint_error is None and resolve_settings(fixed)[0].allow_remote is True


def test_builtin_endpoints_only_by_explicit_choice():
    from hybrid_vae.extension.sdnext_ui import OPTIONS

    default = {o.key: o.default for o in OPTIONS}["hybrid_vae_builtin_endpoints"]
    cfg = read_config(lambda k, d: {"hybrid_vae_allow_remote": True}.get(k, d), families=FAMILIES)
    s, _ = resolve_settings(cfg)
    assert default is False and s.allow_remote and s.use_builtin_endpoints is False and s.endpoints == {}
    from hybrid_vae.policy.decide import endpoint_for
    from hybrid_vae.policy.model import DecodeJob

    url, why = endpoint_for(DecodeJob("sd15", 512, 512), load_profiles("").family("sd15"), s)
    assert url is None and "no endpoint serves sd15" in why


# ---- model inspection ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl", "flux", "hunyuanvideo", "wan"])
def test_detect_family_from_class_and_config(kind, profiles):
    assert detect_family(build_tiny_vae(kind), profiles) == (kind, "")


def test_detect_family_rejects_unknown(profiles):
    from diffusers import AutoencoderKL, AutoencoderTiny

    odd = AutoencoderKL(block_out_channels=[8], norm_num_groups=4, latent_channels=4, scaling_factor=0.5)
    key, why = detect_family(odd, profiles)
    assert key is None and "4 channels, 1x spatial, scaling 0.5 matches no family" in why
    assert "nearest sd15 has 8x spatial, scaling 0.18215" in why
    key, why = detect_family(AutoencoderTiny(), profiles)
    assert key is None and "AutoencoderTiny is not a VAE class" in why


def test_detect_custom(profiles):
    fam = profiles.family("sdxl")
    vae = build_tiny_vae("sdxl")
    hub = "/root/.cache/huggingface/hub/models--stabilityai--stable-diffusion-xl-base-1.0/snapshots/abc/vae"
    vae.register_to_config(_name_or_path=hub)
    assert detect_custom(vae, None, fam) == (False, "stabilityai/stable-diffusion-xl-base-1.0", "stock VAE")
    assert detect_custom(vae, None, fam, sd_vae="Automatic") [0] is False
    custom, vid, why = detect_custom(vae, None, fam, sd_vae="sdxl-vae-fp16-fix.safetensors")
    assert custom and vid == "sdxl-vae-fp16-fix.safetensors" and "VAE setting" in why
    assert detect_custom(vae, None, fam, loaded_vae_file="/models/VAE/my.safetensors")[:2] == (True, "my.safetensors")
    vae.register_to_config(_name_or_path="/models/Stable-diffusion/juggernaut.safetensors")
    assert detect_custom(vae, None, fam)[0] is True
    pipe = stubtools.ImagePipeline(vae, name="madebyollin/sdxl-vae-fp16-fix")
    assert detect_custom(vae, pipe, fam)[:2] == (False, "madebyollin/sdxl-vae-fp16-fix")


@pytest.mark.parametrize("family", ["sd15", "flux", "hunyuanvideo", "wan"])
def test_from_vae_space_inverts_to_vae_space(family, profiles):
    fam = profiles.family(family)
    shape = (2, fam.latent_channels, 3, 4, 4) if fam.video else (2, fam.latent_channels, 4, 4)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(from_vae_space(to_vae_space(z, fam), fam), z, atol=1e-5)


# ---- video: the pipeline VAE's decode ----------------------------------------------------------------------
def video_latents(t=3, seed=0):
    return torch.randn(1, 16, t, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["hunyuanvideo", "wan"])
def test_pipeline_decode_goes_through_the_engine(sd, kind):
    pipe = stubtools.VideoPipeline(build_tiny_vae(kind))
    z = video_latents(t=2)
    ref = pipe.decode(z).clamp(-1, 1)  # the engine clamps; the video processor would too
    sd.shared.sd_model = pipe
    stubtools.load_extension()
    sd.script_callbacks.model_loaded_callback(pipe)  # SD.Next: the model (re)load after the scripts
    assert "decode" in pipe.vae.__dict__ and pipe.vae.decode._hybrid_vae_runtime is not None
    out = pipe.decode(z)
    assert out.shape == ref.shape == (1, 3, 5, 64, 64) and float((out - ref).abs().max()) < 1e-4
    (entry,) = decisions(sd)
    assert (entry["source"], entry["family"], entry["latent_shape"]) == ("pipeline", kind, [1, 16, 2, 8, 8])
    sd.script_callbacks.script_unloaded_callback()
    assert "decode" not in pipe.vae.__dict__  # the class's own method again


@pytest.mark.slow
def test_video_low_vram_gets_chunks_and_infotext(sd, monkeypatch):
    pipe = stubtools.VideoPipeline(build_tiny_vae("hunyuanvideo"))
    sd.shared.sd_model = pipe
    stubtools.load_extension()
    runner = sd.scripts_manager.ScriptRunner(False)
    # a card with 60% of what a full decode of 17 frames at 64 px needs (the engine's own estimate)
    from hybrid_vae.policy.decide import decide
    from hybrid_vae.policy.gpu import parse_simulation
    from hybrid_vae.policy.model import DecodeJob

    job = DecodeJob(family="hunyuanvideo", width=64, height=64, frames=17, dtype="float32")
    big = decide(job, parse_simulation("name=NVIDIA GeForce RTX 3070,free_gib=8"), load_profiles(""), DecodeSettings())
    need = next(o.plan.estimate.peak_bytes for o in big.options if o.plan.path == "full")
    free = (0.6 * need + DecodeSettings().reserve_bytes) / 2**30
    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", f"name=NVIDIA GeForce RTX 3070,free_gib={free:.3f}")
    p = sd.processing.StableDiffusionProcessing(latents=[], width=64, height=64, scripts=runner)
    sd.script_callbacks.before_process_callback(p)
    frames = pipe.decode(video_latents(t=5), output_type="pil")
    sd.script_callbacks.after_process_callback(p)
    assert len(frames[0]) == 17
    line = p.extra_generation_params["Hybrid VAE"]
    assert line.startswith("tiled") and "frame chunks" in line, line


def test_sdnext_hijack_before_or_after_ours(sd):
    pipe = stubtools.VideoPipeline(build_tiny_vae("hunyuanvideo"))
    vae, z = pipe.vae, video_latents()
    ref = pipe.decode(z).clamp(-1, 1)
    sd.shared.sd_model = pipe
    sd.sd_hijack_vae.init_hijack(pipe)  # SD.Next wrapped first ...
    hijack = vae.decode
    stubtools.load_extension()  # ... then we wrap SD.Next's wrapper
    sd.script_callbacks.model_loaded_callback(pipe)  # SD.Next: the model (re)load after the scripts
    assert float((pipe.decode(z) - ref).abs().max()) < 1e-4 and len(decisions(sd)) == 1
    sd.script_callbacks.script_unloaded_callback()
    assert vae.decode is hijack
    del vae.orig_decode, vae.decode
    stubtools.load_extension()  # we wrap first ...
    sd.script_callbacks.model_loaded_callback(pipe)  # SD.Next: the model (re)load after the scripts
    sd.sd_hijack_vae.init_hijack(pipe)  # ... then SD.Next wraps ours
    assert vae.orig_decode._hybrid_vae_runtime is not None
    assert float((pipe.decode(z) - ref).abs().max()) < 1e-4 and len(decisions(sd)) == 2
    sd.script_callbacks.script_unloaded_callback()
    assert vae.orig_decode.__func__ is type(vae).decode  # SD.Next's wrapper now calls the VAE itself


def test_pipeline_decode_failure_saves_latent(sd):
    pipe = stubtools.VideoPipeline(build_tiny_vae("wan"))
    sd.shared.sd_model = pipe
    stubtools.load_extension()
    sd.script_callbacks.model_loaded_callback(pipe)  # SD.Next: the model (re)load after the scripts

    def oom(*_):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    handle = pipe.vae.decoder.register_forward_pre_hook(oom)
    try:
        from hybrid_vae.policy.errors import DecodeFailedError

        with pytest.raises(DecodeFailedError):  # plain diffusers: a failed decode raises, as without us
            pipe.decode(video_latents(t=2))
        sd.sd_hijack_vae.init_hijack(pipe)
        assert pipe.vae.decode(torch.zeros(1, 16, 2, 8, 8), return_dict=False) is None  # SD.Next's failure value
    finally:
        handle.remove()
    saved = sorted((sd.data / "hybrid-vae" / "latents").glob("*.safetensors"))
    paths = {str(f) for f in saved}
    assert len(paths) == 2 and {e["latent_path"] for e in decisions(sd)} == paths
    assert any(f in sd.shared.state.textinfo for f in paths)


def test_wan_through_vae_decode_and_tiny_video_type(sd):
    pipe = stubtools.VideoPipeline(build_tiny_vae("wan"))
    sd.shared.sd_model = pipe
    z = video_latents(t=2)
    ref = sd.processing_vae.vae_decode(z, pipe, output_type="pil")
    stubtools.load_extension()
    out = sd.processing_vae.vae_decode(z, pipe, output_type="pil")
    assert len(out) == len(ref) == 5
    assert max(int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
               for a, b in zip(out, ref, strict=True)) <= 1
    assert decisions(sd)[-1]["source"] == "vae_decode"
    pipe.sdnext_vae_type = "Tiny"  # SD.Next's Tiny choice for a video model: the pipeline decode is left alone
    pipe.decode(z)
    assert len(decisions(sd)) == 1


# ---- remote decode from SD.Next (real loopback server) ---------------------------------------------------------
def test_remote_decode_from_sdnext(sd, monkeypatch):
    from hybrid_vae.server.app import create_app
    from hybrid_vae.server.testing import serve_in_thread

    vae = build_tiny_vae("sd15")
    pipe = stubtools.ImagePipeline(vae, name="stable-diffusion-v1-5/stable-diffusion-v1-5")
    sd.shared.sd_model = pipe
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ref = sd.processing_vae.vae_decode(z, pipe, output_type="np")
    stubtools.load_extension()
    served = copy.deepcopy(vae)  # the endpoint's own copy: changing the local weights below must not change it
    with serve_in_thread(create_app(families={"sd15": served}, device="cpu")) as base:
        sd.shared.opts.data.update({"hybrid_vae_allow_remote": True, "hybrid_vae_mode": "remote",
                                    "hybrid_vae_endpoints": f"sd15={base}/sd15"})
        runner = sd.scripts_manager.ScriptRunner(False)
        p = sd.processing.StableDiffusionProcessing(latents=z, width=128, height=128, scripts=runner)
        processed = sd.processing.process_images(p)
        line = p.extra_generation_params["Hybrid VAE"]
        assert line.startswith("remote ") and "via 127.0.0.1" in line, line
        got = np.asarray(processed.images[0], dtype=np.float32) / 255
        assert float(np.abs(got - ref[0]).max()) <= 1.5 / 255
        # a VAE chosen in SD.Next's VAE setting: the name says "custom", the identity canary decides. Same weights
        # as the endpoint's (a renamed file): remote is used; other weights: not, and the line says why
        sd.shared.opts.data["sd_vae"] = "my-finetune.safetensors"
        p = sd.processing.StableDiffusionProcessing(latents=z, width=128, height=128, scripts=runner)
        sd.processing.process_images(p)
        line = p.extra_generation_params["Hybrid VAE"]
        assert line.startswith("remote ") and "endpoint serves this VAE" in line, line
        with torch.no_grad():
            vae.load_state_dict(build_tiny_vae("sd15", seed=5).state_dict())  # a real fine-tune would do the same
        p = sd.processing.StableDiffusionProcessing(latents=z, width=128, height=128, scripts=runner)
        sd.processing.process_images(p)
        line = p.extra_generation_params["Hybrid VAE"]
        assert not line.startswith("remote") and "endpoint serves another VAE" in line, line
    assert decisions(sd)[-1]["custom_vae"] is True


def test_remote_decode_from_sdnext_over_an_endpoint_pool(sd):
    """``sd15=<dead>|<live>``: the image comes from the live endpoint; infotext and decision log name it."""
    from hybrid_vae.server.app import create_app
    from hybrid_vae.server.testing import free_port, serve_in_thread

    vae = build_tiny_vae("sd15")
    pipe = stubtools.ImagePipeline(vae, name="stable-diffusion-v1-5/stable-diffusion-v1-5")
    sd.shared.sd_model = pipe
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    stubtools.load_extension()
    dead = f"http://127.0.0.1:{free_port()}/sd15"
    with serve_in_thread(create_app(families={"sd15": vae}, device="cpu")) as base:
        sd.shared.opts.data.update({"hybrid_vae_allow_remote": True, "hybrid_vae_mode": "remote",
                                    "hybrid_vae_endpoints": f"sd15={dead}|{base}/sd15"})
        runner = sd.scripts_manager.ScriptRunner(False)
        p = sd.processing.StableDiffusionProcessing(latents=z, width=128, height=128, scripts=runner)
        processed = sd.processing.process_images(p)
    line = p.extra_generation_params["Hybrid VAE"]
    assert len(processed.images) == 1 and line.startswith("remote ") and f"via {base.split('//')[1]}" in line, line
    entry = decisions(sd)[-1]
    assert entry["report"]["remote"]["endpoint"] == f"{base}/sd15"
    assert entry["report"]["chosen"]["endpoint"] == f"{dead}|{base}/sd15"  # the pool the engine chose
