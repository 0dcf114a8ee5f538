"""The self-hosted decode server (``server/``): routes, parsing, auth, bounds, batching, health.

A real uvicorn server on 127.0.0.1 (free port), real diffusers VAEs (tiny random weights), real
sockets. Nothing here contacts a non-loopback address.
"""

from __future__ import annotations

import concurrent.futures
import json
import resource
import socket
import sys
import threading
import time

import pytest
import requests
import torch
from hybrid_vae.extension.fixture import build_tiny_vae
from hybrid_vae.policy import load_profiles, parse_simulation
from hybrid_vae.server.app import create_app
from hybrid_vae.server.protocol import BadRequest, parse_request, toolkit_value
from hybrid_vae.server.testing import serve_in_thread

TOKEN = "s3cret-token-for-tests"


def _vae(kind: str) -> torch.nn.Module:
    return build_tiny_vae(kind, seed=0)


@pytest.fixture(scope="module")
def server() -> tuple[str, object]:
    torch.manual_seed(0)
    app = create_app(families={"sd15": _vae("sd15"), "flux": _vae("flux"), "hunyuanvideo": _vae("hunyuanvideo")},
                     device="cpu", batch_window_s=0.05, max_batch=8)
    with serve_in_thread(app) as base:
        yield base, app


@pytest.fixture(scope="module")
def token_server() -> str:
    app = create_app(families={"sd15": _vae("sd15")}, device="cpu", token=TOKEN)
    with serve_in_thread(app) as base:
        yield base


def _post(url: str, z: torch.Tensor, **params: object) -> requests.Response:
    q = {"shape": list(z.shape), "dtype": str(z.dtype).split(".")[-1], **params}
    return requests.post(url, params=q, data=z.contiguous().numpy().tobytes(),
                         headers={"Content-Type": "tensor/binary"}, timeout=60)


def _raw_http(base: str, path: str, headers: dict[str, str], body: bytes = b"", *, wait_s: float = 10.0) -> tuple[int, bytes]:
    """Send a request by hand on a socket (so the body can be withheld); return (status, body)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as s:
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head_b, _, rest = data.partition(b"\r\n\r\n")
        status = int(head_b.split(b" ")[1])
        length = next((int(line.split(b":")[1]) for line in head_b.split(b"\r\n")
                       if line.lower().startswith(b"content-length")), 0)
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, rest


class _RssSampler:
    """Peak growth of this process's resident memory while the block runs (sampled every 2 ms)."""

    def __enter__(self) -> _RssSampler:
        self.page = resource.getpagesize()
        self.base = self.peak = self._rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.peak_growth = self.peak - self.base


# ---- parsing, as the inference toolkit does ---------------------------------------------------------
def test_toolkit_value_conversion() -> None:
    assert toolkit_value("42") == 42
    assert toolkit_value("True") is True and toolkit_value("FALSE") is False and toolkit_value("true") is True
    assert toolkit_value("0.18215") == "0.18215"  # floats stay strings: the server parses them itself


def test_parse_request_like_diffusers_sends_it() -> None:
    fam = load_profiles().family("flux")
    items = [("image_format", "jpg"), ("output_type", "pil"), ("partial_postprocess", "False"), ("shape", "1"),
             ("shape", "4096"), ("shape", "64"), ("dtype", "bfloat16"), ("scaling_factor", "0.3611"),
             ("shift_factor", "0.1159"), ("height", "1024"), ("width", "1024")]
    r = parse_request(items, family_name="flux", family=fam)
    assert r.shape == (1, 4096, 64) and r.packed and (r.height, r.width) == (1024, 1024)
    assert r.scaling_factor == pytest.approx(0.3611) and r.shift_factor == pytest.approx(0.1159)
    assert r.partial_postprocess is False and r.dtype == "bfloat16" and r.body_bytes == 4096 * 64 * 2
    # a JSON-list shape and legacy do_scaling are accepted too
    sd = load_profiles().family("sd15")
    r2 = parse_request([("shape", "[1,4,8,8]"), ("dtype", "float32"), ("do_scaling", "True")],
                       family_name="sd15", family=sd)
    assert r2.shape == (1, 4, 8, 8) and r2.do_scaling and r2.scaling_factor is None and r2.height == 64


@pytest.mark.parametrize(("items", "field"), [
    ([("shape", "1"), ("shape", "4"), ("shape", "8"), ("shape", "8"), ("dtype", "int8")], "dtype"),
    ([("shape", "1"), ("shape", "4"), ("shape", "8"), ("shape", "8"), ("output_type", "gif")], "output_type"),
    ([("shape", "1"), ("shape", "16"), ("shape", "8"), ("shape", "8")], "shape"),
    ([("shape", "1"), ("shape", "4"), ("shape", "x"), ("shape", "8")], "shape"),
    ([("dtype", "float16")], "shape"),
    ([("shape", "1"), ("shape", "4"), ("shape", "8"), ("shape", "8"), ("scaling_factor", "abc")], "scaling_factor"),
    ([("shape", "2"), ("shape", "4"), ("shape", "8"), ("shape", "8"), ("output_type", "pil")], "shape"),
    ([("shape", "1"), ("shape", "4"), ("shape", "8"), ("shape", "8"), ("partial_postprocess", "maybe")],
     "partial_postprocess"),
])
def test_parse_request_errors_name_the_field(items: list[tuple[str, str]], field: str) -> None:
    with pytest.raises(BadRequest) as ei:
        parse_request(items, family_name="sd15", family=load_profiles().family("sd15"))
    assert ei.value.field == field and ei.value.status == 400


def test_packed_latents_need_height_and_width() -> None:
    with pytest.raises(BadRequest, match="height and width") as ei:
        parse_request([("shape", "1"), ("shape", "16"), ("shape", "64")], family_name="flux",
                      family=load_profiles().family("flux"))
    assert ei.value.field == "height"


# ---- routes and answers -----------------------------------------------------------------------------
def test_health_reports_families_queue_and_device(server: tuple[str, object]) -> None:
    base, _ = server
    h = requests.get(f"{base}/health", timeout=10).json()
    assert set(h["families"]) == {"sd15", "flux", "hunyuanvideo"}
    assert h["device"]["device"] == "cpu" and "waiting" in h["queue"] and h["busy"] is False
    assert h["families"]["hunyuanvideo"]["video"] is True


@pytest.mark.parametrize("path", ["/sd15", "/sd15/", "/sd15/predict"])
def test_routes_decode_uint8(server: tuple[str, object], path: str) -> None:
    base, _ = server
    z = torch.randn(1, 4, 8, 8)
    r = _post(base + path, z, output_type="pt", partial_postprocess=True, scaling_factor=0.18215)
    assert r.status_code == 200, r.text
    assert json.loads(r.headers["shape"]) == [1, 64, 64, 3] and r.headers["dtype"] == "uint8"
    assert len(r.content) == 64 * 64 * 3 and float(r.headers["X-Decode-Seconds"]) > 0


def test_float_output_equals_local_decode(server: tuple[str, object]) -> None:
    base, _ = server
    z = torch.randn(1, 4, 8, 8)
    r = _post(base + "/sd15", z, output_type="pt", partial_postprocess=False, scaling_factor=0.18215)
    got = torch.frombuffer(bytearray(r.content), dtype=torch.float32).reshape(json.loads(r.headers["shape"]))
    with torch.no_grad():
        want = _vae("sd15").decode(z / 0.18215).sample.clamp(-1, 1)
    assert got.shape == (1, 3, 64, 64)
    assert torch.allclose(got, want, atol=1e-5)


def test_video_pil_gives_float_frames_in_0_1(server: tuple[str, object]) -> None:
    base, _ = server
    z = torch.randn(1, 16, 2, 4, 4, dtype=torch.float16)
    r = requests.post(base + "/hunyuanvideo", params={"shape": [1, 16, 2, 4, 4], "dtype": "float16",
                                                      "output_type": "pil", "do_scaling": True},
                      data=z.numpy().tobytes(), headers={"Content-Type": "tensor/binary",
                                                         "Accept": "tensor/binary"}, timeout=60)
    assert r.status_code == 200, r.text
    shape = json.loads(r.headers["shape"])
    assert shape == [5, 3, 32, 32] and r.headers["dtype"] == "float16"
    t = torch.frombuffer(bytearray(r.content), dtype=torch.float16).reshape(shape)
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0


def test_nan_latent_is_400_naming_latents(server: tuple[str, object]) -> None:
    base, _ = server
    z = torch.randn(1, 4, 8, 8)
    z[0, 0, 0, 0] = float("nan")
    r = _post(base + "/sd15", z, output_type="pt", scaling_factor=0.18215)
    assert r.status_code == 400 and r.json()["field"] == "latents" and "NaN" in r.json()["error"]


def test_client_errors_are_json_with_field(server: tuple[str, object]) -> None:
    base, _ = server
    z = torch.randn(1, 4, 8, 8)
    r = _post(base + "/nope", z)
    assert r.status_code == 404 and "sd15" in r.json()["error"] and r.json()["field"] == "family"
    r = _post(base + "/", z)
    assert r.status_code == 404 and "POST to /<family>" in r.json()["error"]
    r = requests.post(base + "/sd15", params={"shape": [1, 4, 8, 8], "dtype": "float32"}, data=b"\0" * 1024,
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 415 and r.json()["field"] == "content-type"
    r = requests.post(base + "/sd15", params={"shape": [1, 4, 8, 8], "dtype": "float32"}, data=b"\0" * 100,
                      headers={"Content-Type": "tensor/binary"}, timeout=10)
    assert r.status_code == 400 and r.json()["field"] == "shape" and "1024 bytes" in r.json()["error"]


def test_single_family_server_answers_on_root_and_predict() -> None:
    app = create_app(families={"sd15": _vae("sd15")}, device="cpu")
    z = torch.randn(1, 4, 4, 4)
    with serve_in_thread(app) as base:
        for path in ("/", "/predict"):
            r = _post(base + path, z, output_type="pt", partial_postprocess=True)
            assert r.status_code == 200 and json.loads(r.headers["shape"]) == [1, 32, 32, 3]


# ---- security and bounds ----------------------------------------------------------------------------
def test_token_required(token_server: str) -> None:
    z = torch.randn(1, 4, 4, 4)
    q = {"shape": [1, 4, 4, 4], "dtype": "float32", "output_type": "pt"}
    body = z.numpy().tobytes()
    r = requests.post(token_server + "/sd15", params=q, data=body, headers={"Content-Type": "tensor/binary"}, timeout=10)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer" and "token" in r.json()["error"]
    r = requests.post(token_server + "/sd15", params=q, data=body, timeout=10,
                      headers={"Content-Type": "tensor/binary", "Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = requests.post(token_server + "/sd15", params=q, data=body, timeout=10,
                      headers={"Content-Type": "tensor/binary", "Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    assert requests.get(token_server + "/health", timeout=10).status_code == 200  # open for load balancers


def test_oversize_body_refused_before_reading() -> None:
    app = create_app(families={"sd15": _vae("sd15")}, device="cpu", max_body_bytes=1024 * 1024)
    with serve_in_thread(app) as base:
        # 4 x 512 x 512 float32 = 4 MiB declared; not one body byte is sent
        t0 = time.monotonic()
        status, body = _raw_http(base, "/sd15?shape=1&shape=4&shape=512&shape=512&dtype=float32",
                                 {"Content-Type": "tensor/binary", "Content-Length": str(4 * 512 * 512 * 4)})
        assert status == 413 and json.loads(body)["field"] == "shape"
        assert time.monotonic() - t0 < 5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_over_limit_shape_refused_without_allocating(server: tuple[str, object]) -> None:
    base, app = server
    # 1 x 4 x 4096 x 4096 fp16 latent = 128 MiB body, 32768 x 32768 output (1.07e9 pixels, > 12 GB as float)
    service = app.state.service
    submitted = service.counters["requests"]
    with _RssSampler() as rss:
        t0 = time.monotonic()
        status, body = _raw_http(base, "/sd15?shape=1&shape=4&shape=4096&shape=4096&dtype=float16&output_type=pt",
                                 {"Content-Type": "tensor/binary", "Content-Length": str(4 * 4096 * 4096 * 2)})
        elapsed = time.monotonic() - t0
    err = json.loads(body)
    assert status == 422 and err["field"] == "shape" and "exceeds" in err["error"]
    assert elapsed < 5  # answered before the (never sent) 128 MiB body
    assert service.counters["requests"] == submitted  # nothing reached the decode queue
    assert rss.peak_growth < 64 * 1024**2, rss.peak_growth  # nothing near the body or the output was allocated


def test_gpu_memory_admission_uses_the_engine() -> None:
    """On a (simulated) 8 GiB card with 6 GiB free (budget: 6 GiB less the 0.5 GiB reserve) a 32k x 32k decode
    cannot fit even tiled: 413 before reading, naming the budget."""
    gpu = parse_simulation("name=NVIDIA GeForce RTX 3070,free_gib=6.0,total_gib=8")
    app = create_app(families={"sd15": _vae("sd15")}, device="cpu", max_output_pixels=2**32,
                     probe_fn=lambda: gpu)
    with serve_in_thread(app) as base:
        status, body = _raw_http(base, "/sd15?shape=1&shape=4&shape=4096&shape=4096&dtype=float16",
                                 {"Content-Type": "tensor/binary", "Content-Length": str(4 * 4096 * 4096 * 2)})
        err = json.loads(body)
        assert status == 413 and "smallest tile" in err["error"] and "budget is 5.50 GiB" in err["error"]
        # a decode that fits is planned by the engine (tiled on this card is not needed at 64 px: full)
        r = _post(base + "/sd15", torch.randn(1, 4, 8, 8), output_type="pt", partial_postprocess=True)
        assert r.status_code == 200 and r.headers["X-Decode-Plan"] == "full"


def test_server_tiles_when_its_device_is_short_of_memory() -> None:
    """The engine plans on the server's own device: 1 GiB free (0.5 GiB budget) cannot hold a 512 px
    float32 decode (about 1.3 GiB), so the server decodes in tiles and says so."""
    gpu = parse_simulation("name=NVIDIA GeForce RTX 3070,free_gib=1.0,total_gib=8")
    app = create_app(families={"sd15": _vae("sd15")}, device="cpu", probe_fn=lambda: gpu)
    with serve_in_thread(app) as base:
        r = _post(base + "/sd15", torch.randn(1, 4, 64, 64), output_type="pt", partial_postprocess=True)
        assert r.status_code == 200, r.text
        assert r.headers["X-Decode-Plan"].startswith("tiled ") and json.loads(r.headers["shape"]) == [1, 512, 512, 3]
        h = requests.get(base + "/health", timeout=10).json()
        assert h["last_plan"] == r.headers["X-Decode-Plan"] and h["device"]["simulated"] is True


def test_server_tiles_exactly_and_falls_back_to_local_tiles_for_other_decoders() -> None:
    """The tiles are exact (the same image as a full decode) for a diffusers Decoder; a decoder the exact
    tiler cannot run gets local tiles, planned as such (no failed attempt, no 500). 1.4 GiB free - the
    server's 512 MiB reserve: a 512 px float32 full decode (1.22 GiB) does not fit, exact tiles (0.69) do."""
    gpu = parse_simulation("name=NVIDIA GeForce RTX 3070,free_gib=1.4,total_gib=8")
    odd = _vae("sd15")
    odd.decoder.conv_act = torch.nn.GELU()  # not SiLU: outside what extension/stream.py runs
    app = create_app(families={"sd15": _vae("sd15"), "sdxl": odd}, device="cpu", probe_fn=lambda: gpu)
    with serve_in_thread(app) as base:
        r = _post(base + "/sd15", torch.randn(1, 4, 64, 64), output_type="pt", partial_postprocess=True)
        assert r.status_code == 200 and r.headers["X-Decode-Plan"].endswith(" exact")
        r = _post(base + "/sdxl", torch.randn(1, 4, 64, 64), output_type="pt", partial_postprocess=True)
        assert r.status_code == 200, r.text
        assert r.headers["X-Decode-Plan"].startswith("tiled ") and not r.headers["X-Decode-Plan"].endswith("exact")


# ---- batching ---------------------------------------------------------------------------------------
def test_concurrent_requests_are_batched_and_equal_to_single_decodes(server: tuple[str, object]) -> None:
    base, app = server
    service = app.state.service
    zs = [torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    singles = []
    for z in zs[:2]:
        r = _post(base + "/sd15", z, output_type="pt", partial_postprocess=False, scaling_factor=0.18215)
        singles.append(torch.frombuffer(bytearray(r.content), dtype=torch.float32).reshape(1, 3, 128, 128))
    before = dict(service.counters)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(_post, base + "/sd15", z, output_type="pt", partial_postprocess=False,
                            scaling_factor=0.18215) for z in zs]
        res = [f.result() for f in futs]
    assert all(r.status_code == 200 for r in res)
    outs = [torch.frombuffer(bytearray(r.content), dtype=torch.float32).reshape(1, 3, 128, 128) for r in res]
    batches = [int(r.headers["X-Decode-Batch"]) for r in res]
    assert max(batches) > 1, batches  # some requests shared a decode
    assert service.counters["batched_items"] > before["batched_items"]
    for got, want in zip(outs[:2], singles, strict=True):
        assert (got - want).abs().max() < 1e-4  # batching changes nothing visible


# ---- Hugging Face Inference Endpoints custom handler -----------------------------------------------
def test_endpoint_handler_loads_a_saved_vae_and_decodes(tmp_path: object) -> None:
    import base64
    from pathlib import Path

    from hybrid_vae.server.handler import EndpointHandler, detect_family
    from PIL import Image

    repo = Path(str(tmp_path))
    vae = _vae("sdxl")
    vae.save_pretrained(repo / "vae")  # a pipeline-style repository with vae/
    assert detect_family(repo) == "sdxl"
    handler = EndpointHandler(str(repo), device="cpu")
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want = vae.decode(z / 0.13025).sample.clamp(-1, 1)
    # raw bytes in, image out (the toolkit serialises it per Accept)
    img = handler({"inputs": z.numpy().tobytes(), "parameters": {"shape": [1, 4, 8, 8], "dtype": "float32",
                                                                 "scaling_factor": "0.13025"}})
    assert isinstance(img, Image.Image) and img.size == (64, 64)
    # base64 JSON in (the public toolkit), tensor dict out
    out = handler({"inputs": base64.b64encode(z.numpy().tobytes()).decode(),
                   "parameters": {"shape": "[1, 4, 8, 8]", "dtype": "float32", "output_type": "pt",
                                  "partial_postprocess": False, "do_scaling": True}})
    got = torch.frombuffer(bytearray(base64.b64decode(out["data"])), dtype=torch.float32).reshape(out["shape"])
    assert out["dtype"] == "float32" and torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        handler({"inputs": b"\0" * 10, "parameters": {"shape": [1, 4, 8, 8], "dtype": "float32"}})
