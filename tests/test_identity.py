"""Proof of identity before remote decode (extension/identity.py) against two real endpoints on loopback:
``hybrid-vae serve`` with the fixture VAE (the local one) and ``hybrid-vae serve`` with another VAE of the same
architecture. Requests are counted at the servers (``/health``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
from hybrid_vae.extension.fixture import load_fixture_vae
from hybrid_vae.extension.identity import (
    IdentityChecker,
    IdentityStore,
    canary_latent,
    psnr_8bit,
    weights_fingerprint,
)
from hybrid_vae.extension.orchestrator import HybridDecoder
from hybrid_vae.extension.remote import RemoteClient
from hybrid_vae.policy import DecodeJob, DecodeSettings, EndpointIdentity, decide, load_profiles, parse_simulation
from hybrid_vae.server.cli import build_app
from hybrid_vae.server.testing import DEMO_CONFIG, free_port, serve_in_thread

CPU = "name=NVIDIA GeForce RTX 3070,free_gib=4"  # a simulated card; its local plans run on the CPU here


def _other_vae_dir(tmp: Path) -> Path:
    """The fixture's architecture with other (random, seed 1) weights, as a diffusers folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    other = AutoencoderKL.from_config(load_fixture_vae().config)
    other.save_pretrained(tmp / "other-vae")
    return tmp / "other-vae"


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """{"same": .../sd15 serving the fixture, "other": .../sd15 serving another VAE}."""
    other_dir = _other_vae_dir(tmp_path_factory.mktemp("vaes"))
    same_cfg = {**DEMO_CONFIG, "families": {"sd15": str(Path(load_fixture_vae.__code__.co_filename).parent / "weights")},
                "demo": False}
    other_cfg = {**DEMO_CONFIG, "families": {"sd15": str(other_dir)}, "demo": False}
    with serve_in_thread(build_app(same_cfg, None)) as a, serve_in_thread(build_app(other_cfg, None)) as b:
        yield {"same": f"{a}/sd15", "other": f"{b}/sd15"}


def requests_at(endpoint: str) -> int:
    """Decode requests the server behind ``endpoint`` has received."""
    base = endpoint.rsplit("/", 1)[0]
    return int(requests.get(f"{base}/health", timeout=10).json()["queue"]["requests"])


def _decoder(tmp_path: Path, endpoint: str, **settings: object) -> HybridDecoder:
    st = DecodeSettings(allow_remote=True, endpoints={"sd15": endpoint}, mode="remote", **settings)  # type: ignore[arg-type]
    return HybridDecoder(settings=st, remote=RemoteClient(max_retries=0), probe=lambda: parse_simulation(CPU),
                         identity=IdentityChecker(IdentityStore(tmp_path / "identity.json")), latent_dir=tmp_path)


def _latent(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_remote_for_the_matching_endpoint_refused_for_the_other_one_canary_once_per_pair(
        endpoints: dict[str, str], tmp_path: Path) -> None:
    vae = load_fixture_vae()
    same, other = endpoints["same"], endpoints["other"]
    n_same, n_other = requests_at(same), requests_at(other)

    dec = _decoder(tmp_path, same)
    r1 = dec.decode(_latent(1), vae, family="sd15").report
    assert r1.ran.path == "remote" and not r1.fell_back
    ident = r1.decision.identity
    assert ident is not None and ident.verdict == "same" and ident.source == "canary" and ident.psnr_db >= 35
    assert requests_at(same) == n_same + 2  # the canary, then the decode
    r2 = dec.decode(_latent(2), vae, family="sd15").report
    assert r2.ran.path == "remote" and r2.decision.identity.source == "cache"
    assert requests_at(same) == n_same + 3  # no second canary
    assert "endpoint serves this VAE" in r2.infotext()

    dec_o = _decoder(tmp_path, other)
    r3 = dec_o.decode(_latent(3), vae, family="sd15").report
    assert r3.ran.path != "remote" and not r3.fell_back  # remote was never a plan
    assert "endpoint serves another VAE" in r3.reason and "endpoint serves another VAE" in r3.infotext()
    assert r3.decision.identity.verdict == "other" and r3.decision.identity.psnr_db < 35
    assert not any(p.path == "remote" for p in r3.decision.plans)
    r4 = dec_o.decode(_latent(4), vae, family="sd15").report
    assert r4.ran.path != "remote" and r4.decision.identity.source == "cache"
    assert requests_at(other) == n_other + 1  # one canary; no latent of the user's ever went there

    # the user's override: remote on the other VAE's endpoint, and the line still says what it is
    dec_ok = _decoder(tmp_path, other, allow_remote_custom_vae=True)
    r5 = dec_ok.decode(_latent(5), vae, family="sd15").report
    assert r5.ran.path == "remote" and "endpoint serves another VAE" in r5.infotext()
    assert "allowed by allow_remote_custom_vae" in str(r5.decision.to_dict()["options"])
    assert requests_at(other) == n_other + 2  # the decode only: the verdict was cached


def test_verdict_is_checked_again_when_the_local_weights_change(endpoints: dict[str, str], tmp_path: Path) -> None:
    vae = load_fixture_vae()
    same = endpoints["same"]
    dec = _decoder(tmp_path, same)
    dec.decode(_latent(1), vae, family="sd15")
    n = requests_at(same)
    with torch.no_grad():
        for p in vae.decoder.parameters():  # a "fine-tune": every weight moves a little
            p.mul_(1.0 + 1e-4)
    r = dec.decode(_latent(1), vae, family="sd15").report
    assert r.decision.identity.source == "canary" and requests_at(same) == n + 2  # a new canary, then the decode
    assert r.decision.identity.verdict == "same"  # 1e-4 relative is far inside 35 dB
    with torch.no_grad():
        for p in vae.decoder.parameters():  # another VAE altogether
            p.copy_(torch.randn_like(p) * p.std().clamp_min(1e-3))
    r = dec.decode(_latent(1), vae, family="sd15").report
    assert r.decision.identity.verdict == "other" and r.ran.path != "remote"
    assert requests_at(same) == n + 3  # its canary only


def test_verdicts_persist_and_expire(endpoints: dict[str, str], tmp_path: Path) -> None:
    vae = load_fixture_vae()
    same = endpoints["same"]
    _decoder(tmp_path, same).decode(_latent(1), vae, family="sd15")
    n = requests_at(same)
    fresh = _decoder(tmp_path, same)  # a new process would read the same file
    assert fresh.decode(_latent(1), vae, family="sd15").report.decision.identity.source == "cache"
    assert requests_at(same) == n + 1
    store = IdentityStore(tmp_path / "identity.json", ttl_s=60)
    fp = weights_fingerprint(vae)
    assert fp is not None
    got = store.get(same, "sd15", fp)
    assert got is not None and got.verdict == "same"
    assert store.get(same, "sd15", fp, now=got.checked_at + 61) is None  # past the TTL: checked again


def test_an_unreachable_endpoint_is_unverified_and_not_used(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}/sd15"
    r = _decoder(tmp_path, down).decode(_latent(1), load_fixture_vae(), family="sd15").report
    assert r.ran.path != "remote" and r.decision.identity.verdict == "unverified"
    assert "not verified" in r.reason and "cannot connect" in r.decision.identity.detail
    assert IdentityStore(tmp_path / "identity.json").load() == {}  # not cached: checked again next time


def test_decide_applies_the_verdict_instead_of_the_name_rule() -> None:
    profiles, gpu = load_profiles(), parse_simulation(CPU)
    url = "http://127.0.0.1:9/sd15"
    st = DecodeSettings(allow_remote=True, endpoints={"sd15": url})
    job = DecodeJob("sd15", 512, 512, custom_vae=True, vae_id="renamed.safetensors")
    same = EndpointIdentity(url, "sd15", "f" * 32, "same", 52.0, 35.0, 0.0)
    assert not any(p.path == "remote" for p in decide(job, gpu, profiles, st).plans)  # name rule: custom
    d = decide(job, gpu, profiles, st, identity=same)  # proven the same VAE: the name does not matter
    assert any(p.path == "remote" for p in d.plans) and d.identity == same
    other = EndpointIdentity(url, "sd15", "f" * 32, "other", 7.8, 35.0, 0.0)
    d = decide(DecodeJob("sd15", 512, 512), gpu, profiles, st, identity=other)
    assert not any(p.path == "remote" for p in d.plans)
    assert "endpoint serves another VAE (canary 7.8 dB < 35 dB)" in d.reason
    assert d.to_dict()["identity"]["verdict"] == "other"
    elsewhere = EndpointIdentity("http://127.0.0.1:9/other", "sd15", "f" * 32, "other", 7.8, 35.0, 0.0)
    assert any(p.path == "remote" for p in decide(DecodeJob("sd15", 512, 512), gpu, profiles, st,
                                                  identity=elsewhere).plans)  # a verdict about another URL


def test_fingerprint_sees_weights_dtype_and_shape_not_the_object() -> None:
    a, b = load_fixture_vae(), load_fixture_vae()
    fa = weights_fingerprint(a)
    assert fa is not None and fa == weights_fingerprint(b)
    with torch.no_grad():
        b.decoder.conv_in.weight.mul_(1.001)
    assert weights_fingerprint(b) != fa
    assert weights_fingerprint(load_fixture_vae(dtype=torch.bfloat16)) != fa
    assert weights_fingerprint(torch.nn.Identity()) is None  # no weights: nothing to compare


def test_canary_is_seeded_and_never_the_users_latent() -> None:
    fam = load_profiles().family("sd15")
    c1, c2 = canary_latent(fam), canary_latent(fam)
    assert torch.equal(c1, c2) and c1.shape == (1, 4, 8, 8)
    assert canary_latent(load_profiles().family("wan")).shape == (1, 16, 1, 8, 8)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert psnr_8bit(x, x) == 100.0 and psnr_8bit(x, -x) < 10
    with pytest.raises(ValueError, match="shapes differ"):
        psnr_8bit(x, torch.zeros(1, 3, 16, 16))


def test_store_is_bounded_and_survives_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "identity.json"
    store = IdentityStore(path, max_entries=3)
    for i in range(5):
        store.put(EndpointIdentity(f"http://127.0.0.1:9/e{i}", "sd15", "f" * 32, "same", 50.0, 35.0, float(i + 1)),
                  answer_sha="x")
    kept = store.load()
    assert len(kept) == 3 and {v["endpoint"].rsplit("/", 1)[1] for v in kept.values()} == {"e2", "e3", "e4"}
    assert store.forget("http://127.0.0.1:9/e3") == 1 and len(store.load()) == 2
    path.write_text("{not json", encoding="utf-8")
    assert store.load() == {} and store.error is not None and "identity cache ignored" in store.error
    store.put(EndpointIdentity("http://127.0.0.1:9/e", "sd15", "f" * 32, "unverified", None, 35.0, 1.0), answer_sha="")
    assert store.load() == {}  # unverified verdicts are not kept


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYBRID_VAE_SIMULATE_GPU", "HYBRID_VAE_PROFILE")}
    return subprocess.run([sys.executable, "-m", "hybrid_vae.extension.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_explain_shows_the_verdict_and_decode_applies_it(endpoints: dict[str, str], tmp_path: Path) -> None:
    """`hybrid-vae explain --vae` runs (then reads) the canary and shows it; `hybrid-vae decode --endpoint` uses a
    matching endpoint and refuses the other, with the reason."""
    from hybrid_vae.extension.fixture import FIXTURE_DIR
    from hybrid_vae.extension.latents import save_latent

    same, other = endpoints["same"], endpoints["other"]
    common = ("explain", "--family", "sd15", "--width", "512", "--height", "512", "--gpu", "NVIDIA GeForce RTX 3070",
              "--free-gib", "0.3", "--remote")
    r = _cli(*common, "--endpoint", other)
    assert r.returncode == 0, r.stderr
    assert f"Identity  not checked for {other}: give --vae" in r.stdout
    r = _cli(*common, "--endpoint", other, "--vae", str(FIXTURE_DIR))
    assert r.returncode == 0, r.stderr
    assert "endpoint serves another VAE (canary" in r.stdout and "canary run now" in r.stdout
    assert "remote: endpoint serves another VAE" in r.stdout  # in the reason too
    r = _cli(*common, "--endpoint", other, "--vae", str(FIXTURE_DIR), "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["identity"]
    assert got["verdict"] == "other" and got["source"] == "cache"  # the first explain's canary, from the cache file

    lat = save_latent(_latent(6), tmp_path, family="sd15", meta={"height": 128, "width": 128})
    r = _cli("decode", str(lat), "--fixture", "--endpoint", same, "--gpu", "NVIDIA GeForce RTX 3070", "--free-gib",
             "0.01", "-o", str(tmp_path / "same.png"), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["ran"]["path"] == "remote" and "endpoint serves this VAE" in rep["infotext"]
    r = _cli("decode", str(lat), "--fixture", "--endpoint", other, "--gpu", "NVIDIA GeForce RTX 3070", "--free-gib",
             "0.01", "-o", str(tmp_path / "other.png"), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["ran"]["path"] != "remote" and "endpoint serves another VAE" in rep["infotext"]


def test_a_local_vae_failing_on_the_canary_loses_no_image(endpoints: dict[str, str], tmp_path: Path) -> None:
    """The local canary decode fails (here: the decoder raises once): no verdict, remote unused, and the decode's
    own plans still run and produce the image."""
    vae = load_fixture_vae()
    calls = {"n": 0}

    def once(_module: torch.nn.Module, _inputs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("decoder exploded on the canary")

    handle = vae.decoder.register_forward_pre_hook(once)
    try:
        r = _decoder(tmp_path, endpoints["same"]).decode(_latent(7), vae, family="sd15").report
    finally:
        handle.remove()
    assert r.decision.identity.verdict == "unverified" and "decoder exploded" in r.decision.identity.detail
    assert r.ran.path != "remote" and "not verified" in r.infotext()
