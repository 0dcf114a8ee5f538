"""hybrid-vae inside SD.Next (the stand-in in tests/sdnext_stub, loaded the way SD.Next loads extensions).

Real diffusers VAEs decode on the CPU; low-VRAM cards are simulated with HYBRID_VAE_SIMULATE_GPU;
out-of-memory errors are real ``torch.cuda.OutOfMemoryError`` raised from the decoder's forward.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "sdnext_stub"))
import stubtools
from hybrid_vae.extension.fixture import build_tiny_vae, fixture_image, load_fixture_vae
from hybrid_vae.extension.sdnext_ui import OPTIONS, SECTION

LOW_VRAM = "name=NVIDIA GeForce RTX 3070,free_gib=1.0"
BIG_VRAM = "name=NVIDIA GeForce RTX 4090,free_gib=20.0"


@pytest.fixture(scope="module")
def kl_vae():
    """The trained fixture VAE (SD1.5-like), or a tiny random SD1.5 VAE until the fixture's weights exist."""
    try:
        vae = load_fixture_vae()
        vae.trained = True
    except FileNotFoundError:
        vae = build_tiny_vae("sd15")
        vae.trained = False
    return vae


@pytest.fixture(scope="module")
def latent512(kl_vae):
    """A 512 px picture encoded by ``kl_vae``, scaled as a pipeline hands it to SD.Next's decode."""
    from PIL import Image

    img = fixture_image("astronaut", 256).resize((512, 512), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        return kl_vae.encode(x).latent_dist.mode() * kl_vae.config.scaling_factor


@pytest.fixture(scope="module")
def latent256(latent512):
    return latent512[:, :, 16:48, 16:48].contiguous()


@pytest.fixture
def sd(tmp_path, monkeypatch):
    """A fresh SD.Next stand-in (data folder in tmp_path) with no simulated GPU and no user profile."""
    monkeypatch.delenv("HYBRID_VAE_SIMULATE_GPU", raising=False)
    monkeypatch.delenv("HYBRID_VAE_PROFILE", raising=False)
    monkeypatch.setenv("SD_STUB_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    ns = stubtools.fresh_sdnext(tmp_path / "data")
    ns.data = tmp_path / "data"
    yield ns
    ns.script_callbacks.script_unloaded_callback()
    stubtools.purge()


def loaded(sd, model):
    sd.shared.sd_model = model
    stubtools.load_extension()
    sd.script_callbacks.ui_settings_callback()
    return sd.scripts_manager.ScriptRunner(False)


def sdnext_log_file(sd) -> list[str]:
    """Lines of SD.Next's log file (the stand-in's: <data>/sdnext.log, at DEBUG like SD.Next's)."""
    for h in sd.shared.log.handlers:
        h.flush()
    path = sd.data / "sdnext.log"
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def decisions(sd) -> list[dict]:
    path = sd.data / "hybrid-vae" / "decisions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def generate(sd, runner, latents, *, mode=None, vae_type="Full", size=512):
    args = [mode] if mode is not None else None
    p = sd.processing.StableDiffusionProcessing(latents=latents, width=size, height=size, vae_type=vae_type,
                                                scripts=runner, script_args=args)
    return p, sd.processing.process_images(p)


class OomOnForward:
    """Raises a real torch.cuda.OutOfMemoryError from ``module``'s forward (the first ``times`` calls)."""

    def __init__(self, module, times: int | None = 1):
        self.calls, self.times = 0, times
        self.handle = module.register_forward_pre_hook(self.hook)

    def hook(self, *_):
        self.calls += 1
        if self.times is None or self.calls <= self.times:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    def remove(self):
        self.handle.remove()


# ---- loading, settings, hooks ----------------------------------------------------------------------
def test_settings_section_registered_with_prefixed_keys(sd, kl_vae):
    loaded(sd, stubtools.ImagePipeline(kl_vae))
    labels = sd.shared.opts.data_labels
    ours = {k: v for k, v in labels.items() if v.section == SECTION}
    assert set(ours) == {o.key for o in OPTIONS}
    assert all(k.startswith("hybrid_vae_") and v.visible for k, v in ours.items())
    assert ours["hybrid_vae_allow_remote"].default is False
    assert "endpoint sees your images" in ours["hybrid_vae_allow_remote"].label
    assert ours["hybrid_vae_mode"].component_args == {"choices": ["auto", "full", "tiled", "remote"]}
    # the token is a secret: SD.Next keeps it out of config.json
    sd.shared.opts.hybrid_vae_hf_token = "hf_secret"
    sd.shared.opts.hybrid_vae_reserve_mib = 512
    sd.shared.opts.save()
    assert "hf_secret" not in (sd.data / "config.json").read_text()
    assert json.loads((sd.data / "secrets.json").read_text()) == {"hybrid_vae_hf_token": "hf_secret"}
    assert json.loads((sd.data / "config.json").read_text()) == {"hybrid_vae_reserve_mib": 512}


def test_script_import_reads_no_model(sd):
    """SD.Next's ``shared.sd_model`` loads the default model when none is loaded ("Model requested"): loading the
    extension and building its settings must not touch it (the stand-in records every such read)."""
    assert sd.shared.sd_loaded is False
    stubtools.load_extension()
    sd.script_callbacks.ui_settings_callback()
    sd.scripts_manager.ScriptRunner(False)
    assert sd.shared.model_requests == []


def test_token_option_is_secret_and_every_label_names_the_extension(sd, kl_vae):
    loaded(sd, stubtools.ImagePipeline(kl_vae))
    labels = sd.shared.opts.data_labels
    token = labels["hybrid_vae_hf_token"]
    # SD.Next's /sdapi/v1/options-info reports is_secret as getattr(info, "secret", False) (modules/api/options.py)
    assert getattr(token, "secret", False) is True and token.component_args == {"type": "password"}
    assert [k for k, v in labels.items() if getattr(v, "secret", False)] == ["hybrid_vae_hf_token"]
    # SD.Next's settings search shows a setting when its text contains the query (ui/settings.ts): every label
    # names the extension, so "hybrid" finds all of them (checked in a real browser by bench/hosts/sdnext/browser.py)
    ours = [v for v in labels.values() if v.section == SECTION]
    assert len(ours) == len(OPTIONS) == 14 and all("hybrid" in v.label.lower() for v in ours)


def test_accordion_says_when_remote_would_not_happen(sd, kl_vae):
    import gradio

    runner = loaded(sd, stubtools.ImagePipeline(kl_vae))
    assert runner.script_args == ["as in settings"]
    radio = next(c for c in gradio.created if getattr(c, "kwargs", {}).get("elem_id") == "hybrid_vae_txt2img_mode")
    hint = next(c for c in gradio.created if getattr(c, "kwargs", {}).get("elem_id") == "hybrid_vae_txt2img_hint")
    assert radio.kwargs["choices"][0] == "as in settings" and "settings default" not in radio.kwargs["choices"]
    assert hint.value.startswith("Remote would not happen: remote decode is off (Settings > Hybrid VAE: allow remote")
    radio.fire_change("remote")  # the choice is made: the line is recomputed from the settings of that moment
    assert hint.value.startswith("**Remote would not happen") and "This generation decodes locally." in hint.value
    sd.shared.opts.data.update({"hybrid_vae_allow_remote": True, "hybrid_vae_endpoints": "sd15=ftp://typo"})
    radio.fire_change("remote")
    assert "until the endpoint setting is fixed" in hint.value and "ftp://typo" in hint.value
    sd.shared.opts.data["hybrid_vae_endpoints"] = "sd15=https://gpu.example/sd15"
    radio.fire_change("remote")
    assert hint.value.startswith("Remote decode is allowed")


def test_log_lines_reach_sdnexts_logger_at_their_levels(sd, kl_vae, latent256, monkeypatch):
    """SD.Next sends the root logger to a NullHandler at ERROR (the stand-in too): hybrid-vae's records reach SD.Next's
    own logger instead, whose console/UI buffer is at INFO and whose file is at DEBUG."""
    root = logging.getLogger()
    assert root.level == logging.ERROR and any(isinstance(h, logging.NullHandler) for h in root.handlers)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # an optional dependency missing (import fails)
    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", BIG_VRAM)
    pipe = stubtools.ImagePipeline(kl_vae)
    runner = loaded(sd, pipe)
    buffer = sd.shared.log.buffer  # SD.Next's console level (INFO)

    def seen(level, text):
        return any(f"| {level} |" in line and text in line for line in buffer)

    assert seen("INFO", "hybrid-vae: decode hook installed")
    assert seen("WARNING", "pynvml is not installed: free VRAM is read from torch instead of NVML")
    from modules import logger

    logger.override_all_loggers()  # SD.Next's end of startup: our loggers get SD.Next's handlers; the next
    # generation's before_process undoes it, so no line is written twice
    sd.shared.opts.data["hybrid_vae_mode"] = "fastest"  # a bad setting: one warning
    generate(sd, runner, latent256, size=256)
    assert seen("WARNING", "setting ignored: hybrid_vae_mode='fastest'")
    assert seen("WARNING", "GPU SIMULATED (HYBRID_VAE_SIMULATE_GPU): NVIDIA GeForce RTX 4090")
    decode_lines = [ln for ln in buffer if "| INFO |" in ln and "hybrid-vae: sd15 256x256: full," in ln]
    assert len(decode_lines) == 1  # one line per decode with the decision log on
    sd.shared.opts.data["hybrid_vae_decision_log"] = False
    generate(sd, runner, latent256, size=256)
    assert len([ln for ln in buffer if "hybrid-vae: sd15 256x256: full," in ln]) == 1  # DEBUG: not on the console
    in_file = [ln for ln in sdnext_log_file(sd) if "hybrid-vae: sd15 256x256: full," in ln]
    assert [ln.split(" | ")[3] for ln in in_file] == ["INFO", "DEBUG"]  # the file has both, once, at their levels
    assert all(" | hybrid_vae.orchestrator | " in ln for ln in in_file)


def test_cpu_decode_infotext_says_full(sd, kl_vae, latent256, monkeypatch):
    runner = loaded(sd, stubtools.ImagePipeline(kl_vae))
    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", "name=NVIDIA GeForce RTX 3070,free_gib=0.01")
    p, processed = generate(sd, runner, latent256, size=256)
    line = p.extra_generation_params["Hybrid VAE"]
    assert len(processed.images) == 1 and line.startswith("cpu full decode, no GPU plan fits 0.01 GiB available"), line


def test_hook_installed_once_across_reloads_and_removed_on_unload(sd, kl_vae):
    original = sd.processing_vae.vae_decode
    classes = loaded(sd, stubtools.ImagePipeline(kl_vae))
    wrapper = sd.processing_vae.vae_decode
    assert wrapper is not original and wrapper._hybrid_vae_original is original
    assert [type(s).__name__ for s in classes.alwayson_scripts] == ["HybridVAEScript"]
    import gradio  # the stand-in: the accordion's Radio, its choices and default
    (radio,) = [c for c in gradio.created if isinstance(c, gradio.Radio)]
    assert radio.label == "Hybrid VAE decode mode for this generation" and radio.value == "as in settings"
    assert radio.kwargs["choices"] == ["as in settings", "auto", "full", "tiled", "remote"]
    assert classes.script_args == ["as in settings"]
    stubtools.load_extension()  # the script file executed again without an unload
    assert sd.processing_vae.vae_decode is wrapper and wrapper._hybrid_vae_original is original
    assert len(sd.script_callbacks.callback_map["callbacks_script_unloaded"]) == 1
    sd.script_callbacks.script_unloaded_callback()
    assert sd.processing_vae.vae_decode is original
    stubtools.load_extension()  # SD.Next's UI reload: unload, then load again
    again = sd.processing_vae.vae_decode
    assert again is not original and again._hybrid_vae_original is original
    sd.script_callbacks.script_unloaded_callback()
    assert sd.processing_vae.vae_decode is original


@pytest.mark.parametrize("output_type", ["np", "pil"])
def test_decode_returns_what_sdnext_returns(sd, kl_vae, latent256, output_type):
    pipe = stubtools.ImagePipeline(kl_vae)
    sd.shared.sd_model = pipe
    ref = sd.processing_vae.vae_decode(latent256, pipe, output_type=output_type)
    loaded(sd, pipe)
    out = sd.processing_vae.vae_decode(latent256, pipe, output_type=output_type)
    assert type(out) is type(ref)
    if output_type == "np":
        assert out.shape == ref.shape == (1, 256, 256, 3) and out.dtype == ref.dtype
        assert float(np.abs(out - ref).max()) < 1e-4
    else:
        assert len(out) == len(ref) == 1 and out[0].size == ref[0].size and out[0].mode == ref[0].mode
        diff = np.abs(np.asarray(out[0], dtype=np.int16) - np.asarray(ref[0], dtype=np.int16))
        assert int(diff.max()) <= 1
    (entry,) = decisions(sd)
    assert entry["source"] == "vae_decode" and entry["family"] == "sd15" and entry["report"]["ran"]["path"] == "cpu"


def test_low_vram_card_gets_tiled_and_infotext_says_so(sd, kl_vae, latent512, monkeypatch, tmp_path):
    pipe = stubtools.ImagePipeline(kl_vae)
    sd.shared.sd_model = pipe
    full = sd.processing_vae.vae_decode(latent512, pipe, output_type="np")
    runner = loaded(sd, pipe)
    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", LOW_VRAM)
    p, processed = generate(sd, runner, latent512)
    assert len(processed.images) == 1 and processed.images[0].size == (512, 512)
    line = p.extra_generation_params["Hybrid VAE"]
    assert line.startswith("tiled ") and "budget <" in line and "simulated NVIDIA GeForce RTX 3070" in line
    assert f'Hybrid VAE: "{line}"' in processed.infotexts[0]  # quoted as SD.Next quotes values with commas
    tiled = np.asarray(processed.images[0], dtype=np.float32) / 255
    # the hook delivers exactly the engine's tiled decode of the same latent (same plan, same tiles)
    from hybrid_vae.extension.orchestrator import HybridDecoder

    direct = HybridDecoder(latent_dir=tmp_path / "direct").decode(latent512, kl_vae, family="sd15").tensor
    direct_np = ((direct[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    assert np.abs(tiled - direct_np).max() <= 1.5 / 255
    # and it stays close to SD.Next's full decode: per-tile GroupNorm shifts colours on the trained
    # fixture (about 20 dB, the same as diffusers' tiling; docs/tiling-quality.md), more on random weights
    mse = float(((tiled - full[0]) ** 2).mean())
    assert 10 * np.log10(1 / max(mse, 1e-12)) > (18 if kl_vae.trained else 15)


def test_injected_oom_falls_back_and_keeps_the_image(sd, kl_vae, latent256, monkeypatch):
    runner = loaded(sd, stubtools.ImagePipeline(kl_vae))
    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", BIG_VRAM)
    oom = OomOnForward(kl_vae.decoder.conv_in, times=1)
    try:
        p, processed = generate(sd, runner, latent256, size=256)
    finally:
        oom.remove()
    assert oom.calls >= 2 and len(processed.images) == 1
    line = p.extra_generation_params["Hybrid VAE"]
    assert "fell back from full (out of memory)" in line
    (entry,) = decisions(sd)
    assert entry["report"]["attempts"][0]["error"] == "out of memory" and entry["report"]["attempts"][-1]["error"] is None


def test_learning_is_on_by_default_into_the_data_folder_and_the_option_turns_it_off(sd, kl_vae, latent256,
                                                                                   monkeypatch):
    """The decoder SD.Next's glue builds gets the learned store in <data>/hybrid-vae/learned.json (so each local
    decode on a real GPU refines the next estimates); with the option off it gets none. The simulated GPU here
    records nothing (a simulated card's times are this CPU's)."""
    from hybrid_vae.extension import sdnext_decode

    made = []

    class Spy(sdnext_decode.HybridDecoder):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(sdnext_decode, "HybridDecoder", Spy)
    runner = loaded(sd, stubtools.ImagePipeline(kl_vae))
    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", BIG_VRAM)
    _p, processed = generate(sd, runner, latent256, size=256)
    assert len(processed.images) == 1 and made[-1].learned.path == sd.data / "hybrid-vae" / "learned.json"
    assert not made[-1].learned.path.exists()  # simulated: nothing learned
    sd.shared.opts.data["hybrid_vae_learn"] = False
    _p, processed = generate(sd, runner, latent256, size=256)
    assert len(processed.images) == 1 and made[-1].learned is None


@pytest.mark.parametrize("outcome", ["ok", "every plan failed", "latent rejected", "unexpected error"])
def test_sdnexts_vae_decode_job_ends_once_however_the_decode_ends(sd, kl_vae, latent256, monkeypatch, outcome):
    """SD.Next's job "VAE Decode" (``shared.state.begin``/``end``) ends exactly once on every path, and before a
    failure is reported (the failure message is set after ``end``)."""
    from hybrid_vae.extension.orchestrator import HybridDecoder
    from hybrid_vae.policy.errors import LatentError

    pipe = stubtools.ImagePipeline(kl_vae)
    loaded(sd, pipe)
    state, events = sd.shared.state, []
    begin = state.begin
    monkeypatch.setattr(state, "begin", lambda *a, **k: events.append(("begin", *a[:1])) or begin(*a, **k))
    monkeypatch.setattr(state, "end", lambda *a, **k: events.append(("end", state.textinfo)))
    raise_in_decode = {"latent rejected": LatentError("latent rejected (injected)"),
                       "unexpected error": RuntimeError("unexpected (injected)")}.get(outcome)
    if raise_in_decode is not None:
        def failing(*_a, **_k):
            raise raise_in_decode

        monkeypatch.setattr(HybridDecoder, "decode", failing)
    oom = OomOnForward(kl_vae.decoder.conv_in, times=None) if outcome == "every plan failed" else None
    try:
        out = sd.processing_vae.vae_decode(latent256, pipe, output_type="np")
    finally:
        if oom is not None:
            oom.remove()
    delegated = outcome in ("latent rejected", "unexpected error")  # SD.Next's own decode runs its own job
    assert [e[0] for e in events] == ["begin", "end"] * (2 if delegated else 1), events
    assert events[0] == ("begin", "VAE Decode"), events  # ours ended before SD.Next's own decode began
    assert "every decode plan failed" not in (events[1][1] or ""), events  # and before a failure is reported
    if outcome == "every plan failed":
        assert out == [] and "every decode plan failed" in state.textinfo  # reported after the job ended
    else:  # ours, or SD.Next's own decode after a rejected latent or an unexpected error
        assert len(out) == 1 and out[0].shape == (256, 256, 3)


def test_everything_failing_saves_the_latent_and_the_cli_decodes_it(sd, kl_vae, latent256, tmp_path):
    """Every plan fails: the latent is saved, SD.Next's log (console, file, UI buffer) has the ERROR line, and the
    command the message gives decodes it from SD.Next's Python with no install step (another working folder)."""
    pipe = stubtools.ImagePipeline(kl_vae)
    sd.shared.sd_model = pipe
    ref = sd.processing_vae.vae_decode(latent256, pipe, output_type="np")
    loaded(sd, pipe)
    oom = OomOnForward(kl_vae.decoder.conv_in, times=None)
    try:
        out = sd.processing_vae.vae_decode(latent256, pipe, output_type="pil")
    finally:
        oom.remove()
    assert out == []
    files = list((sd.data / "hybrid-vae" / "latents").glob("*.safetensors"))
    assert len(files) == 1
    latent_file = str(files[0])
    msg = sd.shared.state.textinfo
    assert latent_file in msg and " decode " in msg
    assert any("ERROR" in line and latent_file in line for line in sd.shared.log.buffer)
    assert any("| hybrid_vae.sdnext | ERROR |" in line and latent_file in line for line in sdnext_log_file(sd))
    (entry,) = decisions(sd)
    assert entry["failed"] is True and entry["latent_path"] == latent_file
    command = shlex.split(msg.split("`")[1])
    assert command[0] == sys.executable and Path(command[1]) == stubtools.REPO_DIR and command[2:4] == ["decode", latent_file]
    if kl_vae.trained:
        source = ["--fixture"]
    else:  # the same VAE, saved as a diffusers folder
        kl_vae.save_pretrained(tmp_path / "vae")
        source = ["--vae", str(tmp_path / "vae")]
    png = tmp_path / "recovered.png"
    run = subprocess.run([*command[:4], *source, "-o", str(png)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    from PIL import Image

    got = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 255
    assert got.shape == ref[0].shape and float(np.abs(got - ref[0]).max()) <= 1.5 / 255


def test_tiny_disabled_and_interrupted_are_sdnexts(sd, kl_vae, latent256):
    pipe = stubtools.ImagePipeline(kl_vae)
    sd.shared.sd_model = pipe
    ref = sd.processing_vae.vae_decode(latent256, pipe, output_type="np")
    runner = loaded(sd, pipe)
    p, processed = generate(sd, runner, latent256, vae_type="Tiny", size=256)
    assert sd.processing_vae.taesd_calls == [(1, 4, 32, 32)] and len(processed.images) == 1
    assert "Hybrid VAE" not in p.extra_generation_params and decisions(sd) == []
    sd.shared.opts.data["hybrid_vae_enabled"] = False
    out = sd.processing_vae.vae_decode(latent256, pipe, output_type="np")
    assert np.array_equal(out, ref) and decisions(sd) == []
    sd.shared.opts.data["hybrid_vae_enabled"] = True
    sd.shared.state.interrupt()
    assert sd.processing_vae.vae_decode(latent256, pipe, output_type="np") == [] and decisions(sd) == []


@pytest.mark.slow
def test_profile_yaml_path_applies_to_the_next_generation(sd, kl_vae, latent512, tmp_path, monkeypatch):
    runner = loaded(sd, stubtools.ImagePipeline(kl_vae))
    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", LOW_VRAM)
    p1, _ = generate(sd, runner, latent512)
    assert p1.extra_generation_params["Hybrid VAE"].startswith("tiled")
    cheap = tmp_path / "cheap.yaml"  # "my decoder needs a tenth of the memory": full now fits 0.75 GiB
    cheap.write_text("families:\n  sd15:\n    memory:\n      bytes_per_voxel: 120\n      batch_bytes_per_voxel: 100\n")
    sd.shared.opts.data["hybrid_vae_profile_path"] = str(cheap)
    p2, _ = generate(sd, runner, latent512)
    assert p2.extra_generation_params["Hybrid VAE"].startswith("full,")
    assert str(cheap) in decisions(sd)[-1]["report"]["decision"]["profile_sources"]
    broken = tmp_path / "broken.yaml"
    broken.write_text("families:\n  sd15:\n    memory:\n      bytes_per_voxle: 120\n")
    sd.shared.opts.data["hybrid_vae_profile_path"] = str(broken)
    p3, processed = generate(sd, runner, latent512)
    assert len(processed.images) == 1  # the generation carries on with the built-ins
    line = p3.extra_generation_params["Hybrid VAE"]
    assert line.startswith("tiled") and "profile ignored, built-ins used" in line and str(broken) in line
    assert "bytes_per_voxle" in line and "unknown key" in line
    assert any("WARNING" in line and str(broken) in line for line in sd.shared.log.buffer)  # SD.Next's log


def test_per_generation_mode_and_sdnext_remote_choice(sd, kl_vae, latent256, latent512, monkeypatch):
    runner = loaded(sd, stubtools.ImagePipeline(kl_vae))
    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", BIG_VRAM)
    p, _ = generate(sd, runner, latent512, mode="tiled")
    assert p.extra_generation_params["Hybrid VAE"].startswith("tiled")
    p, _ = generate(sd, runner, latent256, mode="as in settings", size=256)
    assert p.extra_generation_params["Hybrid VAE"].startswith("full,")
    # SD.Next's own "Remote" VAE type: remote preferred, but remote decode is off in our settings
    p, processed = generate(sd, runner, latent256, vae_type="Remote", size=256)
    line = p.extra_generation_params["Hybrid VAE"]
    assert len(processed.images) == 1 and line.startswith("full,") and "remote decode is off" in line
    assert sd.processing_vae.remote_calls == []  # nothing left the machine


def test_batches_get_their_own_line_and_failed_batch_keeps_others(sd, kl_vae, latent256, monkeypatch):
    runner = loaded(sd, stubtools.ImagePipeline(kl_vae))
    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", BIG_VRAM)
    oom = OomOnForward(kl_vae.decoder.conv_in, times=1)
    try:
        _, processed = generate(sd, runner, [latent256, latent256], size=256)
    finally:
        oom.remove()
    assert len(processed.images) == 2
    assert "fell back" in processed.infotexts[0] and "fell back" not in processed.infotexts[1]


def test_flux_packed_latents(sd):
    vae = build_tiny_vae("flux")
    pipe = stubtools.ImagePipeline(vae, packed=True)
    sd.shared.sd_model = pipe
    z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    packed = z.view(1, 16, 8, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 64, 64)
    ref = sd.processing_vae.vae_decode(packed, pipe, output_type="np", width=128, height=128)
    loaded(sd, pipe)
    out = sd.processing_vae.vae_decode(packed, pipe, output_type="np", width=128, height=128)
    assert out.shape == ref.shape == (1, 128, 128, 3) and float(np.abs(out - ref).max()) < 1e-4
    assert decisions(sd)[-1]["family"] == "flux"


def test_vae_matching_no_family_is_decoded_locally_never_remote(sd, monkeypatch):
    """A 2x-compression AutoencoderKL with SD1.5's scaling factor is not SD1.5: decoded by the engine on this machine
    with a memory model scaled from its config, never sent to the sd15 endpoint, and the infotext says so."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    two_x = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, latent_channels=4,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    assert two_x.config.scaling_factor == 0.18215
    pipe = stubtools.ImagePipeline(two_x, name="stable-diffusion-v1-5/stable-diffusion-v1-5")
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2)) * 0.18215
    ref = sd.processing_vae.vae_decode(z, pipe, output_type="np")
    runner = loaded(sd, pipe)
    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", BIG_VRAM)
    sd.shared.opts.data.update({"hybrid_vae_allow_remote": True, "hybrid_vae_mode": "remote",
                                "hybrid_vae_endpoints": "sd15=http://127.0.0.1:9/sd15"})  # nothing may go there
    p, processed = generate(sd, runner, z, size=128)
    line = p.extra_generation_params["Hybrid VAE"]
    assert line.startswith("full, ") and "VAE matches no family: local only" in line, line
    got = np.asarray(processed.images[0], dtype=np.float32) / 255
    assert got.shape == ref[0].shape == (128, 128, 3) and float(np.abs(got - ref[0]).max()) <= 1.5 / 255
    (entry,) = decisions(sd)
    reason = entry["report"]["reason"]
    assert entry["family"] == "unmatched" and entry["report"]["remote"] is None
    assert all(f["path"] != "remote" for f in entry["report"]["decision"]["fallbacks"])
    assert "remote requested but never remote for a VAE whose geometry matches no family" in reason
    assert "2x spatial" in reason and "nearest sd15 has 8x spatial" in reason
    assert "memory model scaled from its config" in reason
    # the log carries why as data; the infotext's note comes from it (the request's first clause)
    rep = entry["report"]
    assert rep["reason_code"] == "full_fits" and rep["reason_params"]["unmet_request"] == "remote"
    assert rep["reason_params"]["remote_code"] == "inferred_family" and rep["reason_params"]["inferred"]
    assert "; remote requested but never remote for a VAE whose geometry matches no family" in line, line
    src = entry["report"]["decision"]["options"][0]["estimate"]["peak_source"]
    assert "x0.312" in src and "decoder widths 32/64" in src  # (32 + 64) / (128 + 256) x 1.25 margin


def test_vae_classes_the_engine_does_not_decode_stay_sdnexts(sd):
    from diffusers import AutoencoderTiny

    tiny = AutoencoderTiny()
    pipe = stubtools.ImagePipeline(tiny)
    loaded(sd, pipe)
    out = sd.processing_vae.vae_decode(torch.randn(1, 4, 8, 8), pipe, output_type="np")
    assert out.shape == (1, 64, 64, 3) and decisions(sd) == []
