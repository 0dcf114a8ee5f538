"""Ray Serve and endpoint pools: throughput of 1 vs 2 replicas, batched vs unbatched, failover cost.

Run: ``python -m hybrid_vae.bench.ray_bench [--requests 48] [--concurrency 8] [--size 256] [--rounds 3]
[--no-write]`` (needs ``pip install -e '.[ray]'``); writes its section of docs/benchmarks.md.

Everything runs in one go on this machine, so the numbers to read are the ratios:

* **Replicas and batching**: one local Ray instance (loopback) with four applications of the same decoder,
  the trained fixture VAE as sd15, each replica reserving one CPU (Ray then gives it one torch thread):
  ``1 replica``, ``2 replicas``, ``2 replicas, unbatched`` (``max_batch=1``) and ``2 replicas, GPU plan``,
  whose replicas plan as on a large GPU (``HYBRID_VAE_SIMULATE_GPU``) and so decode each batch as one
  tensor, while the others, as real CPU servers do, decode a collected batch item by item. Each round sends
  ``--requests`` sd15 latents (``--size`` px) from ``--concurrency`` threads to each application in turn;
  the table gives requests/s (median of the rounds) and the mean batch the replicas received. Plain
  ``hybrid-vae serve`` (one process, torch's default threads) runs the same load as a reference.
* **Endpoint pool, time to first byte**: sequential decodes through :class:`extension.endpoints.EndpointPool`
  against the ``2 replicas`` application. TTFB is measured from the call to the response headers of the
  answering endpoint (a ``requests`` response hook). Cases: the healthy endpoint alone; ``[dead, healthy]``
  where dead is a closed port (connection refused); ``[hung, healthy]`` where hung accepts connections and
  never answers (the client's read timeout is 2 s). "first" is a fresh pool's first decode (the dead member
  tried first: failover cost), "then" the median of the following decodes (the background health check has
  put the dead member last).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

NAME = "bench/ray_bench.py"
SIMULATED = "name=NVIDIA H200,total_gib=140,free_gib=120"


def _post(url: str, z: Any, session: Any) -> tuple[int, int]:
    """One sd15 decode (uint8 tensor answer); returns (status, batch the replica decoded it in)."""
    r = session.post(url, data=z.numpy().tobytes(), timeout=300, headers={"Content-Type": "tensor/binary"},
                     params={"shape": list(z.shape), "dtype": "float32", "output_type": "pt",
                             "partial_postprocess": "true", "scaling_factor": "0.18215"})
    return r.status_code, int(r.headers.get("X-Decode-Batch", "0"))


def _load(url: str, latents: list[Any], concurrency: int) -> tuple[float, float]:
    """Send every latent, ``concurrency`` at a time; (requests/s, mean batch size)."""
    import requests

    local = threading.local()

    def one(z: Any) -> tuple[int, int]:
        if not hasattr(local, "s"):
            local.s = requests.Session()
        return _post(url, z, local.s)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(one, latents))
    secs = time.perf_counter() - t0
    bad = [s for s, _ in out if s != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(out)} requests to {url} failed: {bad[:5]}")
    return len(latents) / secs, statistics.mean(b for _, b in out)


@contextlib.contextmanager
def _hung_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers; yields its URL."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = srv.accept()
                held.append(conn)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}/sd15"
    finally:
        stop.set()
        t.join(2)
        for c in held:
            c.close()
        srv.close()


def _ttfb_case(spec: str, latents: list[Any], family: Any) -> tuple[float, float]:
    """A fresh pool over ``spec``: TTFB of its first decode and the median of the following ones."""
    import requests
    from hybrid_vae.extension.endpoints import EndpointPool
    from hybrid_vae.extension.remote import RemoteClient
    from hybrid_vae.policy.model import DecodeJob, Estimate, Plan

    marks: list[float] = []
    session = requests.Session()
    session.hooks["response"].append(lambda r, *a, **k: marks.append(time.perf_counter()))
    pool = EndpointPool(RemoteClient(session=session, connect_timeout_s=2.0, read_timeout_s=2.0, max_retries=1),
                        pools=[spec])
    n = int(latents[0].shape[-1]) * 8
    job = DecodeJob("sd15", n, n, dtype="float32")
    plan = Plan(path="remote", endpoint=spec, response_format="raw", dtype="float32",
                estimate=Estimate(peak_bytes=0, seconds=0.0, peak_source="", seconds_source=""))
    ttfb = []
    for i, z in enumerate(latents):
        marks.clear()
        t0 = time.perf_counter()
        pool.decode(z, plan=plan, job=job, family=family, deadline_s=60, height=n, width=n)
        ttfb.append(marks[-1] - t0)
        if i == 0:
            time.sleep(2.5)  # let the background health check (2 s timeout) report on every member
    pool.close()
    return ttfb[0], statistics.median(ttfb[1:])


def _tensor_batching(size: int, n: int = 8, repeats: int = 3) -> tuple[float, float]:
    """Seconds per image of the fixture VAE on one thread here: ``n`` single decodes vs one ``n``-image tensor."""
    import torch
    from hybrid_vae.extension.fixture import load_fixture_vae

    vae = load_fixture_vae()
    zs = torch.randn(n, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    single, batched = [], []
    try:
        with torch.no_grad():
            vae.decode(zs[:1])  # warm-up
            for _ in range(repeats):
                t0 = time.perf_counter()
                for i in range(n):
                    vae.decode(zs[i:i + 1])
                single.append((time.perf_counter() - t0) / n)
                t0 = time.perf_counter()
                vae.decode(zs)
                batched.append((time.perf_counter() - t0) / n)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(single), statistics.median(batched)


def _apps(config: dict[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """label -> (serve configuration, deployment options) of the applications compared."""
    gpu_plan = {"HYBRID_VAE_SIMULATE_GPU": SIMULATED}
    return {
        "1 replica": (config, {"replicas": 1}),
        "2 replicas": (config, {"replicas": 2}),
        "2 replicas, unbatched (max_batch 1)": ({**config, "max_batch": 1}, {"replicas": 2}),
        "2 replicas, GPU plan (batch = one tensor)": (config, {"replicas": 2, "env": gpu_plan}),
    }


def run(requests_n: int, concurrency: int, size: int, rounds: int) -> dict[str, Any]:
    """Start Ray on loopback, deploy the applications, measure; everything is stopped before it returns."""
    import torch
    from hybrid_vae.extension.fixture import FIXTURE_DIR
    from hybrid_vae.policy.profiles import load_profiles
    from hybrid_vae.server.cli import build_app
    from hybrid_vae.server.testing import free_port, serve_in_thread

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # one machine: Ray on loopback (before import)
    from hybrid_vae.server import ray_app

    ray, serve = ray_app.ray, ray_app.serve

    config = ray_app.config_from_mapping({"family": {"sd15": str(FIXTURE_DIR)}, "device": "cpu", "max_batch": 8})
    apps = _apps(config)
    latents = [torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(i))
               for i in range(requests_n)]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()[0]
    ray.init(address="local", include_dashboard=False, num_cpus=8, log_to_driver=False)
    results: dict[str, Any] = {"throughput": {}, "ttfb": {}, "tensor": _tensor_batching(size)}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        urls = {}
        for i, (label, (cfg, opts)) in enumerate(apps.items()):
            serve.run(ray_app.application(cfg, cpus_per_replica=1.0, **opts), name=f"a{i}", route_prefix=f"/a{i}")
            urls[label] = f"{base}/a{i}/sd15"
        with serve_in_thread(build_app(config, None)) as plain:
            urls[f"plain `hybrid-vae serve` ({torch.get_num_threads()} torch threads)"] = f"{plain}/sd15"
            for url in urls.values():  # warm-up: every replica loads and runs once
                _load(url, latents[:4], 4)
            runs: dict[str, list[tuple[float, float]]] = {k: [] for k in urls}
            for _ in range(rounds):
                for label, url in urls.items():
                    runs[label].append(_load(url, latents, concurrency))
        for label, rs in runs.items():
            results["throughput"][label] = (statistics.median(r for r, _ in rs), statistics.mean(b for _, b in rs),
                                            [round(r, 2) for r, _ in rs])
        fam = load_profiles().family("sd15")
        healthy = urls["2 replicas"]
        seq = latents[: min(12, len(latents))]
        dead = f"http://127.0.0.1:{free_port()}/sd15"
        with _hung_server() as hung:
            cases = {"healthy endpoint alone": healthy, "[dead, healthy] pool": f"{dead}|{healthy}",
                     "[healthy, dead] pool": f"{healthy}|{dead}", "[hung, healthy] pool": f"{hung}|{healthy}"}
            for label, spec in cases.items():
                results["ttfb"][label] = _ttfb_case(spec, seq, fam)
    finally:
        serve.shutdown()
        ray.shutdown()
    results["setup"] = {"requests": requests_n, "concurrency": concurrency, "size": size, "rounds": rounds,
                        "ray": ray.__version__, "cores": os.cpu_count(),
                        "load": (load_before, os.getloadavg()[0])}
    return results


def render(res: dict[str, Any]) -> str:
    s = res["setup"]
    tp = res["throughput"]
    one = tp["1 replica"][0]
    lines = [
        "## Ray Serve: replicas, batching, and an endpoint pool with a dead member",
        "",
        f"`hybrid-vae serve --ray` as four applications of one local Ray {s['ray']} instance (loopback) and plain "
        f"`hybrid-vae serve` for reference; the trained fixture VAE as sd15, {s['size']}x{s['size']} latents "
        f"(float32 in, uint8 tensor out), {s['requests']} requests from {s['concurrency']} threads per run, "
        f"{s['rounds']} rounds, interleaved. Each Ray replica reserves one CPU (Ray gives it one torch thread). "
        f"**The machine has {s['cores']} cores shared with other work running at the same time** (1-minute load "
        f"average {s['load'][0]:.1f} before the run, {s['load'][1]:.1f} after), so absolute figures wander between "
        "runs and two replicas cannot get two free cores; the ratios within one run are what this measures.",
        "",
        "| application | requests/s (median) | vs 1 replica | mean batch received | every round |",
        "|---|---:|---:|---:|---|",
    ]
    for label, (rps, batch, rounds) in tp.items():
        lines.append(f"| {label} | {rps:.2f} | {rps / one:.2f}x | {batch:.1f} | {rounds} |")
    b2 = tp["2 replicas"][0]
    nb = tp["2 replicas, unbatched (max_batch 1)"][0]
    gp = tp["2 replicas, GPU plan (batch = one tensor)"][0]
    single, batched = res["tensor"]
    lines += [
        "",
        f"2 replicas against 1: **{b2 / one:.2f}x**. Batched (requests collected by `@serve.batch`, decoded one "
        f"by one on a CPU server) against unbatched: **{b2 / nb:.2f}x**; batches decoded as one tensor (the plan "
        f"a GPU replica makes) against unbatched: **{gp / nb:.2f}x**. The decode itself, measured in this run on "
        f"one thread without HTTP: {single * 1000:.0f} ms per image one at a time, {batched * 1000:.0f} ms per "
        f"image in one 8-image tensor ({single / batched:.2f}x). On a CPU that is the most batching can give; "
        "the engine decodes a batch item by item on a CPU-only server and as one tensor when a GPU plan fits "
        "it (on an H200, +15% images/s at batch 4: docs/ray.md).",
        "",
        "Time to first byte through an endpoint pool (sequential decodes; TTFB = call to response headers of the "
        "endpoint that answered):",
        "",
        "| endpoints | first decode (fresh pool) | following decodes (median) | following vs healthy alone |",
        "|---|---:|---:|---:|",
    ]
    alone = res["ttfb"]["healthy endpoint alone"][1]
    for label, (first, then) in res["ttfb"].items():
        lines.append(f"| {label} | {first * 1000:.0f} ms | {then * 1000:.0f} ms | {then / alone:.2f}x |")
    lines += [
        "",
        "A refused connection costs the first decode almost nothing (the pool moves on without the client's "
        "backoff); a member that accepts and never answers costs one read timeout (2 s here), once: the "
        "background health check then puts it last, and later decodes answer as fast as the healthy endpoint "
        "alone.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hybrid_vae.bench.ray_bench", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="output pixels (multiple of 8)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    for flag, v, lo, hi in (("--requests", a.requests, 4, 10_000), ("--concurrency", a.concurrency, 1, 256),
                            ("--size", a.size, 64, 2048), ("--rounds", a.rounds, 1, 100)):
        if not lo <= v <= hi or (flag == "--size" and v % 8):
            p.error(f"{flag} {v}: give {lo}..{hi}{' (multiple of 8)' if flag == '--size' else ''}")
    text = render(run(a.requests, a.concurrency, a.size, a.rounds))
    print(text)
    if not a.no_write:
        from hybrid_vae.bench.report import write_section

        print(f"wrote {write_section(NAME, text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
