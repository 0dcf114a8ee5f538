"""`hybrid-vae probe|explain` as a user runs them: the installed console script in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from hybrid_vae.policy import DecodeSettings

EXE = shutil.which("hybrid-vae") or os.path.join(os.path.dirname(sys.executable), "hybrid-vae")
GiB = 2**30


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("HYBRID_VAE_SIMULATE_GPU", "HYBRID_VAE_PROFILE")}
    e.update(env or {})
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=e, timeout=120)


def explain(*args: str, env: dict | None = None) -> dict:
    r = run("explain", "--family", "sdxl", "--width", "1024", "--height", "1024", *args, "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_4090_full():
    out = explain("--gpu", "NVIDIA GeForce RTX 4090", "--free-gib", "20", "--no-remote")
    assert out["decision"]["path"] == "full"
    assert out["decision"]["tile_px"] is None
    for key in ("reason", "estimate"):
        assert key in out["decision"]
    assert out["decision"]["estimate"]["peak_bytes"] > 0 and out["decision"]["estimate"]["seconds"] > 0
    assert out["gpu"]["free_bytes"] == 20 * GiB and out["gpu"]["source"] == "simulated"
    assert isinstance(out["fallbacks"], list) and all("path" in p for p in out["fallbacks"])
    assert all({"feasible", "why", "path"} <= set(o) for o in out["options"])
    # why, as data (policy/reasons.py): the code and the numbers the sentence states
    assert out["decision"]["reason_code"] == "full_fits"
    assert out["decision"]["reason_params"]["need"] == out["decision"]["estimate"]["peak_bytes"]
    assert out["decision"]["reason_params"]["budget"] == out["budget_bytes"]


def test_3070_tiled_fits_and_is_largest():
    """No host memory to spare (so no exact tiles with buffers in host memory): the largest local tile that fits."""
    out = explain("--gpu", "NVIDIA GeForce RTX 3070", "--free-gib", "1.0", "--host-gib", "0", "--no-remote")
    d = out["decision"]
    assert d["path"] == "tiled" and isinstance(d["tile_px"], int)
    assert d["estimate"]["peak_bytes"] <= 1.0 * GiB - DecodeSettings().reserve_bytes
    larger = [o for o in out["options"] if o["path"] == "tiled" and o["tile_px"] > d["tile_px"]]
    assert larger and not any(o["feasible"] for o in larger)


def test_groupnorm_flag_and_output_column():
    """--groupnorm exact takes exact tiles where they fit (their pixels equal a full decode), --groupnorm local
    local tiles at the same budget, auto the lossless plan unless local tiles are estimated more than
    exact_tolerance faster; the text table has an output column."""
    gpu = ("--gpu", "NVIDIA GeForce RTX 3070", "--free-gib", "2.6", "--no-remote")
    exact = explain(*gpu, "--groupnorm", "exact")["decision"]
    assert exact["groupnorm"] == "exact" and " exact" in exact["label"] and exact["overlap_px"] == 0
    local = explain(*gpu, "--groupnorm", "local")
    assert local["decision"]["groupnorm"] == "local" and all(o["groupnorm"] == "local" for o in local["options"])
    auto = explain(*gpu)["decision"]
    # auto: lossless unless local tiles are estimated more than exact_tolerance faster
    local_wins = local["decision"]["estimate"]["seconds"] * DecodeSettings().exact_tolerance < exact["estimate"]["seconds"]
    assert auto["label"] == (local["decision"] if local_wins else exact)["label"]
    r = run("explain", "--family", "sdxl", "--width", "1024", "--height", "1024", *gpu)
    assert r.returncode == 0 and " output " in r.stdout and "= full" in r.stdout and "tile drift" in r.stdout
    assert run("explain", "--family", "sdxl", "--width", "1024", "--height", "1024", *gpu,
               "--groupnorm", "best").returncode == 2


def test_remote_and_no_remote():
    out = explain("--gpu", "NVIDIA GeForce RTX 3070", "--free-gib", "0.1", "--remote")
    assert out["decision"]["path"] == "remote"
    out = explain("--gpu", "NVIDIA GeForce RTX 3070", "--free-gib", "0.1", "--no-remote")
    chain = [out["decision"], *out["fallbacks"]]
    assert chain[-1]["path"] == "cpu" and all(p["path"] != "remote" for p in chain)


def test_env_simulation_is_shown():
    out = explain(env={"HYBRID_VAE_SIMULATE_GPU": "name=NVIDIA GeForce RTX 3070,free_gib=1.0"})
    assert out["simulated"] is True and out["decision"]["path"] == "tiled"
    assert out["gpu"]["total_bytes"] == 8 * GiB  # filled in from the profile
    r = run("explain", "--family", "sdxl", "--width", "1024", "--height", "1024",
            env={"HYBRID_VAE_SIMULATE_GPU": "name=NVIDIA GeForce RTX 3070,free_gib=1.0"})
    assert "SIMULATED" in r.stdout and "Reason" in r.stdout and "Chain" in r.stdout


def test_broken_profile_exits_nonzero_naming_file_and_key(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("families:\n  sdxl:\n    scaling_factr: 0.1\n")
    r = run("explain", "--family", "sdxl", "--width", "1024", "--height", "1024", "--gpu", "NVIDIA GeForce RTX 4090",
            "--profile", str(f))
    assert r.returncode != 0
    assert str(f) in r.stderr and "families.sdxl.scaling_factr" in r.stderr
    r = run("explain", "--family", "sdxl", "--width", "1024", "--height", "1024", "--gpu", "NVIDIA GeForce RTX 4090",
            env={"HYBRID_VAE_PROFILE": str(f)})
    assert r.returncode != 0 and "scaling_factr" in r.stderr


@pytest.mark.parametrize("args", [
    ["explain", "--family", "sdxl", "--width", "abc", "--height", "1024"],
    ["explain", "--width", "1024", "--height", "1024"],
    ["explain", "--family", "sdxl", "--width", "1003", "--height", "1024", "--gpu", "NVIDIA GeForce RTX 4090"],
    ["explain", "--family", "nope", "--width", "1024", "--height", "1024", "--gpu", "NVIDIA GeForce RTX 4090"],
    ["explain", "--family", "sdxl", "--width", "1024", "--height", "1024", "--gpu", "Unknown Card"],
    ["explain", "--family", "sdxl", "--width", "1024", "--height", "1024", "--remote", "--no-remote"],
])
def test_bad_flags_exit_2(args):
    r = run(*args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "error" in r.stderr


def test_probe_runs_without_gpu():
    r = run("probe", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["source"] in ("cpu", "nvml", "torch", "mps") and "note" in s


@pytest.mark.parametrize(("args", "named"), [
    (["explain", "--family", "sdxl", "--width", "1024", "--height", "1024", "--reserve-gib", "-1"], "--reserve-gib -1"),
    (["explain", "--family", "sdxl", "--width", "1024", "--height", "1024", "--gpu", "X", "--total-gib", "8",
      "--free-gib", "-2"], "--free-gib -2"),
    (["explain", "--family", "sdxl", "--width", "1024", "--height", "1024", "--gpu", "NVIDIA GeForce RTX 3070",
      "--endpoint", "ftp://x"], "--endpoint"),
    (["serve", "--demo", "--port", "99999"], "--port 99999"),
    (["serve", "--demo", "--workers", "0"], "--workers 0"),
    (["serve", "--family", "nope=some/vae"], "--family nope"),
    (["serve", "--family", "sd15"], "--family 'sd15'"),
])
def test_bad_values_name_the_flag_and_value(args, named):
    r = run(*args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert named in r.stderr and "error" in r.stderr


def test_explain_shows_the_offloaded_plan_with_host_bytes_and_copy_seconds():
    """SDXL 1024 with 2 GiB free: exact tiling on the GPU alone does not fit, so explain shows exact tiles with
    their whole-image buffers partly in host memory, how much, and how long the copies take."""
    gpu = ("--gpu", "NVIDIA GeForce RTX 3070", "--free-gib", "2.0", "--host-gib", "16", "--no-remote")
    d = explain(*gpu)["decision"]
    assert "exact+host" in d["label"] and d["device_budget"] is not None
    assert d["estimate"]["host_bytes"] > 0 and d["estimate"]["transfer_bytes"] > 0 and d["estimate"]["transfer_seconds"] > 0
    r = run("explain", "--family", "sdxl", "--width", "1024", "--height", "1024", *gpu)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("Decision"))
    assert "exact+host" in line and "host " in line and "GB copied in" in line
    assert " host GiB " in r.stdout and " copy s " in r.stdout and "Host      16.00 GiB available" in r.stdout
    # too little host memory: not offloaded, and the option says why
    out = explain("--gpu", "NVIDIA GeForce RTX 3070", "--free-gib", "2.0", "--host-gib", "1", "--no-remote")
    assert "exact+host" not in out["decision"]["label"]
    assert any("of host memory" in o["why"] for o in out["options"] if "exact+host" in o["label"])
    assert run("explain", "--family", "sdxl", "--width", "1024", "--height", "1024", *gpu[:4], "--host-gib", "-1").returncode == 2


def test_explain_names_the_fragmented_cache_it_does_not_count():
    import dataclasses

    from hybrid_vae.extension.cli_engine import render
    from hybrid_vae.policy import DecodeJob, GiB, GpuState, decide, load_profiles

    P = load_profiles("")
    g = GpuState(name="NVIDIA GeForce RTX 3070", total_bytes=8 * GiB, free_bytes=2 * GiB, source="simulated",
                 simulated=True, torch_reusable_bytes=2 * GiB)
    plain = render(decide(DecodeJob("sdxl", 1024, 1024), g, P), profiles=P)
    assert "(+2.00 GiB torch cache)" in plain and "fragmented" not in plain
    g = dataclasses.replace(g, torch_fragmented_bytes=int(1.5 * GiB))
    out = render(decide(DecodeJob("sdxl", 1024, 1024), g, P), profiles=P)
    assert "(+0.50 GiB torch cache; 1.50 GiB more fragmented, not counted)" in out
