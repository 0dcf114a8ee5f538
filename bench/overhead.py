"""Probe + decide overhead per decode (issue: median under 1 ms on a CPU).

Run: ``python -m hybrid_vae.bench.overhead [--n 2000]``; writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

from hybrid_vae.policy import DecodeJob, DecodeSettings, decide, load_profiles, probe
from hybrid_vae.policy.gpu import parse_simulation


def measure(n: int) -> dict[str, dict[str, float]]:
    profiles = load_profiles("")
    settings = DecodeSettings(allow_remote=True)
    cases = {
        "sdxl 1024 on RTX 3070, 1 GiB free (tiled)":
            (DecodeJob("sdxl", 1024, 1024), "name=NVIDIA GeForce RTX 3070,free_gib=1.0,host_gib=16"),
        "sdxl 1024 on RTX 4090, 20 GiB free (full)":
            (DecodeJob("sdxl", 1024, 1024), "name=NVIDIA GeForce RTX 4090,free_gib=20,host_gib=16"),
        "flux 2048x1152 x2 on RTX 3080, 3 GiB free":
            (DecodeJob("flux", 2048, 1152, batch=2), "name=NVIDIA GeForce RTX 3080,free_gib=3,host_gib=16"),
        "hunyuanvideo 61x544x960 on RTX 4090, 6 GiB":
            (DecodeJob("hunyuanvideo", 960, 544, frames=61), "name=NVIDIA GeForce RTX 4090,free_gib=6,host_gib=16"),
    }
    out: dict[str, dict[str, float]] = {}
    real_probe = []
    for _ in range(min(n, 200)):
        t0 = time.perf_counter()
        probe()
        real_probe.append(time.perf_counter() - t0)
    for label, (job, spec) in cases.items():
        times_probe, times_decide = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            gpu = parse_simulation(spec, total_for=lambda name: (p.total_gib if (p := profiles.gpu(name)) else None))
            t1 = time.perf_counter()
            decide(job, gpu, profiles, settings)
            t2 = time.perf_counter()
            times_probe.append(t1 - t0)
            times_decide.append(t2 - t1)
        tot = [a + b for a, b in zip(times_probe, times_decide, strict=True)]
        out[label] = {"median_ms": statistics.median(tot) * 1e3, "p95_ms": sorted(tot)[int(0.95 * len(tot))] * 1e3,
                      "decide_median_ms": statistics.median(times_decide) * 1e3}
    out["real probe() on this machine"] = {"median_ms": statistics.median(real_probe) * 1e3,
                                           "p95_ms": sorted(real_probe)[int(0.95 * len(real_probe))] * 1e3,
                                           "decide_median_ms": float("nan")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    res = measure(args.n)
    lines = ["## Probe + decide overhead", "",
             f"`python -m hybrid_vae.bench.overhead --n {args.n}`: simulated card state (the parse of "
             "`HYBRID_VAE_SIMULATE_GPU`) + `decide()` per decode, and the real `probe()` of this machine.", "",
             "| case | median ms | p95 ms | decide() median ms |", "|---|---|---|---|"]
    for label, r in res.items():
        lines.append(f"| {label} | {r['median_ms']:.3f} | {r['p95_ms']:.3f} | {r['decide_median_ms']:.3f} |")
    worst = max(r["median_ms"] for r in res.values())
    lines += ["", f"Target: median under 1 ms. Worst median here: {worst:.3f} ms -> "
              f"{'met' if worst < 1.0 else 'NOT met'}."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        from hybrid_vae.bench.report import write_section
        write_section("bench/overhead.py", text)


if __name__ == "__main__":
    main()
