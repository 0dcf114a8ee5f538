"""Learned timings: EWMA math, the bounded JSON store, decide(learned=...), and `explain --learned`."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from hybrid_vae.policy import DecodeJob, DecodeSettings, GiB, GpuState, NetworkStats, decide, load_profiles
from hybrid_vae.policy.learned import (
    ANY,
    ENV_LEARNED,
    Learned,
    LearnedStore,
    default_path,
    job_voxels,
    observe,
    observe_peak,
    peak_key,
    size_bucket,
)

P = load_profiles("")
CARD = "NVIDIA GeForce RTX 4090"
EXE = shutil.which("hybrid-vae") or os.path.join(os.path.dirname(sys.executable), "hybrid-vae")


def real_gpu(name: str = CARD, free_gib: float = 20.0) -> GpuState:
    """A GPU state as the real probe reports it (not simulated), so decodes on it are learned."""
    return GpuState(name=name, total_bytes=24 * GiB, free_bytes=int(free_gib * GiB), source="nvml", device="cuda:0")


def obs(learned: Learned, ratio: float, *, path: str = "full", family: str = "sdxl", voxels: float = 2**20,
        now: float = 0.0, card: str = CARD) -> Learned:
    return observe(learned, card=card, family=family, path=path, voxels=voxels, estimated_s=1.0, measured_s=ratio,
                   now=now)


def test_size_buckets():
    assert size_bucket(1024 * 1024) == "1MP"
    assert size_bucket(832 * 1216) == "1MP"
    assert size_bucket(512 * 512) == "0.25MP"
    assert size_bucket(2048 * 2048) == "4MP"
    assert size_bucket(61 * 320 * 512) == "8MP"
    assert size_bucket(0) == size_bucket(1)


def test_first_observations_average_then_ewma():
    a = obs(Learned(), 2.0)
    e = a.lookup(CARD, "sdxl", "full", 2**20)
    assert e is not None and e.factor == pytest.approx(2.0) and e.count == 1
    b = obs(a, 0.5, now=1)
    assert b.lookup(CARD, "sdxl", "full", 2**20).factor == pytest.approx(1.0)  # geometric mean of 2 and 0.5
    assert a.lookup(CARD, "sdxl", "full", 2**20).factor == pytest.approx(2.0)  # observe is pure
    x = Learned()
    for i in range(5):  # plain log mean while count <= 1/alpha
        x = obs(x, [1.0, 2.0, 4.0, 1.0, 2.0][i], now=i)
    assert x.lookup(CARD, "sdxl", "full", 2**20).factor == pytest.approx((1 * 2 * 4 * 1 * 2) ** 0.2)
    y = obs(x, 3.0, now=9)  # then alpha = 0.2
    want = math.exp(0.8 * math.log(x.lookup(CARD, "sdxl", "full", 2**20).factor) + 0.2 * math.log(3.0))
    assert y.lookup(CARD, "sdxl", "full", 2**20).factor == pytest.approx(want)


def test_outliers_are_clamped_and_bad_input_rejected():
    e = obs(Learned(), 100.0).lookup(CARD, "sdxl", "full", 2**20)
    assert e.factor == pytest.approx(4.0)
    with pytest.raises(ValueError, match="path='remote'"):
        obs(Learned(), 1.0, path="remote")
    with pytest.raises(ValueError, match="measured_s=-1"):
        observe(Learned(), card=CARD, family="sdxl", path="full", voxels=1, estimated_s=1, measured_s=-1, now=0)
    with pytest.raises(ValueError, match="reserved"):
        obs(Learned(), 1.0, family=ANY)


def test_card_wide_fallback_and_min_count():
    x = Learned()
    for i in range(2):
        x = obs(x, 2.0, family="flux", voxels=4 * 2**20, now=i)
    # nothing applies before min_count (3) observations, anywhere
    assert x.factor(CARD, "flux", "full", 4 * 2**20) == (1.0, None)
    x = obs(x, 2.0, family="sd15", voxels=2**20, path="tiled", now=3)
    f, e = x.factor(CARD, "sdxl", "tiled", 2**18)  # another family, size and path: the card-wide entry
    assert f == pytest.approx(2.0) and e is not None and e.family == ANY and e.count == 3
    assert x.factor("Another GPU", "sdxl", "full", 2**20) == (1.0, None)
    for i in range(3):
        x = obs(x, 0.5, family="flux", voxels=4 * 2**20, now=10 + i)
    f, e = x.factor(CARD, "flux", "full", 4 * 2**20)  # the exact key once it has 3+ observations
    assert e is not None and e.family == "flux" and f < 1.0


def test_bounded_oldest_dropped():
    x = Learned()
    for i in range(600):
        x = observe(x, card=f"GPU {i}", family="sd15", path="full", voxels=2**20, estimated_s=1, measured_s=1, now=i,
                    max_entries=512)
    assert len(x.entries) == 512
    assert not any(e.card == "GPU 0" for e in x.entries.values())
    assert any(e.card == "GPU 599" for e in x.entries.values())


def test_dict_round_trip_skips_malformed():
    x = obs(obs(Learned(), 1.5), 1.5, now=1)
    data = x.to_dict()
    data["entries"].append({"card": "x", "family": "sd15"})  # incomplete
    data["entries"].append({**data["entries"][0], "factor": 1e9})  # out of range
    y = Learned.from_dict(json.loads(json.dumps(data)))
    assert y.entries == x.entries
    with pytest.raises(ValueError):
        Learned.from_dict(["not", "a", "dict"])


def test_store_round_trip_reset_and_broken_file(tmp_path):
    path = tmp_path / "sub" / "learned.json"
    store = LearnedStore(path)
    assert store.load().entries == {} and store.error is None
    e = store.record(card=CARD, family="sdxl", path="full", voxels=2**20, estimated_s=0.2, measured_s=0.3, now=5.0)
    assert e.factor == pytest.approx(1.5) and path.is_file()
    assert LearnedStore(path).load().entries[e.key] == e
    assert not list(path.parent.glob(".learned-*"))  # no temp files left behind
    assert store.reset() == 2  # the exact key and the card-wide one
    assert not path.exists() and store.reset() == 0
    path.write_text("{not json")
    assert store.load().entries == {}
    assert "calibrate --reset-learned" in store.error and str(path) in store.error


def test_default_path_env_and_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_LEARNED, str(tmp_path / "mine.json"))
    assert default_path() == tmp_path / "mine.json"
    assert LearnedStore().path == tmp_path / "mine.json"
    monkeypatch.delenv(ENV_LEARNED)
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        assert default_path() == tmp_path / "cache" / "hybrid-vae" / "learned.json"


def test_decide_applies_learned_seconds_not_memory():
    job = DecodeJob("sdxl", 1024, 1024)
    base = decide(job, real_gpu(), P)
    x = Learned()
    for i in range(3):
        x = obs(x, 1.6, voxels=job_voxels(job), now=i)
    d = decide(job, real_gpu(), P, learned=x)
    assert d.chosen.path == "full"
    assert d.chosen.estimate.seconds == pytest.approx(base.chosen.estimate.seconds * 1.6)
    assert "x1.60 learned from 3 decodes" in d.chosen.estimate.seconds_source
    assert [o.plan.estimate.peak_bytes for o in d.options] == [o.plan.estimate.peak_bytes for o in base.options]
    cpu = next(o for o in d.options if o.plan.path == "cpu")
    assert "learned" not in cpu.plan.estimate.seconds_source
    assert decide(job, real_gpu(), P, learned=x).to_dict() == d.to_dict()  # still pure


def test_learned_slowness_moves_the_choice_to_remote():
    job = DecodeJob("sdxl", 1024, 1024)
    net = NetworkStats(rtt_s=0.02, down_bytes_per_s=500e6 / 8, up_bytes_per_s=500e6 / 8, source="measured")
    s = DecodeSettings(allow_remote=True)
    d0 = decide(job, real_gpu(), P, s, net)
    remote = next(o.plan for o in d0.options if o.plan.path == "remote")
    assert d0.chosen.path == "full" and remote.estimate.seconds < 4 * d0.chosen.estimate.seconds
    x = Learned()
    for i in range(3):  # this card decodes 4x slower than its profile says
        x = obs(x, 4.0, voxels=job_voxels(job), now=i)
        x = obs(x, 4.0, voxels=job_voxels(job), path="tiled", now=i)
    assert decide(job, real_gpu(), P, s, net, learned=x).chosen.path == "remote"


def test_record_decision_divides_out_the_applied_factor(tmp_path):
    """The orchestrator's loop: decide with the snapshot, decode, record. True time = 2x the raw
    estimate; the factor must converge to 2 (not compound to 4)."""
    store = LearnedStore(tmp_path / "l.json")
    job = DecodeJob("sd15", 1024, 1024, dtype="float16")
    raw = decide(job, real_gpu(), P).chosen.estimate.seconds
    for _ in range(12):
        snap = store.load()
        d = decide(job, real_gpu(), P, learned=snap)
        store.record_decision(d, d.chosen, 2.0 * raw, applied=snap)
    d = decide(job, real_gpu(), P, learned=store.load())
    assert d.chosen.estimate.seconds == pytest.approx(2.0 * raw, rel=1e-6)
    assert "x2.00 learned from 12 decodes" in d.chosen.estimate.seconds_source


def test_record_decision_skips_simulated_remote_and_cpu(tmp_path):
    store = LearnedStore(tmp_path / "l.json")
    job = DecodeJob("sd15", 1024, 1024, dtype="float16")
    sim = GpuState(name=CARD, total_bytes=24 * GiB, free_bytes=20 * GiB, source="simulated", simulated=True)
    d = decide(job, sim, P)
    assert store.record_decision(d, d.chosen, 0.5, applied=None) is None
    cpu = GpuState(name="cpu", total_bytes=0, free_bytes=0, source="cpu")
    d = decide(job, cpu, P)
    assert store.record_decision(d, d.chosen, 5.0, applied=None) is None
    assert not (tmp_path / "l.json").exists()


def _explain(*args, env=None):
    e = {k: v for k, v in os.environ.items() if k not in ("HYBRID_VAE_SIMULATE_GPU", "HYBRID_VAE_PROFILE", ENV_LEARNED)}
    e.update(env or {})
    return subprocess.run([EXE, "explain", "--family", "sdxl", "--width", "1024", "--height", "1024",
                           "--gpu", CARD, "--free-gib", "20", "--no-remote", *args],
                          capture_output=True, text=True, env=e, timeout=120)


def test_explain_shows_and_applies_learned(tmp_path):
    path = tmp_path / "learned.json"
    x = Learned()
    for i in range(4):
        x = obs(x, 1.25, voxels=1024 * 1024, now=i)
    LearnedStore(path).save(x)
    r = _explain("--learned", str(path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["learned"]["path"] == str(path) and out["learned"]["error"] is None
    assert {(e["family"], e["path"]) for e in out["learned"]["entries"]} == {("sdxl", "full"), (ANY, ANY)}
    assert "x1.25 learned from 4 decodes" in out["decision"]["estimate"]["seconds_source"]
    r = _explain("--learned", str(path))
    assert r.returncode == 0 and "Learned" in r.stdout and "x1.25 from 4 decodes (applied)" in r.stdout
    # without the flag nothing is read, even when the env names a file
    r = _explain("--json", env={ENV_LEARNED: str(path)})
    assert "learned" not in json.loads(r.stdout)
    # the flag alone reads the env's file
    r = _explain("--learned", "--json", env={ENV_LEARNED: str(path)})
    assert json.loads(r.stdout)["learned"]["path"] == str(path)
    path.write_text("garbage")
    r = _explain("--learned", str(path))
    assert r.returncode == 0 and "ignored" in r.stdout


def test_orchestrator_records_and_applies_learned_timings(tmp_path):
    """A real (not simulated) GPU state: the orchestrator records each local decode and the next decision
    carries the learned factor. The GPU is described by the probe; the decode runs on the CPU."""
    import torch
    from hybrid_vae.extension.fixture import build_tiny_vae
    from hybrid_vae.extension.orchestrator import HybridDecoder
    from hybrid_vae.policy.gpu import GiB, GpuState
    from hybrid_vae.policy.learned import LearnedStore

    state = GpuState(name="NVIDIA GeForce RTX 4090", total_bytes=24 * GiB, free_bytes=20 * GiB, source="nvml",
                     device="cuda:0")
    store = LearnedStore(tmp_path / "learned.json")
    dec = HybridDecoder(probe=lambda: state, device="cpu", latent_dir=tmp_path, learned=store)
    vae = build_tiny_vae("sd15")
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    reports = [dec.decode(z, vae, family="sd15").report for _ in range(4)]
    assert all(r.ran.path == "full" for r in reports)
    snap = store.load()
    assert snap.entries and sum(e.count for e in snap.entries.values()) >= 4
    assert "learned from" in reports[-1].ran.estimate.seconds_source


def test_exact_tiles_learn_under_their_own_key(tmp_path):
    """Exact tiles are learned as ``tiled-exact``, apart from local tiles (different code): once this
    card has shown exact tiles 3x slower and local tiles as estimated, local tiles win. (exact_tolerance 1.2, so
    exact tiles start as the choice.)"""
    s = DecodeSettings(exact_tolerance=1.2)
    store = LearnedStore(tmp_path / "l.json")
    job = DecodeJob("sd15", 2048, 2048, dtype="float16")
    gpu = real_gpu(free_gib=4.5)
    d0 = decide(job, gpu, P, s)
    assert d0.chosen.groupnorm == "exact"
    local0 = next(o.plan for o in d0.options if o.feasible and o.plan.groupnorm == "local"
                  and o.plan.path == "tiled")
    for _ in range(4):
        snap = store.load()
        d = decide(job, gpu, P, s, learned=snap)
        by_label = {o.plan.label: o.plan for o in d.options}
        store.record_decision(d, by_label[d0.chosen.label], 3.0 * d0.chosen.estimate.seconds, applied=snap)
        snap = store.load()
        d = decide(job, gpu, P, s, learned=snap)
        by_label = {o.plan.label: o.plan for o in d.options}
        store.record_decision(d, by_label[local0.label], local0.estimate.seconds, applied=snap)
    keys = set(store.load().entries)
    assert any("|tiled-exact|" in k for k in keys) and any("|tiled|" in k for k in keys)
    d1 = decide(job, gpu, P, s, learned=store.load())
    assert d1.chosen.groupnorm == "local" and "learned from" in d1.chosen.estimate.seconds_source
    exact1 = next(o.plan for o in d1.options if o.plan.label == d0.chosen.label)
    assert exact1.estimate.seconds == pytest.approx(3.0 * d0.chosen.estimate.seconds, rel=0.05)


# ---- learned peaks ----------------------------------------------------------------------------------------------

def peak(learned: Learned, ratio: float, *, path: str = "full", family: str = "sdxl", oom: bool = False,
         card: str = CARD, now: float = 0.0) -> Learned:
    return observe_peak(learned, card=card, family=family, path=path, estimated_bytes=GiB,
                        measured_bytes=ratio * GiB, now=now, oom=oom)


def test_peak_envelope_rises_at_once_falls_slowly_and_an_oom_steps_it_up():
    x = peak(Learned(), 1.06)
    fam, wide = x.entries[peak_key(CARD, "sdxl", "full")], x.entries[peak_key(CARD, ANY, "full")]
    assert fam.factor == pytest.approx(1.06) and wide.factor == pytest.approx(1.06) and fam.what == "peak"
    x = peak(x, 0.90)  # lower: an EWMA step down (alpha 0.2)
    assert x.peak_factor(CARD, "sdxl", "full")[0] == pytest.approx(math.exp(0.8 * math.log(1.06) + 0.2 * math.log(0.9)))
    x = peak(x, 1.10)  # higher: replaces it
    assert x.peak_factor(CARD, "sdxl", "full")[0] == pytest.approx(1.10)
    x = peak(x, 1.0, oom=True)  # ran out with its estimate free: above the current factor
    f, e = x.peak_factor(CARD, "sdxl", "full")
    assert f == pytest.approx(1.10 * 1.05) and e is not None and e.count == 4
    assert peak(Learned(), 9.0).peak_factor(CARD, "sdxl", "full")[0] == 2.0  # clamped
    assert x.factor(CARD, "sdxl", "full", 2**20) == (1.0, None)  # peaks are not timings
    for bad in ({"estimated_bytes": 0}, {"measured_bytes": math.nan}, {"path": "remote"}, {"family": ANY}):
        kw = {"card": CARD, "family": "sdxl", "path": "full", "estimated_bytes": GiB, "measured_bytes": GiB,
              "now": 0.0, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            observe_peak(Learned(), **kw)


def test_peak_factor_never_lowers_an_estimate_and_the_family_wins_over_the_card():
    x = peak(Learned(), 0.8, family="sd15")
    assert x.peak_factor(CARD, "sd15", "full") == (1.0, None)  # below the estimate: the model's margins stay
    x = peak(x, 1.2, family="sdxl")  # the card-wide entry is now 1.2
    assert x.peak_factor(CARD, "sd15", "full") == (1.0, None)  # sd15 has its own, lower, entry
    f, e = x.peak_factor(CARD, "flux", "full")  # nothing for flux: the card-wide one
    assert f == pytest.approx(1.2) and e is not None and e.family == ANY
    assert x.peak_factor(CARD, "flux", "tiled") == (1.0, None) and x.peak_factor("other", "sdxl", "full") == (1.0, None)
    back = Learned.from_dict(json.loads(json.dumps(x.to_dict())))
    assert back.entries == x.entries  # peak entries survive the file; old entries (no "what") read as timings
    old = {"card": CARD, "family": "sdxl", "path": "full", "bucket": "1MP", "factor": 1.3, "count": 3, "updated": 1.0}
    assert Learned.from_dict({"entries": [old]}).factor(CARD, "sdxl", "full", 2**20)[0] == 1.3
    assert not Learned.from_dict({"entries": [{**old, "what": "volume"}]}).entries


def test_decide_applies_a_learned_peak_and_it_can_change_the_plan():
    job = DecodeJob("sdxl", 1024, 1024)
    base = decide(job, real_gpu(), P)
    full = base.chosen.estimate.peak_bytes
    x = peak(Learned(), 1.10)
    d = decide(job, real_gpu(), P, learned=x)
    assert d.chosen.path == "full" and d.chosen.estimate.peak_bytes == math.ceil(full * 1.10)
    assert "x1.10 learned peak from 1 decode" in d.chosen.estimate.peak_source
    assert "1 decodes" not in d.chosen.estimate.peak_source
    assert d.chosen.estimate.seconds == base.chosen.estimate.seconds
    # free memory the full decode fits by its estimate but not by what this card has needed
    free = (full * 1.05 + DecodeSettings().reserve_bytes) / GiB
    assert decide(job, real_gpu(free_gib=free), P).chosen.path == "full"
    assert decide(job, real_gpu(free_gib=free), P, learned=x).chosen.path == "tiled"


def test_an_offloaded_plan_with_a_learned_peak_still_fits_its_budget():
    job = DecodeJob("sdxl", 2048, 2048)
    gpu = GpuState(name=CARD, total_bytes=24 * GiB, free_bytes=2 * GiB, source="nvml", device="cuda:0",
                   host_available_bytes=32 * GiB, host_total_bytes=64 * GiB)
    s = DecodeSettings(tile_groupnorm="exact")
    d0 = decide(job, gpu, P, s)
    assert d0.chosen.offloaded
    x = peak(Learned(), 1.3, path="tiled-offload")
    d = decide(job, gpu, P, s, learned=x)
    c = d.chosen
    assert c.offloaded and "x1.30 learned peak" in c.estimate.peak_source
    assert c.estimate.peak_bytes <= d.available_bytes - DecodeSettings().reserve_bytes
    assert c.device_budget < d0.chosen.device_budget  # fewer buffers on the GPU, the rest in host memory


def test_record_peak_divides_out_the_applied_factor_and_skips_what_is_not_a_gpu_decode(tmp_path):
    """The orchestrator's loop: true peak = 1.2x the raw estimate; the factor must stay 1.2 (not compound)."""
    store = LearnedStore(tmp_path / "l.json")
    job = DecodeJob("sdxl", 1024, 1024)
    raw = decide(job, real_gpu(), P).chosen.estimate.peak_bytes
    for _ in range(5):
        snap = store.load()
        d = decide(job, real_gpu(), P, learned=snap)
        e = store.record_peak(d, d.chosen, int(1.2 * raw), applied=snap)
        assert e is not None
    assert store.load().peak_factor(CARD, "sdxl", "full")[0] == pytest.approx(1.2, rel=1e-6)
    sim = GpuState(name=CARD, total_bytes=24 * GiB, free_bytes=20 * GiB, source="simulated", simulated=True)
    d = decide(job, sim, P)
    assert LearnedStore(tmp_path / "s.json").record_peak(d, d.chosen, GiB, applied=None) is None
    assert not (tmp_path / "s.json").exists()


def test_orchestrator_learns_from_an_out_of_memory_error(tmp_path):
    """A real (not simulated) GPU state whose full decode runs out of memory although its estimate was claimed:
    the store's peak factor for this card's full decodes rises, and the next decision carries it."""
    import torch
    from hybrid_vae.extension.fixture import build_tiny_vae
    from hybrid_vae.extension.orchestrator import HybridDecoder

    state = real_gpu(CARD, free_gib=20.0)
    store = LearnedStore(tmp_path / "learned.json")
    dec = HybridDecoder(probe=lambda: state, device="cpu", latent_dir=tmp_path, learned=store,
                        claim=lambda device, n: True)
    vae = build_tiny_vae("sd15")
    calls = {"n": 0}

    def boom(_m, _i):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    h = vae.decoder.conv_in.register_forward_pre_hook(boom)
    try:
        z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
        first = dec.decode(z, vae, family="sd15").report
        assert first.attempts[0][0] == "full" and "out of memory" in (first.attempts[0][1] or "")
        f, e = store.load().peak_factor(CARD, "sd15", "full")
        assert f == pytest.approx(1.05) and e is not None and e.count == 1
        again = dec.decode(z, vae, family="sd15").report
        assert "x1.05 learned peak from 1 decode" in again.decision.options[0].plan.estimate.peak_source
    finally:
        h.remove()


def test_explain_renders_peak_entries():
    from hybrid_vae.extension.cli_engine import render_learned

    x = peak(peak(Learned(), 1.08), 0.9, family="sd15")
    info = {"path": "l.json", "error": None, "min_count": 3, "entries": [e.to_dict() for e in x.for_card(CARD)]}
    text = render_learned(info)
    assert "full   peak sdxl: x1.08 from 1 decode (applied)" in text
    assert "full   peak sd15: x0.90 from 1 decode (not applied: at most the estimate)" in text
