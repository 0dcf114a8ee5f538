"""Decisions carry a reason code and its parameters; the sentence and the infotext clause are rendered from them
by ``policy/reasons.py`` alone, and consumers read the code (issue 14)."""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib

import pytest
from hybrid_vae.policy import ArgumentError, HybridVAEError
from hybrid_vae.policy.decide import decide, endpoint_for, remote_route
from hybrid_vae.policy.geometry import with_family
from hybrid_vae.policy.gpu import GiB, GpuState, parse_simulation
from hybrid_vae.policy.learned import Learned, LearnedEntry, job_voxels, size_bucket
from hybrid_vae.policy.model import DecodeJob, DecodeSettings, EndpointIdentity, NetworkStats
from hybrid_vae.policy.profiles import load_profiles
from hybrid_vae.policy.reasons import REASON_CODES, reason_text, remote_text, request_text, summary_text

P = load_profiles("")
REPO = pathlib.Path(__file__).resolve().parents[1]
RTX = "NVIDIA GeForce RTX 3070"
NO_GPU = GpuState(name="cpu", total_bytes=0, free_bytes=0, source="cpu")
FAST_NET = NetworkStats(rtt_s=0.01, down_bytes_per_s=1e9, up_bytes_per_s=1e9, source="measured",
                        server_seconds_per_voxel=1e-12)
ON = {"allow_remote": True, "endpoints": {"sd15": "https://a.example/sd15"}}


def gpu(free: float, host: float | None = None, name: str = RTX) -> GpuState:
    g = parse_simulation(f"name={name},free_gib={free}")
    return dataclasses.replace(g, host_available_bytes=None if host is None else int(host * GiB))


def slow_full(job: DecodeJob) -> Learned:
    """Learned timings saying full decodes of this size run 20x slower than estimated on the RTX 3070."""
    e = LearnedEntry(RTX, job.family, "full", size_bucket(job_voxels(job)), factor=20.0, count=5, updated=0.0)
    return Learned(entries={e.key: e})


J512 = DecodeJob("sd15", 512, 512, dtype="float32")
# (scenario, job, gpu, settings, network, learned, expected code, expected parameters)
SCENARIOS = [
    ("full fits", J512, gpu(8), {}, None, None, "full_fits", {"label": "full"}),
    ("batch one at a time", DecodeJob("sd15", 512, 512, batch=2), gpu(1), {}, None, None, "batch_sliced",
     {"batch": 2, "label": "full (item by item)"}),
    ("tiles: full too big, exact", DecodeJob("sd15", 512, 512), gpu(0.5), {}, None, None, "tiled_full_too_big",
     {"tiles": "exact"}),
    ("tiles: exact with host memory", DecodeJob("sdxl", 1024, 1024), gpu(2.0, host=16), {}, None, None,
     "tiled_full_too_big", {"tiles": "exact_host"}),
    ("tiles: nothing lossless fits", DecodeJob("sd15", 768, 768), gpu(0.5), {}, None, None, "tiled_full_too_big",
     {"tiles": "local_no_lossless"}),
    ("tiles: local much faster", DecodeJob("sd15", 256, 256, dtype="float32"), gpu(0.28),
     {"min_tile_px": 64, "reserve_bytes": 128 * 2**20, "exact_tolerance": 1.0, "tight_speedup": None}, None, None,
     "tiled_full_too_big", {"tiles": "local_lossless_slower"}),
    ("tiles requested while full fits", DecodeJob("sd15", 256, 256, dtype="float32"), gpu(1.0), {"mode": "tiled"},
     None, None, "tiled_requested", {}),
    ("tiles estimated faster (learned)", J512, gpu(8), {}, None, slow_full(J512), "tiled_faster", {}),
    ("squeezed", J512, gpu(1.0), {"reserve_bytes": 960 * 2**20}, None, None, "squeezed", {}),
    ("into the reserve, much faster", DecodeJob("sd15", 256, 256, dtype="float32"), gpu(0.28), {"min_tile_px": 64},
     None, None, "tight_faster", {"tiles": "exact", "behind_label": "tiled 64px exact", "tight_speedup": 1.5}),
    ("nearly fits, the CPU's host memory does not", DecodeJob("hunyuanvideo", 1280, 720, frames=129),
     gpu(0.6, host=4), {}, None, None, "near_fit", {"near_fit": 1.25}),
    ("nearly fits, the CPU 10x slower", J512, gpu(0.2, host=64), {}, None, None, "near_fit", {"near_fit": 1.25}),
    ("remote faster", J512, gpu(8), ON, FAST_NET, None, "remote_faster", {"remote_code": "configured"}),
    ("remote, no GPU", J512, NO_GPU, ON, None, None, "remote_no_gpu", {"on_gpu": False}),
    ("remote, nothing fits", J512, gpu(0.01), ON, None, None, "remote_nothing_fits", {}),
    ("cpu, no GPU", J512, NO_GPU, {}, None, None, "cpu_no_gpu", {"remote_code": "remote_off"}),
    ("cpu, nothing fits", J512, gpu(0.01), {}, None, None, "cpu_nothing_fits", {}),
    ("cpu, local tiles off", DecodeJob("sd15", 256, 256, dtype="float32"), gpu(0.1),
     {"tile_groupnorm": "exact", "min_tile_px": 64, "reserve_bytes": 128 * 2**20}, None, None, "cpu_nothing_fits",
     {"local_tiles_off": "exact"}),
    ("full requested, too big", J512, gpu(0.5), {"mode": "full"}, None, None, "tiled_full_too_big",
     {"unmet_request": "full"}),
    ("remote requested, off", J512, gpu(8), {"mode": "remote"}, None, None, "full_fits",
     {"unmet_request": "remote", "remote_code": "remote_off"}),
    ("remote requested, circuit open", J512, gpu(8), {**ON, "mode": "remote"},
     NetworkStats(available=False, note="3 failures"), None, "full_fits",
     {"unmet_request": "remote", "remote_code": "unavailable", "remote_url": "https://a.example/sd15"}),
    ("no endpoint", DecodeJob("sd15", 512, 512, dtype="float32"), gpu(8),
     {"allow_remote": True, "use_builtin_endpoints": False, "mode": "remote"}, None, None, "full_fits",
     {"remote_code": "no_endpoint", "family": "sd15"}),
]


@pytest.mark.parametrize(("name", "job", "g", "s", "net", "learned", "code", "params"), SCENARIOS,
                         ids=[s[0] for s in SCENARIOS])
def test_each_scenario_has_its_code_and_parameters(name, job, g, s, net, learned, code, params):
    d = decide(job, g, P, DecodeSettings(**s), net, learned=learned)
    assert d.reason_code == code, (name, d.reason)
    for k, v in params.items():
        assert d.reason_params.get(k) == v, (name, k, dict(d.reason_params))
    # the text comes from the code and parameters alone, through the one renderer
    assert d.reason == reason_text(d.reason_code, d.reason_params)
    assert d.summary == summary_text(d.reason_code, d.reason_params)
    # the parameters are the numbers the sentence states, and read-only
    if d.reason_params.get("on_gpu"):
        assert d.reason_params["budget"] == d.budget_bytes and d.reason_params["available"] == d.available_bytes
    assert d.reason_params.get("need") == d.chosen.estimate.peak_bytes
    with pytest.raises(TypeError):
        d.reason_params["need"] = 0  # type: ignore[index]


def test_every_code_is_reached_by_a_scenario():
    assert {s[6] for s in SCENARIOS} == set(REASON_CODES)


def test_the_codes_tell_apart_what_the_sentence_says():
    """The code and the sentence agree on every branch (a few phrases per code)."""
    phrase = {"full_fits": "full fits: needs", "batch_sliced": "one at a time needs", "squeezed": "squeezed into",
              "tight_faster": "s), which goes next", "near_fit": "so the GPU is tried first",
              "tiled_full_too_big": "; full needs", "tiled_faster": "estimated faster than full",
              "tiled_requested": "requested: needs", "remote_faster": "s, faster than",
              "remote_no_gpu": "s, no GPU", "remote_nothing_fits": "nothing local fits", "cpu_no_gpu": ": no GPU",
              "cpu_nothing_fits": "no GPU plan fits"}
    for name, job, g, s, net, learned, code, _ in SCENARIOS:
        d = decide(job, g, P, DecodeSettings(**s), net, learned=learned)
        assert phrase[code] in d.reason, (name, d.reason)
        asked = d.reason_params.get("unmet_request")
        assert (asked is not None) == d.reason.startswith(f"{asked} requested but"), (name, d.reason)


def test_identity_refusal_and_inferred_family_are_parameters():
    url = "https://a.example/sd15"
    other = EndpointIdentity(endpoint=url, family="sd15", fingerprint="f", verdict="other", psnr_db=7.8,
                             threshold_db=35.0, checked_at=0.0)
    d = decide(J512, gpu(8), P, DecodeSettings(**ON), FAST_NET, identity=other)
    assert d.chosen.path == "full" and d.reason_params["remote_identity"] == "refused"
    assert "; remote: endpoint serves another VAE (canary 7.8 dB < 35 dB); remote not used for it" in d.reason
    allowed = decide(J512, gpu(8), P, DecodeSettings(**ON, allow_remote_custom_vae=True), FAST_NET, identity=other)
    assert allowed.reason_code == "remote_faster" and allowed.reason_params["remote_identity"] == "allowed"
    fam = P.family("sdxl").model_copy(update={"inferred": "AutoencoderKL: 8 latent channels", "endpoints": ()})
    profiles = with_family(P, "unmatched", fam)
    u = decide(DecodeJob("unmatched", 512, 512), gpu(8), profiles, DecodeSettings(allow_remote=True))
    assert u.reason_params["inferred"] == "AutoencoderKL: 8 latent channels"
    assert u.reason_params["remote_code"] == "inferred_family" and u.summary.endswith("VAE matches no family: local only")


def test_endpoint_for_renders_the_route():
    fam = P.family("sd15")
    for s, code in [(DecodeSettings(), "remote_off"),
                    (DecodeSettings(allow_remote=True, endpoints={"sd15": "https://a/x|https://b/y"}), "pool"),
                    (DecodeSettings(allow_remote=True), "builtin" if fam.endpoints else "no_endpoint")]:
        url, route = remote_route(J512, fam, s)
        assert route["remote_code"] == code and endpoint_for(J512, fam, s) == (url, remote_text(route))
    custom = dataclasses.replace(J512, custom_vae=True, vae_id="my/vae")
    assert remote_route(custom, fam, DecodeSettings(allow_remote=True)) == \
        (None, {"remote_code": "custom_vae", "remote_vae_id": "my/vae"})


def test_request_text_is_the_first_clause_of_an_unmet_request():
    d = decide(DecodeJob("sd15", 256, 256, dtype="float32"), gpu(0.05), P, DecodeSettings(mode="tiled"))
    assert d.reason_params["unmet_request"] == "tiled"
    assert request_text(d.reason_params) == "tiled requested but no tile fits"
    assert d.reason.startswith("tiled requested but no tile fits; ")
    custom = dataclasses.replace(J512, custom_vae=True, vae_id="my/vae")
    r = decide(custom, gpu(8), P, DecodeSettings(mode="remote", allow_remote=True))
    assert r.reason_params["remote_code"] == "custom_vae"
    assert request_text(r.reason_params) == "remote requested but custom VAE my/vae differs from the endpoint's"
    assert r.reason.startswith("remote requested but custom VAE my/vae differs from the endpoint's; remote not "
                               "allowed for it; full fits")
    assert request_text(decide(J512, gpu(8), P, DecodeSettings(mode="full")).reason_params) is None


def test_to_dict_and_json_carry_the_code():
    d = decide(J512, gpu(0.5), P)
    import copy
    import pickle

    for back in (pickle.loads(pickle.dumps(d)), copy.deepcopy(d)):  # a decision may cross a process boundary
        assert back == d and back.reason == d.reason and back.reason_params == d.reason_params
    out = json.loads(json.dumps(d.to_dict()))
    assert out["decision"]["reason_code"] == d.reason_code == "tiled_full_too_big"
    assert out["decision"]["reason_params"]["full_need"] == d.reason_params["full_need"]
    assert out["decision"]["reason"] == d.reason


def _string_literals(path: pathlib.Path) -> list[str]:
    """The string constants of a module's code (f-string parts included), not its docstrings or comments."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


def test_the_sentences_live_in_the_renderer_only():
    """No other module's code writes the reason's phrases (one renderer): a change of wording is one edit."""
    phrases = ["full fits: needs", "one at a time needs", "squeezed into the reserve:", "full would fit too",
               "which goes next",
               "requested but no tile fits", "remote not used for it", "reserve: no budget]",
               "of whole-image buffers in host memory,", "no lossless plan fits:", "budget < "]
    files = [f for d in ("policy", "extension", "server") for f in (REPO / d).rglob("*.py") if f.name != "reasons.py"]
    assert len(files) > 20
    for f in files:
        for literal in _string_literals(f):
            for ph in phrases:
                assert ph not in literal, (f, ph, literal)
    assert any("full would fit too" in lit for lit in _string_literals(REPO / "policy" / "reasons.py"))


def test_output_argument_error_is_a_hybrid_vae_error_and_a_value_error():
    import torch
    from hybrid_vae.extension.fixture import build_tiny_vae
    from hybrid_vae.extension.orchestrator import HybridDecoder

    with pytest.raises(ArgumentError, match="output='jpeg'") as exc:
        HybridDecoder().decode(torch.zeros(1, 4, 8, 8), build_tiny_vae("sd15"), family="sd15", output="jpeg")  # type: ignore[arg-type]
    assert isinstance(exc.value, HybridVAEError) and isinstance(exc.value, ValueError)
