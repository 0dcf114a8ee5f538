"""The "Hybrid VAE Decode" ComfyUI node, loaded from a ``custom_nodes/`` folder the way ComfyUI loads it,
against a stand-in of ComfyUI's API (``tests/comfy_stub``: ``comfy.sd.VAE`` with ComfyUI's attribute names
around real diffusers weights, ``comfy.model_management``, ``folder_paths``).

Real diffusers VAEs on the CPU; the endpoint is ``hybrid-vae serve --demo``'s app on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hybrid_vae.extension.fixture import build_tiny_vae, load_fixture_vae
from hybrid_vae.policy import DecodeJob, DecodeSettings, decide, load_profiles, parse_simulation
from hybrid_vae.server.testing import free_port, serve_demo

REPO = Path(__file__).resolve().parents[1]
STUB = REPO / "tests" / "comfy_stub"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ModuleType]]:
    """ComfyUI's stand-in on sys.path, the node package symlinked into custom_nodes/ and loaded like ComfyUI."""
    out = tmp_path_factory.mktemp("comfy-output")
    saved_path, saved_env = list(sys.path), os.environ.get("COMFY_STUB_OUTPUT")
    os.environ["COMFY_STUB_OUTPUT"] = str(out)
    sys.path.insert(0, str(STUB))
    custom_nodes = tmp_path_factory.mktemp("custom_nodes")
    link = custom_nodes / "hybrid_vae_node"
    link.symlink_to(REPO / "extension" / "comfyui", target_is_directory=True)
    try:
        import comfy.model_management
        import comfy.sd
        import loader

        pack = loader.load_custom_node(str(link))
        yield {"pack": pack, "sd": comfy.sd, "mm": comfy.model_management, "out": out}  # type: ignore[dict-item]
    finally:
        sys.path[:] = saved_path
        for name in [m for m in sys.modules if m == "comfy" or m.startswith("comfy.") or m in ("loader", "folder_paths")]:
            del sys.modules[name]
        if saved_env is None:
            os.environ.pop("COMFY_STUB_OUTPUT", None)
        else:
            os.environ["COMFY_STUB_OUTPUT"] = saved_env


@pytest.fixture(scope="module")
def sd15_weights() -> torch.nn.Module:
    try:
        return load_fixture_vae()
    except FileNotFoundError:  # the trained fixture is not committed yet: same architecture, random weights
        return build_tiny_vae("sd15")


def _comfy_vae(comfy: dict, dvae: torch.nn.Module, *, channels: int = 4, kind: str = "kl") -> object:
    """A ComfyUI VAE (stub) around a diffusers VAE, with ComfyUI's own decoder module types."""
    from comfy.ldm.hunyuan_video.vae import VideoVAE
    from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine
    from comfy.ldm.wan.vae import WanVAE

    model = {"kl": lambda: AutoencoderKL(dvae), "engine": lambda: AutoencodingEngine(dvae),
             "hunyuan": lambda: VideoVAE(dvae), "wan": lambda: WanVAE(dvae), "diffusers": lambda: dvae}[kind]()
    return comfy["sd"].VAE(model, latent_channels=channels, video=kind in ("hunyuan", "wan"))


def _latent(*shape: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ComfyUI LATENT: samples in the VAE's own space (as the sampler leaves them)."""
    return {"samples": torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.5}


def test_loads_from_custom_nodes_like_comfyui(comfy: dict) -> None:
    pack = comfy["pack"]
    assert pack.__name__ == str(Path(pack.__file__).parent).replace(".", "_x_")  # ComfyUI's module naming
    assert set(pack.NODE_CLASS_MAPPINGS) == {"HybridVAEDecode"}
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == {"HybridVAEDecode": "Hybrid VAE Decode"}
    node_cls = pack.NODE_CLASS_MAPPINGS["HybridVAEDecode"]
    assert node_cls.__module__ == pack.__name__ + ".nodes"  # the relative import resolved inside the package


_FRESH_LOAD = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")
                    and "editable" not in getattr(type(f), "__module__", "")]
sys.path[:] = [p for p in sys.path if p not in ("", {repo!r})]
try:
    from hybrid_vae import policy
    raise SystemExit("the engine is importable before the node package runs: the test proves nothing")
except ImportError:
    pass
sys.path.insert(0, {stub!r})
import loader
pack = loader.load_custom_node({link!r})
assert {repo!r} not in sys.path, sys.path[-3:]
assert sys.modules["hybrid_vae"].__path__ == [{repo!r}], sys.modules["hybrid_vae"].__path__
assert not {{"server", "policy", "extension", "bench", "profiles"}} & set(sys.modules), "a generic top-level module was imported"
assert "server" not in sys.modules, "the node imported a top-level 'server' (ComfyUI has its own)"
print("OK", sorted(pack.NODE_CLASS_MAPPINGS))
"""


def test_loads_in_a_fresh_comfyui_like_interpreter_without_the_repo_on_sys_path(tmp_path: Path) -> None:
    """Only the symlink leads to the engine: the package registers the repository root as ``hybrid_vae``
    itself, puts nothing on sys.path, and imports no generic top-level module (ComfyUI's own ``server``
    must not be shadowed)."""
    import subprocess

    link = tmp_path / "custom_nodes" / "hybrid_vae_node"
    link.parent.mkdir()
    link.symlink_to(REPO / "extension" / "comfyui", target_is_directory=True)
    code = _FRESH_LOAD.format(repo=str(REPO), stub=str(STUB), link=str(link))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK ['HybridVAEDecode']" in proc.stdout


def test_node_api(comfy: dict) -> None:
    node_cls = comfy["pack"].NODE_CLASS_MAPPINGS["HybridVAEDecode"]
    spec = node_cls.INPUT_TYPES()
    assert spec["required"]["samples"][0] == "LATENT" and spec["required"]["vae"][0] == "VAE"
    assert spec["optional"]["endpoint"][0] == "STRING" and spec["optional"]["endpoint"][1]["default"] == ""
    assert spec["optional"]["family"][0][0] == "auto" and "hunyuanvideo" in spec["optional"]["family"][0]
    assert spec["optional"]["mode"][0] == ["auto", "full", "tiled", "remote"]
    assert spec["optional"]["free_memory_first"][0] == "BOOLEAN"
    assert spec["optional"]["remote_custom_vae"][0] == "BOOLEAN" and spec["optional"]["remote_custom_vae"][1]["default"] is False
    assert node_cls.RETURN_TYPES == ("IMAGE", "STRING", "FLOAT") and len(node_cls.RETURN_NAMES) == 3
    assert callable(getattr(node_cls(), node_cls.FUNCTION)) and isinstance(node_cls.CATEGORY, str)


def test_decodes_like_comfyui_and_asks_comfyui_for_room(comfy: dict, sd15_weights: torch.nn.Module) -> None:
    vae = _comfy_vae(comfy, sd15_weights)
    node = comfy["pack"].NODE_CLASS_MAPPINGS["HybridVAEDecode"]()
    lat = _latent(1, 4, 16, 16)
    comfy["mm"].LOAD_CALLS.clear()
    image, text, secs = node.decode(lat, vae)
    ref = vae.decode(lat["samples"])  # ComfyUI's own VAE Decode
    assert image.shape == (1, 128, 128, 3) and image.dtype == torch.float32
    assert 0.0 <= image.min().item() and image.max().item() <= 1.0
    assert (image - ref).abs().max().item() < 1e-4
    assert text.startswith("Hybrid VAE: ") and "sd15" in text and "ComfyUI first_stage_model.decode" in text
    assert isinstance(secs, float) and secs >= 0 and " s," not in text and not text.rstrip().endswith(" s")
    # no GPU here: the cpu plan, for which nothing asked ComfyUI for room; loading the VAE used ComfyUI's figure
    first = comfy["mm"].LOAD_CALLS[0]
    assert first["models"] == [vae.patcher]
    assert first["memory_required"] == vae.memory_used_decode(lat["samples"].shape, vae.vae_dtype)
    comfy["mm"].LOAD_CALLS.clear()
    _, text2, _ = node.decode(lat, vae)
    assert text2 == text  # the same line for the same run: no timing in it
    assert len(comfy["mm"].LOAD_CALLS) == 1


LOW_VRAM = "name=NVIDIA GeForce RTX 3070,free_gib=0.45"


def _expected_tiled(size: int, sim: str = LOW_VRAM, groupnorm: str = "auto") -> object:
    plan = decide(DecodeJob("sd15", size, size, dtype="float32"), parse_simulation(sim, total_for=lambda n: 8.0),
                  load_profiles(), DecodeSettings(tile_groupnorm=groupnorm)).chosen  # type: ignore[arg-type]
    assert plan.path == "tiled"
    return plan


def test_low_vram_simulated_exact_tiles_over_comfyuis_ldm_decoder(
        comfy: dict, sd15_weights: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """ComfyUI's AutoencoderKL has the LDM Decoder: the engine's exact tiler runs ComfyUI's own modules through
    extension.stream_ldm (output = ComfyUI's full decode), after asking ComfyUI for that plan's estimate only."""
    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", LOW_VRAM)
    vae = _comfy_vae(comfy, sd15_weights)
    assert type(vae.first_stage_model.decoder).__name__ == "Decoder" and hasattr(vae.first_stage_model.decoder, "mid")
    node = comfy["pack"].NODE_CLASS_MAPPINGS["HybridVAEDecode"]()
    lat = _latent(1, 4, 40, 40, seed=1)
    comfy["mm"].LOAD_CALLS.clear()
    image, text, _ = node.decode(lat, vae)
    plan = _expected_tiled(320)
    assert plan.groupnorm == "exact"
    assert f"tiled {plan.tile_px}px exact" in text and "simulated NVIDIA GeForce RTX 3070" in text
    assert "exact tiles over ComfyUI's decoder | exact tiles: equals a full decode" in text
    assert "colours may differ" not in text
    assert vae.decode_calls == []  # neither ComfyUI's decode nor decode_tiled: its modules, pass by pass
    assert [c["memory_required"] for c in comfy["mm"].LOAD_CALLS] == [plan.estimate.peak_bytes]
    assert f"asked ComfyUI for {plan.estimate.peak_bytes / 1024**3:.2f} GiB ({plan.label})" in text
    ref = vae.decode(lat["samples"])
    assert image.shape == ref.shape == (1, 320, 320, 3)
    assert (image - ref).abs().max().item() < 1e-4


def test_local_tiles_say_colours_may_differ(
        comfy: dict, sd15_weights: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where exact tiles do not fit (not even with their buffers in host memory: none to spare here), the one-pass
    local tiler runs first_stage_model.decode per tile, and the decision line says its colours may differ from a
    full decode."""
    tight = "name=NVIDIA GeForce RTX 3070,free_gib=0.3,host_gib=0"
    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", tight)
    vae = _comfy_vae(comfy, sd15_weights)
    node = comfy["pack"].NODE_CLASS_MAPPINGS["HybridVAEDecode"]()
    lat = _latent(1, 4, 96, 96, seed=1)
    plan = _expected_tiled(768, tight)
    assert plan.groupnorm == "local"
    comfy["mm"].LOAD_CALLS.clear()
    image, text, _ = node.decode(lat, vae)
    assert f"tiled {plan.tile_px}px/{plan.overlap_px}" in text and "engine tiler" in text
    assert "local tiles: colours may differ from a full decode" in text and vae.decode_calls == []
    assert [c["memory_required"] for c in comfy["mm"].LOAD_CALLS] == [plan.estimate.peak_bytes]
    ref = vae.decode(lat["samples"])
    assert image.shape == ref.shape == (1, 768, 768, 3)
    assert (image - ref).abs().mean().item() < 0.05  # tile borders only (GroupNorm sees each tile)


def test_a_cpu_decode_in_exact_tiles_says_so(
        comfy: dict, sd15_weights: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing fits the GPU and the host holds exact tiles' buffers but not a whole CPU decode: the CPU plan in exact
    tiles runs over ComfyUI's own modules (their buffers in host memory), and the line says it equals a full decode."""
    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", "name=NVIDIA GeForce RTX 3070,free_gib=0.01,host_gib=3")
    vae = _comfy_vae(comfy, sd15_weights)
    node = comfy["pack"].NODE_CLASS_MAPPINGS["HybridVAEDecode"]()
    lat = _latent(1, 4, 64, 64, seed=1)
    image, text, _ = node.decode(lat, vae)
    assert "cpu exact tiles 256px" in text, text
    assert "exact tiles over ComfyUI's decoder | exact tiles: equals a full decode" in text
    assert "colours may differ" not in text and vae.decode_calls == []
    ref = vae.decode(lat["samples"])
    assert image.shape == ref.shape == (1, 512, 512, 3)
    assert (image - ref).abs().max().item() < 1e-4


@pytest.mark.slow
def test_low_vram_simulated_runs_comfyuis_decode_tiled_for_other_vaes(
        comfy: dict, sd15_weights: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """A VAE that is not decoder(post_quant_conv(z)) (here a TAESD-like one): ComfyUI's own decode_tiled, with
    the engine's tile and overlap in latent units."""
    from comfy.taesd.taesd import TAESD

    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", LOW_VRAM)
    vae = comfy["sd"].VAE(TAESD(sd15_weights), latent_channels=4)
    node = comfy["pack"].NODE_CLASS_MAPPINGS["HybridVAEDecode"]()
    lat = _latent(1, 4, 40, 40, seed=1)
    image, text, _ = node.decode(lat, vae)
    plan = _expected_tiled(320, groupnorm="local")  # TAESD is no LDM Decoder: local tiles only
    kind, args = vae.decode_calls[-1]
    assert kind == "decode_tiled"
    assert args["tile_x"] == args["tile_y"] == plan.tile_px // 8 and args["overlap"] == plan.overlap_px // 8
    assert "vae.decode_tiled(tile_x=" in text
    ref = vae.decode(lat["samples"])
    assert image.shape == ref.shape == (1, 320, 320, 3)
    assert (image - ref).abs().mean().item() < 0.05


def test_video_tiles_and_frame_chunks_reach_comfyuis_decode_tiled(comfy: dict) -> None:
    """The executors' video tiling attributes become decode_tiled's tile_x/tile_y/overlap/tile_t/overlap_t."""
    from comfy.ldm.hunyuan_video.vae import VideoVAE
    from hybrid_vae.extension.executors import run_plan
    from hybrid_vae.policy import Estimate, Plan

    pack_nodes = sys.modules[comfy["pack"].__name__ + ".nodes"]
    vae = comfy["sd"].VAE(VideoVAE(build_tiny_vae("hunyuanvideo")), latent_channels=16, video=True)
    fam = load_profiles().family("hunyuanvideo")
    adapter = pack_nodes.ComfyVAEAdapter(vae, fam)
    plan = Plan(path="tiled", dtype="float32", tile_px=32, overlap_px=16, frame_chunk=2, frame_overlap=1,
                estimate=Estimate(peak_bytes=0, seconds=0.0, peak_source="test", seconds_source="test"))
    z = torch.randn(1, 16, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    out = run_plan(plan, adapter, z, family=fam)
    assert out.shape == (1, 3, 5, 48, 48)
    kind, args = vae.decode_calls[-1]
    assert kind == "decode_tiled"
    assert args == {"tile_x": 4, "tile_y": 4, "overlap": 2, "tile_t": 2, "overlap_t": 1}
    assert not adapter.use_tiling and not adapter.use_framewise_decoding  # restored after the plan
    # ComfyUI's VAE cannot stream frames to host: the decision counts its own loop, and a plan that asks for
    # streaming still runs decode_tiled
    from hybrid_vae.extension.stream import settings_for_vae
    from hybrid_vae.policy.model import DecodeSettings

    assert not settings_for_vae(DecodeSettings(), adapter, fam).video_host_output
    import dataclasses

    out2 = run_plan(dataclasses.replace(plan, host_output=True), adapter, z, family=fam)
    assert vae.decode_calls[-1] == (kind, args) and torch.equal(out2, out)


def test_remote_endpoint_down_stays_local_and_says_so(comfy: dict, sd15_weights: torch.nn.Module) -> None:
    vae = _comfy_vae(comfy, sd15_weights)
    node = comfy["pack"].NODE_CLASS_MAPPINGS["HybridVAEDecode"]()
    lat = _latent(1, 4, 8, 8, seed=2)
    image, text, _ = node.decode(lat, vae, endpoint=f"http://127.0.0.1:{free_port()}/sd15")
    assert image.shape == (1, 64, 64, 3)
    assert "endpoint's VAE not verified (canary failed" in text and "Connection refused" in text
    assert (image - vae.decode(lat["samples"])).abs().max().item() < 1e-4


def test_remote_endpoint_up_decodes_remotely(comfy: dict, sd15_weights: torch.nn.Module) -> None:
    vae = _comfy_vae(comfy, sd15_weights)
    node = comfy["pack"].NODE_CLASS_MAPPINGS["HybridVAEDecode"]()
    lat = _latent(1, 4, 8, 8, seed=3)
    comfy["mm"].LOAD_CALLS.clear()
    with serve_demo() as base:
        image, text, _ = node.decode(lat, vae, endpoint=f"{base}/sd15", mode="remote")
    assert "remote" in text and "fell back" not in text and "via 127.0.0.1" in text
    assert "endpoint serves this VAE (canary" in text  # the canary proved the demo serves the wired-in weights
    # the remote plan asked ComfyUI for nothing: the one load was the canary's local 64 px decode
    assert [c["memory_required"] for c in comfy["mm"].LOAD_CALLS] == [vae.memory_used_decode((1, 4, 8, 8), vae.vae_dtype)]
    # the demo serves the same sd15 weights: the remote image matches ComfyUI's decode up to 8-bit rounding
    assert (image - vae.decode(lat["samples"])).abs().max().item() <= 1 / 255 + 1e-3


def test_an_endpoint_serving_another_vae_is_refused_unless_allowed(comfy: dict) -> None:
    """The wired-in VAE is not the endpoint's (the demo serves the trained fixture; this one has random weights
    of another shape): the canary refuses remote and the line says why; remote_custom_vae overrides it."""
    vae = _comfy_vae(comfy, build_tiny_vae("sd15", seed=7))
    node = comfy["pack"].NODE_CLASS_MAPPINGS["HybridVAEDecode"]()
    lat = _latent(1, 4, 8, 8, seed=4)
    with serve_demo() as base:
        image, text, _ = node.decode(lat, vae, endpoint=f"{base}/sd15", mode="remote")
        assert "endpoint serves another VAE (canary" in text and "via 127.0.0.1" not in text
        assert (image - vae.decode(lat["samples"])).abs().max().item() < 1e-4  # ComfyUI's own picture
        _, text2, _ = node.decode(lat, vae, endpoint=f"{base}/sd15", mode="remote", remote_custom_vae=True)
    assert "via 127.0.0.1" in text2 and "endpoint serves another VAE" in text2


def test_free_memory_first_counts_what_comfyui_can_unload_on_the_vaes_gpu(comfy: dict) -> None:
    """Other models loaded on the VAE's GPU count as available (ComfyUI unloads them on request); nothing on a
    CPU, and a simulated card is taken as given."""
    import types

    from hybrid_vae.policy.gpu import GiB, GpuState

    nodes = sys.modules[comfy["pack"].__name__ + ".nodes"]
    patcher, unet = object(), object()
    loaded = [types.SimpleNamespace(model=unet, device=torch.device("cuda", 0), model_loaded_memory=lambda: 3 * GiB),
              types.SimpleNamespace(model=patcher, device=torch.device("cuda", 0), model_loaded_memory=lambda: GiB)]
    comfy["mm"].current_loaded_models = loaded
    try:
        gpu_vae = types.SimpleNamespace(device=torch.device("cuda", 0), patcher=patcher)
        assert nodes.freeable_bytes(gpu_vae) == 3 * GiB  # the UNet, not the VAE itself
        assert nodes.freeable_bytes(types.SimpleNamespace(device=torch.device("cpu"), patcher=patcher)) == 0
    finally:
        del comfy["mm"].current_loaded_models
    state = GpuState(device="cuda:0", name="NVIDIA GeForce RTX 3070", total_bytes=8 * GiB, free_bytes=1 * GiB,
                     torch_reusable_bytes=0, source="nvml")
    more = nodes._with_freeable(state, 3 * GiB)
    assert more.free_bytes == 4 * GiB and "ComfyUI can free" in more.note
    assert nodes._with_freeable(dataclasses.replace(state, simulated=True), 3 * GiB).free_bytes == GiB


def test_a_diffusers_first_stage_model_runs_on_the_engines_executors(
        comfy: dict, sd15_weights: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", "name=NVIDIA GeForce RTX 3070,free_gib=0.5")
    vae = _comfy_vae(comfy, sd15_weights, kind="diffusers")
    node = comfy["pack"].NODE_CLASS_MAPPINGS["HybridVAEDecode"]()
    lat = _latent(1, 4, 40, 40, seed=4)
    image, text, _ = node.decode(lat, vae)
    assert "tiled" in text and "engine executors (diffusers VAE)" in text and vae.decode_calls == []
    assert "ComfyUI's decoder" not in text
    with torch.no_grad():
        ref = ((sd15_weights.decode(lat["samples"]).sample.clamp(-1, 1) + 1) / 2).movedim(1, -1)
    assert (image - ref).abs().mean().item() < 0.05


def test_video_vae_gives_frames(comfy: dict) -> None:
    vae = _comfy_vae(comfy, build_tiny_vae("hunyuanvideo"), channels=16, kind="hunyuan")
    node = comfy["pack"].NODE_CLASS_MAPPINGS["HybridVAEDecode"]()
    lat = _latent(1, 16, 2, 8, 8, seed=5)
    image, text, _ = node.decode(lat, vae)
    assert image.shape == (5, 64, 64, 3) and "hunyuanvideo" in text
    ref = vae.decode(lat["samples"])  # [B, T, H, W, C]
    assert (image - ref.reshape(-1, *ref.shape[-3:])).abs().max().item() < 1e-4


def test_flux_and_a_vae_without_a_family(comfy: dict) -> None:
    node = comfy["pack"].NODE_CLASS_MAPPINGS["HybridVAEDecode"]()
    flux = _comfy_vae(comfy, build_tiny_vae("flux"), channels=16, kind="engine")
    image, text, _ = node.decode(_latent(1, 16, 8, 8, seed=6), flux)
    assert image.shape == (1, 64, 64, 3) and "| flux (" in text
    odd = comfy["sd"].VAE(build_tiny_vae("sd15").decoder, latent_channels=4)
    odd.latent_channels, odd.upscale_ratio = 7, 8  # a VAE the engine has no family for
    odd.first_stage_model = type("Odd", (torch.nn.Module,), {"decode": lambda self, z: torch.zeros(
        z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8)})()
    image, text, _ = node.decode({"samples": torch.zeros(1, 7, 4, 4)}, odd)
    assert image.shape == (1, 32, 32, 3) and "ComfyUI vae.decode" in text and "no family" in text


def test_every_plan_failing_saves_the_latent_in_comfyuis_output(comfy: dict, sd15_weights: torch.nn.Module) -> None:
    from hybrid_vae.policy import DecodeFailedError

    vae = _comfy_vae(comfy, sd15_weights)

    def broken(z: torch.Tensor, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("decoder exploded")

    vae.first_stage_model.decode = broken  # type: ignore[method-assign]
    node = comfy["pack"].NODE_CLASS_MAPPINGS["HybridVAEDecode"]()
    with pytest.raises(DecodeFailedError) as err:
        node.decode(_latent(1, 4, 8, 8, seed=7), vae, endpoint=f"http://127.0.0.1:{free_port()}/sd15")
    path = err.value.latent_path
    assert path is not None and path.is_file() and path.parent == comfy["out"] / "hybrid-vae-latents"
    assert "decoder exploded" in str(err.value)


def test_repo_root_is_found_through_the_symlink(comfy: dict) -> None:
    pack = comfy["pack"]
    assert pack.repo_root() == REPO
    assert Path(pack.__file__).parent.is_symlink() or Path(pack.__file__).resolve() != Path(pack.__file__)


def test_the_node_learns_by_default_and_the_learn_input_turns_it_off(comfy: dict, sd15_weights: torch.nn.Module) -> None:
    """A probe that reports a card (not simulated): the decode's time is recorded in the learned file (the session's,
    via HYBRID_VAE_LEARNED, tests/conftest.py) under that card; with ``learn`` off nothing is. (The device string
    is not CUDA, so the plan runs where the VAE is, on the CPU, and no CUDA peak is measured.)"""
    from hybrid_vae.policy.gpu import GiB, GpuState
    from hybrid_vae.policy.learned import LearnedStore

    card = "NVIDIA Test Card (node learning)"
    state = GpuState(device="gpu-on-cpu", name=card, total_bytes=24 * GiB, free_bytes=20 * GiB, source="nvml")
    node_cls = comfy["pack"].NODE_CLASS_MAPPINGS["HybridVAEDecode"]
    assert node_cls.INPUT_TYPES()["optional"]["learn"] == ("BOOLEAN", node_cls.INPUT_TYPES()["optional"]["learn"][1])
    assert node_cls.INPUT_TYPES()["optional"]["learn"][1]["default"] is True
    vae, lat, store = _comfy_vae(comfy, sd15_weights), _latent(1, 4, 16, 16), LearnedStore()

    def count() -> int:
        return sum(e.count for e in store.load().entries.values() if e.card == card and e.family != "*")

    node = node_cls()
    node.decode(lat, vae, free_memory_first=False, learn=False, probe=lambda: state)
    assert count() == 0
    node.decode(lat, vae, free_memory_first=False, probe=lambda: state)
    assert count() == 1 and store.path == node._learned.path
