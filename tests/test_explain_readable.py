"""`hybrid-vae explain` read by a newcomer: every point of issue 12's explain paragraph, one test each."""

from __future__ import annotations

import json

import pytest
from hybrid_vae.extension.cli import main

EXPLAIN = ["explain", "--width", "1024", "--height", "1024"]


def explain(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(["explain", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRID_VAE_SIMULATE_GPU", raising=False)
    monkeypatch.delenv("HYBRID_VAE_PROFILE", raising=False)


def _row(out: str, label: str) -> str:
    return next(ln for ln in out.splitlines() if ln[2:].startswith(label + " "))


def test_header_dtype_is_the_decode_dtype_not_the_cpu_plans(capsys):
    out = explain(capsys, "--family", "flux", "--width", "1024", "--height", "1024", "--gpu", "NVIDIA GeForce RTX 3070",
                  "--free-gib", "0.05")
    assert "decoded in bfloat16; the cpu plan runs float32" in out  # the chosen plan is cpu, the table bfloat16


def test_the_chosen_row_is_marked_and_the_legend_glosses_the_jargon(capsys):
    out = explain(capsys, "--family", "sdxl", *EXPLAIN[1:], "--gpu", "NVIDIA GeForce RTX 3070", "--free-gib", "1.0")
    chosen = out.split("Decision  ", 1)[1].split(":", 1)[0]
    marked = [ln for ln in out.splitlines() if ln.startswith("* ")]
    assert len(marked) == 1 and marked[0][2:].startswith(chosen + " ")
    legend = out.split("Legend", 1)[1].split("Sources", 1)[0]
    for word in ("Chain", "/64", "exact", "local tiles", "tile drift", "cache", "reserve", "voxel", "decoded"):
        assert word in legend, word
    assert "<profile data>" not in out


def test_video_chunks_say_latent_frames_and_why_shorter_chunks_are_slower(capsys):
    out = explain(capsys, "--family", "hunyuanvideo", "--width", "720", "--height", "480", "--frames", "61",
                  "--gpu", "NVIDIA GeForce RTX 3070", "--free-gib", "3")
    assert "4-latent-frame chunks" in out and "-frame chunks" not in out.replace("-latent-frame chunks", "")
    chunk_only = _row(out, "tiled 4-latent-frame chunks")
    assert "chunk blend" in chunk_only and "tile drift" not in chunk_only  # temporal only: no spatial tiles

    def decoded(label: str) -> float:
        return float(_row(out, label).split("x ", 1)[0].split()[-1])

    # the 2-frame chunks are estimated slower than the 1-frame ones because they decode more frames twice
    two, one = "tiled 256px/64, 2-latent-frame chunks", "tiled 256px/64, 1-latent-frame chunks"
    assert decoded(two) > decoded(one) and decoded("tiled 256px/64, 4-latent-frame chunks") > decoded(
        "tiled 4-latent-frame chunks")


def test_total_is_never_silently_the_free_memory(capsys):
    out = explain(capsys, "--family", "sdxl", *EXPLAIN[1:], "--gpu", "Some Card", "--free-gib", "6")
    assert "total not given, taken equal to free (--total-gib sets it)" in out


def test_no_gpu_name_reads_as_such(capsys):
    out = explain(capsys, "--family", "sdxl", *EXPLAIN[1:], "--free-gib", "6", "--total-gib", "8")
    assert "Simulated GPU SIMULATED" not in out and "a card (SIMULATED; no --gpu name)" in out


@pytest.mark.parametrize(("name", "says"), [("AMD Radeon RX 7900 XTX", "ROCm"), ("Apple M2 Max", "not VRAM"),
                                            ("Apple MPS", "unified memory")])
def test_amd_and_apple_are_handled_by_name(capsys, name, says):
    out = explain(capsys, "--family", "sdxl", *EXPLAIN[1:], "--gpu", name, "--free-gib", "12", "--total-gib", "16")
    assert says in out and "profile: none" in out
    js = json.loads(explain(capsys, "--family", "sdxl", *EXPLAIN[1:], "--gpu", name, "--free-gib", "12",
                            "--total-gib", "16", "--json"))
    assert any(says in n for n in js["notes"])


def test_cpu_seconds_say_why_sdxl_and_flux_match(capsys):
    sdxl = explain(capsys, "--family", "sdxl", *EXPLAIN[1:], "--gpu", "NVIDIA GeForce RTX 3070", "--free-gib", "0")
    flux = explain(capsys, "--family", "flux", *EXPLAIN[1:], "--gpu", "NVIDIA GeForce RTX 3070", "--free-gib", "0")
    assert _row(sdxl, "cpu").split()[2] == _row(flux, "cpu").split()[2]
    assert "the same for every family on the SD decoder" in sdxl


def test_remote_off_is_said_once(capsys):
    out = explain(capsys, "--family", "sdxl", *EXPLAIN[1:], "--gpu", "NVIDIA GeForce RTX 3070", "--free-gib", "0.2",
                  "--mode", "remote")
    reason = next(ln for ln in out.splitlines() if ln.startswith("Reason"))
    assert reason.count("remote decode is off") == 1


def test_float16_on_the_stock_sdxl_vae_is_upcast_and_said(capsys):
    out = explain(capsys, "--family", "sdxl", *EXPLAIN[1:], "--gpu", "NVIDIA GeForce RTX 3070", "--free-gib", "6",
                  "--dtype", "float16")
    assert "decoded in float32" in out and "Note      float16 asked for, decoded in float32" in out
    js = json.loads(explain(capsys, "--family", "sdxl", *EXPLAIN[1:], "--gpu", "NVIDIA GeForce RTX 3070",
                            "--free-gib", "6", "--dtype", "float16", "--json"))
    assert js["job"]["dtype"] == "float32" and "force_upcast" in js["notes"][0]
    out = explain(capsys, "--family", "sd15", *EXPLAIN[1:], "--gpu", "NVIDIA GeForce RTX 3070", "--free-gib", "6",
                  "--dtype", "float16")
    assert "decoded in float16" in out and "Note " not in out


def test_spec_derived_profile_is_shown(capsys):
    out = explain(capsys, "--family", "sdxl", *EXPLAIN[1:], "--gpu", "NVIDIA GeForce RTX 3060", "--free-gib", "4")
    assert "profile: NVIDIA GeForce RTX 3060 (spec-derived)" in out and "12.00 GiB total" in out
    assert "seconds: NVIDIA GeForce RTX 3060 profile rows" in out


def test_no_negative_budget_in_reasons(capsys):
    out = explain(capsys, "--family", "sd15", "--width", "512", "--height", "512", "--gpu", "NVIDIA GeForce RTX 3070",
                  "--free-gib", "0.05", "--remote")
    assert "-0." not in out and "under the 0.12 GiB reserve: no budget" in out  # 128 MiB default reserve
