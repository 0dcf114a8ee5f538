"""The decision's reason and infotext summary never state a comparison that is false (issue: "0.88 GiB budget <
0.07 GiB full", "0.22 GiB fits 0.17 GiB"): every "A of B", "A > B", "B budget < F full" in them holds."""

from __future__ import annotations

import re

import pytest
from hybrid_vae.policy.decide import decide, describe_plan
from hybrid_vae.policy.gpu import GpuState, parse_simulation
from hybrid_vae.policy.model import DecodeJob, DecodeSettings
from hybrid_vae.policy.profiles import load_profiles
from hypothesis import given, settings
from hypothesis import strategies as st

PROFILES = load_profiles("")
G = r"(-?[\d.]+) GiB"
ROUND = 0.005  # format_gib shows 2 decimals


def statements(text: str) -> list[tuple[str, float, float]]:
    """(kind, left, right) for every comparison written in ``text``."""
    out = []
    for a, b in re.findall(rf"{G} of {G}", text):
        out.append(("<=", float(a), float(b)))
    for a, b in re.findall(rf"needs {G} <= {G}", text):
        out.append(("<=", float(a), float(b)))
    for a, b in re.findall(rf"needs {G} > {G}", text):
        out.append((">", float(a), float(b)))
    for a, b in re.findall(rf"{G} > {G} budget", text):
        out.append((">", float(a), float(b)))
    for a, b in re.findall(rf"{G} budget < {G} full", text):
        out.append(("<", float(a), float(b)))
    for a, b in re.findall(rf"{G} budget, <= {G} available", text):
        out.append(("<=", float(a), float(b)))
    return out


def holds(kind: str, a: float, b: float) -> bool:
    return a <= b + ROUND if kind == "<=" else a >= b - ROUND if kind == ">" else a <= b + ROUND


def check(d) -> None:
    for text in (d.reason, d.summary):
        assert not re.search(rf"GiB fits {G}", text), text  # the old "A fits B" form, true or not
        for kind, a, b in statements(text):
            assert holds(kind, a, b), (kind, a, b, text)


@settings(max_examples=300, deadline=None)
@given(fam=st.sampled_from(["sd15", "sdxl", "flux"]), side=st.sampled_from([128, 256, 512, 768, 1024]),
       free=st.floats(0.05, 8.0), reserve_mib=st.sampled_from([0, 128, 512, 960]),
       mode=st.sampled_from(["auto", "full", "tiled", "remote"]), gn=st.sampled_from(["auto", "exact", "local", "offload"]),
       batch=st.sampled_from([1, 2]))
def test_every_comparison_in_reason_and_summary_holds(fam, side, free, reserve_mib, mode, gn, batch):
    s = DecodeSettings(mode=mode, reserve_bytes=reserve_mib * 2**20, tile_groupnorm=gn)
    gpu = parse_simulation(f"name=NVIDIA GeForce RTX 3070,free_gib={free},host_gib=16")
    d = decide(DecodeJob(fam, side, side, batch=batch), gpu, PROFILES, s)
    check(d)


def test_forced_tiled_while_full_fits_says_requested():
    d = decide(DecodeJob("sd15", 256, 256, dtype="float32"), parse_simulation("name=NVIDIA GeForce RTX 3070,free_gib=1.0"),
               PROFILES, DecodeSettings(mode="tiled"))
    assert d.chosen.path == "tiled"
    assert "as requested" in d.summary and "budget <" not in d.summary, d.summary
    assert "requested: needs" in d.reason and "full would fit too" in d.reason, d.reason
    check(d)


def test_squeezed_tiled_says_needs_more_than_the_budget():
    d = decide(DecodeJob("sd15", 512, 512, dtype="float32"), parse_simulation("name=NVIDIA GeForce RTX 3070,free_gib=1.0"),
               PROFILES, DecodeSettings(reserve_bytes=960 * 2**20))
    assert d.chosen.path == "tiled" and d.reason.startswith("squeezed into the reserve: tiled"), d.reason
    assert "squeezed into the reserve" in d.summary and re.search(rf"{G} > {G} budget", d.summary), d.summary
    check(d)


@pytest.mark.parametrize(("free", "want"), [(None, "cpu full decode, no GPU"),
                                              (0.01, "cpu full decode, no GPU plan fits 0.01 GiB available")])
def test_cpu_summary_says_full(free, want):
    gpu = parse_simulation(f"name=NVIDIA GeForce RTX 3070,free_gib={free}") if free else \
        GpuState(name="cpu", total_bytes=0, free_bytes=0, source="cpu")
    d = decide(DecodeJob("sd15", 512, 512), gpu, PROFILES, DecodeSettings())
    assert d.chosen.path == "cpu" and d.summary == want and d.reason.startswith("cpu full decode:"), (d.summary, d.reason)


def test_cpu_plans_say_full_or_tiled():
    """Item 9: a cpu decode's infotext says whether it decoded the whole frame or tiles (describe_plan is what the
    summary, the reason and the orchestrator's fallback text use)."""
    gpu = parse_simulation("name=NVIDIA GeForce RTX 3070,free_gib=0.01")
    d = decide(DecodeJob("sd15", 1024, 1024, batch=2), gpu, PROFILES, DecodeSettings())
    cpu = [p for p in d.plans if p.path == "cpu"]
    assert [describe_plan(p) for p in cpu] == ["cpu full decode (item by item)", "cpu exact tiles 512px",
                                               "cpu tiled 256px/64"], cpu
    assert d.summary.startswith("cpu full decode (item by item), no GPU plan fits")
    v = decide(DecodeJob("hunyuanvideo", 512, 512, frames=33), gpu, PROFILES, DecodeSettings())
    assert describe_plan(v.chosen).startswith("cpu full frames, ") and "-frame chunks" in describe_plan(v.chosen)
    assert describe_plan(d.options[0].plan) == d.options[0].plan.label  # other plans: their label


@pytest.mark.parametrize("exact_fails", [False, True])
def test_a_cpu_fallback_to_tiles_says_tiled(exact_fails):
    """The CPU's full decode fails: exact tiles next (the infotext says so), and when they fail too, local tiles."""
    import torch
    from hybrid_vae.extension.fixture import build_tiny_vae
    from hybrid_vae.extension.orchestrator import HybridDecoder

    def cpu_fails(plan):
        if plan.path == "cpu" and (plan.tile_px is None or (exact_fails and plan.groupnorm == "exact")):
            raise torch.OutOfMemoryError("host out of memory (injected)")

    dec = HybridDecoder(probe=lambda: GpuState(name="cpu", total_bytes=0, free_bytes=0, source="cpu"),
                        before_plan=cpu_fails)
    r = dec.decode(torch.randn(1, 4, 64, 64) * 0.18215, build_tiny_vae("sd15"), family="sd15")
    want = r"cpu tiled \d+px/64" if exact_fails else r"cpu exact tiles \d+px"
    assert re.match(want + r", fell back from cpu \(out of memory\)", r.report.infotext()), r.report.infotext()
    kinds = [a[0].split()[-1].split("px/")[-1] for a in r.report.attempts]
    assert kinds == (["cpu", "exact", "64"] if exact_fails else ["cpu", "exact"]), r.report.attempts
