"""`hybrid-vae calibrate`: the CPU message, the profile writer/loader, and explain using the profile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from hybrid_vae.extension.calibrate import Measurement, profile_dict, write_profile
from hybrid_vae.policy import ProfileError, load_profiles
from hybrid_vae.policy.learned import Learned, LearnedStore, observe

EXE = shutil.which("hybrid-vae") or os.path.join(os.path.dirname(sys.executable), "hybrid-vae")
CARD = "NVIDIA H100 80GB HBM3"  # not a built-in profile
FAKE = [Measurement(size=s, dtype=d, time_s=t, peak_alloc_bytes=int(p * 2**30))
        for d, rows in (("float16", ((512, 0.02, 0.6), (1024, 0.07, 2.4), (2048, 0.30, 9.5))),
                        ("float32", ((512, 0.03, 1.2), (1024, 0.20, 4.8), (2048, 0.55, 19.0))))
        for s, t, p in rows]


def run(*args, cwd=None, env=None):
    e = {k: v for k, v in os.environ.items() if k not in ("HYBRID_VAE_SIMULATE_GPU", "HYBRID_VAE_PROFILE",
                                                           "HYBRID_VAE_LEARNED")}
    e.update(env or {})
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=cwd, env=e, timeout=180)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda(), reason="this machine has a GPU: calibrate would measure it")
def test_cpu_says_nothing_to_calibrate(tmp_path):
    r = run("calibrate", "--out", str(tmp_path / "p.yaml"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "no CUDA GPU found, so there is nothing to calibrate" in r.stdout and "Nothing written" in r.stdout
    assert not list(tmp_path.iterdir())


def test_bad_grid_is_an_error(tmp_path):
    r = run("calibrate", "--sizes", "512,abc", cwd=tmp_path)
    assert r.returncode == 2 and "--sizes" in r.stderr
    r = run("calibrate", "--dtypes", "float8", cwd=tmp_path)
    assert r.returncode == 2 and "--dtypes" in r.stderr


def test_reset_learned(tmp_path):
    path = tmp_path / "learned.json"
    LearnedStore(path).save(observe(Learned(), card="X", family="sd15", path="full", voxels=2**20, estimated_s=1,
                                    measured_s=2, now=0))
    r = run("calibrate", "--reset-learned", "--learned", str(path))
    assert r.returncode == 0 and "2 entries removed" in r.stdout and not path.exists()
    r = run("calibrate", "--reset-learned", env={"HYBRID_VAE_LEARNED": str(path)})
    assert r.returncode == 0 and "0 entries removed" in r.stdout and str(path) in r.stdout


def test_profile_dict_rows():
    d = profile_dict(CARD, 79.19, FAKE, date="2026-11-27")
    assert d["name"] == CARD and d["total_gib"] == 79.19 and len(d["rows"]) == 6
    r = d["rows"][0]
    assert r == {"model": "sd15", "size": 512, "time_s": 0.02, "peak_alloc_bytes": int(0.6 * 2**30), "dtype": "float16",
                 "source": "hybrid-vae calibrate 2026-11-27"}
    assert {r["model"] for r in d["rows"]} == {"sd15", "sdxl"}
    with pytest.raises(ValueError, match="no measurements"):
        profile_dict(CARD, 80, [], date="x")


def test_write_load_round_trip_and_merge(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"families": {"sdxl": {"default_dtype": "float16"}},
                                    "gpus": [{"name": "Other GPU", "total_gib": 8,
                                              "rows": [{"model": "sd15", "size": 512, "time_s": 0.1}]},
                                             {"name": CARD, "total_gib": 1, "rows": []}]}))
    write_profile(path, CARD, 79.19, FAKE, date="2026-11-27")
    prof = load_profiles(path)
    g = prof.gpu(CARD)
    assert g is not None and g.total_gib == 79.19 and len(g.rows) == 6
    assert {(r.dtype, r.size) for r in g.rows} == {(m.dtype, m.size) for m in FAKE}
    assert all(r.source == "hybrid-vae calibrate 2026-11-27" and r.peak_alloc_bytes for r in g.rows)
    assert prof.gpu("Other GPU") is not None  # kept
    assert prof.family("sdxl").default_dtype == "float16"  # kept
    assert sum(1 for x in yaml.safe_load(path.read_text())["gpus"] if x["name"] == CARD) == 1  # replaced, not added
    before = path.read_text()
    with pytest.raises(ProfileError):  # a row the loader rejects: the file is left as it was
        write_profile(path, CARD, 79.19, [Measurement(512, "float16", 0.0, 1)])
    assert path.read_text() == before and not list(tmp_path.glob("*.tmp"))


def test_explain_uses_the_calibrated_profile(tmp_path):
    path = write_profile(tmp_path / "h100.yaml", CARD, 79.19, FAKE, date="2026-11-27")
    base = ["explain", "--family", "sdxl", "--width", "1024", "--height", "1024", "--gpu", CARD, "--free-gib", "60",
            "--no-remote", "--json"]
    r = run(*base, "--profile", str(path))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    d = out["decision"]
    assert out["gpu_profile"] == CARD and str(path) in out["profile_sources"]
    assert d["path"] == "full" and d["estimate"]["seconds_source"].startswith(f"{CARD} profile rows (3)")
    assert d["estimate"]["seconds"] == pytest.approx(0.20)  # the float32 1024 row: stock SDXL decodes in fp32
    r = run(*base)  # without the profile the card is unknown
    out = json.loads(r.stdout)
    assert out["gpu_profile"] is None and "unprofiled card" in out["decision"]["estimate"]["seconds_source"]
    r = run(*base, env={"HYBRID_VAE_PROFILE": str(path)})
    assert json.loads(r.stdout)["gpu_profile"] == CARD


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")
def test_calibrate_on_gpu_writes_a_profile_explain_uses(tmp_path):
    path = tmp_path / "p.yaml"
    r = run("calibrate", "--out", str(path), "--sizes", "512,1024", "--dtypes", "float16", "--repeats", "1")
    assert r.returncode == 0, r.stderr
    import torch

    card = torch.cuda.get_device_name(0)
    g = load_profiles(path).gpu(card)
    assert g is not None and len(g.rows) == 2 and all(r.peak_alloc_bytes > 0 for r in g.rows)
    r = run("explain", "--family", "sd15", "--width", "1024", "--height", "1024", "--gpu", card, "--free-gib", "20",
            "--profile", str(path), "--json")
    assert json.loads(r.stdout)["decision"]["estimate"]["seconds_source"].startswith(f"{card} profile rows")
