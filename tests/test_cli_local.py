"""`hybrid-vae decode` and `hybrid-vae demo` as a user runs them: the console script in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hybrid_vae.extension.fixture import build_tiny_vae, load_fixture_vae
from hybrid_vae.extension.latents import save_latent
from hybrid_vae.extension.orchestrator import HybridDecoder
from hybrid_vae.policy import DecodeFailedError, load_profiles, parse_simulation
from PIL import Image

EXE = shutil.which("hybrid-vae") or os.path.join(os.path.dirname(sys.executable), "hybrid-vae")


def run(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("HYBRID_VAE_SIMULATE_GPU", "HYBRID_VAE_PROFILE")}
    e.update(env or {})
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=e, timeout=timeout)


def test_cli_module_does_not_import_torch():
    code = "import sys, extension.cli_local; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_help_lists_decode_and_demo():
    r = run("--help")
    assert r.returncode == 0 and "decode" in r.stdout and "demo" in r.stdout


@pytest.mark.slow
def test_demo_runs_offline_and_writes_the_pngs(tmp_path):
    out = tmp_path / "demo"
    r = run("demo", "--out", str(out))
    assert r.returncode == 0, r.stderr
    names = {p.name for p in out.iterdir()}
    assert {"0-picture.png", "1-full.png", "2-tiled-exact.png", "2b-tiled-local.png", "3-oom-fallback.png",
            "4-cpu.png", "demo.json"} <= names
    for n in ("1-full.png", "2-tiled-exact.png", "2b-tiled-local.png", "4-cpu.png"):
        assert Image.open(out / n).size == (512, 512)
    cases = {c["case"]: c for c in json.loads((out / "demo.json").read_text())["cases"]}
    assert cases["1-full"]["decision"] == "full" and not cases["1-full"]["fell_back"]
    full_vs_picture = cases["1-full"]["psnr_vs_picture_db"]
    exact = cases["2-tiled-exact"]  # the engine's tiled plan while it fits: equal to the full decode
    assert exact["decision"].startswith("tiled ") and exact["decision"].endswith(" exact")
    assert exact["psnr_vs_full_db"] >= 40 and "output equals a full decode" in exact["reason"]
    local = cases["2b-tiled-local"]  # less memory than any exact plan: per-tile statistics, and it says so
    assert local["decision"].startswith("tiled ") and "/64" in local["decision"]
    assert "tile colours may differ" in local["reason"] and local["psnr_vs_picture_db"] >= full_vs_picture - 1.5
    # why, as data: each case's reason code (policy/reasons.py)
    assert cases["1-full"]["reason_code"] == "full_fits" and cases["4-cpu"]["reason_code"] == "cpu_nothing_fits"
    assert exact["reason_code"] == local["reason_code"] == "tiled_full_too_big"
    oom = cases["3-oom-fallback"]
    assert oom["fell_back"] and oom["chosen"] == "full" and oom["attempts"][0][1] == "out of memory"
    assert oom["decision"].startswith("tiled ") and oom["psnr_vs_full_db"] >= 40
    assert cases["4-cpu"]["decision"] == "cpu" and cases["4-cpu"]["psnr_vs_full_db"] == float("inf")
    assert cases["1-full"]["psnr_vs_picture_db"] > 15  # the fixture reconstructs the picture (about 19 dB)
    assert "vs full" in r.stdout and "vs picture" in r.stdout and "5-remote" in r.stdout
    # the newcomer is told the fixture is blurry (about 19 dB against the picture) and shown the original beside it
    assert f"{full_vs_picture:.1f} dB PSNR against the original picture" in r.stdout and "0-picture-vs-full.png" in names
    assert Image.open(out / "0-picture-vs-full.png").size == (512 * 2 + 8, 512)
    # fits a terminal, even the remote-down error (the last line names the output folder, which can be long)
    assert max(len(line) for line in r.stdout.splitlines() if str(out) not in line) <= 100
    # remote: decoded by a loopback `hybrid-vae serve` app with the same fixture; down -> local fallback
    remote, down = cases["5-remote"], cases["6-remote-down"]
    assert remote["decision"].startswith("remote ") and not remote["fell_back"]
    assert remote["psnr_vs_full_db"] >= 40 and remote["remote"]["endpoint"].startswith("http://127.0.0.1:")
    assert down["fell_back"] and down["chosen"].startswith("remote ") and down["decision"] in ("cpu", "full")
    assert "RemoteConnectError" in down["attempts"][0][1] and down["psnr_vs_full_db"] >= 40
    assert remote["identity"]["verdict"] == "same" and remote["identity"]["source"] == "canary"
    assert down["identity"]["source"] == "cache"  # verified while it was up; now it does not answer
    other = cases["7-remote-other-vae"]  # an endpoint with other weights: the canary keeps the image local
    assert other["identity"]["verdict"] == "other" and not other["decision"].startswith("remote")
    assert "endpoint serves another VAE" in other["infotext"] and other["psnr_vs_full_db"] >= 40
    # deterministic: a second run decides the same and produces the same pixels
    r2 = run("demo", "--out", str(tmp_path / "again"), "--no-oom")
    assert r2.returncode == 0, r2.stderr
    for n in ("1-full.png", "2-tiled-exact.png", "2b-tiled-local.png"):
        assert np.array_equal(np.asarray(Image.open(out / n)), np.asarray(Image.open(tmp_path / "again" / n)))


def test_failed_decode_then_cli_decode_reproduces_the_image(tmp_path):
    vae = load_fixture_vae()
    z = torch.randn(1, 4, 24, 32, generator=torch.Generator().manual_seed(4)) * 0.8

    def oom(_m, _i):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    h = vae.decoder.conv_in.register_forward_pre_hook(oom)  # every local path runs it
    try:
        with pytest.raises(DecodeFailedError) as e:
            HybridDecoder(probe=lambda: parse_simulation("name=NVIDIA GeForce RTX 3070,free_gib=8"),
                          latent_dir=tmp_path / "latents").decode(z, vae, family="sd15")
    finally:
        h.remove()
    path = e.value.latent_path
    assert path is not None and path.is_file() and str(path) in str(e.value)
    png = tmp_path / "again.png"
    r = run("decode", str(path), "--fixture", "-o", str(png), "--json")
    assert r.returncode == 0, r.stderr
    assert "accelerate" not in r.stderr  # diffusers' 5-line notice is kept out of our commands (issue 12)
    report = json.loads(r.stdout)
    assert report["ran"]["path"] == "cpu" and report["written"] == [str(png)]
    with torch.no_grad():
        direct = vae.decode(z / 0.18215).sample.clamp(-1, 1)
    want = ((direct[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    got = np.asarray(Image.open(png))
    assert got.shape == (192, 256, 3)
    assert int(np.abs(got.astype(int) - want.astype(int)).max()) <= 1


def test_decode_simulated_tiled_and_text_report(tmp_path):
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(5))
    path = save_latent(z, tmp_path, family="sd15", profile=load_profiles("").family("sd15"))
    r = run("decode", str(path), "--fixture", "--gpu", "NVIDIA GeForce RTX 3070", "--free-gib", "0.6",
            "-o", str(tmp_path / "t.png"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hybrid VAE: tiled ") and "simulated NVIDIA GeForce RTX 3070" in r.stdout
    assert Image.open(tmp_path / "t.png").size == (384, 384)


def test_decode_applies_a_learned_peak(tmp_path):
    """`decode --learned FILE`: this card's learned peak for full decodes (x1.5) no longer lets the full decode fit
    the simulated free memory, so it tiles, and the report's source names the learned factor; a simulated decode is
    not recorded (the file is unchanged)."""
    from hybrid_vae.policy.gpu import GiB
    from hybrid_vae.policy.learned import Learned, LearnedStore, observe_peak

    card = "NVIDIA GeForce RTX 3070"
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(5))
    path = save_latent(z, tmp_path, family="sd15", profile=load_profiles("").family("sd15"))
    roomy = json.loads(run("decode", str(path), "--fixture", "--gpu", card, "--free-gib", "8", "--json",
                           "-o", str(tmp_path / "r.png")).stdout)
    assert roomy["ran"]["path"] == "full"
    free = f"{(roomy['ran']['estimate']['peak_bytes'] * 1.2 + 128 * 2**20) / GiB:.4f}"
    learned = tmp_path / "learned.json"
    LearnedStore(learned).save(observe_peak(Learned(), card=card, family="sd15", path="full", estimated_bytes=GiB,
                                            measured_bytes=1.5 * GiB, now=0.0))
    before = learned.read_bytes()
    args = ("decode", str(path), "--fixture", "--gpu", card, "--free-gib", free, "--json")
    plain = json.loads(run(*args, "-o", str(tmp_path / "a.png")).stdout)
    r = run(*args, "-o", str(tmp_path / "b.png"), "--learned", str(learned))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert plain["ran"]["path"] == "full" and report["ran"]["path"] == "tiled"
    full_opt = next(o for o in report["decision"]["options"] if o["label"] == "full")
    assert "x1.50 learned peak from 1 decode" in full_opt["estimate"]["peak_source"] and not full_opt["feasible"]
    assert learned.read_bytes() == before


def test_decode_video_with_a_vae_folder_writes_a_gif(tmp_path):
    vae = build_tiny_vae("hunyuanvideo")
    vae.save_pretrained(tmp_path / "vae")
    z = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(6))
    path = save_latent(z, tmp_path, family="hunyuanvideo", profile=load_profiles("").family("hunyuanvideo"))
    r = run("decode", str(path), "--vae", str(tmp_path / "vae"))
    assert r.returncode == 0, r.stderr
    gif = path.with_suffix(".gif")
    im = Image.open(gif)
    assert im.size == (64, 64) and im.n_frames == 5


def test_decode_errors_are_clear(tmp_path, capsys, monkeypatch):
    from hybrid_vae.extension.cli import main
    from safetensors.torch import save_file

    monkeypatch.delenv("HYBRID_VAE_SIMULATE_GPU", raising=False)
    bare = tmp_path / "bare.safetensors"
    save_file({"latents": torch.randn(1, 4, 8, 8)}, str(bare))
    for argv, text in [
        (["--fixture"], "has no family in its metadata; pass --family"),
        (["--family", "sd15"], "no VAE: pass --vae"),
        (["--family", "flux", "--fixture"], "4 channels; family flux expects 16"),
    ]:
        assert main(["decode", str(bare), *argv]) == 2
        assert text in capsys.readouterr().err
    assert main(["decode", str(tmp_path / "nope.safetensors"), "--fixture"]) == 2
    assert "not found" in capsys.readouterr().err
    # a hub id that is not cached, offline (the environment must be set before huggingface_hub loads)
    r = run("decode", str(bare), "--family", "sd15", "--vae", "nobody/no-such-vae", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "cannot load it as AutoencoderKL" in r.stderr
    assert r.stderr.count("\n") == 1 and "Warning" not in r.stderr  # one line, no hub warnings
