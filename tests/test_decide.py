"""decide(): the issue's must-show cases and property tests over random jobs and GPU states."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hybrid_vae.policy import (
    DecodeJob,
    DecodeSettings,
    GiB,
    GpuState,
    LatentError,
    NetworkStats,
    ProfileError,
    decide,
    load_profiles,
    parse_simulation,
)
from hybrid_vae.policy.decide import NEAR_FIT, _actual_tile, claim_bytes
from hybrid_vae.policy.estimate import peak_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

P = load_profiles("")
CARDS = [g.name for g in P.gpus] + ["Some Unprofiled GPU"]


def card(name: str, free_gib: float, total_gib: float | None = None, reusable_gib: float = 0.0) -> GpuState:
    prof = P.gpu(name)
    total = total_gib or (prof.total_gib if prof else max(free_gib, 8.0))
    return GpuState(name=name, total_bytes=int(total * GiB), free_bytes=int(free_gib * GiB),
                    torch_reusable_bytes=int(reusable_gib * GiB), source="simulated", simulated=True)


SDXL = DecodeJob("sdxl", 1024, 1024)


def test_claim_bytes_is_the_estimate_and_reserve_or_the_near_fit_floor():
    """What the orchestrator claims before a plan runs: the estimate and the reserve when it fits the budget (so a
    reserve that went elsewhere since the probe is a refused claim, not an OOM); the estimate alone when it fits only
    what is available (into the reserve); else (and for the last GPU plan before the CPU) the least the near-fit
    band says it may need; nothing off the GPU."""
    d = decide(SDXL, card("NVIDIA GeForce RTX 3070", 3), P, DecodeSettings(allow_remote=False))
    gpu = [p for p in d.plans if p.path in ("full", "tiled")]
    e, reserve = gpu[0].estimate.peak_bytes, DecodeSettings().reserve_bytes
    assert e <= d.budget_bytes and d.available_bytes - d.budget_bytes == reserve
    assert claim_bytes(gpu[0], d) == e + reserve <= d.available_bytes
    squeezed = dataclasses.replace(d, budget_bytes=e - 1)
    assert claim_bytes(gpu[0], squeezed) == e
    above = dataclasses.replace(d, available_bytes=e - 1, budget_bytes=e - 1 - reserve)
    assert claim_bytes(gpu[0], above) == math.ceil(e / NEAR_FIT) == claim_bytes(gpu[0], d, floor=True) < e
    assert all(claim_bytes(p, d) == 0 for p in d.plans if p.path == "cpu")
    assert any(p.path == "cpu" for p in d.plans)


def test_a_fragmented_torch_cache_is_not_counted_as_available():
    """Free blocks inside segments that hold live tensors (PyTorch's inactive split bytes) cannot give a large
    block: the decision counts the cache without them, and a refused claim caps the usable cache first."""
    g = dataclasses.replace(card("NVIDIA GeForce RTX 3070", 1.0, reusable_gib=2.0), torch_fragmented_bytes=int(1.5 * GiB))
    assert g.usable_cache_bytes == int(0.5 * GiB) and g.available_bytes == int(1.5 * GiB)
    d = decide(SDXL, g, P)
    assert d.available_bytes == g.available_bytes
    assert "1.50 GiB available (1.00 GiB free + 0.50 GiB cache; 1.50 GiB more fragmented, not counted)" in d.reason
    c = g.capped(int(1.2 * GiB), "claim refused")
    assert (c.free_bytes, c.usable_cache_bytes, c.available_bytes) == (g.free_bytes, int(0.2 * GiB), int(1.2 * GiB))
    assert dataclasses.replace(g, torch_fragmented_bytes=3 * GiB).available_bytes == g.free_bytes


def test_4090_20gib_full():
    d = decide(SDXL, card("NVIDIA GeForce RTX 4090", 20), P, DecodeSettings(allow_remote=False))
    assert d.chosen.path == "full"
    assert d.gpu_profile == "NVIDIA GeForce RTX 4090"
    assert d.plans[-1].path == "cpu"


def test_3070_1gib_largest_fitting_tile():
    s = DecodeSettings(allow_remote=False)
    d = decide(SDXL, card("NVIDIA GeForce RTX 3070", 1.0), P, s)
    c = d.chosen
    assert c.path == "tiled"
    assert c.estimate.peak_bytes <= 1.0 * GiB - s.reserve_bytes
    fam = P.family("sdxl")
    # no larger tile fits: every larger cap either runs the same tiles or exceeds the budget
    for cap in range(c.tile_px + 8, 1024, 8):
        tile = _actual_tile(SDXL, fam, cap, c.overlap_px)
        if tile == c.tile_px:
            continue
        need = peak_bytes(SDXL, fam, tile_px=tile, overlap_px=c.overlap_px, frame_chunk=None, slice_batch=True)
        assert need > d.budget_bytes, (cap, tile, need)


def test_tiny_free_remote_or_cpu():
    g = card("NVIDIA GeForce RTX 3070", 0.1)
    d = decide(SDXL, g, P, DecodeSettings(allow_remote=True))
    assert d.chosen.path == "remote"
    assert d.chosen.endpoint.startswith("https://")
    d = decide(SDXL, g, P, DecodeSettings(allow_remote=False))
    assert d.plans[-1].path == "cpu"
    assert all(p.path != "remote" for p in d.plans)


def test_batch_prefers_item_by_item_over_tiling():
    # 4 x 1024 fp16 needs ~8.4 GiB at once, ~2.4 GiB one by one
    job = DecodeJob("sd15", 1024, 1024, batch=4, dtype="float16")
    d = decide(job, card("NVIDIA H200", 4.0, total_gib=140), P, DecodeSettings())
    assert d.chosen.path == "full" and d.chosen.slice_batch
    assert "one at a time" in d.reason


def test_video_temporal_chunks_before_spatial_tiles():
    job = DecodeJob("hunyuanvideo", 512, 320, frames=61, dtype="float16")
    d = decide(job, card("NVIDIA GeForce RTX 4090", 12), P, DecodeSettings())
    c = d.chosen
    assert c.path == "tiled" and c.frame_chunk == 4 and c.tile_px is None  # 8.9 GiB chunked fits, 31 GiB full does not
    # less memory: shorter temporal chunks of whole frames first, then spatial tiles
    d = decide(job, card("NVIDIA GeForce RTX 4090", 5), P, DecodeSettings())
    assert d.chosen.tile_px is None and d.chosen.frame_chunk < 4
    d = decide(job, card("NVIDIA GeForce RTX 4090", 2.5), P, DecodeSettings())
    assert d.chosen.tile_px is not None


def test_forced_modes_keep_fallbacks_and_never_exceed():
    g = card("NVIDIA GeForce RTX 3070", 1.0)
    d = decide(SDXL, g, P, DecodeSettings(mode="full"))
    assert d.chosen.path == "tiled" and d.reason.startswith("full requested but")
    d = decide(SDXL, card("NVIDIA GeForce RTX 4090", 20), P, DecodeSettings(mode="tiled"))
    assert d.chosen.path == "tiled" and d.plans[-1].path == "cpu"
    d = decide(SDXL, card("NVIDIA GeForce RTX 4090", 20), P, DecodeSettings(mode="remote", allow_remote=True))
    assert d.chosen.path == "remote" and any(p.path == "full" for p in d.fallbacks)
    d = decide(SDXL, card("NVIDIA GeForce RTX 4090", 20), P, DecodeSettings(mode="remote"))
    assert d.chosen.path == "full" and "remote requested but remote decode is off" in d.reason


def test_remote_rules():
    g = card("NVIDIA GeForce RTX 3070", 0.1)
    custom = dataclasses.replace(SDXL, custom_vae=True, vae_id="my/finetune")
    d = decide(custom, g, P, DecodeSettings(allow_remote=True))
    assert d.chosen.path == "cpu" and "custom VAE" in d.reason
    d = decide(custom, g, P, DecodeSettings(allow_remote=True, allow_remote_custom_vae=True))
    assert d.chosen.path == "remote"
    wan = DecodeJob("wan", 832, 480, frames=81)
    d = decide(wan, g, P, DecodeSettings(allow_remote=True))
    assert all(p.path != "remote" for p in d.plans) and "no endpoint serves wan" in d.reason
    d = decide(wan, g, P, DecodeSettings(allow_remote=True, endpoints={"wan": "http://127.0.0.1:9000/wan"}))
    assert d.chosen.path == "remote" and d.chosen.endpoint == "http://127.0.0.1:9000/wan"
    down = {d.chosen.endpoint: NetworkStats(available=False, note="circuit open after 3 failures")}
    d2 = decide(wan, g, P, DecodeSettings(allow_remote=True, endpoints={"wan": "http://127.0.0.1:9000/wan"}), down)
    assert d2.chosen.path == "cpu"


def test_response_format_follows_bandwidth():
    g = card("NVIDIA GeForce RTX 3070", 0.1)
    s = DecodeSettings(allow_remote=True, remote_quality="high")
    fast = decide(SDXL, g, P, s, NetworkStats(rtt_s=0.001, down_bytes_per_s=5e9 / 8, up_bytes_per_s=5e9 / 8, source="measured"))
    slow = decide(SDXL, g, P, s, NetworkStats(rtt_s=0.15, down_bytes_per_s=10e6 / 8, up_bytes_per_s=10e6 / 8, source="measured"))
    assert fast.chosen.response_format == "raw"
    assert slow.chosen.response_format == "jpg"
    lossless = decide(SDXL, g, P, DecodeSettings(allow_remote=True), NetworkStats(down_bytes_per_s=10e6 / 8))
    assert lossless.chosen.response_format in ("raw", "png")


def test_reusable_cache_counts():
    job = DecodeJob("sd15", 1024, 1024, dtype="float16")
    d1 = decide(job, card("NVIDIA GeForce RTX 3070", 1.5), P)
    d2 = decide(job, card("NVIDIA GeForce RTX 3070", 1.5, reusable_gib=1.5), P)
    assert d1.chosen.path == "tiled" and d2.chosen.path == "full"


def test_no_gpu_is_cpu():
    cpu = GpuState(name="cpu", total_bytes=0, free_bytes=0, source="cpu", note="no CUDA")
    d = decide(SDXL, cpu, P)
    assert [p.label for p in d.plans] == ["cpu", "cpu 512px exact", "cpu 256px/64"]
    assert [p.label for p in decide(SDXL, cpu, P, DecodeSettings(tile_groupnorm="local")).plans] == [
        "cpu", "cpu 256px/64"]


def test_cpu_plans_bound_host_memory():
    """The CPU plans: one item at a time (video: the VAE's temporal chunks), then (images) exact tiles with the
    whole-image buffers in host memory, then local tiles (video: then those tiles one latent frame at a time), so a
    host without ~15 GiB free for a 2048 px float32 decode still gets the image (docs/benchmarks.md: lost on host
    memory), without tile drift where the exact tiles' buffers fit."""
    from hybrid_vae.policy.estimate import CPU_EXACT_FACTOR, cpu_exact_host_bytes

    cpu = GpuState(name="cpu", total_bytes=0, free_bytes=0, source="cpu", note="no CUDA")
    job = DecodeJob("sdxl", 2048, 2048, batch=2)
    d = decide(job, cpu, P)
    first, exact, tiled = d.plans
    assert first.slice_batch and first.tile_px is None and first.dtype == "float32"
    assert exact.path == "cpu" and exact.groupnorm == "exact" and exact.tile_px == 512 and exact.dtype == "float32"
    assert exact.estimate.seconds == pytest.approx(first.estimate.seconds * CPU_EXACT_FACTOR)
    assert exact.estimate.host_bytes == cpu_exact_host_bytes(job, P.family("sdxl"), 512)
    assert tiled.estimate.host_bytes < exact.estimate.host_bytes < first.estimate.host_bytes
    assert tiled.path == "cpu" and tiled.tile_px == 248 and tiled.slice_batch  # equalised tiles under a 256 cap
    assert tiled.estimate.seconds > exact.estimate.seconds > first.estimate.seconds  # overlaps decoded twice
    why = {o.plan.label: o.why for o in d.options}
    assert why["cpu 512px exact"].startswith("last resort, exact tiles: whole-image buffers in host memory")
    # a host that holds the exact tiles' buffers but not a whole decode: exact before the full decode
    host = int(exact.estimate.host_bytes + DecodeSettings().host_reserve_bytes + GiB)
    short = decide(job, dataclasses.replace(cpu, host_available_bytes=host), P)
    assert [p.label for p in short.plans] == ["cpu 512px exact", "cpu 248px/64", "cpu"]
    v = decide(DecodeJob("hunyuanvideo", 960, 544, frames=61), cpu, P)
    assert [p.label for p in v.plans] == ["cpu 4-latent-frame chunks", "cpu 256px/64, 4-latent-frame chunks",
                                          "cpu 256px/64, 1-latent-frame chunks"]
    assert v.plans[0].estimate.host_bytes > v.plans[1].estimate.host_bytes > v.plans[2].estimate.host_bytes
    small = decide(DecodeJob("sd15", 256, 256), cpu, P)
    assert [p.label for p in small.plans] == ["cpu"]  # nothing to tile


@pytest.mark.parametrize(("job", "match"), [
    (DecodeJob("sdxl", 1004, 1024), "width=1004"),
    (DecodeJob("sdxl", 1024, 1024, frames=9), "image family"),
    (DecodeJob("hunyuanvideo", 512, 320, frames=10), "frames=10"),
    (DecodeJob("hunyuanvideo", 512, 320), "frames=None"),
    (DecodeJob("sd15", 512, 512, batch=0), "batch=0"),
])
def test_bad_jobs(job, match):
    with pytest.raises(LatentError, match=match):
        decide(job, card("NVIDIA GeForce RTX 4090", 20), P)


def test_unknown_family():
    with pytest.raises(ProfileError, match="known families: flux, hunyuanvideo, sd15, sd3, sdxl, wan"):
        decide(DecodeJob("sd9", 512, 512), card("NVIDIA GeForce RTX 4090", 20), P)


def test_decision_is_frozen_and_json_ready():
    import json
    d = decide(SDXL, card("NVIDIA GeForce RTX 3070", 1.0), P)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.reason = "x"  # type: ignore[misc]
    out = json.loads(json.dumps(d.to_dict()))
    assert out["decision"]["path"] == "tiled" and out["gpu"]["source"] == "simulated"
    assert all("feasible" in o and "why" in o for o in out["options"])


# ---------------------------------------------------------------- properties


@st.composite
def jobs(draw):
    fam = draw(st.sampled_from(sorted(P.families)))
    f = P.family(fam)
    if f.video:
        w = draw(st.integers(16, 160)) * 8
        h = draw(st.integers(16, 96)) * 8
        frames = 1 + 4 * draw(st.integers(0, 32))
    else:
        w = draw(st.integers(32, 320)) * 8
        h = draw(st.integers(32, 320)) * 8
        frames = None
    return DecodeJob(fam, w, h, batch=draw(st.integers(1, 4)), frames=frames,
                     dtype=draw(st.sampled_from([None, "float16", "bfloat16", "float32"])),
                     vae_resident=draw(st.booleans()))


free_gib = st.floats(0.0, 48.0, allow_nan=False)
settings_st = st.builds(DecodeSettings, allow_remote=st.booleans(), reserve_bytes=st.integers(0, 2 * GiB),
                        tile_overlap_px=st.sampled_from([0, 32, 64, 128]),
                        tile_groupnorm=st.sampled_from(["auto", "exact", "local"]))
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _state(name, free, reusable=0.0):
    return GpuState(name=name, total_bytes=int(64 * GiB), free_bytes=int(free * GiB),
                    torch_reusable_bytes=int(reusable * GiB), source="simulated", simulated=True)


@PROPS
@given(job=jobs(), name=st.sampled_from(CARDS), free=free_gib, reusable=st.floats(0, 2), s=settings_st)
def test_chosen_local_plan_always_fits(job, name, free, reusable, s):
    d = decide(job, _state(name, free, reusable), P, s)
    c = d.chosen
    if c.path in ("full", "tiled"):
        if d.reason_code == "near_fit":  # nothing fits; within NEAR_FIT of what is available, the CPU far worse
            assert c.estimate.peak_bytes <= NEAR_FIT * d.available_bytes
            assert not [o for o in d.options if o.feasible and o.plan.path in ("full", "tiled")]
        else:
            assert c.estimate.peak_bytes <= d.available_bytes
        fits_budget = [o for o in d.options if o.feasible and o.plan.path in ("full", "tiled")]
        if d.reason_code == "tight_faster":  # into the reserve on purpose: lossless, much faster, the budget's next
            behind = d.plans[1]
            assert c.path == "full" or c.groupnorm == "exact"
            assert c.estimate.seconds * s.tight_speedup < behind.estimate.seconds
            assert behind.path not in ("full", "tiled") or behind.estimate.peak_bytes <= d.budget_bytes
        elif fits_budget:
            assert c.estimate.peak_bytes <= d.budget_bytes
    # every local GPU fallback after a GPU plan needs less memory than the plans before it
    last = None
    for p in d.plans:
        if p.path in ("full", "tiled"):
            if last is not None:
                assert p.estimate.peak_bytes < last
            last = p.estimate.peak_bytes
    assert d.plans[-1].path == "cpu"


@PROPS
@given(job=jobs(), name=st.sampled_from(CARDS), f1=free_gib, f2=free_gib, s=settings_st)
def test_more_free_memory_never_worse(job, name, f1, f2, s):
    """More memory never gives a slower plan, counting a local-tiled image plan's seconds x
    ``exact_tolerance`` under ``tile_groupnorm="auto"`` (the price put on its colour drift), never a
    smaller tile of the same kind, and never local tiles where exact ones (or full) ran before. A plan chosen into
    the reserve (``tight_faster``) is a gamble taken only while it is ``tight_speedup`` faster than the budget's
    choice, so the comparison is with what the budget chose (with more memory the gamble may not be worth it)."""
    lo, hi = sorted((f1, f2))
    da, db = decide(job, _state(name, lo), P, s), decide(job, _state(name, hi), P, s)
    a = da.plans[1] if da.reason_code == "tight_faster" else da.chosen
    b = db.plans[1] if db.reason_code == "tight_faster" else db.chosen
    local = {"local"} if not P.family(job.family).video else set()

    def weighted(p):
        tol = s.exact_tolerance if (s.tile_groupnorm == "auto" and p.path == "tiled" and p.groupnorm in local) else 1.0
        return p.estimate.seconds * tol

    assert weighted(b) <= weighted(a) * (1 + 1e-9)
    if a.path == "tiled" and b.path == "tiled" and a.tile_px and b.tile_px and a.groupnorm == b.groupnorm:
        assert b.tile_px >= a.tile_px
    if a.path == "full" or a.groupnorm == "exact":
        assert not (b.path == "tiled" and b.groupnorm in local and s.tile_groupnorm == "auto"
                    and b.estimate.seconds * s.exact_tolerance >= a.estimate.seconds)


@PROPS
@given(job=jobs(), name=st.sampled_from(CARDS), free=free_gib,
       mode=st.sampled_from(["auto", "full", "tiled", "remote"]))
def test_no_remote_is_never_remote(job, name, free, mode):
    d = decide(job, _state(name, free), P, DecodeSettings(allow_remote=False, mode=mode))
    assert all(p.path != "remote" for p in d.plans)
    assert all(not o.plan.path == "remote" for o in d.options)


@PROPS
@given(job=jobs(), name=st.sampled_from(CARDS), free=free_gib)
def test_pure_same_inputs_same_decision(job, name, free):
    g = _state(name, free)
    assert decide(job, g, P).to_dict() == decide(job, g, P).to_dict()


def test_squeezed_full_says_so():
    job = DecodeJob("sd15", 256, 256, dtype="float16")  # 0.15 GiB, no tile smaller than the image
    d = decide(job, card("NVIDIA GeForce RTX 3070", 0.17), P,
               DecodeSettings(reserve_bytes=64 * 2**20, tile_groupnorm="local"))
    assert d.chosen.path == "full" and d.reason.startswith("squeezed into the reserve: full")


def test_a_lossless_plan_goes_into_the_reserve_only_when_much_faster_and_the_reason_says_so():
    """``tight_speedup``: a lossless plan that fits what is available but not the budget goes first when estimated
    that many times faster than the budget's choice, which goes right after it; it claims its estimate alone (the
    reserve is what it uses); never a local-tile plan; off with None."""
    job = DecodeJob("sd15", 256, 256, dtype="float32")
    g = card("NVIDIA GeForce RTX 3070", 0.28)
    d = decide(job, g, P, DecodeSettings(min_tile_px=64))
    budget_only = decide(job, g, P, DecodeSettings(min_tile_px=64, tight_speedup=None))
    t, behind = d.chosen, budget_only.chosen
    assert d.reason_code == "tight_faster" and budget_only.reason_code != "tight_faster"
    assert t.groupnorm == "exact" and d.budget_bytes < t.estimate.peak_bytes <= d.available_bytes
    assert t.estimate.seconds * DecodeSettings().tight_speedup < behind.estimate.seconds  # type: ignore[operator]
    assert d.plans[1] == behind and behind.estimate.peak_bytes <= d.budget_bytes
    assert claim_bytes(t, d) == t.estimate.peak_bytes and claim_bytes(behind, d) > behind.estimate.peak_bytes
    assert (f"into the reserve: {t.label} needs" in d.reason and f"faster than {behind.label}" in d.reason
            and "), which goes next; output equals a full decode" in d.reason), d.reason
    assert d.summary.startswith(f"{t.label}, into the reserve:"), d.summary
    # a speed-up it cannot reach, and local tiles only: the budget's choice
    ratio = behind.estimate.seconds / t.estimate.seconds
    assert decide(job, g, P, DecodeSettings(min_tile_px=64, tight_speedup=ratio * 1.01)).chosen == behind
    assert decide(job, g, P, DecodeSettings(min_tile_px=64, tile_groupnorm="local")).reason_code != "tight_faster"


def test_local_tiles_over_a_fitting_exact_plan_only_when_much_faster_and_the_reason_says_so():
    job = DecodeJob("sd15", 256, 256, dtype="float32")
    g = card("NVIDIA GeForce RTX 3070", 0.28)
    base = {"min_tile_px": 64, "reserve_bytes": 128 * 2**20, "tight_speedup": None}  # the budget's choice alone
    d = decide(job, g, P, DecodeSettings(**base, exact_tolerance=1.2))
    exact = [o.plan for o in d.options if o.feasible and o.plan.path == "tiled" and o.plan.groupnorm == "exact"]
    assert d.chosen.groupnorm == "local" and exact
    assert min(p.estimate.seconds for p in exact) > 1.2 * d.chosen.estimate.seconds
    assert "fits but is estimated" in d.reason and "tile colours may differ" in d.reason
    # a looser tolerance takes the exact plan; "exact" never takes local tiles
    assert decide(job, g, P, DecodeSettings(**base, exact_tolerance=10)).chosen.groupnorm == "exact"
    only = decide(job, g, P, DecodeSettings(**base, tile_groupnorm="exact"))
    assert all(p.groupnorm == "exact" for p in only.plans if p.path == "tiled")
    tight = decide(job, card("NVIDIA GeForce RTX 3070", 0.1), P, DecodeSettings(**base, tile_groupnorm="exact"))
    assert tight.chosen.path == "cpu" and "local GPU tiles are off: tile_groupnorm=exact" in tight.reason
    assert all(o.plan.groupnorm == "local" for o in decide(job, g, P, DecodeSettings(
        **base, tile_groupnorm="local")).options if o.plan.path == "tiled")


def test_video_exact_plans_need_host_memory_known_to_hold_their_buffers():
    """HunyuanVideo's exact 3-D tiles keep every whole-video buffer in host memory: with host memory unknown they
    are listed, refused, and diffusers' tiles run; under ``auto`` they are not planned at all."""
    job, g = DecodeJob("hunyuanvideo", 512, 320, frames=33), card("NVIDIA GeForce RTX 3070", 2.0)
    d = decide(job, g, P, DecodeSettings(tile_groupnorm="exact"))
    exact = [o for o in d.options if o.plan.path == "tiled" and o.plan.groupnorm == "exact"]
    assert exact and not any(o.feasible for o in exact) and d.chosen.groupnorm == "local"
    assert all(o.plan.groupnorm == "local" for o in decide(job, g, P).options)


# ---- offloaded exact tiles (whole-image buffers in host memory) ------------------------------------------

def _with_host(state: GpuState, host_gib: float | None) -> GpuState:
    return dataclasses.replace(state, host_available_bytes=None if host_gib is None else int(host_gib * GiB))


@pytest.mark.parametrize(("job", "name", "free"), [
    (DecodeJob("sdxl", 1024, 1024), "NVIDIA GeForce RTX 3070", 2.0),   # exact on the GPU alone needs 1.99 GiB
    (DecodeJob("sdxl", 2048, 2048), "NVIDIA GeForce RTX 4090", 6.0),   # was local 1056 px tiles
    (DecodeJob("sd15", 2048, 2048, dtype="float16"), "NVIDIA GeForce RTX 3070", 2.5),  # hires fix
])
def test_the_situations_that_drifted_are_lossless_now(job, name, free):
    """Where local tiles used to run (exact tiling on the GPU alone does not fit), the engine now plans
    exact tiles with part of their buffers in host memory: the output equals a full decode."""
    g = _with_host(card(name, free), 16)
    d = decide(job, g, P)
    c = d.chosen
    assert c.path == "tiled" and c.groupnorm == "exact" and c.offloaded, d.reason
    assert "exact+host" in c.label and 0 < c.estimate.host_bytes <= (16 - 2) * GiB
    assert c.estimate.peak_bytes <= d.budget_bytes and c.estimate.transfer_seconds > 0
    assert "in host memory" in d.reason and "output equals a full decode" in d.reason
    inmem = [o for o in d.options if o.plan.path == "tiled" and o.plan.groupnorm == "exact" and not o.plan.offloaded]
    assert inmem and not any(o.feasible for o in inmem)  # it really did not fit on the GPU alone
    # without host memory to spare the same decision drifts, and says why
    tight = decide(job, _with_host(card(name, free), 2.5), P)
    assert not tight.chosen.offloaded and any("of host memory" in o.why for o in tight.options if o.plan.offloaded)


def test_offloaded_plans_need_known_host_memory_and_fit_the_budget():
    job = DecodeJob("sdxl", 1024, 1024)
    unknown = decide(job, card("NVIDIA GeForce RTX 3070", 2.0), P)
    assert not unknown.chosen.offloaded
    offloaded = [o for o in unknown.options if o.plan.offloaded]
    assert offloaded and all(not o.feasible and "of host memory > unknown" in o.why for o in offloaded)
    # squeezed into the reserve: never an offloaded plan whose host memory is unknown
    squeezed = decide(job, card("NVIDIA GeForce RTX 3070", 0.14), P, DecodeSettings(allow_cpu=True))
    assert not any(p.offloaded for p in squeezed.plans)
    d = decide(job, _with_host(card("NVIDIA GeForce RTX 3070", 2.0), 16), P)
    for o in d.options:
        if o.plan.offloaded and o.feasible:
            assert o.plan.estimate.peak_bytes <= d.budget_bytes and o.plan.device_budget is not None
    # one offloaded plan keeps every buffer in host memory: device memory bounded by the tile
    zero = [o.plan for o in d.options if o.plan.offloaded and o.plan.device_budget == 0]
    assert zero and zero[0].estimate.peak_bytes < 0.5 * GiB


def test_tile_groupnorm_offload_and_exact_and_local():
    job, g = DecodeJob("sdxl", 1024, 1024), _with_host(card("NVIDIA GeForce RTX 3070", 3.0), 16)
    off = decide(job, g, P, DecodeSettings(tile_groupnorm="offload"))
    tiled = [o.plan for o in off.options if o.plan.path == "tiled"]
    assert tiled and all(p.offloaded for p in tiled)
    exact = decide(job, _with_host(card("NVIDIA GeForce RTX 3070", 2.0), 16), P, DecodeSettings(tile_groupnorm="exact"))
    assert exact.chosen.offloaded and all(o.plan.groupnorm == "exact" for o in exact.options if o.plan.path == "tiled")
    local = decide(job, _with_host(card("NVIDIA GeForce RTX 3070", 2.0), 16), P, DecodeSettings(tile_groupnorm="local"))
    assert all(o.plan.groupnorm == "local" for o in local.options if o.plan.path == "tiled")


def test_local_tiles_only_when_nothing_lossless_fits_or_much_faster():
    """auto: a drifting local-tiled plan is chosen over a fitting lossless one only when estimated more than
    exact_tolerance faster, and the reason says which rule applied."""
    g = _with_host(card("NVIDIA GeForce RTX 3070", 2.0), 16)
    job = DecodeJob("sdxl", 1024, 1024)
    d = decide(job, g, P)
    lossless = [o.plan for o in d.options if o.feasible and o.plan.path == "tiled" and o.plan.groupnorm == "exact"]
    local = [o.plan for o in d.options if o.feasible and o.plan.groupnorm == "local"]
    assert lossless and local and d.chosen in lossless
    fastest_local = min(p.estimate.seconds for p in local)
    assert d.chosen.estimate.seconds <= DecodeSettings().exact_tolerance * fastest_local
    # a tolerance of 1 ranks by speed alone: local tiles then win whenever estimated faster
    speed = decide(job, g, P, DecodeSettings(exact_tolerance=1.0))
    if fastest_local < d.chosen.estimate.seconds:
        assert speed.chosen.groupnorm == "local" and "fits but is estimated" in speed.reason
    # nothing lossless fits: local tiles, and the reason says exact tiling would need more
    tiny = decide(job, _with_host(card("NVIDIA GeForce RTX 3070", 0.25), 16), P)
    if tiny.chosen.path == "tiled":
        assert tiny.chosen.groupnorm == "local" and "no lossless plan fits" in tiny.reason


def test_cpu_plans_carry_host_memory_and_the_gpu_goes_before_a_cpu_that_cannot_fit():
    """CPU plans estimate their host memory (float32 GPU estimate x the measured CPU/GPU ratio); a CPU plan that
    does not fit the host goes after the GPU's smallest plan, and a near-fitting GPU plan goes before a CPU that
    is 10x slower or does not fit (HunyuanVideo 129x1280x720 on 2 GiB: the CPU plans need 81 / 7.2 GiB)."""
    import dataclasses as dc

    from hybrid_vae.policy.estimate import CPU_HOST_PER_GPU_BYTE, cpu_host_bytes

    job = DecodeJob("hunyuanvideo", 1280, 720, frames=129)
    base = _state("NVIDIA GeForce RTX 3070", 2.0)
    cpu = [p for p in decide(job, base, P, DecodeSettings()).plans if p.path == "cpu"]
    assert all(p.estimate.host_bytes > 0 for p in cpu)
    whole = next(p for p in cpu if p.tile_px is None)
    assert whole.estimate.host_bytes == cpu_host_bytes(job, P.family("hunyuanvideo"), tile_px=None, overlap_px=0,
                                                       frame_chunk=whole.frame_chunk, slice_batch=False)
    assert 0.85 <= CPU_HOST_PER_GPU_BYTE <= 0.9  # the top of the measured CPU/GPU ratios (HunyuanVideo's 0.86)
    small_host = dc.replace(base, host_available_bytes=12 * GiB)  # - the 2 GiB host reserve: 10 GiB for the CPU
    # finished frames to host memory (the default): the smallest GPU plan fits
    fit = decide(job, small_host, P, DecodeSettings())
    assert fit.chosen.path == "tiled" and fit.chosen.host_output and fit.chosen.frame_chunk == 1
    assert fit.chosen.estimate.peak_bytes <= fit.budget_bytes and fit.reason_code != "near_fit"
    # diffusers' own loop (the whole video stitched on the GPU) on 1.45 GiB: even its last-resort 192 px tiles
    # (1.58 GiB) do not fit, but they are within NEAR_FIT: near_fit
    own = DecodeSettings(video_host_output=False)
    d = decide(job, dc.replace(small_host, free_bytes=int(1.45 * GiB)), P, own)
    assert not any(p.host_output for p in d.plans)
    assert d.reason_code == "near_fit" and d.plans[0].path == "tiled"
    fits = [p for p in d.plans if p.path == "cpu" and p.estimate.host_bytes <= 10 * GiB]
    unfit = [p for p in d.plans if p.path == "cpu" and p.estimate.host_bytes > 10 * GiB]
    assert fits and unfit and d.plans.index(fits[0]) < d.plans.index(unfit[0])
    # far from fitting (1.1 GiB): the CPU plan that fits the host first, the GPU's smallest plan before the one
    # that does not
    far = decide(job, dc.replace(small_host, free_bytes=int(1.1 * GiB)), P, own)
    kinds = [p.path for p in far.plans]
    assert far.reason_code == "cpu_nothing_fits" and kinds == ["cpu", "cpu", "tiled", "cpu"]
    assert far.plans[1].estimate.host_bytes <= far.plans[0].estimate.host_bytes <= 10 * GiB < \
        far.plans[3].estimate.host_bytes
    assert far.plans[1].frame_chunk == 1  # video: the least host memory, one latent frame at a time
    # nothing near: an image on 0.01 GiB goes to the CPU as before
    assert decide(DecodeJob("sd15", 512, 512), _state("NVIDIA GeForce RTX 3070", 0.01), P,
                  DecodeSettings()).reason_code == "cpu_nothing_fits"


@pytest.mark.parametrize("family, frames, chunked", [("hunyuanvideo", 129, True), ("wan", 129, False)])
def test_video_frames_to_host_shrink_the_plans_and_say_so(family, frames, chunked):
    """video_host_output: HunyuanVideo's chunks and Wan's tiles hold one chunk / one tile of output on the GPU
    (and the blend frames or strips), so their estimates drop by about the whole video's stitching; off (a VAE
    that cannot stream), the plans and estimates are diffusers' loops'."""
    job = DecodeJob(family, 1280, 720, frames=frames)
    g = _state("NVIDIA GeForce RTX 3070", 2.0)
    on, off = decide(job, g, P, DecodeSettings()), decide(job, g, P, DecodeSettings(video_host_output=False))
    streamed = [o.plan for o in on.options if o.plan.host_output]
    assert streamed and all(p.path == "tiled" for p in streamed)
    assert all((p.frame_chunk is not None) == chunked for p in streamed)
    assert "finished frames to host memory" in streamed[0].estimate.peak_source
    same = {(p.tile_px, p.frame_chunk): p for p in (o.plan for o in off.options) if p.path == "tiled"}
    for p in (o.plan for o in on.options if o.plan.path == "tiled"):
        q = same[(p.tile_px, p.frame_chunk)]
        assert not q.host_output and p.estimate.seconds == q.estimate.seconds
        # streamed only where it holds less than the VAE's own loop
        assert p.estimate.peak_bytes < q.estimate.peak_bytes if p.host_output else p.estimate == q.estimate
    assert on.chosen.path == "tiled" and on.chosen.host_output and on.chosen.estimate.peak_bytes <= on.budget_bytes
    # less memory per tile or chunk: the same budget takes a plan at least as fast
    assert off.chosen.path == "cpu" or on.chosen.estimate.seconds <= off.chosen.estimate.seconds


def test_last_resort_tiles_only_when_nothing_at_the_smallest_tile_fits():
    """HunyuanVideo's 192 px tiles (below its smallest measured tile, 256) are planned only when no GPU plan fits;
    then the smallest of them goes first instead of a near-fit gamble or the CPU, and says its estimate
    extrapolates. A user's min_tile_px turns them off."""
    job = DecodeJob("hunyuanvideo", 512, 320, frames=61)
    sim = "name=NVIDIA GeForce RTX 4060,free_gib={}"
    roomy = decide(job, parse_simulation(sim.format(1.3)), P)
    assert roomy.chosen.tile_px == 256 and all((o.plan.tile_px or 256) >= 256 for o in roomy.options)
    tight = decide(job, parse_simulation(sim.format(1.0)), P)
    assert tight.chosen.label == "tiled 192px/64, 1-latent-frame chunks" and tight.reason_code != "near_fit"
    assert "last-resort tile below the family's smallest (256 px)" in tight.chosen.estimate.peak_source
    assert tight.reason_params["below_tile_px"] == 256 and "below the family's smallest tile (256 px)" in tight.reason
    assert "below_tile_px" not in roomy.reason_params and "smallest tile" not in roomy.reason
    assert tight.chosen.estimate.peak_bytes <= tight.budget_bytes
    own = decide(job, parse_simulation(sim.format(1.0)), P, DecodeSettings(min_tile_px=256))
    assert all((o.plan.tile_px or 256) >= 256 for o in own.options) and own.chosen.tile_px != 192


def test_an_images_equalised_tile_below_the_smallest_cap_is_not_a_last_resort():
    """A 512 px SD1.5 image in local tiles at the smallest cap (256 px) runs two equalised 216 px tiles per side:
    smaller than the cap, but the normal smallest plan, not a last resort; neither the reason nor the infotext
    may call it one (a real ComfyUI run said ", last-resort tile" here, session 7)."""
    from hybrid_vae.extension.orchestrator import DecodeReport

    d = decide(DecodeJob("sd15", 512, 512), parse_simulation("name=NVIDIA GeForce RTX 3070,free_gib=0.3"), P,
               DecodeSettings(tile_groupnorm="local"))
    assert d.chosen.path == "tiled" and d.chosen.tile_px is not None and d.chosen.tile_px < 256
    assert d.reason_params.get("below_tile_px") is None and "last-resort" not in d.reason
    r = DecodeReport(chosen=d.chosen, ran=d.chosen, attempts=((d.chosen.label, None, 1.0),), seconds=1.0,
                     peak_bytes=None, decision=d, simulated=True, device="cpu")
    assert "last-resort" not in r.infotext()
