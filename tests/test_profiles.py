"""Built-in profiles, the user override merge, and errors that name file, key path and value."""

from __future__ import annotations

from pathlib import Path

import pytest
from hybrid_vae.policy import ProfileError, ProfileStore, load_profiles
from hybrid_vae.policy.profiles import builtin_dir

REPO = Path(__file__).resolve().parent.parent


def test_builtins_cover_the_families_and_the_seed_tables():
    p = load_profiles("")
    assert {"sd15", "sdxl", "sd3", "flux", "hunyuanvideo", "wan"} <= set(p.families)
    seed_rows = [r for g in p.gpus for r in g.rows if r.source == "seed"]
    assert len(seed_rows) == 24
    cards = {g.name: g.total_gib for g in p.gpus}
    assert cards["NVIDIA GeForce RTX 3070"] == 8 and cards["NVIDIA GeForce RTX 4090"] == 24
    r = next(r for r in p.gpu("RTX 3070").rows if r.model == "sdxl" and r.size == 1024)
    assert (r.time_s, r.memory_pct, r.tiled_time_s, r.tiled_memory_pct) == (0.794, 96.4, 0.794, 96.4)
    h200 = p.gpu("NVIDIA H200")
    assert h200 is not None and len(h200.rows) >= 18
    assert p.family("flux").packed and p.family("wan").latents_mean is not None
    assert p.family("hunyuanvideo").endpoints[0].url.startswith("https://o7ywnmrahorts457")


def test_gpu_name_matching():
    p = load_profiles("")
    assert p.gpu("NVIDIA GeForce RTX 3070").name == "NVIDIA GeForce RTX 3070"
    assert p.gpu("rtx 3070").name == "NVIDIA GeForce RTX 3070"
    assert p.gpu("NVIDIA GeForce RTX 3070 Ti").name == "NVIDIA GeForce RTX 3070 Ti"  # its own, not the 3070's
    assert p.gpu("NVIDIA GeForce RTX 3070 Laptop GPU") is None  # not the 3070
    assert p.gpu("NVIDIA GeForce RTX 4070 Ti").total_gib == 12


# The cards issue 12 names as the most used for SD, each with a profile (spec-derived where not measured).
COMMON_SD_CARDS = ["NVIDIA GeForce RTX 3060", "NVIDIA GeForce RTX 2060", "NVIDIA GeForce RTX 2070",
                   "NVIDIA GeForce RTX 2080", "NVIDIA GeForce RTX 3060 Ti", "NVIDIA GeForce RTX 4060",
                   "NVIDIA GeForce RTX 4060 Ti", "NVIDIA GeForce RTX 4070", "NVIDIA RTX A4000",
                   "NVIDIA GeForce RTX 3070", "NVIDIA GeForce RTX 3080", "NVIDIA GeForce RTX 3090",
                   "NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 2080 Ti", "NVIDIA GeForce RTX 4070 SUPER"]


def test_common_sd_cards_have_profiles_labelled_by_source():
    p = load_profiles("")
    totals = {"NVIDIA GeForce RTX 3060": 12, "NVIDIA GeForce RTX 2060": 6, "NVIDIA GeForce RTX 3060 Ti": 8,
              "NVIDIA GeForce RTX 4060": 8, "NVIDIA GeForce RTX 4070": 12, "NVIDIA RTX A4000": 16,
              "NVIDIA GeForce RTX 2080 Ti": 11}
    for name in COMMON_SD_CARDS:
        g = p.gpu(name)
        assert g is not None, name
        assert {r.model for r in g.rows} >= {"sd15", "sdxl"}, name
        if name in totals:
            assert g.total_gib == totals[name], name
        if g.source == "spec-derived":
            assert all(r.source.startswith("spec-derived") for r in g.rows), name
    measured = [g for g in p.gpus if g.source == "measured"]
    assert {g.name for g in measured} >= {"NVIDIA GeForce RTX 3070", "NVIDIA H200"}
    assert len([g for g in p.gpus if g.source == "spec-derived"]) >= 12


def test_spec_derived_profiles_are_what_the_script_writes():
    """profiles/gpus.yaml and docs/spec-profiles.md match bench/spec_profiles.py (fit on the measured cards)."""
    from hybrid_vae.bench.spec_profiles import main

    assert main(["--check"]) == 0


def test_spec_derived_speeds_follow_the_specs():
    """A faster card (more FP16 throughput and bandwidth) is estimated faster; each held-out measured card is
    predicted within 20% by a fit on the other five."""
    from hybrid_vae.bench.spec_profiles import held_out, measured_times

    p = load_profiles("")

    def t(name: str) -> float:
        return next(r.time_s for r in p.gpu(name).rows if r.model == "sd15" and r.size == 1024)

    assert t("NVIDIA GeForce RTX 3050") > t("NVIDIA GeForce RTX 3060") > t("NVIDIA GeForce RTX 3060 Ti") \
        > t("NVIDIA GeForce RTX 3070")
    assert t("NVIDIA GeForce RTX 4060") > t("NVIDIA GeForce RTX 4070") > t("NVIDIA GeForce RTX 4080")
    rows = held_out(measured_times())
    assert len(rows) == 24 and max(abs(pred / meas - 1) for *_, meas, pred in rows) < 0.2


def test_example_override_merges_key_by_key():
    p = load_profiles(REPO / "profiles" / "example-override.yaml")
    sdxl = p.family("sdxl")
    assert sdxl.default_dtype == "float16" and not sdxl.force_upcast
    assert sdxl.scaling_factor == 0.13025  # untouched keys stay
    assert p.family("wan").memory.bytes_per_voxel == 1600
    assert p.family("wan").memory.extra_frame_voxels == 1267  # untouched keys stay
    assert p.gpu("NVIDIA GeForce RTX 4060 Ti").total_gib == 16
    assert p.gpu("NVIDIA GeForce RTX 3070") is not None
    assert p.sources[-1].endswith("example-override.yaml")


def test_env_override(monkeypatch, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("families:\n  sd15:\n    scaling_factor: 0.2\n")
    monkeypatch.setenv("HYBRID_VAE_PROFILE", str(f))
    assert load_profiles().family("sd15").scaling_factor == 0.2
    assert load_profiles("").family("sd15").scaling_factor == 0.18215


@pytest.mark.parametrize(("text", "key", "value", "msg"), [
    ("families:\n  sdxl:\n    latent_channels: four\n", "families.sdxl.latent_channels", "four", "integer"),
    ("families:\n  sdxl:\n    memory:\n      bytes_per_voxl: 3\n", "families.sdxl.memory.bytes_per_voxl", 3, "unknown key"),
    ("families:\n  sdxl:\n    latent_channels: -4\n", "families.sdxl.latent_channels", -4, "greater than or equal"),
    ("gpus:\n  - name: X\n    total_gib: 0\n", "gpus.0.total_gib", 0, "greater than 0"),
    ("gpu:\n  - name: X\n", "gpu", None, "unknown top-level key"),
    ("families:\n  newfam:\n    architecture: sd\n", "families.newfam.latent_channels", None, "required"),
])
def test_broken_override_names_file_key_and_value(tmp_path, text, key, value, msg):
    f = tmp_path / "mine.yaml"
    f.write_text(text)
    with pytest.raises(ProfileError) as ei:
        load_profiles(f)
    e = ei.value
    assert e.file == str(f) and e.key_path == key and e.value == value
    assert str(f) in str(e) and key in str(e) and msg in str(e)


def test_bad_yaml_and_missing_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("families:\n  sdxl: [unclosed\n")
    with pytest.raises(ProfileError, match=r"bad.yaml: not valid YAML at line \d+"):
        load_profiles(f)
    with pytest.raises(ProfileError, match="file not found"):
        load_profiles(tmp_path / "nope.yaml")
    f.write_text("- just\n- a list\n")
    with pytest.raises(ProfileError, match="top level must be a mapping"):
        load_profiles(f)


def test_store_keeps_builtins_on_error_and_reloads_on_change(tmp_path):
    store = ProfileStore()
    f = tmp_path / "mine.yaml"
    f.write_text("families:\n  sd15:\n    scaling_factor: 0.3\n")
    p, err = store.get(f)
    assert err is None and p.family("sd15").scaling_factor == 0.3
    assert store.get(f)[0] is p  # cached
    f.write_text("families:\n  sd15:\n    scaling_factor: [\n")
    import os
    os.utime(f, ns=(1, 10**18))
    p2, err2 = store.get(f)
    assert err2 is not None and "mine.yaml" in str(err2)
    assert p2.family("sd15").scaling_factor == 0.18215  # built-ins in force
    p3, err3 = store.get(None)
    assert err3 is None and p3.family("sd15").scaling_factor == 0.18215


def test_builtin_files_are_package_data():
    assert (builtin_dir() / "families.yaml").is_file() and (builtin_dir() / "gpus.yaml").is_file()


def test_last_resort_tile_must_be_below_the_smallest_tile(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("families:\n  hunyuanvideo:\n    tiling:\n      last_resort_tile_px: 320\n")
    with pytest.raises(ProfileError) as ei:
        load_profiles(f)
    assert "families.hunyuanvideo.tiling" in str(ei.value)
    assert "last_resort_tile_px (320) must be smaller than min_tile_px (256)" in str(ei.value)
