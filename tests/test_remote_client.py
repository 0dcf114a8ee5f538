"""The remote client (``extension.remote``) against ``serve --demo`` and small recording servers.

Everything runs on 127.0.0.1. The one test about a non-loopback host asserts that nothing is sent at
all (an audit hook records, and refuses, every socket connect while it runs).
"""

from __future__ import annotations

import http.server
import io
import json
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest
import requests
import torch
from diffusers.utils.remote_utils import remote_decode
from hybrid_vae.extension.remote import RemoteClient, is_loopback, origin, tensor_bytes
from hybrid_vae.policy import (
    DecodeJob,
    DecodeSettings,
    Estimate,
    LatentError,
    Plan,
    RemoteSecurityError,
    RemoteStatusError,
    decide,
    load_profiles,
    parse_simulation,
)
from hybrid_vae.server.cli import demo_families
from hybrid_vae.server.testing import free_port, serve_in_thread
from PIL import Image

PROFILES = load_profiles()



@pytest.fixture(scope="module")
def local() -> dict[str, torch.nn.Module]:
    loaders = demo_families()
    return {k: loaders[k]() for k in ("sd15", "flux", "hunyuanvideo")}


def _plan(endpoint: str, fmt: str = "raw") -> Plan:
    return Plan(path="remote", dtype="float16", endpoint=endpoint, response_format=fmt,  # type: ignore[arg-type]
                estimate=Estimate(peak_bytes=0, seconds=1.0, peak_source="-", seconds_source="-"))


def _decode(client: RemoteClient, url: str, z: torch.Tensor, family: str, fmt: str = "raw", *,
            height: int | None = None, width: int | None = None, deadline_s: float = 60.0):  # type: ignore[no-untyped-def]
    fam = PROFILES.family(family)
    sc = fam.spatial_compression
    h = height or z.shape[-2] * sc
    w = width or z.shape[-1] * sc
    frames = (z.shape[2] - 1) * fam.temporal_compression + 1 if fam.video else None
    job = DecodeJob(family=family, width=w, height=h, batch=z.shape[0], frames=frames)
    return client.decode(z, plan=_plan(url, fmt), job=job, family=fam, deadline_s=deadline_s, height=h, width=w)


def _local_float(vae: torch.nn.Module, z: torch.Tensor, family: str) -> torch.Tensor:
    from hybrid_vae.extension.latents import to_vae_space

    with torch.no_grad():
        return vae.decode(to_vae_space(z.float(), PROFILES.family(family))).sample.clamp(-1, 1)


def _u8(x: torch.Tensor) -> torch.Tensor:
    return ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def _fixture_available() -> bool:
    from hybrid_vae.extension.fixture import FIXTURE_DIR

    return (FIXTURE_DIR / "diffusion_pytorch_model.safetensors").is_file()


# ---- a recording server: answers valid protocol responses and remembers what it got ------------------
class Recorder:
    def __init__(self, *, health_status: int = 404, redirect_to: str | None = None, delay_s: float = 0.0) -> None:
        self.requests: list[dict[str, object]] = []
        rec = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                rec.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers)})
                body = b'{"status": "ok"}' if health_status == 200 else b"not here"
                self.send_response(health_status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(n)
                q = parse_qsl(urlsplit(self.path).query, keep_blank_values=True)
                rec.requests.append({"method": "POST", "path": self.path, "query": q, "headers": dict(self.headers),
                                     "body": body})
                if redirect_to:
                    self.send_response(307)
                    self.send_header("Location", redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                d = dict(q)
                shape = [int(v) for k, v in q if k == "shape"]
                h = int(d["height"]) if len(shape) == 3 else shape[2] * 8
                w = int(d["width"]) if len(shape) == 3 else shape[3] * 8
                headers = {}
                if d.get("output_type") == "pil":
                    buf = io.BytesIO()
                    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="JPEG" if d["image_format"] == "jpg"
                                                                  else "PNG")
                    out = buf.getvalue()
                else:
                    out = bytes(shape[0] * h * w * 3)
                    headers = {"shape": json.dumps([shape[0], h, w, 3]), "dtype": "uint8"}
                time.sleep(delay_s)  # "decoding": before the headers, as a real server
                self.send_response(200)
                for k, v in {**headers, "Content-Length": str(len(out))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(out)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.close()


# ---- wire format --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {"output_type": "pt", "partial_postprocess": True, "scaling_factor": 0.18215},
    {"output_type": "pil", "image_format": "jpg", "scaling_factor": 0.18215},
    {"output_type": "pil", "image_format": "png", "scaling_factor": 0.3611, "shift_factor": 0.1159,
     "height": 128, "width": 128},
])
def test_query_headers_and_body_exactly_as_diffusers(recorder: Recorder, kwargs: dict[str, object]) -> None:
    z = (torch.randn(1, 64, 64) if "height" in kwargs else torch.randn(1, 4, 8, 8)).half()
    extra = {"return_type": "pt"} if kwargs["output_type"] == "pt" else {}
    remote_decode(recorder.url + "/x", z, **kwargs, **extra)  # type: ignore[arg-type]
    RemoteClient().request(recorder.url + "/x", z, **kwargs)  # type: ignore[arg-type]
    theirs, ours = recorder.requests
    assert ours["query"] == theirs["query"]  # same keys, order, repetition and spelling (True/False)
    assert ours["body"] == theirs["body"]
    for h in ("Content-Type", "Accept"):
        assert ours["headers"][h] == theirs["headers"][h]  # type: ignore[index]


def test_sends_contiguous_little_endian_and_bf16_bit_pattern() -> None:
    z = torch.randn(1, 4, 8, 6).transpose(2, 3)  # non-contiguous view
    assert not z.is_contiguous()
    assert tensor_bytes(z) == z.contiguous().numpy().astype("<f4").tobytes()
    b = torch.randn(2, 3).to(torch.bfloat16)
    assert tensor_bytes(b) == b.view(torch.int16).numpy().astype("<i2").tobytes()
    with pytest.raises(LatentError, match="dtype=int64"):
        tensor_bytes(torch.zeros(2, dtype=torch.int64))


# ---- results equal a local decode ---------------------------------------------------------------------
def test_raw_equals_local_decode(demo: str, local: dict[str, torch.nn.Module]) -> None:
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    r = _decode(RemoteClient(), f"{demo}/sd15", z, "sd15", "raw")
    assert r.tensor.shape == (2, 3, 128, 128) and r.tensor.dtype == torch.float32 and r.format == "raw"
    assert r.bytes_up == z.numel() * 4 and r.bytes_down == 2 * 128 * 128 * 3 and r.status == 200
    assert int((_u8(r.tensor).int() - _u8(_local_float(local["sd15"], z, "sd15")).int()).abs().max()) <= 1


def test_png_lossless_and_jpg_within_jpeg_tolerance(demo: str, local: dict[str, torch.nn.Module]) -> None:
    if not _fixture_available():
        pytest.skip("trained fixture VAE not built yet (python -m hybrid_vae.extension.fixture.train)")
    from hybrid_vae.extension.fixture import fixture_image

    vae = local["sd15"]
    img = torch.from_numpy(np.array(fixture_image(size=128))).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(img).latent_dist.mean * 0.18215  # a real picture's latent
    want = _u8(_local_float(vae, z, "sd15"))
    client = RemoteClient()
    png = _decode(client, f"{demo}/sd15", z, "sd15", "png")
    jpg = _decode(client, f"{demo}/sd15", z, "sd15", "jpg")
    assert int((_u8(png.tensor).int() - want.int()).abs().max()) <= 1
    assert _psnr(_u8(jpg.tensor), want) > 30.0
    assert jpg.bytes_down < png.bytes_down


def test_flux_packed_and_batch_png(demo: str, local: dict[str, torch.nn.Module]) -> None:
    from hybrid_vae.extension.latents import pack_flux

    z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    r = _decode(RemoteClient(), f"{demo}/flux", pack_flux(z), "flux", "raw", height=128, width=128)
    assert r.tensor.shape == (1, 3, 128, 128)
    assert int((_u8(r.tensor).int() - _u8(_local_float(local["flux"], z, "flux")).int()).abs().max()) <= 1
    z2 = torch.randn(2, 4, 8, 8)
    p = _decode(RemoteClient(), f"{demo}/sd15", z2, "sd15", "png")
    assert p.tensor.shape == (2, 3, 64, 64) and p.attempts == 2  # one request per image


def test_video_raw_and_mp4(demo: str, local: dict[str, torch.nn.Module]) -> None:
    z = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(3)).half()
    want = _u8(_local_float(local["hunyuanvideo"], z, "hunyuanvideo"))
    client = RemoteClient()
    raw = _decode(client, f"{demo}/hunyuanvideo", z, "hunyuanvideo", "raw")
    assert raw.tensor.shape == (1, 3, 9, 64, 64)
    assert int((_u8(raw.tensor).int() - want.int()).abs().max()) <= 1
    pytest.importorskip("av", reason="mp4 needs PyAV: pip install 'sdnext-hybrid-vae[server]'")
    mp4 = _decode(client, f"{demo}/hunyuanvideo", z, "hunyuanvideo", "mp4")
    assert mp4.tensor.shape == (1, 3, 9, 64, 64) and mp4.format == "mp4"
    assert mp4.bytes_down < raw.bytes_down
    assert _psnr(_u8(mp4.tensor), want) > 20.0  # lossy H.264 of random-weight output


def test_bad_latents_fail_before_sending(recorder: Recorder) -> None:
    with pytest.raises(LatentError, match="needs"):
        _decode(RemoteClient(), recorder.url, torch.randn(1, 16, 8, 8), "sd15")
    assert recorder.requests == []


# ---- measurements feed the engine ---------------------------------------------------------------------
def test_network_stats_are_measured_and_used_by_decide(demo: str) -> None:
    client = RemoteClient()
    url = f"{demo}/sd15"
    assert client.health(url)["status"] == "ok"
    for _ in range(2):
        _decode(client, url, torch.randn(1, 4, 64, 64), "sd15", "raw")  # 512 px: 768 KiB down
    st = client.network_stats()[url]
    assert st.source == "measured" and st.available and st.rtt_s > 0 and st.down_bytes_per_s > 0
    assert st.server_seconds_per_voxel is not None and st.server_seconds_per_voxel > 0
    d = decide(DecodeJob("sd15", 512, 512), parse_simulation("name=cpu-box,free_gib=0.1,total_gib=1"), PROFILES,
               DecodeSettings(allow_remote=True, endpoints={"sd15": url}), client.network_stats())
    assert d.chosen.path == "remote" and "network measured" in d.chosen.estimate.seconds_source


def test_health_unknown_on_404_and_down_when_refused(recorder: Recorder) -> None:
    client = RemoteClient()
    assert client.health(recorder.url + "/sd15")["status"] == "unknown"
    assert client.health(f"http://127.0.0.1:{free_port()}/sd15", timeout_s=2)["status"] == "down"


# ---- token rules ----------------------------------------------------------------------------------------
def test_token_goes_only_to_configured_origin(recorder: Recorder) -> None:
    other = Recorder()
    try:
        client = RemoteClient(token="tok-123", trusted_endpoints=[recorder.url + "/sd15"])
        z = torch.randn(1, 4, 4, 4)
        client.request(recorder.url + "/sd15", z)
        client.request(recorder.url + "/other-path", z)  # same origin: configured
        client.request(other.url + "/sd15", z)  # same host, other port: NOT configured
        assert [r["headers"].get("Authorization") for r in recorder.requests] == ["Bearer tok-123"] * 2  # type: ignore[union-attr]
        assert "Authorization" not in other.requests[0]["headers"]  # type: ignore[operator]
    finally:
        other.close()


def test_redirects_are_not_followed(recorder: Recorder) -> None:
    jump = Recorder(redirect_to=recorder.url + "/sd15")
    try:
        client = RemoteClient(token="tok", trusted_endpoints=[jump.url])
        with pytest.raises(RemoteStatusError) as ei:
            client.request(jump.url + "/sd15", torch.randn(1, 4, 4, 4))
        assert ei.value.status == 307 and "not followed" in str(ei.value)
        assert recorder.requests == []  # the token never reached the redirect target
    finally:
        jump.close()


def test_token_over_plain_http_to_remote_host_refused_before_any_socket() -> None:
    connects: list[object] = []
    active = threading.Event()

    def hook(event: str, args: tuple[object, ...]) -> None:
        if active.is_set() and event == "socket.connect":
            connects.append(args[1])
            host = str(args[1][0]) if isinstance(args[1], tuple) else ""
            if not is_loopback(host):
                raise RuntimeError(f"test refused a connect to {args[1]!r}")

    sys.addaudithook(hook)
    url = "http://192.0.2.10:8188/sd15"  # TEST-NET-1: never routed, and never contacted here
    client = RemoteClient(token="tok", trusted_endpoints=[url])
    fam = PROFILES.family("sd15")
    active.set()
    try:
        t0 = time.monotonic()
        with pytest.raises(RemoteSecurityError, match="plain HTTP"):
            client.decode(torch.randn(1, 4, 8, 8), plan=_plan(url), job=DecodeJob("sd15", 64, 64), family=fam,
                          deadline_s=10, height=64, width=64)
        with pytest.raises(RemoteSecurityError):
            client.health(url)
    finally:
        active.clear()
    assert connects == [] and time.monotonic() - t0 < 1.0
    assert client.breaker(url).failures == 0  # a refusal is not the endpoint's failure


def test_token_rules_for_https_and_loopback() -> None:
    c = RemoteClient(token="tok", trusted_endpoints=["https://example.invalid/a", "http://localhost:9/x",
                                                     "http://[::1]:9/y"])
    assert c._headers("https://example.invalid/other")["Authorization"] == "Bearer tok"  # nothing is sent here
    assert c._headers("http://localhost:9/z")["Authorization"] == "Bearer tok"
    assert c._headers("http://[::1]:9/y")["Authorization"] == "Bearer tok"
    assert "Authorization" not in c._headers("https://example.invalid:444/a")  # other port: other origin
    assert "Authorization" not in c._headers("http://example.invalid/a")  # other scheme: other origin
    assert origin("HTTPS://Example.Invalid/a") == ("https", "example.invalid", 443)
    assert is_loopback("127.8.9.1") and is_loopback("::1") and not is_loopback("10.0.0.1")


def test_for_settings_trusts_configured_and_builtin_endpoints() -> None:
    s = DecodeSettings(allow_remote=True, endpoints={"sdxl": "https://gpu.example.invalid/sdxl"})
    c = RemoteClient.for_settings(s, PROFILES, token="hf_x")
    assert "Authorization" in c._headers("https://gpu.example.invalid/sdxl")
    hf = PROFILES.family("sd15").endpoints[0].url
    assert "Authorization" in c._headers(hf)
    off = RemoteClient.for_settings(s.model_copy(update={"use_builtin_endpoints": False}), PROFILES, token="hf_x")
    assert "Authorization" not in off._headers(hf)


def test_server_token_with_client_token(demo: str) -> None:
    from hybrid_vae.server.app import create_app

    app = create_app(families={"sd15": demo_families()["sd15"]}, device="cpu", token="t0k")
    with serve_in_thread(app) as base:
        url = f"{base}/sd15"
        ok = _decode(RemoteClient(token="t0k", trusted_endpoints=[url]), url, torch.randn(1, 4, 4, 4), "sd15")
        assert ok.tensor.shape == (1, 3, 32, 32)
        with pytest.raises(RemoteStatusError) as ei:
            _decode(RemoteClient(), url, torch.randn(1, 4, 4, 4), "sd15")
        assert ei.value.status == 401 and "token" in str(ei.value)
        assert requests.get(base + "/health", timeout=5).ok


# ---- an endpoint that does not report its decode seconds -----------------------------------------------
def _reply(ttfb: float, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    from hybrid_vae.extension.remote_wire import Reply

    return Reply(200, headers or {}, b"", 0.0, ttfb, ttfb)


def test_server_speed_is_inferred_from_the_time_to_the_headers() -> None:
    from hybrid_vae.extension.remote.netstats import INFERRED_TTL_S, EndpointStats, network_stats, record

    st = EndpointStats(0.5)
    st.rtt, st.up = 0.05, 1e6  # the figures the engine estimates with
    assert record(st, _reply(1.05), 200_000, 1_000_000, now=0.0) is None  # nothing reported
    n = network_stats(st, circuit="closed", failures=0, now=1.0)
    assert n.server_inferred and n.server_seconds_per_voxel == pytest.approx(0.8 / 1e6)  # 1.05 - 0.05 - 0.2
    record(st, _reply(100.0), 200_000, 1_000_000, now=2.0)  # a cold start counts at most 4x the running figure
    assert network_stats(st, circuit="closed", failures=0, now=3.0).server_seconds_per_voxel == \
        pytest.approx((0.8 + 0.5 * (3.2 - 0.8)) / 1e6)
    assert network_stats(st, circuit="closed", failures=0, now=2.0 + INFERRED_TTL_S + 1).server_seconds_per_voxel \
        is None  # forgotten: the engine's assumption applies again
    record(st, _reply(0.5), 200_000, 1_000_000, now=INFERRED_TTL_S + 10)  # after the TTL: starts again, no cap
    assert st.server_spv == pytest.approx(0.25 / 1e6)
    record(st, _reply(0.6, {"x-decode-seconds": "0.4"}), 200_000, 1_000_000, now=INFERRED_TTL_S + 11)
    n = network_stats(st, circuit="closed", failures=0, now=INFERRED_TTL_S + 12)
    assert not n.server_inferred and n.server_seconds_per_voxel == pytest.approx(0.4 / 1e6)  # reported wins
    record(st, _reply(9.0), 200_000, 1_000_000, now=INFERRED_TTL_S + 13)
    assert st.server_spv == pytest.approx(0.4 / 1e6)  # an unreported reply does not overwrite a reported figure
    fast = EndpointStats(0.5)  # the engine's defaults: 0.15 s round trip, 20 Mbit/s up
    record(fast, _reply(0.12), 32_768, 262_144, now=0.0)  # faster than the assumed round trip: says nothing
    record(fast, _reply(0.2), 32_768, 262_144, now=1.0)  # 0.037 s left of 0.2 s: under INFERRED_MIN_SHARE
    assert fast.server_spv is None and network_stats(fast, circuit="closed", failures=0).server_seconds_per_voxel \
        is None


def test_a_slow_endpoint_without_decode_seconds_is_learned_by_decide() -> None:
    """A real loopback endpoint that answers after 0.6 s and does not say how long it decoded (as Hugging Face's
    endpoints): after two replies the engine's estimate for the same request is what was observed, not the
    assumed speed, and the source says so."""
    rec = Recorder(delay_s=0.6)
    try:
        client = RemoteClient()
        z = torch.randn(1, 4, 64, 64)
        got = [_decode(client, rec.url, z, "sd15", "raw") for _ in range(2)]
        st = client.network_stats()[rec.url]
        assert st.server_inferred and st.server_seconds_per_voxel is not None
        job = DecodeJob("sd15", 512, 512)
        d = decide(job, parse_simulation("name=cpu-box,free_gib=0.1,total_gib=1"), PROFILES,
                   DecodeSettings(allow_remote=True, endpoints={"sd15": rec.url}), client.network_stats())
        assert d.chosen.path == "remote" and "inferred from earlier replies" in d.chosen.estimate.seconds_source
        seen = statistics.median(r.seconds for r in got)
        assert 0.75 * seen <= d.chosen.estimate.seconds <= 1.35 * seen
        assumed = decide(job, parse_simulation("name=cpu-box,free_gib=0.1,total_gib=1"), PROFILES,
                         DecodeSettings(allow_remote=True, endpoints={"sd15": rec.url}), None)
        assert assumed.chosen.estimate.seconds < 0.75 * seen  # the assumption would have ranked it too fast
    finally:
        rec.close()
