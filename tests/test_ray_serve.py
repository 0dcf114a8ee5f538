"""``hybrid-vae serve --ray``: the decode endpoint on a real local Ray instance (loopback, 2 CPU replicas).

One Ray instance for the module (started by the real command in a subprocess, stopped by the last test, which
checks that no process of it is left). diffusers' own ``remote_decode`` talks to it unchanged; batching, both
replicas, token and limits, and a replica killed under load are checked on it. Skipped without Ray
(``pip install -e '.[ray]'``); the check that plain serve never imports Ray runs always.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from diffusers.utils.remote_utils import remote_decode
from hybrid_vae.server.cli import demo_families
from hybrid_vae.server.testing import RayServeProcess, alive
from PIL import Image

SD15 = 0.18215
SIMULATED = "name=NVIDIA H200,total_gib=140,free_gib=120"
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray Serve is not installed: pip install -e '.[ray]'")


def test_plain_serve_and_the_server_package_never_import_ray() -> None:
    """Importing every server module, building and running plain serve, and `serve --help` leave Ray unimported."""
    code = textwrap.dedent("""
        import sys, contextlib, io
        import hybrid_vae.server, hybrid_vae.server.app, hybrid_vae.server.cli, hybrid_vae.server.handler
        import hybrid_vae.server.protocol, hybrid_vae.server.service, hybrid_vae.server.testing
        import hybrid_vae.extension.endpoints, hybrid_vae.extension.cli as cli
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            cli.main(["serve", "--help"])
        import requests, torch
        from hybrid_vae.server.testing import serve_demo
        with serve_demo() as base:
            z = torch.randn(1, 4, 8, 8)
            r = requests.post(base + "/sd15", data=z.numpy().tobytes(), timeout=60,
                              params={"shape": [1, 4, 8, 8], "dtype": "float32", "output_type": "pt"},
                              headers={"Content-Type": "tensor/binary"})
            assert r.status_code == 200, r.text
        bad = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
        print("RAY_MODULES", bad)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RAY_MODULES []" in out.stdout, out.stdout[-2000:]


def test_ray_flags_need_ray() -> None:
    from hybrid_vae.extension.cli import main

    assert main(["serve", "--demo", "--replicas", "2"]) == 2  # a Ray option without --ray: refused, named
    assert main(["serve", "--demo", "--ray", "--workers", "2"]) == 2


@needs_ray
def test_the_config_file_is_valid_for_serve_run_and_deploy() -> None:
    """server/ray-serve.yaml passes Ray's own schema; its args go through the CLI's flags and checks."""
    import yaml
    from hybrid_vae.server import ray_app
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load((Path(__file__).parents[1] / "server" / "ray-serve.yaml").read_text(encoding="utf-8"))
    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj  # older Ray: v1 API
    validate(cfg)
    app = cfg["applications"][0]
    assert app["import_path"] == "hybrid_vae.server.ray_app:build" and app["deployments"][0]["name"] == ray_app.DEPLOYMENT
    config = ray_app.config_from_mapping(app["args"])
    assert config["families"] == {"sdxl": "madebyollin/sdxl-vae-fp16-fix", "flux": "black-forest-labs/FLUX.1-schnell"}
    assert (config["max_batch"], config["batch_window_s"], config["max_body_bytes"]) == (8, 0.004, 256 * 1024**2)
    assert type(ray_app.build(app["args"])).__name__ == "Application"
    for bad, msg in (({"token": "x"}, "HYBRID_VAE_SERVER_TOKEN"), ({"colour": "red"}, "unrecognized arguments"),
                     ({"demo": True, "max_batch": 0}, "--max-batch 0"), ({"family": {"sdx": "a/b"}}, "unknown family")):
        with pytest.raises(ValueError, match=msg):
            ray_app.config_from_mapping(bad)
    opts = ray_app.deployment_options(config, replicas=(1, 3), gpus_per_replica=1, token="t")
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1,
                                         "runtime_env": {"env_vars": {"HYBRID_VAE_SERVER_TOKEN": "t"}}}
    assert opts["autoscaling_config"]["max_replicas"] == 3 and opts["max_ongoing_requests"] == 16
    assert ray_app.parse_replicas("1:3", 1) == (1, 3) and ray_app.parse_replicas(None, 2) == 2
    with pytest.raises(ValueError, match="--replicas"):
        ray_app.parse_replicas("3:1", 1)


# ---- on a real Ray instance ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_server() -> Iterator[RayServeProcess]:
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray Serve is not installed: pip install -e '.[ray]'")
    # the replicas plan as on a large GPU (simulated; they run on the CPU), so a batch is decoded as one tensor
    # (on a real CPU server the engine decodes a batch item by item: it is faster there, see docs/ray.md)
    server = RayServeProcess(["--demo", "--device", "cpu", "--replicas", "2", "--cpus-per-replica", "0.5"],
                             env={"HYBRID_VAE_SIMULATE_GPU": SIMULATED})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def local_sd15() -> torch.nn.Module:
    return demo_families()["sd15"]()


def _latent(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _local_uint8(vae: torch.nn.Module, z: torch.Tensor) -> np.ndarray:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray processes share the cores: one thread avoids OpenMP spinning against them
    try:
        with torch.no_grad():
            x = vae.decode(z.float() / SD15).sample
    finally:
        torch.set_num_threads(threads)
    return ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()


def _post(url: str, z: torch.Tensor, token: str | None = None, **params: object) -> requests.Response:
    q = {"shape": list(z.shape), "dtype": str(z.dtype).rsplit(".", 1)[-1], "scaling_factor": SD15, **params}
    headers = {"Content-Type": "tensor/binary", **({"Authorization": f"Bearer {token}"} if token else {})}
    return requests.post(url, data=z.contiguous().numpy().tobytes(), params=q, headers=headers, timeout=120)


@needs_ray
def test_diffusers_remote_decode_sd15_flux_packed_and_video(ray_server: RayServeProcess,
                                                            local_sd15: torch.nn.Module) -> None:
    base = ray_server.base
    z = _latent(1, 4, 16, 16, dtype=torch.float16)
    img = remote_decode(f"{base}/sd15", z, scaling_factor=SD15, image_format="png")
    assert isinstance(img, Image.Image) and img.size == (128, 128)
    assert np.abs(np.asarray(img).astype(int) - _local_uint8(local_sd15, z).astype(int)).max() <= 1
    flux = remote_decode(f"{base}/flux", _latent(1, 64, 64, dtype=torch.bfloat16), scaling_factor=0.3611,
                         shift_factor=0.1159, height=128, width=128, output_type="pt", partial_postprocess=True,
                         return_type="pt")
    assert tuple(flux.shape) == (1, 128, 128, 3) and flux.dtype == torch.uint8
    av = pytest.importorskip("av", reason="mp4 needs PyAV")
    data = remote_decode(f"{base}/hunyuanvideo", _latent(1, 16, 3, 8, 8, dtype=torch.float16), output_type="mp4",
                         return_type="mp4")
    with av.open(io.BytesIO(data)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)


@needs_ray
def test_concurrent_requests_are_batched_on_both_replicas_and_equal_single_decodes(ray_server: RayServeProcess) -> None:
    url = f"{ray_server.base}/sd15"
    zs = [_latent(1, 4, 32, 32, seed=i) for i in range(24)]

    def decode(z: torch.Tensor) -> tuple[torch.Tensor, int, str, str]:
        r = _post(url, z, output_type="pt", partial_postprocess=False)
        assert r.status_code == 200, r.text
        t = torch.frombuffer(bytearray(r.content), dtype=torch.float32).reshape(1, 3, 256, 256)
        return t, int(r.headers["X-Decode-Batch"]), r.headers["X-Decode-Replica"], r.headers["X-Decode-Plan"]

    singles = [decode(z) for z in zs]  # one at a time: nothing to batch with
    assert {b for _, b, _, _ in singles} == {1}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        burst = list(pool.map(decode, zs))
    batches = [b for _, b, _, _ in burst]
    assert max(batches) > 1, batches  # a replica received several requests in one batch ...
    assert any(b > 1 and plan == "full" for _, b, _, plan in burst)  # ... and decoded them as one tensor
    assert len({rep for _, _, rep, _ in burst}) == 2  # both replicas answered
    for (alone, _, _, _), (batched, _, _, _) in zip(singles, burst, strict=True):  # each its own image, and
        assert (alone - batched).abs().max().item() < 1e-4  # batching changes nothing visible


@needs_ray
def test_token_and_limits_are_the_same_as_plain_serve(ray_server: RayServeProcess) -> None:
    """A second application on the same Ray instance (under /secure), built with a token and small limits."""
    script = textwrap.dedent(f"""
        import ray
        from ray import serve
        from hybrid_vae.server.ray_app import application, config_from_mapping
        ray.init(address={ray_server.gcs_address!r})
        cfg = config_from_mapping({{"demo": True, "device": "cpu", "max_body_mib": 0.05, "max_output_pixels": 300000}})
        serve.run(application(cfg, replicas=1, cpus_per_replica=0.25, token="s3cret"), name="secure",
                  route_prefix="/secure")
    """)
    env = {**os.environ, "RAY_TMPDIR": ray_server.tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    url = f"{ray_server.base}/secure/sd15"
    z = _latent(1, 4, 16, 16)
    assert _post(url, z).status_code == 401
    assert _post(url, z, token="wrong").status_code == 401
    ok = _post(url, z, token="s3cret", output_type="pt", partial_postprocess=True)
    assert ok.status_code == 200 and ok.headers["X-Decode-Replica"]
    big = _post(url, _latent(1, 4, 80, 80), token="s3cret")  # 100 KiB body > 0.05 MiB
    assert big.status_code == 413 and big.json()["field"] == "shape"
    huge = _post(url, _latent(1, 4, 80, 80, dtype=torch.float16), token="s3cret")  # 50 KiB, 640 x 640 > 300000 px
    assert huge.status_code == 422 and "max-output-pixels" in huge.json()["error"]
    r = requests.post(url, data=b"x" * 16, headers={"Authorization": "Bearer s3cret"}, timeout=30)
    assert r.status_code == 415 and "Content-Type" in r.json()["error"]
    assert requests.get(f"{ray_server.base}/secure/health", timeout=30).json()["status"] == "ok"  # open, as in serve


@needs_ray
def test_a_replica_killed_under_load_loses_no_request(ray_server: RayServeProcess, local_sd15: torch.nn.Module) -> None:
    """30 requests, 6 at a time; one replica is SIGKILLed after 4 answers. Every request is answered with its own
    image: Ray or the client's retries (on Ray's 5xx for the dead replica) carry it to the other replica."""
    from hybrid_vae.extension.remote import RemoteClient

    replicas = ray_server.replica_pids()
    assert len(replicas) == 2, replicas
    client = RemoteClient(max_retries=4, backoff_base_s=0.2, read_timeout_s=120)
    url = f"{ray_server.base}/sd15"
    zs = [_latent(1, 4, 24, 24, seed=100 + i) for i in range(30)]
    done = threading.Event()
    answered = []
    lock = threading.Lock()

    def one(i: int) -> tuple[int, np.ndarray, int]:
        r = client.request(url, zs[i], output_type="pt", partial_postprocess=True, scaling_factor=SD15,
                           deadline_s=180, expect_shape=[[1, 192, 192, 3]])
        with lock:
            answered.append(i)
            if len(answered) == 4:
                done.set()
        return i, r.output[0].numpy(), r.attempts

    victim = replicas[0]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(len(zs))]
        assert done.wait(120), "no answers before the kill"
        os.kill(victim, signal.SIGKILL)
        results = [f.result() for f in futures]  # raises if any request was lost
    assert not alive(victim)
    assert sorted(i for i, _, _ in results) == list(range(len(zs)))
    for i, got, _ in results:  # each answer is the image of its own latent
        assert np.abs(got.astype(int) - _local_uint8(local_sd15, zs[i]).astype(int)).max() <= 1, i
    retried = sum(a > 1 for _, _, a in results)
    print(f"replica {victim} killed after 4 answers; {retried} of {len(zs)} requests needed a client retry")
    assert requests.get(f"{ray_server.base}/health", timeout=30).status_code == 200  # the other replica serves
    client.close()


@needs_ray
def test_stopping_leaves_no_process(ray_server: RayServeProcess) -> None:
    """Last test of the module: SIGTERM to the command shuts Serve and Ray down; nothing of them is left."""
    seen = ray_server.snapshot()
    assert len(seen) >= 6, seen  # the command, gcs_server, raylet, workers: the check looks at real processes
    left = ray_server.stop()
    assert ray_server.proc.returncode == 0, ray_server.log()[-3000:]
    assert left == set(), f"left behind: {sorted(left)}"
    assert not any(alive(p) for p in ray_server.seen)
