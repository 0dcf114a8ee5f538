"""The PNG plots of docs/benchmarks.md (``hybrid-vae bench --plots``; matplotlib is the ``plots`` extra).

* ``decision-map.png``: the path ``decide`` chooses per card, by image size and free memory.
* ``estimate-vs-measured.png``: the memory estimate against every measured peak in profiles/measured.
* ``tiled-time.png``: tiled decode time by tile size and overlap (the H200 tile sweep), with the
  simulated world's fitted model.
* ``remote-formats.png``: remote decode time by response format and bandwidth. MODELLED from
  ``policy.estimate.remote_estimate`` unless measured remote results exist.
* ``regret-cdf.png``: latency regret of every strategy over the simulated matrix (written by
  ``hybrid-vae bench --simulate``).

matplotlib is imported inside the functions; without it they raise ImportError and the CLI says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
GiB = 2**30
COLORS = {"full": "#2e7d32", "full (item by item)": "#81c784", "tiled exact": "#26a69a", "tiled": "#1565c0",
          "tiled chunks": "#7e57c2", "remote": "#ef6c00", "cpu": "#c62828"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, name: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return path


def decision_map(profile_path: str = "", *, family: str = "sdxl", out: Path = IMG) -> Path:
    """One panel per card: image side (square, px) x free memory (GiB) -> the chosen path, remote off."""
    from hybrid_vae.bench.world import EXTRA_CARDS
    from hybrid_vae.policy import DecodeJob, DecodeSettings, GpuState, decide, load_profiles
    from matplotlib.colors import ListedColormap

    plt = _plt()
    profiles = load_profiles(profile_path)
    cards = [(g.name, g.total_gib) for g in profiles.gpus] + [(n, t) for n, t, _, _ in EXTRA_CARDS]
    sides = list(range(512, 2049, 64))
    cats = ["full", "full (item by item)", "tiled exact", "tiled", "cpu"]
    cmap = ListedColormap([COLORS[c] for c in cats])
    ncol = 3
    nrow = math.ceil(len(cards) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    settings = DecodeSettings()
    for ax, (name, total) in zip(axes.flat, cards, strict=False):
        frees = [total * f / 40 for f in range(1, 41)]
        grid = []
        tiles: dict[tuple[int, int], int] = {}
        for j, free in enumerate(frees):
            row = []
            for i, side in enumerate(sides):
                gpu = GpuState(name=name, total_bytes=int(total * GiB), free_bytes=int(free * GiB), source="simulated",
                               simulated=True)
                c = decide(DecodeJob(family, side, side), gpu, profiles, settings).chosen
                label = c.label if c.path == "full" else ("tiled exact" if c.groupnorm == "exact" else c.path)
                row.append(cats.index(label) if label in cats else 3)
                if c.path == "tiled" and c.tile_px:
                    tiles[(i, j)] = c.tile_px
            grid.append(row)
        ax.imshow(grid, origin="lower", aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(cats) - 0.5,
                  extent=(sides[0] - 32, sides[-1] + 32, frees[0] - total / 80, frees[-1] + total / 80))
        for (i, j), t in tiles.items():
            if i % 4 == 0 and j % 5 == 2:
                ax.text(sides[i], frees[j], str(t), fontsize=6, ha="center", va="center", color="white")
        ax.set_title(name.replace("NVIDIA GeForce ", "").replace("NVIDIA ", "") + f" ({total:g} GiB)", fontsize=9)
        ax.set_xlabel("image side (px)", fontsize=8)
        ax.set_ylabel("free GiB", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(cards):]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[c]) for c in cats]
    fig.legend(handles, [*cats[:2], "tiled exact (same image as full)", "tiled, local GroupNorm (numbers: tile px)",
                         "cpu"], loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(f"decide(): {family} (default dtype), batch 1, remote off — path by image size and free memory", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return _save(fig, "decision-map.png", out)


def estimate_vs_measured(profile_path: str = "", *, out: Path = IMG) -> Path:
    """Every measured peak of profiles/measured against the engine's estimate for that decode."""
    from hybrid_vae.bench.estimator_fit import estimate_for, kind_of
    from hybrid_vae.policy import load_profiles
    from hybrid_vae.profiles.measurements import measured_rows

    plt = _plt()
    profiles = load_profiles(profile_path)
    rows = [(kind_of(r).rsplit(", ", 1)[0], estimate_for(r, profiles), float(r.peak_bytes or 0)) for r in measured_rows()]
    fig, ax = plt.subplots(figsize=(6, 5))
    kinds = sorted({r[0] for r in rows})
    for k in kinds:
        xs = [r[2] / GiB for r in rows if r[0] == k]
        ys = [r[1] / GiB for r in rows if r[0] == k]
        ax.scatter(xs, ys, s=14, label=f"{k} ({len(xs)})", alpha=0.8)
    lo, hi = 0.1, 40
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="estimate = measured")
    ax.plot([lo, hi], [lo * 1.1, hi * 1.1], "k--", lw=0.8, label="+10%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured peak allocated (GiB, H200)")
    ax.set_ylabel("engine estimate (GiB)")
    worst = max(r[1] / r[2] for r in rows) - 1
    best = min(r[1] / r[2] for r in rows) - 1
    ax.set_title(f"memory estimate vs measurement: {len(rows)} rows (fitted on them), +{best:.1%} .. +{worst:.1%}",
                 fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, "estimate-vs-measured.png", out)


def tiled_time(profile_path: str = "", *, out: Path = IMG) -> Path:
    """The H200 tile sweep (seconds by tile size, overlap 0.25 and 0.125) with the world's fitted model."""
    from hybrid_vae.bench.world import Card, Exec, Scenario, World, WorldParams
    from hybrid_vae.policy import load_profiles
    from hybrid_vae.profiles.measurements import measured_rows

    plt = _plt()
    profiles = load_profiles(profile_path)
    world = World(profiles, WorldParams.quiet())
    rows = [r for r in measured_rows() if r.series == "tilesweep"]
    full = {r.width: float(r.seconds or 0) for r in measured_rows() if r.series == "baseline"}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    h200 = Card("NVIDIA H200", 140.4, True)
    for res, color in ((1024, "#1565c0"), (2048, "#c62828")):
        for ov, style in ((0.25, "o-"), (0.125, "s--")):
            pts = sorted((r.tile_px or 0, float(r.seconds or 0)) for r in rows if r.width == res and r.overlap == ov)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=f"{res} px, overlap {ov:g} (measured)")
            sc = Scenario("sd15", "sd15", "float16", res, res, 1, None, h200, 1.0, None)
            model = [world.base_seconds(sc, Exec("tiled", tiles=((t, t),), overlap_px=int(t * ov) // 8 * 8,
                                                 geometry="diffusers"))[0] for t, _ in pts]
            ax.plot([p[0] for p in pts], model, ":", color=color, alpha=0.6, lw=1)
        if res in full:
            ax.axhline(full[res], color=color, lw=0.8, alpha=0.5)
            ax.text(1290, full[res], f" full {full[res]:.2f} s", color=color, fontsize=7, va="center")
    ax.set_xlabel("tile (px)")
    ax.set_ylabel("seconds (H200, fp16)")
    ax.set_title("tiled decode time by tile size and overlap (dotted: the world's fitted model)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, "tiled-time.png", out)


def remote_formats(*, out: Path = IMG) -> tuple[Path, bool]:
    """Remote decode seconds by format and bandwidth (SDXL 1024x1024, rtt 20 ms). Returns (path, measured?)."""
    from hybrid_vae.policy import DecodeJob, NetworkStats, load_profiles
    from hybrid_vae.policy.estimate import remote_estimate

    plt = _plt()
    profiles = load_profiles("")
    fam = profiles.family("sdxl")
    job = DecodeJob("sdxl", 1024, 1024, dtype="float16")
    mbits = [2 ** (i / 4) for i in range(0, 41)]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for fmt, color in (("raw", "#ef6c00"), ("png", "#6a1b9a"), ("jpg", "#00838f")):
        ys = [remote_estimate(job, fam, NetworkStats(rtt_s=0.02, down_bytes_per_s=m * 1e6 / 8, up_bytes_per_s=m * 1e6 / 8,
                                                     source="measured"), fmt).seconds for m in mbits]
        ax.plot(mbits, ys, label=f"remote {fmt}", color=color)
    for name, t in (("RTX 3070 full (seed table)", 0.794), ("RTX 4090 full (seed table)", 0.256)):
        ax.axhline(t, color="gray", lw=0.8, ls="--")
        ax.text(mbits[0], t, name, fontsize=7, va="bottom", color="gray")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bandwidth (Mbit/s, both ways)")
    ax.set_ylabel("seconds")
    ax.set_title("MODELLED remote decode time by response format (SDXL 1024x1024, rtt 20 ms)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, "remote-formats.png", out), False


def regret_cdf(res: dict[str, Any], *, out: Path = IMG) -> Path:
    """Cumulative distribution of latency regret per strategy; lost images plotted at the right edge."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    from hybrid_vae.bench.strategies import STRATEGIES

    edge = 100.0
    for name, (label, _) in STRATEGIES.items():
        vals = []
        for r in res["rows"]:
            ok, delivered, secs = r["results"][name][:3]
            if not ok:
                continue
            vals.append(secs / r["best"] - 1 if delivered else edge)
        if not vals:
            continue
        vals.sort()
        ys = [(i + 1) / len(vals) for i in range(len(vals))]
        ax.plot([max(v, 1e-3) for v in vals], ys, label=label, lw=2 if name == "engine" else 1)
    ax.set_xscale("log")
    ax.set_xlim(1e-3, edge * 1.2)
    ax.axvline(0.2, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("latency regret (seconds / best - 1; lost image = right edge)")
    ax.set_ylabel("share of scenarios")
    ax.set_title(f"simulated matrix, {res['scenarios']} scenarios", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, "regret-cdf.png", out)


def draw_all(profile_path: str = "", *, out: Path = IMG) -> list[Path]:
    """Draw every plot that needs no matrix run."""
    made = [decision_map(profile_path, out=out), estimate_vs_measured(profile_path, out=out),
            tiled_time(profile_path, out=out), remote_formats(out=out)[0]]
    return made


def section(made: Sequence[Path]) -> str:
    """The docs/benchmarks.md section listing the plots."""
    captions = {
        "decision-map.png": "What `decide` chooses for stock SDXL (float32) by image side and free memory, per card "
                            "(remote off). Full where it fits the free memory less the reserve (`reserve_bytes`), else the "
                            "largest tile that fits (numbers), else the CPU.",
        "estimate-vs-measured.png": "The engine's memory estimate against every measured peak in `profiles/measured` "
                                    "(H200): all within +0..+10%, never below. These are the rows its constants were "
                                    "fitted on; the errors on rows held out of the fit are in docs/estimator.md.",
        "tiled-time.png": "Tiled decode time by tile size and overlap (H200 tile sweep, fp16); the dotted lines are "
                          "the simulated world's model (per-tile full-decode time plus a fitted per-tile cost).",
        "remote-formats.png": "**Modelled**, not measured: remote decode time by response format and bandwidth from "
                              "`policy.estimate.remote_estimate` (raw 3 B/px, PNG 1.6 B/px + 0.12 s/MP, JPEG 0.35 B/px).",
    }
    lines = ["## Plots", ""]
    for p in made:
        lines += [f"![{p.stem}](img/{p.name})", "", captions.get(p.name, ""), ""]
    lines.append("Regenerate with `hybrid-vae bench --plots` (needs the `plots` extra: matplotlib).")
    return "\n".join(lines)


def load_rows(path: str | Path) -> dict[str, Any]:
    """A saved ``bench --simulate --out`` JSON."""
    return dict(json.loads(Path(path).read_text()))
