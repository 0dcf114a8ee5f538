"""HybridDecoder: the plan chain on real diffusers VAEs, OOM recovery, saved latents, bad input, remote."""

from __future__ import annotations

import dataclasses
import json
import math
import weakref

import numpy as np
import pytest
import torch
from hybrid_vae.extension.executors import run_plan
from hybrid_vae.extension.fixture import build_tiny_vae, fixture_image, load_fixture_vae
from hybrid_vae.extension.latents import load_latent, pack_flux, to_vae_space, unpack_flux
from hybrid_vae.extension.orchestrator import HybridDecoder, claim_memory, is_oom
from hybrid_vae.policy import (
    DecodeFailedError,
    DecodeSettings,
    LatentError,
    ProfileError,
    load_profiles,
    parse_simulation,
)
from hybrid_vae.policy.decide import NEAR_FIT, claim_bytes, decide

BIG = "name=NVIDIA GeForce RTX 3070,total_gib=8,free_gib=8"


def sim(spec: str = BIG):
    return lambda: parse_simulation(spec)


@pytest.fixture(scope="module")
def profiles():
    return load_profiles("")


@pytest.fixture
def tiny():
    return build_tiny_vae("sd15")


def latent(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


class DecoderCalls:
    """Counts decoder (conv_in) forwards; raises ``exc`` on the calls listed in ``fail`` (1-based), or on all."""

    def __init__(self, vae, *, fail=(), exc_factory=None, always=False):
        self.n = 0
        self.fail, self.always, self.exc_factory = set(fail), always, exc_factory
        # every local path runs conv_in first (exact tiles run the mid block's layers, not its forward)
        self.handle = vae.decoder.conv_in.register_forward_pre_hook(self.hook)

    def hook(self, _m, _i):
        self.n += 1
        if self.always or self.n in self.fail:
            raise self.exc_factory()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.handle.remove()


def oom():
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (injected)")


# ---- the chosen plan runs ---------------------------------------------------------------------

def test_simulated_gpu_runs_the_chosen_tiled_plan_on_cpu(monkeypatch, tmp_path):
    """Env simulation, fixture VAE, real picture: the tiles the decision chose run here, and look right."""
    from PIL import Image

    vae = load_fixture_vae()
    img = fixture_image("astronaut", 256).resize((512, 512), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode() * 0.18215
    # no host memory to spare: local tiles (with it, exact tiles with host buffers: tests/test_offload.py)
    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", "name=NVIDIA GeForce RTX 3070,total_gib=8,free_gib=0.55,host_gib=0")
    calls = []
    res = HybridDecoder(latent_dir=tmp_path).decode(z, vae, family="sd15", progress=lambda d, n: calls.append((d, n)))
    r = res.report
    assert r.simulated and r.device == "cpu" and r.ran is r.chosen and r.ran.path == "tiled"
    from hybrid_vae.policy.tiles import axis_tiles

    n = len(axis_tiles(64, r.ran.tile_px // 8, r.ran.overlap_px // 8)) ** 2
    assert calls == [(i + 1, n) for i in range(n)] and n > 1
    full = run_plan(r.decision.options[0].plan, vae, z / 0.18215, family=load_profiles("").family("sd15"))

    def psnr(a, b):
        return 10 * np.log10(4 / float(((a - b) ** 2).mean()))

    assert psnr(res.tensor, x) >= psnr(full, x) - 1.5  # as faithful to the picture as the full decode
    assert r.groupnorm == "local"
    assert r.infotext().startswith(f"{r.ran.label}, ") and "budget <" in r.infotext() and "simulated" in r.infotext()
    assert r.peak_bytes is None  # no CUDA: nothing measured, nothing invented


def test_exact_tiles_reach_the_executor_and_the_report(tiny, tmp_path):
    z = latent(1, 4, 40, 40)
    dec = HybridDecoder(probe=sim(), latent_dir=tmp_path, settings=DecodeSettings(mode="tiled"))
    res = dec.decode(z, tiny, family="sd15")
    r = res.report
    assert r.ran.path == "tiled" and r.groupnorm == "exact" and r.ran.label.endswith(" exact")
    assert r.infotext().startswith(r.ran.label)
    again = run_plan(r.ran, tiny, z / 0.18215, family=load_profiles("").family("sd15"))
    torch.testing.assert_close(res.tensor, again)
    with torch.no_grad():
        torch.testing.assert_close(res.tensor, tiny.decode(z / 0.18215).sample.clamp(-1, 1), atol=2e-5, rtol=0)
    local = HybridDecoder(probe=sim(), latent_dir=tmp_path,
                          settings=DecodeSettings(mode="tiled", tile_groupnorm="local")).decode(z, tiny, family="sd15")
    assert local.report.groupnorm == "local" and local.report.ran.overlap_px == 64


def test_a_decoder_the_exact_tiler_cannot_run_is_never_planned_exact(tmp_path):
    """The engine asks the executor whether it can tile this VAE exactly before deciding: no wasted
    attempt on a decoder it cannot run layer by layer (here its activation is not SiLU)."""
    vae = build_tiny_vae("sd15")
    vae.decoder.conv_act = torch.nn.GELU()
    res = HybridDecoder(probe=sim(), latent_dir=tmp_path, settings=DecodeSettings(mode="tiled")).decode(
        latent(1, 4, 40, 40), vae, family="sd15")
    assert all(p.groupnorm == "local" for p in res.report.decision.plans)
    assert len(res.report.attempts) == 1 and res.report.groupnorm == "local"


def test_full_on_a_big_card_equals_direct_decode(tiny, tmp_path):
    z = latent(1, 4, 16, 16)
    res = HybridDecoder(probe=sim(), latent_dir=tmp_path).decode(z, tiny, family="sd15")
    assert res.report.ran.path == "full" and res.report.attempts[0][1] is None
    with torch.no_grad():
        direct = tiny.decode(z / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(res.tensor, direct)
    json.dumps(res.report.to_dict())  # serialisable


# ---- failures move down the chain -----------------------------------------------------------------

@pytest.mark.parametrize("make", [oom, lambda: RuntimeError("CUDA error: out of memory"),
                                  lambda: torch.OutOfMemoryError("out of memory (MPS)")],
                         ids=["cuda-oom", "runtime-text", "torch-oom"])
def test_out_of_memory_in_full_plan_falls_to_the_next_plan(tiny, tmp_path, make):
    z = latent(1, 4, 40, 40)
    freed = []
    hold = []

    def exc():
        big = torch.empty(1 << 20)  # pinned by this frame, which the traceback keeps alive
        hold.append(weakref.ref(big))
        return make()

    def before(plan):
        if hold:
            freed.append(hold[0]() is None)

    dec = HybridDecoder(probe=sim(), latent_dir=tmp_path, before_plan=before)
    with DecoderCalls(tiny, fail=[1], exc_factory=exc):
        res = dec.decode(z, tiny, family="sd15")
    r = res.report
    assert r.chosen.path == "full" and r.ran is r.decision.plans[1] and r.ran.path == "tiled"
    assert r.attempts[0][0] == "full" and r.attempts[0][1] == "out of memory" and r.attempts[1][1] is None
    assert freed == [True]  # the failed attempt's memory was released before the next plan ran
    assert r.infotext().startswith(f"{r.ran.label}, fell back from full (out of memory)")
    again = run_plan(r.ran, tiny, to_vae_space(z, load_profiles("").family("sd15")),
                     family=load_profiles("").family("sd15"))
    torch.testing.assert_close(res.tensor, again)
    assert not list(tmp_path.iterdir())  # nothing saved: the image was made


def test_oom_at_the_decoders_forward_falls_to_exact_tiles_equal_to_the_full_decode(tiny, tmp_path):
    """The issue's fault test, literally: torch.cuda.OutOfMemoryError raised at the decoder's forward
    fails the full plan; the next plan (exact tiles, which never call the decoder's forward) gives the
    same image a full decode would have."""
    z = latent(1, 4, 40, 40)

    def boom(_m, _i):
        raise oom()

    h = tiny.decoder.register_forward_pre_hook(boom)
    try:
        res = HybridDecoder(probe=sim(), latent_dir=tmp_path).decode(z, tiny, family="sd15")
    finally:
        h.remove()
    r = res.report
    assert r.attempts[0] == ("full", "out of memory", r.attempts[0][2]) and r.attempts[-1][1] is None
    assert r.ran.path == "tiled" and r.ran.groupnorm == "exact"
    with torch.no_grad():
        torch.testing.assert_close(res.tensor, tiny.decode(z / 0.18215).sample.clamp(-1, 1), atol=2e-5, rtol=0)


def test_any_local_error_moves_on_and_cpu_is_last(tiny, tmp_path):
    z = latent(1, 4, 40, 40)
    dec = HybridDecoder(probe=sim(), latent_dir=tmp_path)
    with DecoderCalls(tiny, always=True, exc_factory=lambda: ValueError("cudnn said no")) as calls:
        with pytest.raises(DecodeFailedError):
            dec.decode(z, tiny, family="sd15")
    assert calls.n == len(HybridDecoder(probe=sim()).decode(z, tiny, family="sd15").report.decision.plans)


def test_every_plan_failing_saves_the_latent_and_names_it(tiny, tmp_path):
    z = latent(1, 4, 40, 40, dtype=torch.float16)
    dec = HybridDecoder(probe=sim(), latent_dir=tmp_path / "saved")
    with DecoderCalls(tiny, always=True, exc_factory=oom), pytest.raises(DecodeFailedError) as e:
        dec.decode(z, tiny, family="sd15", vae_id="my/vae")
    err = e.value
    assert err.latent_path is not None and err.latent_path.is_file()
    assert str(err.latent_path) in str(err) and "hybrid-vae decode" in str(err)
    labels = [a[0] for a in err.attempts]
    assert labels[0] == "full" and labels[-3:] == ["cpu", "cpu 160px exact", "cpu 192px/64"]
    assert all(a[1] == "out of memory" for a in err.attempts)
    back, meta = load_latent(err.latent_path)
    assert torch.equal(back, z)  # the latent as given: not normalised, same dtype
    assert meta["family"] == "sd15" and meta["height"] == 320 and meta["width"] == 320
    assert meta["vae_id"] == "my/vae" and "every plan failed" in meta["reason"]


def test_no_plan_at_all_still_saves_the_latent(tiny, tmp_path):
    dec = HybridDecoder(probe=sim("name=cpu-only,total_gib=1,free_gib=0"), settings=DecodeSettings(allow_cpu=False),
                        latent_dir=tmp_path)
    with pytest.raises(DecodeFailedError, match="no plan can decode this job") as e:
        dec.decode(latent(1, 4, 8, 8), tiny, family="sd15")
    assert e.value.latent_path is not None and e.value.latent_path.is_file()


# ---- bad input is rejected before any decoder runs --------------------------------------------

@pytest.mark.parametrize("z, family, kw, err, text", [
    (latent(1, 16, 8, 8), "sd15", {}, LatentError, "16 channels; family sd15 expects 4"),
    (torch.full((1, 4, 8, 8), float("nan")), "sd15", {}, LatentError, "NaN"),
    (torch.full((1, 4, 8, 8), float("inf")), "sd15", {}, LatentError, "inf"),
    (latent(1, 16, 64), "flux", {}, LatentError, "give height and width"),
    (latent(1, 4, 8, 8), "sd9", {}, ProfileError, "unknown family"),
    (latent(4, 8, 8), "sd15", {}, LatentError, "3-D"),
    (latent(1, 4, 2, 8, 8), "sd15", {}, LatentError, "5-D"),
    (latent(1, 4, 8, 8), "sd15", {"dtype": "float64"}, LatentError, "dtype='float64'"),
    (latent(1, 4, 8, 8), "sd3", {}, LatentError, r"family='sd3', but the VAE is AutoencoderKL: 4 channels"),
], ids=["channels", "nan", "inf", "packed-no-size", "unknown-family", "rank3", "rank5", "dtype", "family-vs-vae"])
def test_bad_input_fails_before_the_decoder(tiny, tmp_path, z, family, kw, err, text):
    vae = build_tiny_vae("flux") if family == "flux" else tiny  # a flux latent comes with a flux VAE
    with DecoderCalls(vae) as calls, pytest.raises(err, match=text):
        HybridDecoder(probe=sim(), latent_dir=tmp_path).decode(z, vae, family=family, **kw)
    assert calls.n == 0 and not list(tmp_path.iterdir())


def test_latent_error_during_the_chain_is_not_retried(tiny, tmp_path):
    def before(plan):
        raise LatentError("bad latent found late")

    with DecoderCalls(tiny) as calls, pytest.raises(LatentError, match="found late"):
        HybridDecoder(probe=sim(), latent_dir=tmp_path, before_plan=before).decode(latent(1, 4, 8, 8), tiny,
                                                                                   family="sd15")
    assert calls.n == 0 and not list(tmp_path.iterdir())


def test_is_oom():
    assert is_oom(oom()) and is_oom(RuntimeError("HIP out of memory")) and not is_oom(RuntimeError("shape"))


# ---- other families ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["full", "tiled"])
def test_flux_packed_latents(profiles, tmp_path, mode):
    vae = build_tiny_vae("flux")
    z = latent(1, 16, 24, 32, seed=5)
    packed = pack_flux(z)
    dec = HybridDecoder(probe=sim(), latent_dir=tmp_path,
                        settings=DecodeSettings(mode=mode, min_tile_px=64, tile_overlap_px=32))
    res = dec.decode(packed, vae, family="flux", height=192, width=256)
    assert res.report.ran.path == mode and res.tensor.shape == (1, 3, 192, 256)
    if mode == "full":
        with torch.no_grad():
            direct = vae.decode(unpack_flux(packed, 192, 256) / 0.3611 + 0.1159).sample.clamp(-1, 1)
        torch.testing.assert_close(res.tensor, direct)


@pytest.mark.parametrize("kind, frames", [("hunyuanvideo", 6), ("wan", 2)])
@pytest.mark.parametrize("mode", ["full", "tiled"])
def test_video_families(tmp_path, kind, frames, mode):
    vae = build_tiny_vae(kind)
    z = latent(1, 16, frames, 16, 16, seed=6)
    calls = []
    dec = HybridDecoder(probe=sim("name=NVIDIA H100 80GB HBM3,total_gib=80,free_gib=80"), latent_dir=tmp_path,
                        settings=DecodeSettings(mode=mode, min_tile_px=64, tile_overlap_px=16))
    res = dec.decode(z, vae, family=kind, progress=lambda d, n: calls.append((d, n)))
    r = res.report
    out_frames = (frames - 1) * 4 + 1
    assert res.tensor.shape == (1, 3, out_frames, 128, 128)
    assert r.ran.path == mode and r.ran is r.chosen
    if mode == "tiled":
        assert r.ran.tile_px is not None and r.ran.tile_px < 128 and calls[-1][1] > frames


def test_video_frames_argument_is_checked(tmp_path):
    vae = build_tiny_vae("wan")
    with pytest.raises(LatentError, match="frames=9, but 2 latent frames decode to 5"):
        HybridDecoder(probe=sim(), latent_dir=tmp_path).decode(latent(1, 16, 2, 8, 8), vae, family="wan", frames=9)


# ---- remote plans (real client, real loopback servers) ----------------------------------------

@pytest.fixture(scope="module")
def failing_server():
    from hybrid_vae.server.testing import serve_in_thread
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def down(request):
        return JSONResponse({"error": "Service Unavailable"}, status_code=503)

    with serve_in_thread(Starlette(routes=[Route("/{path:path}", down, methods=["POST", "GET"])])) as base:
        yield base


def test_remote_503_falls_back_to_local_and_says_so(tiny, tmp_path, failing_server):
    from hybrid_vae.extension.remote import RemoteClient
    from hybrid_vae.server.testing import verified_identity

    url = f"{failing_server}/sd15"
    client = RemoteClient(max_retries=0)
    dec = HybridDecoder(probe=sim(), latent_dir=tmp_path, remote=client,
                        identity=verified_identity(tmp_path / "identity.json", url, tiny),  # it answered its canary
                        settings=DecodeSettings(allow_remote=True, endpoints={"sd15": url}, mode="remote",
                                                remote_format="raw"))
    res = dec.decode(latent(1, 4, 16, 16), tiny, family="sd15")
    r = res.report
    assert r.chosen.path == "remote" and r.ran.path == "full" and r.remote is None
    assert r.attempts[0][1] == "HTTP 503"
    assert r.infotext().startswith("full, fell back from remote raw (HTTP 503)")


def test_remote_success_gets_the_original_latents(tiny, tmp_path):
    from hybrid_vae.extension.remote import RemoteClient
    from hybrid_vae.server.app import create_app
    from hybrid_vae.server.testing import serve_in_thread

    z = latent(1, 4, 16, 16, seed=9)
    with serve_in_thread(create_app(families={"sd15": tiny}, device="cpu")) as base:
        dec = HybridDecoder(probe=sim(), latent_dir=tmp_path, remote=RemoteClient(max_retries=0),
                            settings=DecodeSettings(allow_remote=True, endpoints={"sd15": f"{base}/sd15"},
                                                    mode="remote", remote_format="raw"))
        res = dec.decode(z, tiny, family="sd15")
    r = res.report
    assert r.ran.path == "remote" and r.device == "remote" and r.remote is not None
    assert r.remote.bytes_up == z.numel() * 4 and r.remote.bytes_down > 0
    with torch.no_grad():
        local = tiny.decode(z / 0.18215).sample.clamp(-1, 1)
    # the server normalised the original latents itself: same picture up to 8-bit quantisation
    assert float((res.tensor - local).abs().max()) <= 1.5 / 127.5
    assert "remote raw via 127.0.0.1" in r.infotext()


def test_no_remote_client_means_no_remote_plan(tiny, tmp_path):
    dec = HybridDecoder(probe=sim(), latent_dir=tmp_path,
                        settings=DecodeSettings(allow_remote=True, endpoints={"sd15": "http://127.0.0.1:9/"}))
    r = dec.decode(latent(1, 4, 8, 8), tiny, family="sd15").report
    assert all(p.path != "remote" for p in r.decision.plans)


# ---- claims: the memory a plan needs, taken before it runs --------------------------------------------


def test_a_refused_claim_decides_again_from_a_fresh_probe(tiny, tmp_path, profiles):
    """Before a local GPU plan runs, its estimated peak is claimed; when that memory went to another process
    after the probe, the engine probes again and decides from what is free now, without starting a decode
    that would run out of memory. Once per decode: a second refusal moves down the new chain."""
    z = latent(1, 4, 40, 40)
    specs = iter(["name=NVIDIA GeForce RTX 3070,total_gib=8,free_gib=8",
                  "name=NVIDIA GeForce RTX 3070,total_gib=8,free_gib=0.4"])
    probes, claims = [], []

    def probe():
        probes.append(next(specs))
        return parse_simulation(probes[-1])

    def claim(device, nbytes):
        claims.append(nbytes)
        return len(claims) != 1  # the first claim is refused

    res = HybridDecoder(probe=probe, latent_dir=tmp_path, claim=claim).decode(z, tiny, family="sd15")
    r = res.report
    assert len(probes) == 2
    assert r.attempts[0][0] == "full" and r.attempts[0][1].startswith("claim refused: ")
    assert r.decision.gpu.free_bytes == int(0.4 * 2**30)  # the report carries the new decision
    assert r.ran is r.decision.chosen and r.ran.path == "tiled" and r.attempts[1][1] is None
    assert claims[1] == claim_bytes(r.ran, r.decision) == r.ran.estimate.peak_bytes + DecodeSettings().reserve_bytes
    fam = profiles.family("sd15")
    torch.testing.assert_close(res.tensor, run_plan(r.ran, tiny, to_vae_space(z, fam), family=fam))
    # refused every time: one fresh decision, then down its chain; the last GPU plan before the CPU claims only
    # its floor (estimate / NEAR_FIT: an OOM costs one attempt, the CPU far more), refused too: the CPU decodes it
    seen = []
    never = HybridDecoder(probe=sim(), latent_dir=tmp_path,
                          claim=lambda d, n: seen.append(n) is not None).decode(z, tiny, family="sd15")
    r = never.report
    refused = [a for a in r.attempts if a[1] and a[1].startswith("claim refused")]
    gpu_plans = [q for q in r.decision.plans if q.path in ("full", "tiled")]
    assert r.ran.path == "cpu" and r.attempts[-1] == (r.ran.label, None, r.attempts[-1][2])
    assert len(refused) == 1 + len(gpu_plans) == len(r.attempts) - 1
    last_e = gpu_plans[-1].estimate.peak_bytes
    assert seen[-1] == math.ceil(last_e / NEAR_FIT) < last_e
    # the floor free, every estimate refused: the last GPU plan runs (the band lets it through)
    floor = HybridDecoder(probe=sim(), latent_dir=tmp_path,
                          claim=lambda d, n: n <= math.ceil(last_e / NEAR_FIT)).decode(z, tiny, family="sd15")
    assert floor.report.ran.label == gpu_plans[-1].label and floor.report.attempts[-1][1] is None
    assert not list(tmp_path.iterdir())


def test_the_new_decision_after_a_refused_claim_stays_under_it(tiny, tmp_path):
    """A re-probe counts all of torch's cache and may show as much as before, but the refused claim measured that
    the plan's estimate cannot be allocated now: the new decision's available memory is capped under it, so it
    does not pick the same plan (only to be refused again and fall down its chain), not even into the reserve: with
    the memory moving, the new decision puts no plan there (full would go there by ``tight_speedup`` otherwise)."""
    z = latent(1, 4, 40, 40)
    claims = []

    def claim(device, nbytes):
        claims.append(nbytes)
        return len(claims) != 1

    res = HybridDecoder(probe=sim(), latent_dir=tmp_path, claim=claim).decode(z, tiny, family="sd15")
    r = res.report
    first = claims[0]
    assert r.attempts[0][1].startswith("claim refused: ") and r.attempts[1][1] is None
    assert r.decision.available_bytes < first and r.ran.estimate.peak_bytes < first
    assert r.decision.chosen is r.ran and len(claims) == 2
    assert "capped under a refused claim" in r.decision.gpu.note
    assert r.attempts[0][0] == "full" and r.ran.path == "tiled" and r.decision.reason_code != "tight_faster"
    assert decide(r.decision.job, r.decision.gpu, load_profiles("")).reason_code == "tight_faster"


def test_the_claim_comes_after_before_plan(tiny, tmp_path):
    """``before_plan`` may free memory for the plan (ComfyUI unloads other models there), so the claim follows it."""
    order = []
    dec = HybridDecoder(probe=sim(), latent_dir=tmp_path, before_plan=lambda plan: order.append(("prepare", plan.label)),
                        claim=lambda device, n: order.append(("claim", n)) is None)
    res = dec.decode(latent(1, 4, 16, 16), tiny, family="sd15")
    assert order == [("prepare", res.report.ran.label), ("claim", claim_bytes(res.report.ran, res.report.decision))]


def test_claim_memory_claims_nothing_off_cuda():
    assert claim_memory("cpu", 1 << 40) and claim_memory("mps", 1 << 40)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_claim_memory_on_cuda_keeps_the_block_in_the_cache_or_says_no():
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    assert not claim_memory("cuda", free + (1 << 30))
    reserved, allocated = torch.cuda.memory_reserved(), torch.cuda.memory_allocated()
    assert claim_memory("cuda", 256 << 20)
    # handed back to the cache: reserved by this process for the decode, not allocated
    assert torch.cuda.memory_reserved() >= reserved + (256 << 20) and torch.cuda.memory_allocated() == allocated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_peak_is_measured_and_vae_goes_back(tmp_path):
    vae = build_tiny_vae("sd15").half()
    res = HybridDecoder(latent_dir=tmp_path).decode(latent(1, 4, 64, 64, dtype=torch.float16), vae, family="sd15")
    r = res.report
    assert r.device.startswith("cuda") and r.peak_bytes is not None and r.peak_bytes > 0
    assert res.tensor.device.type == "cuda" and next(vae.parameters()).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_peak_is_learned_against_its_estimate(tmp_path):
    """On CUDA the measured allocated peak is recorded as a learned peak: measured / estimated, per card and path."""
    from hybrid_vae.policy.learned import LearnedStore, learn_path, peak_key

    store = LearnedStore(tmp_path / "learned.json")
    vae = build_tiny_vae("sd15").half()
    r = HybridDecoder(latent_dir=tmp_path, learned=store).decode(latent(1, 4, 64, 64, dtype=torch.float16), vae,
                                                                family="sd15").report
    e = store.load().entries[peak_key(r.decision.gpu.name, "sd15", learn_path(r.ran))]
    assert e.what == "peak" and e.count == 1
    assert e.factor == pytest.approx(max(0.5, min(2.0, r.peak_bytes / r.ran.estimate.peak_bytes)), rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_the_probe_counts_a_split_segments_free_blocks_as_fragmented():
    """Three 4 MiB tensors share one 20 MiB segment of PyTorch's large pool; freeing the middle one leaves free
    blocks inside a segment that still holds live tensors (inactive split bytes): the probe does not count them
    as available, and a claim of the free memory plus the usable cache still succeeds."""
    from hybrid_vae.policy.gpu import probe

    torch.cuda.empty_cache()
    a, b, c = (torch.empty(4 << 20, dtype=torch.uint8, device="cuda") for _ in range(3))
    del b
    g = probe("cuda")
    assert (4 << 20) <= g.torch_fragmented_bytes <= g.torch_reusable_bytes
    assert g.available_bytes == g.free_bytes + g.torch_reusable_bytes - g.torch_fragmented_bytes
    assert claim_memory("cuda", g.available_bytes - (1 << 30))
    del a, c


def test_the_new_decision_does_not_try_again_a_plan_that_already_failed(tiny, tmp_path, monkeypatch):
    """A plan that failed (here: a backend error before it ran) is not tried again in the same decode when a later
    plan's refused claim makes the engine decide again and the new chain lists it again (a CPU plan that ran out of
    host memory would cost its time twice)."""
    z = latent(1, 4, 40, 40)
    d = HybridDecoder(probe=sim(), latent_dir=tmp_path).decode(z, tiny, family="sd15").report.decision
    gpu = next(q for q in d.plans if q.path in ("full", "tiled"))
    cpu = [q for q in d.plans if q.path == "cpu"]
    assert len(cpu) >= 2  # the whole image, then one item at a time in tiles
    crafted = dataclasses.replace(d, plans=(cpu[0], gpu, *cpu))  # a new decision lists cpu[0] again
    monkeypatch.setattr(HybridDecoder, "_decide", lambda self, p, latents, vae: (crafted, None))
    ran = []

    def before(plan):
        ran.append(plan.label)
        if len(ran) == 1:
            raise RuntimeError("injected backend failure")

    res = HybridDecoder(probe=sim(), latent_dir=tmp_path, before_plan=before,
                        claim=lambda device, n: False).decode(z, tiny, family="sd15")
    r = res.report
    assert [a[0] for a in r.attempts] == [cpu[0].label, gpu.label, gpu.label, cpu[1].label]
    assert r.attempts[1][1].startswith("claim refused") and r.attempts[2][1].startswith("claim refused")
    assert r.ran is cpu[1] and r.attempts[-1][1] is None and ran == [cpu[0].label, gpu.label, gpu.label, cpu[1].label]
