"""The simulated world, the peer strategies, the scenario matrix, and `hybrid-vae bench` (CPU only)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys

import pytest
from hybrid_vae.bench import matrix
from hybrid_vae.bench.strategies import (
    ALL,
    STRATEGIES,
    always_full,
    always_remote,
    comfy_formula,
    comfyui,
    engine,
    sdnext_default,
    tiled_vae,
    tiledvae_tile,
)
from hybrid_vae.bench.world import NETWORKS, Card, Exec, Scenario, World, _data_rows, comfy_axis, tiledvae_axis
from hybrid_vae.policy import DecodeSettings, decide, load_profiles

P = load_profiles("")
EXE = shutil.which("hybrid-vae") or os.path.join(os.path.dirname(sys.executable), "hybrid-vae")
H200 = Card("NVIDIA H200", 140.4, True)
R3070 = Card("NVIDIA GeForce RTX 3070", 8.0, True)
QUIET = World(P, sigma_card=0, sigma_local=0, sigma_plan=0, sigma_net=0, remote_failure=0)


def sc(variant="sdxl", family="sdxl", dtype="float32", w=1024, h=1024, batch=1, frames=None, card=R3070, free=1.0,
       net=None) -> Scenario:
    return Scenario(variant, family, dtype, w, h, batch, frames, card, free, net)


@pytest.fixture(scope="module")
def reduced() -> dict:
    return matrix.run(reduced=True, jobs=1)


# ---- the world is the data -----------------------------------------------------------------------


def _data_cases():
    for r in _data_rows():
        t = r.get("tag")
        if t in ("sd15", "sdxl", "sdxl_fp16", "flux"):
            s = sc(t, "sdxl" if t.startswith("sdxl") else t, r["dtype"].replace("torch.", ""), r["res"], r["res"],
                   r.get("batch", 1), card=H200)
            ex = Exec("full", items=r.get("batch", 1)) if r["mode"] == "full" else \
                Exec("tiled", tiles=((r["tile"], r["tile"]),), overlap_px=r["tile"] // 4, geometry="diffusers")
            yield r["mode"], s, ex, r
        elif t == "hunyuan":
            f, h, w = (int(v) for v in r["res"].split("x"))
            s = sc("hunyuanvideo", "hunyuanvideo", "float16", w, h, frames=f, card=H200)
            ex = {"full": Exec("full", items=1), "framewise": Exec("full", items=1, frame_chunk=4, frame_overlap=1)}.get(
                r["mode"], Exec("tiled", tiles=((256, 256),), overlap_px=64, geometry="diffusers", frame_chunk=4,
                                frame_overlap=1))
            yield "video", s, ex, r


def test_world_times_reproduce_the_measurements():
    errs: dict[str, list[float]] = {}
    for kind, s, ex, r in _data_cases():
        errs.setdefault(kind, []).append(abs(QUIET.base_seconds(s, ex)[0] / r["median_s"] - 1))
    assert len(errs["full"]) == 24 and len(errs["tiled"]) == 44 and len(errs["video"]) == 9
    assert max(errs["full"]) < 0.08
    assert statistics.median(errs["tiled"]) < 0.10
    assert max(errs["video"]) < 0.10


def test_world_peaks_lie_under_the_estimate_by_the_measured_margin():
    s = sc("sdxl", free=1.0, card=H200)
    d = decide(s.job(), s.gpu(), P)
    fam = P.family("sdxl")
    kinds = set()
    for o in d.options:
        if o.plan.path in ("full", "tiled"):
            true = QUIET.true_peak(s, Exec.from_plan(o.plan, fam, 1))
            # measured fits: 0-10% over; exact tiling: analytic x exact_margin over a truth 0-10% above it
            margin = fam.memory.exact_margin if o.plan.groupnorm == "exact" else 1.10
            assert o.plan.estimate.peak_bytes / margin - 1 <= true <= o.plan.estimate.peak_bytes
            kinds.add((o.plan.path, o.plan.groupnorm))
    assert kinds == {("full", "local"), ("tiled", "local"), ("tiled", "exact")}


def test_oom_exactly_when_the_true_peak_exceeds_free_memory():
    ex = Exec("full", items=1)
    need = QUIET.true_peak(sc(free=1.0), ex)
    below = need / (8 * 2**30) * 0.999
    above = need / (8 * 2**30) * 1.001
    a, b = QUIET.attempt(sc(free=below), ex), QUIET.attempt(sc(free=above), ex)
    assert not a.ok and a.oom and b.ok
    full_s = QUIET.base_seconds(sc(free=above), ex)[0]
    assert 0.70 * full_s <= a.seconds <= 1.0 * full_s  # a failed attempt costs most of a full decode


def test_common_random_numbers_and_seeds():
    w1, w2, w3 = World(P), World(P), World(P, seed=1)
    s = sc(free=0.5, net=NETWORKS[2])
    for ex in (Exec("full", items=1), Exec("remote", fmt="raw")):
        assert w1.attempt(s, ex) == w2.attempt(s, ex)
        assert w1.attempt(s, ex).seconds != w3.attempt(s, ex).seconds


def test_peer_geometries():
    assert comfy_axis(128, 64, 16) == [(0, 64), (48, 64), (96, 32)]
    assert tiledvae_axis(128, 96, 11) == [(0, 75), (53, 75)]
    assert [tiledvae_tile(g) for g in (140.4, 24, 16, 12, 10, 8, 6, 4)] == [256, 192, 192, 128, 96, 96, 64, 64]
    s = sc("sd15", "sd15", "float16")
    assert comfy_formula(P.family("sd15"), s) == 2178 * 128 * 128 * 64 * 2


# ---- strategies ------------------------------------------------------------------------------------


def test_crash_strategies_lose_the_image_on_oom():
    s = sc(free=0.5)  # 3070 with 4 GiB free: stock SDXL 1024 full needs ~4.8 GiB
    for fn in (always_full, sdnext_default):
        o = fn(QUIET, s, P)
        assert not o.delivered and o.ooms == 1 and o.note == "out of memory"
    o = comfyui(QUIET, s, P)  # tries full, then tiled x3
    assert o.delivered and o.ooms == 1 and o.attempts[1].startswith("tiled x3")
    e = engine(QUIET, s, P)
    assert e.delivered and e.ooms == 0 and e.attempts[0].startswith("tiled")


def test_comfy_tiled_runs_three_passes():
    s = sc(free=1.0)
    one = QUIET.base_seconds(s, Exec("tiled", tiles=((512, 512),), overlap_px=128, geometry="comfy"))[0]
    three = QUIET.base_seconds(s, Exec("tiled", tiles=((512, 512), (256, 1024), (1024, 256)), overlap_px=128,
                                       geometry="comfy"))[0]
    assert three > 2.5 * one


def test_unsupported_and_unreachable():
    assert not tiled_vae(QUIET, sc("hunyuanvideo", "hunyuanvideo", "float16", 512, 320, frames=9), P).supported
    o = always_remote(QUIET, sc("sd3", "sd3", "float16", net=NETWORKS[1]), P)
    assert not o.delivered and o.note == "no endpoint"
    o = always_remote(QUIET, sc(net=None), P)
    assert not o.delivered and o.note == "no network"
    o = always_remote(QUIET, sc(net=NETWORKS[2]), P)
    assert o.delivered and o.ooms == 0


def test_engine_follows_its_chain_after_a_remote_failure():
    world = World(P, remote_failure=1.0)
    s = sc(free=0.05, net=NETWORKS[2])  # 0.4 GiB free: remote first
    d = decide(s.job(), s.gpu(), P, DecodeSettings(allow_remote=True), NETWORKS[2].stats())
    assert d.chosen.path == "remote"
    o = engine(world, s, P)
    assert o.delivered and o.wasted == 1 and o.ooms == 0 and len(o.attempts) >= 2


# ---- the matrix --------------------------------------------------------------------------------------


def test_matrix_shape():
    full = matrix.scenarios(P)
    assert len(full) == 16875
    assert {s.variant for s in full} == {v[0] for v in matrix.VARIANTS}
    assert {s.card.name for s in full} >= {g.name for g in P.gpus} | {"NVIDIA GeForce RTX 3050 Laptop GPU"}
    assert {s.free_frac for s in full} == set(matrix.FREE_FRACTIONS)
    assert {(s.width, s.height) for s in full} >= {(832, 1216), (1344, 768), (512, 512), (2048, 2048)}
    assert {s.batch for s in full} == {1, 2, 4}
    assert len(matrix.scenarios(P, reduced=True)) == 1584


def test_reduced_matrix_engine_never_ooms_never_loses(reduced):
    e = reduced["strategies"]["engine"]
    assert e["scenarios"] == reduced["scenarios"] == 1584
    assert e["ooms"] == 0 and e["lost"] == 0 and e["median_regret"] <= 0.05
    assert reduced["targets"]["ooms"] and reduced["targets"]["lost"]
    peers = reduced["strategies"]
    assert peers["always_full"]["lost"] > 100 and peers["sdnext"]["lost"] > 100
    assert peers["comfyui"]["ooms"] > peers["comfyui"]["lost"] > 0  # retries tiled, loses only when tiling OOMs too
    assert peers["tiled_vae"]["unsupported"] == 144  # video scenarios
    assert peers["always_remote"]["lost_why"]["no network"] == 528
    for n in ALL:
        assert set(reduced["by_family"]["sd15"][n]) >= {"lost", "ooms", "median_regret", "p95_regret"}
        assert reduced["strategies"][n]["ooms"] >= 0


def test_what_ifs_and_learning(reduced):
    s = reduced["strategies"]
    assert all(s[n]["lost"] == 0 for n in ("engine_learned", "engine_reserve64", "engine_tight", "engine_tight_learned"))
    assert s["engine_tight"]["p95_regret"] < s["engine"]["p95_regret"]
    learned = matrix.train_learned(P, matrix.WorldParams(), reduced=True, per_card=20)
    cards = {e.card for e in learned.entries.values() if e.family == "*"}
    assert cards == {c.name for c in {x.card for x in matrix.scenarios(P, reduced=True)}}


def test_report_text(reduced):
    md = matrix.markdown(reduced)
    for _, (label, _) in STRATEGIES.items():
        assert label in md
    text = matrix.section(reduced)
    assert "Targets for this engine" in text and "What-if" not in text and "tight plan first" in text
    assert "| cause | scenarios |" in text


def test_determinism_across_processes():
    a = matrix.run(reduced=True, jobs=1, strategies=["engine", "always_full"])
    b = matrix.run(reduced=True, jobs=2, strategies=["engine", "always_full"])
    assert a["strategies"] == b["strategies"]


# ---- CLI --------------------------------------------------------------------------------------------


def _run(*args):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_simulate_json():
    r = _run("bench", "--simulate", "--reduced", "--json", "--no-write", "--no-what-if", "--jobs", "2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["scenarios"] == 1584 and "rows" not in out
    assert out["strategies"]["engine"]["ooms"] == 0 and out["strategies"]["engine"]["lost"] == 0
    assert set(out["strategies"]) == set(STRATEGIES)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda(), reason="a GPU is present")
def test_cli_gpu_skips_without_cuda():
    r = _run("bench", "--gpu", "--no-write")
    assert r.returncode == 0 and "skipped: no CUDA GPU" in r.stdout


@pytest.mark.slow
def test_gpu_runner_plumbing_on_cpu(tmp_path):
    """The --gpu runner end to end with tiny VAEs on the CPU (no memory cap, no peaks): plans run through
    HybridDecoder, diffusers' default decode runs beside it, records and summary are complete."""
    from hybrid_vae.bench.cli import gpu_markdown, run_gpu, summarise_gpu, tiny_cases

    seen = []
    res = run_gpu(tiny_cases(), device="cpu", latent_dir=tmp_path, on_record=seen.append)
    recs = res["records"]
    assert len(recs) == 3 and all(r["delivered"] for r in recs) and seen == recs  # each as soon as it is done
    assert all(r["diffusers_default"]["ok"] for r in recs)
    assert recs[1]["ran"].startswith("tiled")  # full needs 0.56 GiB > 0.6 - 0.25
    s = summarise_gpu(recs)
    assert s["scenarios"] == 3 and s["engine_ooms"] == 0 and s["peak_measured"] == 0
    assert "| scenario | engine ran |" in gpu_markdown(res)
    assert summarise_gpu([*recs, {"case": "x", "skipped": "time"}])["skipped"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_gpu_bench_real(tmp_path):
    from hybrid_vae.bench.cli import gpu_cases, run_gpu

    res = run_gpu(gpu_cases()[:6], device="cuda", latent_dir=tmp_path)
    s = res["summary"]
    assert s["engine_ooms"] == 0 and s["delivered"] == s["scenarios"]
    assert s["peak_under_estimate"] == s["peak_measured"] > 0


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from hybrid_vae.bench import plots

    made = [plots.estimate_vs_measured(out=tmp_path), plots.tiled_time(out=tmp_path), plots.remote_formats(out=tmp_path)[0]]
    assert all(p.is_file() and p.stat().st_size > 10_000 for p in made)
    assert "img/estimate-vs-measured.png" in plots.section(made) and "Modelled" in plots.section(made)


def test_tiled_speed_benchmark_times_every_kind_at_one_budget():
    """bench/tiled_speed.py on a small image: the engine's exact choice equals the full decode, the local
    alternative and diffusers' tiling run under the same budget, and the table says what ran."""
    from hybrid_vae.bench.tiled_speed import markdown
    from hybrid_vae.bench.tiled_speed import run as run_speed

    res = run_speed(size=256, dtype="float32", budget_gib=0.3, card="NVIDIA GeForce RTX 3070", device="cpu",
                    repeat=1, min_tile_px=64)
    whats = [r["what"] for r in res["rows"]]
    assert whats[0].startswith("full") and any("exact" in w for w in whats) and any("/" in w for w in whats[1:3])
    assert any(w.startswith("diffusers enable_tiling(") for w in whats)
    exact = next(r for r in res["rows"] if "exact" in r["what"])
    assert exact["psnr"] > 60 and all(r["seconds"] > 0 for r in res["rows"])
    text = markdown(res)
    assert "| decode | seconds | x full |" in text and "2048x2048 float16" in text


def test_exact_tiling_peak_measured_on_the_cpu_stays_under_the_estimate():
    """PyTorch's own allocation count during an exact-tiled decode (SD-width decoder, 128 px) lies under
    the engine's estimate (analytic x exact_margin) and above the bare analytic figure's 90%."""
    from hybrid_vae.bench.exact_memory import run as run_mem

    rows = run_mem([128], [32, 64])
    fam = P.family("sd15")
    assert len(rows) == 2
    for r in rows:
        assert 0.9 * r["model"] <= r["measured"] <= r["model"] * fam.memory.exact_margin, r
        assert r["measured"] < r["full"]


def test_gpu_session_script_commands_exist():
    """bench/gpu_session.sh (the one script a lent GPU runs) only calls commands that parse: bash syntax,
    and every `$PY -m module subcommand` answers --help."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_session.sh"
    for sh in (script, script.with_name("gpu_wheels.sh")):
        assert subprocess.run(["bash", "-n", str(sh)], capture_output=True).returncode == 0, sh
    calls = re.findall(r"\$PY -m (\S+)(?: (\w+))?", script.read_text())
    assert {m for m, _ in calls} >= {"hybrid_vae.bench.tiled_speed", "hybrid_vae.bench.cli", "hybrid_vae.extension.cli"}
    for module, sub in calls:
        if module == "pip":
            continue
        args = [sys.executable, "-m", module, *([sub] if sub and not sub.startswith("-") else []), "--help"]
        r = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (args, r.stderr[-500:])
