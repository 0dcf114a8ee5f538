"""Exact HunyuanVideo tiles in the engine: the policy's counts (``policy/video_exact.py``) equal the executor's
ledger; the engine plans them only when lossless tiles are asked for and host memory holds their buffers; the
orchestrator runs them; the simulated world prices them from diffusers' defaults, not the profile."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo
from hybrid_vae.extension.cli_local import psnr
from hybrid_vae.extension.fixture import build_tiny_vae
from hybrid_vae.extension.stream_hunyuan import hunyuan_exact_decode
from hybrid_vae.policy import DecodeJob, DecodeSettings, decide, load_profiles, parse_simulation
from hybrid_vae.policy.learned import learn_path
from hybrid_vae.policy.video_exact import hunyuan_counts, hunyuan_passes, video_exact_counts

P = load_profiles("")


@pytest.mark.parametrize("config", [dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4),
                                    dict(block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=4,
                                         mid_block_add_attention=False)])
@pytest.mark.parametrize(("latent", "tile_px", "tile_frames"), [((3, 5, 7), 16, 4), ((2, 6, 6), 24, 5),
                                                                 ((1, 7, 4), 8, 1), ((3, 4, 9), 1000, 1000)])
def test_the_policys_counts_equal_the_executors_ledger(config, latent, tile_px, tile_frames):
    """Buffers, tile, keys/values, copies: counted from the config alone, equal to what the decode counted."""
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, **config).eval()
    ledger: dict[str, int] = {}
    hunyuan_exact_decode(vae, torch.randn(1, 4, *latent), tile_px=tile_px, tile_frames=tile_frames, ledger=ledger)
    ps = hunyuan_passes(config["block_out_channels"], config["layers_per_block"], latent_channels=4, latent=latent,
                        mid_attention=config.get("mid_block_add_attention", True))
    t, h, w = latent
    c = hunyuan_counts(ps, tile_px=tile_px, tile_frames=tile_frames, out=(1 + 4 * (t - 1), 8 * h, 8 * w))
    assert (c.buffer_elements, c.tile_elements, c.kv_elements, c.moved_elements) == (
        ledger["buffer_elements"], ledger["tile_elements"], ledger.get("kv_elements", 0), ledger["moved_elements"])


@pytest.mark.parametrize("share", [0.0, 0.3, 0.6, 10.0])
def test_buffers_placed_on_the_device_are_counted_as_the_executor_places_them(share):
    """With a device budget (a share of the widest buffers), the buffers each side holds at once and the elements
    copied over the host link, counted from the config, equal the decode's ledger; more budget, fewer copies; the
    frames still equal the full decode, and the finished video is in host memory whatever the budget."""
    torch.manual_seed(0)
    config = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, **config).eval()
    latent, tile_px, tile_frames = (3, 5, 7), 16, 4
    ps = hunyuan_passes(config["block_out_channels"], config["layers_per_block"], latent_channels=4, latent=latent)
    t, h, w = latent
    out = (1 + 4 * (t - 1), 8 * h, 8 * w)
    none = hunyuan_counts(ps, tile_px=tile_px, tile_frames=tile_frames, out=out)
    budget = int(share * none.buffer_elements)
    c = hunyuan_counts(ps, tile_px=tile_px, tile_frames=tile_frames, out=out, device_budget=budget)
    ledger: dict[str, int] = {}
    z = torch.randn(1, 4, *latent)
    got = hunyuan_exact_decode(vae, z, tile_px=tile_px, tile_frames=tile_frames, device_budget=budget * 4,
                               ledger=ledger)
    assert (c.device_buffer_elements, c.host_buffer_elements, c.host_moved_elements) == (
        ledger.get("device_buffer_elements", 0), ledger.get("host_buffer_elements", 0),
        ledger.get("host_moved_elements", 0))
    assert c.device_buffer_elements <= budget and c.buffers - 1 in c.host
    assert (c.buffer_elements, c.tile_elements, c.moved_elements) == (
        ledger["buffer_elements"], ledger["tile_elements"], ledger["moved_elements"])
    if share == 0:
        assert c.host == frozenset(range(c.buffers)) and c.device_buffer_elements == 0
        assert 0 < c.moved_elements - c.host_moved_elements < c.moved_elements / 100  # all but the latent's reads
    else:
        assert c.host_moved_elements < none.host_moved_elements and c.device_buffer_elements > 0
    if share > 1:  # everything but the finished video on the device: its one write crosses the link
        assert c.host == {c.buffers - 1} and c.host_moved_elements == 3 * out[0] * out[1] * out[2]
    with torch.no_grad():
        full = vae.decoder(vae.post_quant_conv(z))
    assert psnr(got, full) >= 100, psnr(got, full)


def test_the_profile_and_the_world_describe_diffusers_default_decoder():
    """The engine reads the profile's decoder fields, the world its own constants; both are diffusers' defaults
    (so neither can drift from the class unnoticed, and a wrong profile would not move the world's truth)."""
    from hybrid_vae.bench.world_exact3d import DECODER, TILE_FRAMES

    d = {k: v.default for k, v in inspect.signature(AutoencoderKLHunyuanVideo.__init__).parameters.items()}
    assert DECODER == (tuple(d["block_out_channels"]), d["layers_per_block"], d["latent_channels"])
    fam = P.family("hunyuanvideo")
    assert (tuple(fam.decoder_widths or ()), fam.decoder and fam.decoder.layers_per_block) == DECODER[:2]
    assert fam.tiling.exact_tile_frames == TILE_FRAMES
    assert inspect.signature(hunyuan_exact_decode).parameters["tile_frames"].default == TILE_FRAMES


def _gpu(free: float, host: float | None) -> object:
    h = "" if host is None else f",host_gib={host}"
    return parse_simulation(f"name=NVIDIA GeForce RTX 4090,free_gib={free}{h}")


def test_the_engine_plans_exact_hunyuan_tiles_only_when_asked_and_host_memory_holds_them():
    job = DecodeJob("hunyuanvideo", 960, 544, frames=61)
    exact = DecodeSettings(tile_groupnorm="exact")
    auto = decide(job, _gpu(8, 48), P)
    assert all(o.plan.groupnorm != "exact" for o in auto.options)
    d = decide(job, _gpu(8, 48), P, exact)
    c = d.chosen
    assert c.groupnorm == "exact" and c.offloaded and c.label.endswith("exact+host"), c.label
    assert learn_path(c) == "tiled-exact3d"
    assert c.estimate.peak_bytes <= d.budget_bytes
    fam = P.family("hunyuanvideo")
    assert c.device_budget and c.estimate.peak_bytes > d.budget_bytes * 0.7  # the budget's buffers on the GPU...
    counted = video_exact_counts(job, fam, c.tile_px or 0, device_budget=c.device_budget // 2)
    none = video_exact_counts(job, fam, c.tile_px or 0)
    assert counted.device_buffer_elements > 0 and c.estimate.host_bytes == counted.host_buffer_elements * 2
    assert c.estimate.transfer_bytes == counted.host_moved_elements * 2 < none.host_moved_elements * 2  # ...fewer copies
    assert "GiB of whole-video buffers in host memory (up to" in d.reason and "s, overlapped)" in d.reason
    every = next(o.plan for o in d.options if o.plan.label == f"tiled {c.tile_px}px exact+host (all)")
    assert every.estimate.host_bytes == none.buffer_elements * 2 and every.estimate.seconds > c.estimate.seconds
    exact_first = [p.groupnorm for p in d.plans if p.path == "tiled"]  # the chain: diffusers' tiles after exact ones
    assert exact_first == sorted(exact_first) and exact_first[-1] == "local", exact_first
    assert d.plans[-1].path == "cpu"  # ...as the fallback before the CPU
    assert decide(job, _gpu(8, 48), P, DecodeSettings(tile_groupnorm="offload")).chosen.label == c.label
    for host in (24, None):  # 30 GiB of buffers do not fit (or host memory is unknown): diffusers' tiles, said why
        small = decide(job, _gpu(8, host), P, exact)
        assert small.chosen.groupnorm == "local" and small.chosen.frame_chunk is not None
        refused = [o for o in small.options if o.plan.path == "tiled" and o.plan.groupnorm == "exact"]
        assert refused and not any(o.feasible for o in refused) and any("host memory" in o.why for o in refused)
        assert "no lossless plan fits" in small.reason


def test_tiles_one_latent_frame_long_fit_where_the_default_ones_do_not(monkeypatch):
    """61 frames of 512x320 on an RTX 3080 with 2.5 GiB free and 16 GiB of host memory, ``exact``: 16-frame 3-D
    tiles need 3.8 GiB and more on the GPU, tiles of 4 frames (one latent frame's worth) from 1.2 GiB: those run, priced
    with more copies and steps (counted for 4 frames); the executor gets the plan's frames."""
    from hybrid_vae.extension import executors
    from hybrid_vae.extension.executors import run_plan

    job = DecodeJob("hunyuanvideo", 512, 320, frames=61)
    fam = P.family("hunyuanvideo")
    sim = parse_simulation("name=NVIDIA GeForce RTX 3080,free_gib=2.5,host_gib=16")
    d = decide(job, sim, P, DecodeSettings(tile_groupnorm="exact"))
    c = d.chosen
    assert c.offloaded and c.tile_frames == 4 and c.label.startswith(f"tiled {c.tile_px}px x 4 frames exact+host")
    default = [o for o in d.options if o.plan.path == "tiled" and o.plan.offloaded and o.plan.tile_frames is None]
    assert default and not any(o.feasible for o in default)
    same = next(o.plan for o in default if o.plan.tile_px == c.tile_px and o.plan.device_budget == 0)
    every = next(o for o in d.options if o.plan.label == f"tiled {c.tile_px}px x 4 frames exact+host (all)")
    assert every.feasible
    four, sixteen = (video_exact_counts(job, fam, c.tile_px or 0, f) for f in (4, None))
    assert four.tile_elements < sixteen.tile_elements / 2 and four.moved_elements > sixteen.moved_elements
    assert every.plan.estimate.transfer_bytes == four.host_moved_elements * 2 > same.estimate.transfer_bytes
    assert every.plan.estimate.peak_bytes < same.estimate.peak_bytes / 2
    seen: list[int] = []
    real = executors.hunyuan_exact_decode

    def spy(*a, **kw):
        seen.append(kw["tile_frames"])
        return real(*a, **kw)

    monkeypatch.setattr(executors, "hunyuan_exact_decode", spy)
    vae = build_tiny_vae("hunyuanvideo")
    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = vae.decoder(vae.post_quant_conv(z))
    out = run_plan(dataclasses.replace(c, tile_px=16), vae, z, family=fam)  # the plan's frames on a tiny video
    assert seen == [4] and psnr(out, full.clamp(-1, 1)) >= 100


def test_the_orchestrator_decodes_a_hunyuan_video_with_exact_tiles_when_asked(tmp_path):
    """End to end: HybridDecoder on a simulated card where the full decode does not fit, ``tile_groupnorm="exact"``
    and host memory for the buffers: exact 3-D tiles run and the frames equal diffusers' full decode."""
    from hybrid_vae.extension.latents import to_vae_space
    from hybrid_vae.extension.orchestrator import HybridDecoder

    vae = build_tiny_vae("hunyuanvideo")
    fam = P.family("hunyuanvideo")
    z = torch.randn(1, 16, 3, 40, 48, generator=torch.Generator().manual_seed(4))  # 9 x 320x384 float32: full needs ~7.3 GiB
    dec = HybridDecoder(probe=lambda: parse_simulation("name=NVIDIA GeForce RTX 3070,free_gib=3,host_gib=32"),
                        latent_dir=tmp_path, settings=DecodeSettings(tile_groupnorm="exact"))
    res = dec.decode(z, vae, family="hunyuanvideo")
    r = res.report
    assert r.ran.path == "tiled" and r.ran.groupnorm == "exact" and r.ran.offloaded, r.ran.label
    with torch.no_grad():
        full = vae.decode(to_vae_space(z, fam)).sample.clamp(-1, 1)
    assert psnr(res.tensor, full) >= 100


def test_the_world_prices_the_engines_plan_from_its_own_counts():
    from hybrid_vae.bench import truth
    from hybrid_vae.bench.matrix import scenarios
    from hybrid_vae.bench.world import Exec, World

    job = DecodeJob("hunyuanvideo", 960, 544, frames=33)
    d = decide(job, _gpu(8, 48), P, DecodeSettings(tile_groupnorm="exact"))
    fam = P.family("hunyuanvideo")
    every = next(o.plan for o in d.options if o.plan.label == "tiled 256px exact+host (all)")
    ex = Exec.from_plan(every, fam, 1)
    assert ex.kind == "tiled-exact3d" and "tiled-exact3d" in truth.KINDS and ex.budget == 0
    world = World(P)
    sc = next(s for s in scenarios(P, "scoring") if s.family == "hunyuanvideo" and s.frames == 33 and s.batch == 1)
    t = truth.of(world, sc, ex)
    full = truth.of(world, sc, Exec("full", items=1))
    assert t.host_bytes > 0 and t.gpu_bytes < full.gpu_bytes and t.seconds > full.seconds
    four = dataclasses.replace(ex, tile_frames=4)  # 4-frame tiles: counted as such, a key of their own
    t4 = truth.of(world, sc, four)
    assert four.key != ex.key and t4.gpu_bytes < t.gpu_bytes / 2 and t4.host_bytes == t.host_bytes
    # the chosen plan keeps some buffers on the GPU: the world counts them there (the executor's placement for the
    # plan's budget), with fewer bytes over the link
    part = Exec.from_plan(d.chosen, fam, 1)
    assert d.chosen.device_budget and part.budget == d.chosen.device_budget and part.key != four.key
    kept, none = truth.of(world, sc, part), truth.of(world, sc, dataclasses.replace(part, budget=0))
    assert kept.gpu_bytes > none.gpu_bytes and kept.host_bytes <= none.host_bytes and kept.seconds < none.seconds


def test_with_room_on_the_gpu_the_buffers_stay_there_and_nothing_crosses_the_link():
    """``exact`` with the whole-video buffers fitting the budget: exact tiles with every buffer on the GPU (no
    copies) or, as fast, all but the finished video there; both well before the plans with every buffer in host
    memory; ``offload`` never keeps them all on the GPU; the world prices the on-GPU plan without copies and
    run_plan runs it (buffers on the compute device)."""
    from hybrid_vae.bench import truth
    from hybrid_vae.bench.world import Exec, World
    from hybrid_vae.extension.executors import run_plan

    job = DecodeJob("hunyuanvideo", 960, 544, frames=33)
    d = decide(job, _gpu(22, 48), P, DecodeSettings(tile_groupnorm="exact"))
    c = next(o.plan for o in d.options if o.feasible and o.plan.label.endswith("px exact"))
    assert not c.offloaded and c.estimate.host_bytes == 0, c.label
    host_plans = [o.plan for o in d.options if o.plan.label.endswith("exact+host (all)")]
    assert host_plans and all(p.estimate.seconds > 2 * c.estimate.seconds for p in host_plans)
    assert d.chosen.estimate.seconds <= c.estimate.seconds * 1.05
    assert (d.chosen.estimate.transfer_bytes or 0) < min(p.estimate.transfer_bytes or 0 for p in host_plans) / 10
    assert decide(job, _gpu(22, 48), P, DecodeSettings(tile_groupnorm="offload")).chosen.offloaded
    ex, ex_host = (Exec.from_plan(p, P.family("hunyuanvideo"), 1) for p in (c, host_plans[0]))
    assert ex.kind == ex_host.kind == "tiled-exact3d" and ex.key != ex_host.key
    world = World(P)
    from hybrid_vae.bench.matrix import scenarios

    sc = next(s for s in scenarios(P, "scoring") if s.family == "hunyuanvideo" and s.frames == 33 and s.batch == 1)
    on_gpu, on_host = truth.of(world, sc, ex), truth.of(world, sc, ex_host)
    assert on_gpu.host_bytes == 0 and on_gpu.gpu_bytes > on_host.host_bytes > 0 and on_gpu.seconds < on_host.seconds
    vae = build_tiny_vae("hunyuanvideo")
    z = torch.randn(1, 16, 2, 5, 6, generator=torch.Generator().manual_seed(2))
    import dataclasses

    with torch.no_grad():
        got = run_plan(dataclasses.replace(c, tile_px=16), vae, z, family=P.family("hunyuanvideo"))
        full = vae.decode(z).sample.clamp(-1, 1)
    assert psnr(got, full) >= 100


def test_exact_video_tiles_are_learned_under_their_own_keys(tmp_path):
    """A decode of exact HunyuanVideo tiles (host buffers) on a real card is learned under ``tiled-exact3d`` (and
    exact Wan tiles under ``tiled-halo``): the next decision's plan carries the factor; an image exact-tile entry of
    the same card does not scale it."""
    from hybrid_vae.policy.gpu import GiB, GpuState
    from hybrid_vae.policy.learned import LearnedStore

    card = "NVIDIA GeForce RTX 4090"
    gpu = GpuState(name=card, total_bytes=24 * GiB, free_bytes=8 * GiB, source="nvml", device="cuda:0",
                   host_available_bytes=48 * GiB, host_total_bytes=64 * GiB)
    job, s = DecodeJob("hunyuanvideo", 960, 544, frames=33), DecodeSettings(tile_groupnorm="exact")
    store = LearnedStore(tmp_path / "learned.json")
    for _ in range(3):
        snap = store.load()
        d = decide(job, gpu, P, s, learned=snap)
        assert learn_path(d.chosen) == "tiled-exact3d"
        raw = d.chosen.estimate.seconds / snap.factor(card, "hunyuanvideo", "tiled-exact3d", 33 * 960 * 544)[0]
        assert store.record_decision(d, d.chosen, 1.5 * raw, applied=snap) is not None
    d = decide(job, gpu, P, s, learned=store.load())
    assert "learned from 3 decodes" in d.chosen.estimate.seconds_source and d.chosen.offloaded
    wan = decide(DecodeJob("wan", 1280, 720, frames=61), gpu, P, s).chosen
    assert learn_path(wan) == "tiled-halo"
    assert store.record_decision(decide(DecodeJob("wan", 1280, 720, frames=61), gpu, P, s), wan, 10.0,
                                 applied=None) is not None
