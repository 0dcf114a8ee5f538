"""``hybrid_decode``: the seed's ``remote_decode`` examples, changed only to call the drop-in, and the
drop-in's promises (same return types as ``remote_decode``, family inference, fallbacks, saved latent).

The endpoint is the app ``hybrid-vae serve --demo`` builds, under a real uvicorn server on 127.0.0.1; local
VAEs are separate instances of the same demo VAEs (same weights). Nothing contacts a non-loopback address.
"""

from __future__ import annotations

import io
import queue
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.remote_utils import remote_decode
from diffusers.video_processor import VideoProcessor
from hybrid_vae.extension.dropin import hybrid_decode, infer_family
from hybrid_vae.extension.fixture import build_tiny_vae
from hybrid_vae.extension.latents import load_latent
from hybrid_vae.extension.orchestrator import DecodeReport, HybridDecoder
from hybrid_vae.extension.remote import RemoteClient
from hybrid_vae.policy import DecodeFailedError, DecodeSettings, load_profiles
from hybrid_vae.server.cli import demo_families
from hybrid_vae.server.testing import free_port
from PIL import Image


@pytest.fixture(scope="module")
def local() -> dict[str, torch.nn.Module]:
    """Separate instances of the demo's VAEs (same weights) for local decodes."""
    fams = demo_families()
    return {k: fams[k]() for k in ("sd15", "flux", "hunyuanvideo")}


@pytest.fixture
def down_url() -> str:
    return f"http://127.0.0.1:{free_port()}/sd15"  # nothing listens there: connection refused


def _latent(*shape: int, dtype: torch.dtype = torch.float16, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _reports() -> tuple[list[DecodeReport], object]:
    got: list[DecodeReport] = []
    return got, got.append


def _mp4_frames(data: bytes) -> list[np.ndarray]:
    import av

    with av.open(io.BytesIO(data)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


# ---- the seed's code examples, remote_decode -> hybrid_decode, HF endpoints -> hybrid-vae serve --demo ----------
@pytest.mark.slow
def test_seed_basic_example_sd15(demo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    image = hybrid_decode(
        endpoint=f"{demo}/sd15",
        tensor=torch.randn([1, 4, 64, 64], dtype=torch.float16),
        scaling_factor=0.18215,
    )
    image.save("test.jpg")
    assert isinstance(image, Image.Image) and image.size == (512, 512) and image.mode == "RGB"
    assert image.format == "jpeg" and "remote jpg via 127.0.0.1" in image.info["hybrid_vae"]
    assert Image.open("test.jpg").size == (512, 512)


@pytest.mark.slow
def test_seed_flux_example_packed_latents(demo: str) -> None:
    image = hybrid_decode(
        endpoint=f"{demo}/flux",
        tensor=torch.randn([1, 4096, 64], dtype=torch.float16),
        height=1024,
        width=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    assert isinstance(image, Image.Image) and image.size == (1024, 1024)
    assert "remote jpg" in image.info["hybrid_vae"]


@pytest.mark.slow
def test_seed_hunyuanvideo_example_mp4(demo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("av", reason="mp4 needs PyAV: pip install av")
    monkeypatch.chdir(tmp_path)
    video = hybrid_decode(
        endpoint=f"{demo}/hunyuanvideo",
        tensor=torch.randn([1, 16, 3, 40, 64], dtype=torch.float16),
        output_type="mp4",
    )
    if isinstance(video, bytes):
        with open("video.mp4", "wb") as f:
            f.write(video)
    frames = _mp4_frames(Path("video.mp4").read_bytes())
    assert len(frames) == 9 and frames[0].shape == (320, 512, 3)  # 1 + 4 * (3 - 1) frames, 8x spatial


@pytest.mark.slow
def test_seed_queueing_example(demo: str) -> None:
    """The seed's worker-thread queue, verbatim but for hybrid_decode, a list for IPython's ``display`` and a
    random latent per prompt for the (unavailable) pipeline."""
    shown: list[Image.Image] = []
    display = shown.append

    def decode_worker(q: queue.Queue):
        while True:
            item = q.get()
            if item is None:
                break
            image = hybrid_decode(
                endpoint=f"{demo}/sd15",
                tensor=item,
                scaling_factor=0.18215,
            )
            display(image)
            q.task_done()

    q = queue.Queue()
    thread = threading.Thread(target=decode_worker, args=(q,), daemon=True)
    thread.start()

    def decode(latent: torch.Tensor):
        q.put(latent)

    prompts = ["Blueberry ice cream", "Lemonade in a glass", "Comic book art", "vanilla cone", "A bowl of milk",
               "Cold Coffee with cream"]
    for i, _prompt in enumerate(prompts):
        latent = _latent(1, 4, 64, 64, seed=i)  # pipe(prompt=prompt, output_type="latent").images
        decode(latent)
    q.put(None)
    thread.join()
    assert len(shown) == 6 and all(im.size == (512, 512) for im in shown)


def test_queueing_with_decode_queue_and_local_fallback(local: dict[str, torch.nn.Module], down_url: str) -> None:
    """The same pattern on DecodeQueue: the endpoint is down, every image still comes back, in order."""
    import functools

    from hybrid_vae.extension.queue import DecodeQueue

    client = HybridDecoder(remote=RemoteClient(max_retries=0, failure_threshold=2))
    decode = functools.partial(hybrid_decode, endpoint=down_url, scaling_factor=0.18215, vae=local["sd15"],
                               decoder=client)
    latents = [_latent(1, 4, 8, 8, seed=i) for i in range(4)]
    with DecodeQueue(decode, workers=1, maxsize=2) as q:
        for z in latents:
            q.submit(z)
        images = list(q.results(until_closed=False))
    assert [im.size for im in images] == [(64, 64)] * 4
    texts = [im.info["hybrid_vae"] for im in images]
    # the identity canary cannot reach the endpoint: remote is never used; two failed canaries open the circuit ...
    assert all("endpoint's VAE not verified (canary failed" in t for t in texts[:2])
    assert all("canary" not in t and "remote" not in t for t in texts[2:])  # ... then the endpoint is skipped
    assert client.remote.breaker(down_url).state == "open"  # the shared client learned the endpoint is down
    alone = hybrid_decode(latents[2], vae=local["sd15"], scaling_factor=0.18215)
    assert np.array_equal(np.asarray(images[2]), np.asarray(alone))


# ---- fallbacks --------------------------------------------------------------------------------------------------
def test_endpoint_down_falls_back_to_the_local_vae(local: dict[str, torch.nn.Module], down_url: str) -> None:
    z = _latent(1, 4, 8, 8, seed=3)
    got, sink = _reports()
    image = hybrid_decode(endpoint=down_url, tensor=z, scaling_factor=0.18215, vae=local["sd15"], on_report=sink)
    assert image.size == (64, 64)
    rep = got[0]
    # its identity canary got no answer: remote is not used, and the line says why
    assert rep.chosen.path != "remote" and not rep.fell_back and rep.decision.identity.verdict == "unverified"
    assert "endpoint's VAE not verified (canary failed" in rep.infotext() and "Connection refused" in rep.infotext()
    ref = hybrid_decode(z, vae=local["sd15"], scaling_factor=0.18215)  # local only, no endpoint
    assert np.array_equal(np.asarray(image), np.asarray(ref))


def test_no_vae_and_endpoint_down_saves_the_latent(down_url: str, tmp_path: Path) -> None:
    z = _latent(1, 4, 8, 8, seed=4)
    with pytest.raises(DecodeFailedError) as err:
        hybrid_decode(endpoint=down_url, tensor=z, scaling_factor=0.18215, latent_dir=tmp_path)
    path = err.value.latent_path
    assert path is not None and path.is_file() and str(path) in str(err.value)
    assert "no local VAE" in str(err.value) and "Connection refused" in str(err.value)
    saved, meta = load_latent(path)
    assert torch.equal(saved, z) and meta["family"] == "sd15" and meta["height"] == 64


def test_no_endpoint_means_local_even_when_remote_would_be_chosen(local: dict[str, torch.nn.Module]) -> None:
    got, sink = _reports()
    hybrid_decode(_latent(1, 4, 8, 8), vae=local["sd15"], on_report=sink)
    assert all(p.path != "remote" for p in got[0].decision.plans)  # remote is opt-in


def test_low_vram_simulated_decodes_tiled(local: dict[str, torch.nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", "name=NVIDIA GeForce RTX 3070,free_gib=0.45")
    got, sink = _reports()
    t = hybrid_decode(_latent(1, 4, 40, 40), vae=local["sd15"], output_type="pt", return_type="pt", on_report=sink)
    assert got[0].ran.path == "tiled" and t.shape == (1, 3, 320, 320) and t.dtype == torch.float16


# ---- return types: what remote_decode returns for the same arguments ---------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {},
    {"image_format": "png"},
    {"output_type": "pt", "partial_postprocess": True, "return_type": "pt"},
    {"output_type": "pt", "partial_postprocess": True, "return_type": "pil"},
    {"output_type": "pt", "partial_postprocess": False, "return_type": "pt"},
    {"output_type": "pt", "partial_postprocess": False, "return_type": "pil", "processor": VaeImageProcessor()},
], ids=["pil-jpg", "pil-png", "pt-u8", "pt-u8-pil", "pt-float", "pt-float-processor"])
def test_same_types_as_remote_decode(demo: str, local: dict[str, torch.nn.Module], kwargs: dict) -> None:
    z = _latent(1, 4, 8, 8, seed=5)
    theirs = remote_decode(f"{demo}/sd15", z, scaling_factor=0.18215, **kwargs)
    remote = hybrid_decode(endpoint=f"{demo}/sd15", tensor=z, scaling_factor=0.18215, **kwargs)
    mine = hybrid_decode(z, vae=local["sd15"], scaling_factor=0.18215, **kwargs)  # local decode
    jpeg = not kwargs  # the endpoint answers JPEG; the local decode is not compressed
    for out in (remote, mine):
        assert type(out) is type(theirs)
        if isinstance(theirs, torch.Tensor):
            assert out.shape == theirs.shape and out.dtype == theirs.dtype
            tol = 1.0 if theirs.dtype == torch.uint8 else 1 / 127.5 + 2e-3  # remote answers are 8-bit
            assert (out.float() - theirs.float()).abs().max().item() <= tol
        else:
            assert out.size == theirs.size and out.mode == theirs.mode
            if jpeg and out is mine:  # the same pixels once JPEG-compressed as the server does (quality 95)
                buf = io.BytesIO()
                out.save(buf, format="JPEG", quality=95)
                out = Image.open(buf)
            diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
            assert diff.max() <= 1
    if not kwargs:
        assert theirs.format == remote.format == mine.format == "jpeg"


def test_video_types_as_remote_decode(demo: str, local: dict[str, torch.nn.Module]) -> None:
    z = _latent(1, 16, 2, 8, 8, seed=6)
    frames_theirs = remote_decode(f"{demo}/hunyuanvideo", z, processor=VideoProcessor(), output_type="pil")
    frames_mine = hybrid_decode(z, vae=local["hunyuanvideo"], processor=VideoProcessor(), output_type="pil")
    frames_plain = hybrid_decode(z, vae=local["hunyuanvideo"])  # video pil without a processor: frames too
    for frames in (frames_mine, frames_plain):
        assert isinstance(frames, list) and len(frames) == len(frames_theirs) == 5
        assert all(f.size == (64, 64) for f in frames)
        assert np.abs(np.asarray(frames[2], dtype=np.int16) - np.asarray(frames_theirs[2], dtype=np.int16)).max() <= 1
    t = hybrid_decode(z, vae=local["hunyuanvideo"], output_type="pt", return_type="pt")
    assert t.shape == (1, 3, 5, 64, 64) and t.dtype == torch.float16


def test_video_mp4_as_remote_decode(demo: str, local: dict[str, torch.nn.Module]) -> None:
    pytest.importorskip("av", reason="mp4 needs PyAV: pip install av")
    z = _latent(1, 16, 2, 8, 8, seed=6)
    theirs = remote_decode(f"{demo}/hunyuanvideo", z, output_type="mp4", return_type="mp4")
    mine = hybrid_decode(z, vae=local["hunyuanvideo"], output_type="mp4")  # local decode, local mp4
    default_return = hybrid_decode(z, vae=local["hunyuanvideo"], output_type="mp4", return_type="pil")
    assert isinstance(theirs, bytes) and isinstance(mine, bytes) and isinstance(default_return, bytes)
    assert len(_mp4_frames(mine)) == len(_mp4_frames(theirs)) == 5


def test_batch_gives_a_list_and_flux_packed_locally(local: dict[str, torch.nn.Module]) -> None:
    imgs = hybrid_decode(_latent(2, 4, 8, 8), vae=local["sd15"])
    assert isinstance(imgs, list) and [i.size for i in imgs] == [(64, 64), (64, 64)]
    img = hybrid_decode(_latent(1, 16, 64), vae=local["flux"], height=64, width=64, scaling_factor=0.3611,
                        shift_factor=0.1159)
    assert img.size == (64, 64)


# ---- arguments --------------------------------------------------------------------------------------------------
def test_positional_forms_and_diffusers_order(demo: str, local: dict[str, torch.nn.Module]) -> None:
    z = _latent(1, 4, 8, 8, seed=7)
    a = hybrid_decode(z, vae=local["sd15"], output_type="pt", partial_postprocess=True, return_type="pt")
    b = hybrid_decode(f"{demo}/sd15", z, output_type="pt", partial_postprocess=True, return_type="pt")
    assert a.shape == b.shape == (1, 64, 64, 3)
    with pytest.raises(TypeError, match="by keyword"):
        hybrid_decode(z, 0.18215)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"tensor": torch.zeros(1, 16, 64)}, "`height` and `width` required"),
    ({"tensor": torch.zeros(1, 4, 8, 8), "output_type": "gif"}, "output_type='gif'"),
    ({"tensor": torch.zeros(1, 4, 8, 8), "output_type": "pt", "return_type": "pil"}, "`processor` is required"),
    ({"tensor": torch.zeros(1, 7, 8, 8)}, "cannot tell the VAE family"),
    ({"tensor": torch.zeros(1, 4, 8, 8), "endpoint": "localhost:8188/sd15"}, "http:// or https:// URL"),
    ({"tensor": torch.zeros(1, 16, 8, 8), "family": "sd15"}, "16 channels; family sd15 expects 4"),
])
def test_bad_arguments_fail_before_decoding(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hybrid_decode(**kwargs)


def test_scaling_factors_are_honoured(local: dict[str, torch.nn.Module]) -> None:
    vae = local["sd15"]
    z_vae = _latent(1, 4, 8, 8, dtype=torch.float32, seed=8)  # VAE space
    direct = hybrid_decode(z_vae, vae=vae, do_scaling=False, output_type="pt", return_type="pt")
    other = hybrid_decode(z_vae * 0.5, vae=vae, scaling_factor=0.5, output_type="pt", return_type="pt")
    default = hybrid_decode(z_vae * 0.18215, vae=vae, output_type="pt", return_type="pt")
    with torch.no_grad():
        ref = vae.decode(z_vae).sample.clamp(-1, 1)
    for t in (direct, other, default):
        assert (t - ref).abs().max().item() < 1e-5


def test_family_inference() -> None:
    profiles = load_profiles()
    z4, z16 = torch.zeros(1, 4, 8, 8), torch.zeros(1, 16, 8, 8)
    assert infer_family(z16, vae=build_tiny_vae("flux"), profiles=profiles)[0] == "flux"
    assert infer_family(z4, vae=build_tiny_vae("sdxl"), profiles=profiles)[0] == "sdxl"
    assert infer_family(torch.zeros(1, 16, 2, 8, 8), vae=build_tiny_vae("wan"), profiles=profiles)[0] == "wan"
    pipe = DiTPipeline(transformer=None, vae=build_tiny_vae("sd15"), scheduler=DDIMScheduler())
    assert infer_family(z4, pipeline=pipe, vae=pipe.vae, profiles=profiles)[0] == "sd15"
    assert infer_family(z4, endpoint="https://x2dmsqunjd6k9prw.us-east-1.aws.endpoints.huggingface.cloud/",
                        profiles=profiles)[0] == "sdxl"
    assert infer_family(z16, endpoint="http://127.0.0.1:8188/sd3/", profiles=profiles)[0] == "sd3"
    assert infer_family(torch.zeros(1, 4096, 64), profiles=profiles)[0] == "flux"
    assert infer_family(torch.zeros(1, 16, 3, 8, 8), profiles=profiles)[0] == "hunyuanvideo"
    assert infer_family(z4, scaling_factor=0.13025, profiles=profiles)[0] == "sdxl"
    assert infer_family(z16, scaling_factor=1.5305, shift_factor=0.0609, profiles=profiles)[0] == "sd3"


def test_pipeline_argument_uses_its_vae() -> None:
    vae = build_tiny_vae("sd15")
    pipe = DiTPipeline(transformer=None, vae=vae, scheduler=DDIMScheduler())
    z = _latent(1, 4, 8, 8, dtype=torch.float32, seed=9)
    via_pipe = hybrid_decode(z, pipeline=pipe, output_type="pt", return_type="pt")
    assert torch.equal(via_pipe, hybrid_decode(z, vae=vae, output_type="pt", return_type="pt"))


def test_a_given_decoder_is_reused_not_changed(local: dict[str, torch.nn.Module], down_url: str) -> None:
    settings = DecodeSettings(reserve_bytes=0)
    dec = HybridDecoder(settings=settings, remote=RemoteClient(max_retries=0, failure_threshold=1))
    img = hybrid_decode(_latent(1, 4, 8, 8), endpoint=down_url, vae=local["sd15"], decoder=dec)
    assert img.size == (64, 64)
    assert dec.settings is settings and not dec.settings.allow_remote  # the caller's decoder is untouched
    assert dec.remote.breaker(down_url).state == "open"  # ... but its client saw the failure
    got, sink = _reports()
    hybrid_decode(_latent(1, 4, 8, 8), endpoint=down_url, vae=local["sd15"], decoder=dec, on_report=sink)
    assert all(p.path != "remote" for p in got[0].decision.plans)  # circuit open: the endpoint is not even tried
