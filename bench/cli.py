"""``hybrid-vae bench``: the simulated scenario matrix, real GPU decodes, and the plots.

::

    hybrid-vae bench --simulate [--json] [--set scoring|tuning|reduced]   # every strategy x scenario, CPU only
    hybrid-vae bench --gpu [--out bench/results]       # >= 30 real decodes on emulated smaller cards
    hybrid-vae bench --plots                            # PNGs under docs/img/ (needs matplotlib)
    python -m hybrid_vae.bench.cli gpu --out bench/results         # the same as --gpu

Each writes its own section of docs/benchmarks.md (``--no-write`` to skip). Heavy imports (torch,
diffusers, matplotlib) happen inside the handlers, so ``hybrid-vae --help`` stays fast.

``--gpu`` emulates a smaller card on the real one: before each scenario the cache is emptied and
``torch.cuda.set_per_process_memory_fraction`` caps this process at the VAE's weights plus the
scenario's free memory (the allocator frees its cache and retries before it raises, so the cap
bounds peak *allocated* bytes, the engine's measure). The engine sees that free memory through a
simulated GPU state and runs through :class:`extension.orchestrator.HybridDecoder`; diffusers'
default decode runs under the same cap for contrast. Without CUDA it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GiB = 2**30
DEFAULT_RESULTS = Path("bench") / "results"


# ---- parsers --------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print per-strategy metrics (simulate) or results (gpu) as JSON")
    p.add_argument("--no-write", action="store_true", help="do not write the section of docs/benchmarks.md")
    p.add_argument("--out", default=None, help="results folder (gpu: JSONL per run; simulate: full JSON with every row)")
    p.add_argument("--set", dest="sset", choices=("scoring", "tuning", "reduced"), default="scoring",
                   help="simulate: scenario set (scoring: the headline; tuning: where defaults are chosen; reduced: tests)")
    p.add_argument("--reduced", action="store_true", help="simulate: the reduced set (= --set reduced)")
    p.add_argument("--jobs", type=int, default=None, help="simulate: worker processes (default: CPU count, max 8)")
    p.add_argument("--seed", type=int, default=None, help="simulate: one world seed instead of the set's seeds")
    p.add_argument("--no-what-if", action="store_true", help="simulate: skip the engine what-if variants (faster)")
    p.add_argument("--profile", default="", help="profile YAML merged over the built-ins")
    p.add_argument("--budget-s", type=float, default=300.0, help="gpu: stop starting new scenarios after this long")
    p.add_argument("--device", default="cuda", help="gpu: device (cpu only with --tiny: a plumbing smoke run)")
    p.add_argument("--tiny", action="store_true", help="gpu: tiny random VAEs and sizes (smoke run; never writes docs)")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks: simulated scenario matrix, real GPU decodes, plots",
                       description="Benchmarks that write docs/benchmarks.md. Pick one of --simulate, --gpu, --plots.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--simulate", dest="what", action="store_const", const="simulate",
                   help="every strategy in every simulated scenario (CPU only)")
    g.add_argument("--gpu", dest="what", action="store_const", const="gpu", help="real decodes on this CUDA GPU")
    g.add_argument("--plots", dest="what", action="store_const", const="plots", help="draw docs/img/*.png")
    _common(p)
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    """``python -m hybrid_vae.bench.cli {simulate,gpu,plots} ...``."""
    ap = argparse.ArgumentParser(prog="python -m hybrid_vae.bench.cli", description=(__doc__ or "").split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    for name in ("simulate", "gpu", "plots"):
        _common(sub.add_parser(name))
    return ap


def cmd_bench(args: argparse.Namespace) -> int:
    return {"simulate": cmd_simulate, "gpu": cmd_gpu, "plots": cmd_plots}[args.what](args)


# ---- simulate -------------------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    from hybrid_vae.bench import matrix
    from hybrid_vae.bench.strategies import STRATEGIES

    if args.jobs is not None and args.jobs < 1:
        print(f"hybrid-vae bench: --jobs {args.jobs}: must be >= 1", file=sys.stderr)
        return 2
    sset = matrix.SETS["reduced" if args.reduced else args.sset]
    if args.seed is not None:
        sset = dataclasses.replace(sset, seeds=(args.seed,))
    names = list(STRATEGIES) if args.no_what_if else None
    res = matrix.run(args.profile, sset=sset, strategies=names, jobs=args.jobs)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"simulate-{sset.name}-seeds{'-'.join(map(str, sset.seeds))}.json").write_text(json.dumps(res))
    slim = {k: v for k, v in res.items() if k != "rows"}
    if args.json:
        print(json.dumps(slim, indent=2, default=str))
    else:
        print(f"{sset.name} set: {res['scenarios']} scenarios in {res['elapsed_s']:.1f} s on {res['jobs']} processes "
              f"({res['cpu_s']:.1f} CPU-seconds)\n")
        print(matrix.markdown(res))
        if not args.no_what_if:
            print("\n" + matrix.what_if_markdown(res))
        print("\ntargets:", ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in res.get("targets", {}).items()))
    from hybrid_vae.bench.report import DOC

    if not (args.no_write or sset.name != "scoring" or args.profile or args.seed is not None) and not DOC.is_file():
        print(f"docs not written: {DOC} does not exist (an installed package, not a source checkout)", file=sys.stderr)
    elif not (args.no_write or sset.name != "scoring" or args.profile or args.seed is not None):
        from hybrid_vae.bench.report import write_section

        full = not args.no_what_if
        tuning_res = matrix.run(args.profile, sset="tuning", strategies=list(STRATEGIES), jobs=args.jobs)
        tuning = matrix.tune(jobs=args.jobs) if full else None
        sens = matrix.sensitivity(jobs=args.jobs) if full else None
        cdf = None
        try:
            from hybrid_vae.bench import plots

            cdf = plots.regret_cdf(res)
        except ImportError:
            print("regret plot skipped: matplotlib is not installed (the `plots` extra)", file=sys.stderr)
        write_section("bench/matrix.py", matrix.section(res, sens, cdf=cdf, tuning=tuning, tuning_res=tuning_res))
        if full:
            from hybrid_vae.bench import online

            learning = {name: online.run(args.profile, sset=s, jobs=args.jobs) for name, s in online.sets().items()}
            for name, r in learning.items():
                print(f"\nlearning as it goes, {name}:\n{online.markdown(r)}")
            write_section("bench/online.py", online.section(learning))
    return 0


# ---- gpu ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GpuCase:
    """One real decode: family, the VAE to build, dtype, size, and the emulated free memory (GiB)."""

    family: str
    kind: str
    dtype: str
    width: int
    height: int
    free_gib: float
    batch: int = 1
    frames: int | None = None

    @property
    def label(self) -> str:
        size = f"{self.frames}x{self.width}x{self.height}" if self.frames else f"{self.width}x{self.height}"
        return f"{self.family} {self.dtype} {size}{f' x{self.batch}' if self.batch > 1 else ''}, {self.free_gib:g} GiB free"


def gpu_cases() -> list[GpuCase]:
    """35 scenarios: every image family and dtype of the matrix, video (Wan's tiles streamed to host at 1.5 GiB,
    and the 192 px tiles of Wan and HunyuanVideo at 0.8 / 1.0 GiB),
    batches, non-square sizes;
    free memory chosen so that full, item-by-item, tiled and chunked plans all run."""
    c = GpuCase
    return [
        c("sd15", "sd", "float16", 1024, 1024, 4.0), c("sd15", "sd", "float16", 1024, 1024, 1.5),
        c("sd15", "sd", "float16", 2048, 2048, 2.0), c("sd15", "sd", "float16", 512, 512, 1.0, batch=4),
        c("sd15", "sd", "float16", 832, 1216, 1.0), c("sd15", "sd", "float16", 1536, 1536, 0.5),
        c("sdxl", "sd", "float32", 1024, 1024, 8.0), c("sdxl", "sd", "float32", 1024, 1024, 2.0),
        c("sdxl", "sd", "float32", 2048, 2048, 6.0), c("sdxl", "sd", "float32", 1344, 768, 3.0),
        c("sdxl", "sd", "float32", 1536, 1536, 1.0), c("sdxl", "sd", "float32", 512, 512, 0.6),
        c("sdxl", "sd", "float16", 1024, 1024, 1.0), c("sdxl", "sd", "float16", 2048, 2048, 4.0),
        c("sdxl", "sd", "float16", 832, 1216, 3.0, batch=2), c("sdxl", "sd", "float16", 1536, 1536, 6.0),
        c("flux", "sd16", "bfloat16", 1024, 1024, 2.5), c("flux", "sd16", "bfloat16", 1024, 1024, 3.0, batch=2),
        c("flux", "sd16", "bfloat16", 2048, 2048, 1.5), c("flux", "sd16", "bfloat16", 1344, 768, 4.0, batch=4),
        c("flux", "sd16", "bfloat16", 512, 512, 0.8, batch=4),
        c("sd3", "sd16", "float16", 1024, 1024, 0.6), c("sd3", "sd16", "float16", 1536, 1536, 2.0),
        c("sd3", "sd16", "float16", 2048, 2048, 11.0), c("sd3", "sd16", "float16", 832, 1216, 1.2),
        c("hunyuanvideo", "hunyuanvideo", "float16", 512, 320, 6.0, frames=9),
        c("hunyuanvideo", "hunyuanvideo", "float16", 512, 320, 3.0, frames=9),
        c("hunyuanvideo", "hunyuanvideo", "float16", 512, 320, 4.0, frames=33),
        c("hunyuanvideo", "hunyuanvideo", "float16", 512, 320, 2.5, frames=33),
        c("hunyuanvideo", "hunyuanvideo", "float16", 512, 320, 10.0, frames=61),
        c("hunyuanvideo", "hunyuanvideo", "float16", 512, 320, 4.5, frames=61),
        c("wan", "wan", "bfloat16", 960, 544, 8.0, frames=33), c("wan", "wan", "bfloat16", 960, 544, 1.5, frames=33),
        # the smallest tiles: Wan's 192 px tiles and HunyuanVideo's last-resort 192 px ones (estimates extrapolated)
        c("wan", "wan", "bfloat16", 960, 544, 0.8, frames=33),
        c("hunyuanvideo", "hunyuanvideo", "float16", 512, 320, 1.0, frames=61),
    ]


def tiny_cases() -> list[GpuCase]:
    """A plumbing smoke run with tiny random VAEs (any device, seconds on a CPU)."""
    c = GpuCase
    return [c("sd15", "tiny:sd15", "float32", 128, 128, 1.0, batch=2), c("sd15", "tiny:sd15", "float32", 384, 320, 0.5),
            c("hunyuanvideo", "tiny:hunyuanvideo", "float32", 64, 64, 1.0, frames=5)]


def _oom_types(torch: Any) -> tuple[type[BaseException], ...]:
    return (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


def _default_full(vae: Any, z: Any, device: str) -> dict[str, Any]:
    """diffusers' default ``vae.decode`` (tiling/slicing off, HunyuanVideo frame-wise) under the same cap."""
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    ok, err = True, None
    try:
        with torch.inference_mode():
            out = vae.decode(z, return_dict=False)[0]
            if cuda:
                torch.cuda.synchronize(device)
            del out
    except _oom_types(torch):
        ok, err = False, "out of memory"
    secs = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) - base) if cuda else None
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
    return {"ok": ok, "error": err, "seconds": round(secs, 4), "peak_bytes": peak}


def run_gpu(cases: list[GpuCase], *, device: str = "cuda", budget_s: float = 300.0,
            latent_dir: Path | None = None, on_record: Callable[[dict[str, Any]], None] | None = None
            ) -> dict[str, Any]:
    """Run ``cases`` for real; returns the card, one record per case and a summary (JSON-ready).
    ``on_record`` gets each record as soon as its scenario is done (the CLI appends it to a file)."""
    import tempfile

    import torch
    from hybrid_vae.extension.calibrate import build_vae
    from hybrid_vae.extension.orchestrator import HybridDecoder
    from hybrid_vae.policy import DecodeSettings, GpuState, load_profiles
    from hybrid_vae.policy.errors import DecodeFailedError

    profiles = load_profiles("")
    cuda = device.startswith("cuda")
    card = torch.cuda.get_device_name(device) if cuda else "cpu (plumbing smoke run)"
    total = torch.cuda.get_device_properties(device).total_memory if cuda else 0
    latent_dir = latent_dir or Path(tempfile.mkdtemp(prefix="hybrid-vae-bench-"))
    records: list[dict[str, Any]] = []
    vaes: dict[tuple[str, str], Any] = {}
    t_start = time.perf_counter()
    for case in cases:
        if time.perf_counter() - t_start > budget_s:
            records.append({"case": case.label, "skipped": f"time budget of {budget_s:g} s spent"})
            continue
        dt = getattr(torch, case.dtype)
        key = (case.kind, case.dtype)
        if key not in vaes:
            vaes.clear()
            if cuda:
                gc.collect()
                torch.cuda.set_per_process_memory_fraction(1.0, device)
                torch.cuda.empty_cache()
            if case.kind.startswith("tiny:"):
                from hybrid_vae.extension.fixture import build_tiny_vae

                vaes[key] = build_tiny_vae(case.kind.split(":", 1)[1]).to(device=device, dtype=dt)
            else:
                vaes[key] = build_vae(case.kind, device=device, dtype=dt)
        vae = vaes[key]
        fam = profiles.family(case.family)
        s = fam.spatial_compression
        shape: tuple[int, ...] = (case.batch, fam.latent_channels, case.height // s, case.width // s)
        if fam.video:
            shape = (case.batch, fam.latent_channels, ((case.frames or 1) - 1) // fam.temporal_compression + 1,
                     case.height // s, case.width // s)
        gen = torch.Generator(device="cpu").manual_seed(0)
        z = torch.randn(shape, generator=gen).to(device)
        free = int(case.free_gib * GiB)
        cap = None
        if cuda:
            torch.cuda.synchronize(device)
            gc.collect()
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            cap = min(1.0, (base + free) / total)
            torch.cuda.set_per_process_memory_fraction(cap, device)
        state = GpuState(name=card, total_bytes=int(total) or free, free_bytes=free, source="simulated", simulated=True,
                         device=device, note=f"emulated: per-process cap = weights + {case.free_gib:g} GiB")
        dec = HybridDecoder(settings=DecodeSettings(allow_remote=False, allow_cpu=False), probe=lambda st=state: st,
                            device=device, latent_dir=latent_dir)
        rec: dict[str, Any] = {"case": case.label, **dataclasses.asdict(case), "cap_fraction": cap}
        t0 = time.perf_counter()
        try:
            res = dec.decode(z, vae, family=case.family, dtype=case.dtype)
            rep = res.report
            del res
            est = rep.ran.estimate.peak_bytes
            rec.update(delivered=True, chosen=rep.chosen.label, ran=rep.ran.label,
                       attempts=[{"plan": a, "error": e, "seconds": round(t, 4)} for a, e, t in rep.attempts],
                       ooms=sum(1 for _, e, _ in rep.attempts if e == "out of memory"),
                       measured_peak=rep.peak_bytes, estimated_peak=est,
                       peak_ratio=(rep.peak_bytes / est) if rep.peak_bytes and est else None,
                       estimated_s=rep.ran.estimate.seconds, seconds=round(rep.seconds, 4))
        except DecodeFailedError as exc:
            rec.update(delivered=False, error=str(exc)[:300], ooms=sum(1 for _, e in exc.attempts if e == "out of memory"),
                       seconds=round(time.perf_counter() - t0, 4))
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
        from hybrid_vae.extension.latents import to_vae_space

        zv = to_vae_space(z.float(), fam).to(dtype=dt)
        rec["diffusers_default"] = _default_full(vae, zv, device)
        del zv, z
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            torch.cuda.empty_cache()
        records.append(rec)
        if on_record is not None:
            on_record(rec)
        mp, ep = rec.get("measured_peak"), rec.get("estimated_peak")
        peak = "" if mp is None or not ep else f"peak {mp / GiB:.2f} of est {ep / GiB:.2f} GiB "
        dd = "ok" if rec["diffusers_default"]["ok"] else "OOM"
        print(f"  {case.label}: {rec.get('ran', 'FAILED')} {peak}| diffusers default: {dd}", file=sys.stderr)
    return {"card": card, "device": device, "total_bytes": total, "torch": torch.__version__,
            "elapsed_s": round(time.perf_counter() - t_start, 1), "records": records, "summary": summarise_gpu(records)}


def summarise_gpu(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts over the records of :func:`run_gpu` (pure)."""
    ran = [r for r in records if "skipped" not in r]
    measured = [r for r in ran if r.get("measured_peak") is not None and r.get("estimated_peak")]
    ratios = [r["measured_peak"] / r["estimated_peak"] for r in measured]
    return {
        "scenarios": len(ran), "skipped": len(records) - len(ran),
        "delivered": sum(1 for r in ran if r.get("delivered")), "engine_ooms": sum(r.get("ooms", 0) for r in ran),
        "fell_back": sum(1 for r in ran if r.get("delivered") and r.get("chosen") != r.get("ran")),
        "peak_measured": len(measured), "peak_under_estimate": sum(1 for x in ratios if x <= 1.0),
        "peak_ratio_max": max(ratios) if ratios else None,
        "peak_ratio_median": statistics.median(ratios) if ratios else None,
        "diffusers_default_ooms": sum(1 for r in ran if not r.get("diffusers_default", {}).get("ok", True)),
    }


CALIBRATE_NOTE = """### Calibrating a card, learning its timings

- `hybrid-vae calibrate [--out FILE]` (GPU only; a few minutes, progress bar) decodes with a random-weight
  SD-architecture VAE at 512-2048 px in float16 and float32 and writes a GPU profile YAML (`gpus: - name,
  total_gib, rows` with peak allocated bytes and seconds, source `hybrid-vae calibrate <date>`); `hybrid-vae
  explain --profile FILE` (or `HYBRID_VAE_PROFILE=FILE`) then names that profile as the seconds source. On a
  machine without CUDA it says there is nothing to calibrate, writes nothing and exits 0.
- Learned timings (`policy/learned.py`): after each successful local decode on a real GPU the orchestrator
  records measured / estimated seconds per (card, family, path, size bucket) and card-wide, as an EWMA in a
  bounded JSON file (512 entries; `$HYBRID_VAE_LEARNED` or the user cache dir). From 3 decodes a factor
  scales that card's local estimates (`explain --learned` shows the factors and the sources say
  `x0.82 learned from 12 decodes`). Reset: `hybrid-vae calibrate --reset-learned`.
- Learned peaks (same file): the allocated peak of each such decode against its estimate, per (card, family,
  path) and card-wide per path, as an upper envelope (a higher ratio replaces the factor, a lower one pulls it
  down slowly); an out-of-memory error of a plan whose estimate was claimed raises it by 5%. From the first
  decode a factor above 1 raises that card's estimates (`x1.06 learned peak from 3 decodes`); it never lowers
  one."""


def gpu_placeholder() -> str:
    """The section text until a GPU run replaces it."""
    return ("## Real decodes on a GPU\n\nNot run yet: the session that wrote this had no GPU. One command runs all "
            "of it (35 scenarios, about 5 minutes on an H100) and replaces this section with the card's name and "
            "the results: `hybrid-vae bench --gpu` (or `python -m hybrid_vae.bench.cli gpu --out bench/results`). It emulates "
            "smaller cards with `torch.cuda.set_per_process_memory_fraction` (the VAE's weights + the scenario's "
            "free memory), runs every scenario through `HybridDecoder`, and records OOM errors, the measured peak "
            "against the estimate, seconds, and diffusers' default decode under the same cap. "
            "`bash bench/gpu_session.sh 1` (the CUDA tests, the tiled-vs-full timing at 2048x2048 float16 / "
            "2.5 GiB with `bench/tiled_speed.py --device cuda`, `hybrid-vae calibrate` and `explain --profile`) "
            "and `bash bench/gpu_session.sh 2` (this benchmark) run it all on a lent machine, each step under "
            "its own time limit; that machine has no network, so `bash bench/gpu_wheels.sh` first downloads "
            "the wheels its image lacks (diffusers, pydantic) into `.whl/` to carry.\n\n" + CALIBRATE_NOTE)


def gpu_markdown(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = [f"## Real decodes on {res['card']}", "",
             f"`hybrid-vae bench --gpu`: {s['scenarios']} scenarios in {res['elapsed_s']} s (torch {res['torch']}), "
             "random-weight VAEs with the real architectures; each smaller card emulated by a per-process memory "
             "cap of the VAE's weights + the free memory shown.", "",
             f"- this engine: {s['delivered']}/{s['scenarios']} delivered, **{s['engine_ooms']} OOM errors**, "
             f"{s['fell_back']} fallbacks;",
             f"- measured peak under the estimate in **{s['peak_under_estimate']}/{s['peak_measured']}** scenarios "
             f"(measured/estimate: median {_r(s['peak_ratio_median'])}, max {_r(s['peak_ratio_max'])});",
             f"- diffusers' default decode under the same caps: **{s['diffusers_default_ooms']} OOM errors** "
             "(each a lost image).", "",
             "| scenario | engine ran | attempts | measured peak GiB | estimate GiB | s | diffusers default |",
             "|---|---|---|---|---|---|---|"]
    for r in res["records"]:
        if "skipped" in r:
            lines.append(f"| {r['case']} | skipped: {r['skipped']} | | | | | |")
            continue
        mp, ep = r.get("measured_peak"), r.get("estimated_peak")
        att = " -> ".join(f"{a['plan']}{' (OOM)' if a['error'] == 'out of memory' else ''}" for a in r.get("attempts", []))
        dd = r["diffusers_default"]
        lines.append(f"| {r['case']} | {r.get('ran', 'FAILED')} | {att or r.get('error', '')} | "
                     f"{'' if mp is None else f'{mp / GiB:.2f}'} | {'' if ep is None else f'{ep / GiB:.2f}'} | "
                     f"{r.get('seconds', '')} | {'ok' if dd['ok'] else 'OOM (lost)'} {dd['seconds']} s |")
    return "\n".join(lines) + "\n\n" + CALIBRATE_NOTE


def _r(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def cmd_gpu(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError as exc:
        print(f"hybrid-vae bench --gpu: skipped: torch is not importable ({exc})")
        return 0
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("hybrid-vae bench --gpu: skipped: no CUDA GPU on this machine (the simulated matrix runs anywhere: "
              "hybrid-vae bench --simulate)")
        return 0
    if not device.startswith("cuda") and not args.tiny:
        print(f"hybrid-vae: error: --device {device}: real-size decodes need CUDA; use --tiny for a CPU smoke run",
              file=sys.stderr)
        return 2
    cases = tiny_cases() if args.tiny else gpu_cases()
    print(f"bench --gpu: {len(cases)} scenarios on {device}", file=sys.stderr)
    out = Path(args.out) if args.out else DEFAULT_RESULTS
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "gpu-partial.jsonl"  # one line per finished scenario, in case the run is cut off
    partial.unlink(missing_ok=True)

    def keep(rec: dict[str, Any]) -> None:
        with partial.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=str) + "\n")

    res = run_gpu(cases, device=device, budget_s=args.budget_s, latent_dir=out / "latents", on_record=keep)
    partial.unlink(missing_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    slug = "".join(ch if ch.isalnum() else "-" for ch in res["card"]).strip("-").lower()
    path = out / f"gpu-{'tiny-' if args.tiny else ''}{slug}-{stamp}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        f.write(json.dumps({k: v for k, v in res.items() if k != "records"}) + "\n")
        for r in res["records"]:
            f.write(json.dumps(r) + "\n")
    text = gpu_markdown(res)
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print(text)
    print(f"results: {path}", file=sys.stderr)
    if not (args.no_write or args.tiny):
        from hybrid_vae.bench.report import write_section

        write_section("bench/cli.py --gpu", text + f"\n\nRaw results: `{path.as_posix()}`.")
    s = res["summary"]
    return 0 if s["engine_ooms"] == 0 and s["delivered"] == s["scenarios"] else 1


# ---- plots ------------------------------------------------------------------------------------------


def cmd_plots(args: argparse.Namespace) -> int:
    from hybrid_vae.bench import plots

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("hybrid-vae bench --plots: skipped: matplotlib is not installed (pip install 'sdnext-hybrid-vae[plots]')")
        return 0
    made = plots.draw_all(profile_path=args.profile)
    for p in made:
        print(f"wrote {p}")
    if not args.no_write:
        from hybrid_vae.bench.report import write_section

        write_section("bench/plots.py", plots.section(made))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
