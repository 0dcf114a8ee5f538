"""The scenario matrix of ``hybrid-vae bench --simulate``: every strategy in every scenario, scored.

Three scenario sets (:data:`SETS`), each a grid of families (sd15, sdxl fp32, sdxl fp16-fix, flux, sd3,
hunyuanvideo, wan) x image shapes and batches or video shapes x cards x free memory x networks, run in one
world per seed:

* ``tuning``: where defaults (``reserve_bytes``, ``exact_tolerance``, ``exact_margin``) are chosen
  (:func:`tune`);
* ``scoring``: other seeds, other cards, other sizes, other free-memory levels and links; the targets are
  judged here (``hybrid-vae bench --simulate``'s headline table);
* ``reduced``: a small set for the tests.

The share of each scenario's free memory that is the UI's torch cache is drawn per scenario from the set's
seed. See :mod:`bench.world` for the ground truth and :mod:`bench.strategies` for the peers.

Metrics per strategy: OOM errors, lost images (nothing delivered), wasted attempts, and latency regret
``seconds / best - 1`` against the fastest execution that succeeds in that scenario (over every execution
any strategy could run), for delivered images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from hybrid_vae.bench.strategies import ALL, STRATEGIES, WHAT_IF, Strategy, best_two, engine_with
from hybrid_vae.bench.world import EXTRA_CARDS, NETWORKS, Card, Exec, NetworkCase, Scenario, World, WorldParams, world_cards
from hybrid_vae.bench.world_doc import WORLD_MD
from hybrid_vae.policy.decide import decide
from hybrid_vae.policy.learned import Learned, job_voxels, learn_path, observe, observe_peak
from hybrid_vae.policy.model import DecodeSettings
from hybrid_vae.policy.profiles import Profiles, load_profiles

__all__ = ["SETS", "TARGETS", "ScenarioSet", "WorldParams", "run", "scenarios", "tune"]
VARIANTS: tuple[tuple[str, str, str], ...] = (
    ("sd15", "sd15", "float16"), ("sdxl", "sdxl", "float32"), ("sdxl-fp16fix", "sdxl", "float16"),
    ("flux", "flux", "bfloat16"), ("sd3", "sd3", "float16"), ("hunyuanvideo", "hunyuanvideo", "float16"),
    ("wan", "wan", "bfloat16"))
TARGETS = {"ooms": 0, "lost": 0, "median_regret": 0.05, "p95_regret": 0.20, "drift_reduction": 0.90}
#: Tile-drift images the engine drew before issue 15 (exact tiles with whole-image buffers in host memory), per
#: set: docs/benchmarks.md at c01a548, the last rerun before that work landed. Issue 15's target: at least
#: ``TARGETS["drift_reduction"]`` fewer.
DRIFT_BEFORE = {"scoring": 2441, "tuning": 945}


def drift_cap(set_name: str) -> float | None:
    """The most tile-drift images the engine may draw on ``set_name`` (None: no baseline for that set)."""
    before = DRIFT_BEFORE.get(set_name)
    return None if before is None else before * (1 - TARGETS["drift_reduction"])


@dataclasses.dataclass(frozen=True)
class ScenarioSet:
    """A scenario grid and the world seeds it runs in (one world per seed)."""

    name: str
    seeds: tuple[int, ...]
    cards: tuple[str, ...]
    image_sizes: tuple[tuple[int, int], ...]
    batches: tuple[int, ...]
    video_shapes: tuple[tuple[int, int, int], ...]  # (width, height, frames)
    free_fractions: tuple[float, ...]
    networks: tuple[NetworkCase | None, ...]

    def describe(self) -> str:
        imgs = ", ".join(f"{w}x{h}" for w, h in self.image_sizes)
        vids = ", ".join(f"{f}x{w}x{h}" for w, h, f in self.video_shapes)
        nets = ", ".join(n.name if n else "none" for n in self.networks)
        short = ", ".join(c.replace("NVIDIA GeForce ", "").replace("NVIDIA ", "") for c in self.cards)
        return (f"seeds {', '.join(map(str, self.seeds))}; cards {short}; images {imgs} (batch "
                f"{', '.join(map(str, self.batches))}); video {vids}; free {', '.join(f'{f:.0%}' for f in self.free_fractions)}"
                f"; network {nets}")


_R3070, _R4080, _R3090, _H200 = ("NVIDIA GeForce RTX 3070", "NVIDIA GeForce RTX 4080", "NVIDIA GeForce RTX 3090",
                                 "NVIDIA H200")
SETS: dict[str, ScenarioSet] = {
    "tuning": ScenarioSet(
        "tuning", (101, 102), (_R3070, _R4080, _R3090, _H200, EXTRA_CARDS[0][0], EXTRA_CARDS[2][0]),
        ((512, 512), (1024, 1024), (1536, 1536), (832, 1216)), (1, 2),
        ((512, 320, 33), (960, 544, 61), (1280, 720, 33), (512, 320, 129)), (0.10, 0.30, 0.60, 1.00), NETWORKS),
    "scoring": ScenarioSet(
        "scoring", (201, 202, 203),
        ("NVIDIA GeForce RTX 3080", "NVIDIA GeForce RTX 4070 Ti", "NVIDIA GeForce RTX 4090", EXTRA_CARDS[1][0],
         EXTRA_CARDS[3][0]),
        ((768, 768), (1280, 1280), (2048, 2048), (1344, 768), (1152, 896)), (1, 4),
        ((512, 320, 61), (960, 544, 33), (960, 544, 129), (1280, 720, 61), (1280, 720, 129)),
        (0.15, 0.25, 0.45, 0.75, 0.95),
        (None, NetworkCase("20 Mbit/s 80 ms", 0.080, 20.0), NetworkCase("300 Mbit/s 30 ms", 0.030, 300.0))),
    "reduced": ScenarioSet(
        "reduced", (7,), (_R3070, "NVIDIA GeForce RTX 4090", EXTRA_CARDS[0][0]),
        ((512, 512), (1024, 1024), (2048, 2048)), (1, 4), ((512, 320, 61), (960, 544, 129)), (0.10, 0.50, 1.00),
        NETWORKS),
}


def _cards(names: Sequence[str]) -> list[Card]:
    known = {c.name: c for c in world_cards()}
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"unknown card(s) {missing}; the world knows: {', '.join(known)}")
    return [known[n] for n in names]


def scenarios(profiles: Profiles, sset: ScenarioSet | str = "scoring", *, seed: int | None = None) -> list[Scenario]:
    """The scenarios of ``sset`` for one world seed (default: the set's first): the grid, each with a torch-cache
    share of its free memory drawn from the seed (half the scenarios none, the others U(0, 0.6))."""
    if isinstance(sset, str):
        sset = SETS[sset]
    rng = random.Random((seed if seed is not None else sset.seeds[0]) * 7919 + 13)
    cards = _cards(sset.cards)
    out: list[Scenario] = []
    for variant, family, dtype in VARIANTS:
        fam = profiles.family(family)
        shapes: Iterable[tuple[int, int, int, int | None]]
        if fam.video:
            shapes = [(w, h, 1, f) for w, h, f in sset.video_shapes]
        else:
            shapes = [(w, h, b, None) for w, h in sset.image_sizes for b in sset.batches]
        for w, h, b, f in shapes:
            for card in cards:
                for free in sset.free_fractions:
                    cache = 0.0 if rng.random() < 0.5 else round(rng.uniform(0.0, 0.6), 3)
                    for net in sset.networks:
                        out.append(Scenario(variant, family, dtype, w, h, b, f, card, free, net, cache))
    return out


# ---- running ------------------------------------------------------------------------------------

_STATE: dict[str, Any] = {}
Variants = Mapping[str, tuple[str, Mapping[str, object]]]  # name -> (label, engine settings): what-if rows


def _world(profiles: Profiles, params: WorldParams, seed: int, *, offset: int = 0) -> World:
    return World(profiles, dataclasses.replace(params, seed=seed + offset, card_seed=seed))


def train_learned(profiles: Profiles, params: WorldParams, sset: ScenarioSet | str = "scoring", *,
                  per_card: int = 60) -> Learned:
    """Warm-up for the learned rows: ``per_card`` decodes per card, drawn from the set (no network), run by the
    engine in another world (its own installations of the same cards, and the card speeds of the set's first
    world); each successful local decode is
    folded in as the orchestrator records it (:func:`policy.learned.observe` with its seconds,
    :func:`policy.learned.observe_peak` with its allocated peak), and so is an out-of-memory error of a plan
    whose estimate fit what the decision saw (the orchestrator claimed it: ``oom=True`` at the estimate)."""
    sset = SETS[sset] if isinstance(sset, str) else sset
    world = _world(profiles, params, sset.seeds[0], offset=7919)
    pool = [sc for sc in scenarios(profiles, sset) if sc.network is None]
    by_card: dict[str, list[Scenario]] = defaultdict(list)
    for sc in pool:
        by_card[sc.card.name].append(sc)
    rng = random.Random(sset.seeds[0] + 17)
    learned = Learned()
    now = 0.0
    for card in sorted(by_card):
        for sc in map(world.seen, rng.sample(by_card[card], min(per_card, len(by_card[card])))):
            d = decide(sc.job(), sc.gpu(), profiles, DecodeSettings(), learned=learned)
            fam = profiles.family(sc.family)
            for p in d.plans:
                ex = Exec.from_plan(p, fam, sc.batch)
                a = world.attempt(sc, ex)
                if p.path not in ("full", "tiled"):
                    if a.ok:
                        break
                    continue
                now += 1
                path, card, vox = learn_path(p), sc.card.name, job_voxels(sc.job())
                raw_peak = p.estimate.peak_bytes / learned.peak_factor(card, sc.family, path)[0]
                if a.ok:
                    f = learned.factor(card, sc.family, path, vox)[0]
                    learned = observe(learned, card=card, family=sc.family, path=path, voxels=vox,
                                      estimated_s=p.estimate.seconds / f, measured_s=a.seconds, now=now)
                    learned = observe_peak(learned, card=card, family=sc.family, path=path, estimated_bytes=raw_peak,
                                           measured_bytes=world.allocated_peak(sc, ex), now=now)
                    break
                if a.oom and p.estimate.peak_bytes <= d.available_bytes:
                    learned = observe_peak(learned, card=card, family=sc.family, path=path, estimated_bytes=raw_peak,
                                           measured_bytes=p.estimate.peak_bytes, now=now, oom=True)
    return learned


def _init(profile_path: str, params: WorldParams, names: tuple[str, ...], variants: Variants,
          trained: Learned | None) -> None:
    profiles = load_profiles(profile_path)
    strategies: dict[str, Strategy] = {n: ALL[n][1] for n in names if n in ALL}
    strategies.update({n: engine_with(**dict(spec)) for n, (_label, spec) in variants.items()})
    _STATE.update(profiles=profiles, strategies=strategies, trained=trained, params=params, worlds={})


def _run_chunk(chunk: tuple[int, list[Scenario]]) -> list[dict[str, Any]]:
    t0 = time.process_time()
    seed, scs = chunk
    worlds = _STATE["worlds"]
    if seed not in worlds:
        worlds[seed] = _world(_STATE["profiles"], _STATE["params"], seed)
    rows = _run_scenarios(worlds[seed], scs, seed)
    if rows:
        rows[0]["cpu_s"] = time.process_time() - t0
    return rows


def _run_scenarios(world: World, chunk: list[Scenario], seed: int) -> list[dict[str, Any]]:
    profiles, strategies = _STATE["profiles"], _STATE["strategies"]
    rows = []
    cache: dict[tuple[object, ...], Any] = {}
    last = ""
    for sc in map(world.seen, chunk):
        if sc.local_key != last:  # decisions are reused across strategies, candidates across networks
            cache.clear()
            last = sc.local_key
        best, best_key, lossless = best_two(world, sc, profiles, cache)
        res = {}
        for name, fn in strategies.items():
            o = fn(world, sc, profiles, trained=_STATE["trained"], cache=cache)
            res[name] = (o.supported, o.delivered, o.seconds, o.ooms, o.wasted, o.note, " -> ".join(o.attempts),
                         o.drift, o.claims, o.floor_ooms, o.drift_video)
        row = {"seed": seed, "variant": sc.variant, "size": sc.size_label, "card": sc.card.name, "free": sc.free_frac,
               "network": sc.network.name if sc.network else "none", "best": best, "best_exec": best_key,
               "best_lossless": lossless, "video": bool(sc.frames), "results": res}
        if "engine" in res and res["engine"][1] and res["engine"][2] > 1.2 * best:
            row["engine_cause"] = regret_cause(sc, profiles, best_key, cache)
        rows.append(row)
    return rows


def regret_cause(sc: Scenario, profiles: Profiles, best_key: str, cache: dict[tuple[object, ...], Any]) -> str:
    """Why the engine missed the best execution by more than 20% (one of a few fixed causes)."""
    from hybrid_vae.bench.strategies import engine_decision

    d = engine_decision(sc, profiles, cache=cache)
    fam = profiles.family(sc.family)
    for o in d.options:
        if Exec.from_plan(o.plan, fam, sc.batch).key != best_key:
            continue
        if o.plan.path == "remote" or o.feasible:
            return f"estimates ranked {d.chosen.path} before {o.plan.path} (time model or noise)"
        if o.plan.estimate.peak_bytes <= d.available_bytes:
            return "reserve: the best plan fits the free memory but not free - the reserve"
        return "the best plan's memory estimate exceeds free memory (estimate margin)"
    if best_key.startswith("remote"):
        return "estimates ranked local before remote (time model or noise)"
    return "the best execution is not among the engine's plans (a peer's tiling)"


def run(profiles_path: str = "", *, sset: ScenarioSet | str = "scoring", params: WorldParams | None = None,
        strategies: Sequence[str] | None = None, variants: Variants | None = None,
        jobs: int | None = None) -> dict[str, Any]:
    """Run a scenario set in one world per seed; returns per-strategy metrics (JSON-ready) and the rows.

    Args:
        profiles_path (`str`, defaults to the built-ins): a profile YAML merged over the built-ins.
        sset (`ScenarioSet | str`, defaults to ``"scoring"``): which scenarios (:data:`SETS`).
        params (`WorldParams`): world knobs (the seed is the set's); default: the headline world.
        strategies (`Sequence[str] | None`): keys of :data:`bench.strategies.ALL`; None: all.
        variants (`Variants | None`): further engine rows, ``name -> (label, DecodeSettings fields or
            exact_margin)`` (the tuning sweep).
        jobs (`int | None`): worker processes (default: the CPU count, at most 8; 1 runs in-process).
    """
    sset = SETS[sset] if isinstance(sset, str) else sset
    params = params or WorldParams()
    names = tuple(strategies if strategies is not None else ALL)
    for n in names:
        if n not in ALL:
            raise ValueError(f"unknown strategy {n!r}; known: {', '.join(ALL)}")
    variants = dict(variants or {})
    labels = {n: ALL[n][0] for n in names} | {n: lab for n, (lab, _) in variants.items()}
    profiles = load_profiles(profiles_path)
    t0 = time.perf_counter()
    trained = train_learned(profiles, params, sset) if any("learned" in n for n in names) else None
    per_seed = [(seed, scenarios(profiles, sset, seed=seed)) for seed in sset.seeds]
    n_scs = sum(len(v) for _, v in per_seed)
    jobs = jobs or min(8, os.cpu_count() or 1)
    initargs = (profiles_path, params, names, variants, trained)
    if jobs <= 1:
        _init(*initargs)
        rows = [r for chunk in per_seed for r in _run_chunk(chunk)]
    else:
        size = max(1, math.ceil(n_scs / (jobs * 4)))
        # chunks keep a scenario's network variants together, so the world's cache is reused
        chunks = [(seed, scs[i:i + size]) for seed, scs in per_seed for i in range(0, len(scs), size)]
        with ProcessPoolExecutor(max_workers=jobs, initializer=_init, initargs=initargs) as ex:
            rows = [r for part in ex.map(_run_chunk, chunks) for r in part]
    elapsed = time.perf_counter() - t0
    cpu = sum(r.pop("cpu_s", 0.0) for r in rows)
    out = {"set": sset.name, "describe": sset.describe(), "scenarios": n_scs, "per_seed": n_scs // len(sset.seeds),
           "elapsed_s": elapsed, "cpu_s": cpu, "jobs": jobs, "world": dataclasses.asdict(params),
           **summarise(rows, list(labels), labels), "rows": rows}
    cap = drift_cap(sset.name)
    if "targets" in out and cap is not None:
        out["targets"]["drift"] = out["strategies"]["engine"]["drift"] <= cap
    return out


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def _metrics(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    sup = [r for r in rows if r["results"][name][0]]
    delivered = [r for r in sup if r["results"][name][1]]
    regrets = [r["results"][name][2] / r["best"] - 1 for r in delivered if r["best"] > 0 and math.isfinite(r["best"])]
    lost_why: dict[str, int] = defaultdict(int)
    for r in sup:
        if not r["results"][name][1]:
            lost_why[r["results"][name][5]] += 1
    return {
        "scenarios": len(sup), "unsupported": len(rows) - len(sup), "delivered": len(delivered),
        "lost": len(sup) - len(delivered), "lost_why": dict(lost_why),
        "ooms": sum(r["results"][name][3] for r in sup),
        "oom_scenarios": sum(1 for r in sup if r["results"][name][3]),
        "wasted_attempts": sum(r["results"][name][4] for r in sup),
        "claims_refused": sum(r["results"][name][8] for r in sup if len(r["results"][name]) > 8),
        "floor_ooms": sum(r["results"][name][9] for r in sup if len(r["results"][name]) > 9),
        "drift": sum(1 for r in delivered if len(r["results"][name]) > 7 and r["results"][name][7]),
        "drift_video": sum(1 for r in delivered if len(r["results"][name]) > 10 and r["results"][name][10]),
        "videos": sum(1 for r in delivered if r.get("video")),
        "median_regret": statistics.median(regrets) if regrets else math.nan,
        "p95_regret": _pct(regrets, 0.95), "max_regret": max(regrets) if regrets else math.nan,
        "mean_regret": statistics.fmean(regrets) if regrets else math.nan,
        # absolute time: regret cannot see a faster plan that enters the best set with the engine's own options
        "hours": sum(r["results"][name][2] for r in sup) / 3600,
        "over_10min": sum(1 for r in sup if r["results"][name][2] > 600),
    }


def summarise(rows: list[dict[str, Any]], names: Sequence[str], labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Per-strategy metrics, a per-family breakdown, the engine's worst cases and the targets."""
    labels = labels or {n: ALL[n][0] for n in names}
    strat = {n: {"label": labels[n], **_metrics(rows, n)} for n in names}
    fams = sorted({r["variant"] for r in rows}, key=[v[0] for v in VARIANTS].index)
    by_family = {f: {n: _metrics([r for r in rows if r["variant"] == f], n) for n in names} for f in fams}
    out: dict[str, Any] = {"strategies": strat, "by_family": by_family,
                           # images where every lossless execution is > 20% slower than the fastest (drifting) one
                           "drift_forced": sum(1 for r in rows if not r.get("video")
                                               and r.get("best_lossless", r["best"]) > 1.2 * r["best"])}
    if "engine" in names:
        e = strat["engine"]
        out["targets"] = {
            "ooms": e["ooms"] == 0, "lost": e["lost"] == 0,
            "median_regret": e["median_regret"] <= TARGETS["median_regret"],
            "p95_regret": e["p95_regret"] <= TARGETS["p95_regret"]}
        worst = sorted((r for r in rows if r["results"]["engine"][1]),
                       key=lambda r: r["results"]["engine"][2] / r["best"], reverse=True)[:12]
        out["engine_worst"] = [{"scenario": f"{r['variant']} {r['size']} on {r['card']} {r['free']:.0%} free, "
                                            f"net {r['network']} (seed {r['seed']})",
                                "engine": r["results"]["engine"][6], "engine_s": round(r["results"]["engine"][2], 4),
                                "best": r["best_exec"], "best_s": round(r["best"], 4),
                                "regret": round(r["results"]["engine"][2] / r["best"] - 1, 3)} for r in worst]
        causes: dict[str, int] = defaultdict(int)
        for r in rows:
            if "engine_cause" in r:
                causes[r["engine_cause"]] += 1
        out["engine_causes"] = dict(sorted(causes.items(), key=lambda kv: -kv[1]))
        lost = [r for r in rows if r["results"]["engine"][0] and not r["results"]["engine"][1]]
        out["engine_lost"] = [{"scenario": f"{r['variant']} {r['size']} on {r['card']} {r['free']:.0%} free, "
                                           f"net {r['network']} (seed {r['seed']})",
                               "attempts": r["results"]["engine"][6], "why": r["results"]["engine"][5]}
                              for r in lost[:12]]
        card_reg: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            if r["results"]["engine"][1]:
                card_reg[r["card"]].append(r["results"]["engine"][2] / r["best"] - 1)
        out["engine_by_card"] = {c: {"median_regret": statistics.median(v), "p95_regret": _pct(v, 0.95)}
                                 for c, v in card_reg.items()}
    return out


# ---- report -------------------------------------------------------------------------------------


def _f(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.1%}"


def markdown(res: dict[str, Any]) -> str:
    """The headline table, the per-family breakdown and the engine's worst cases."""
    s = {n: m for n, m in res["strategies"].items() if n in STRATEGIES}
    lines = ["| strategy | scenarios | OOM errors | lost images | wasted attempts | regret median | regret p95 "
             "| tile-drift images | drifting videos | not supported |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _n, m in s.items():
        lines.append(f"| {m['label']} | {m['scenarios']} | {m['ooms']} | {m['lost']} ({m['lost'] / max(1, m['scenarios']):.1%}) "
                     f"| {m['wasted_attempts']} | {_f(m['median_regret'])} | {_f(m['p95_regret'])} "
                     f"| {m.get('drift', 0)} | {m.get('drift_video', 0)} | {m['unsupported']} |")
    out = "\n".join(lines)
    fam = res["by_family"]
    names = list(s)
    head = "| family | " + " | ".join(s[n]["label"].split(" (")[0] for n in names) + " |"
    rows = [head, "|---|" + "---|" * len(names)]
    for f, per in fam.items():
        cells = []
        for n in names:
            m = per[n]
            if m["scenarios"] == 0:
                cells.append("n/a")
                continue
            cells.append(f"{m['lost']} lost, {m['ooms']} OOM, {_f(m['median_regret'])} / {_f(m['p95_regret'])}")
        rows.append(f"| {f} | " + " | ".join(cells) + " |")
    out += ("\n\nPer family (lost images, OOM errors, regret median / p95 of delivered images):\n\n"
            + "\n".join(rows))
    return out


def what_if_markdown(res: dict[str, Any]) -> str:
    """The engine under other settings/rules, beside the engine as shipped."""
    s = res["strategies"]
    names = [n for n in ("engine", *WHAT_IF) if n in s] + [n for n in s if n not in ALL]
    lines = ["| variant | OOM errors | lost images | wasted attempts | regret median | regret p95 | regret max "
             "| tile-drift images | drifting videos | hours in all | decodes > 10 min |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        m = s[n]
        lines.append(f"| {m['label']} | {m['ooms']} | {m['lost']} | {m['wasted_attempts']} | {_f(m['median_regret'])} "
                     f"| {_f(m['p95_regret'])} | {_f(m['max_regret'])} | {m.get('drift', 0)} | {m.get('drift_video', 0)} "
                     f"| {m['hours']:.0f} "
                     f"| {m['over_10min']} |")
    return "\n".join(lines) + (
        "\n\nHours in all: the variant's seconds summed over every scenario, failed attempts included; decodes > 10 "
        "min: scenarios that took longer (mostly CPU decodes). Regret cannot show these: a faster plan that the "
        "engine adds also enters the best set it is measured against.")


def worst_markdown(res: dict[str, Any], n: int = 8) -> str:
    lines = ["| scenario | engine ran | engine s | best execution | best s | regret |", "|---|---|---|---|---|---|"]
    for w in res.get("engine_worst", [])[:n]:
        lines.append(f"| {w['scenario']} | {w['engine']} | {w['engine_s']} | `{w['best']}` | {w['best_s']} | {w['regret']:.1%} |")
    return "\n".join(lines)


def lost_markdown(res: dict[str, Any], n: int = 8) -> str:
    lost = res.get("engine_lost", [])
    if not lost:
        return "The engine lost no image."
    lines = ["| scenario | engine tried | why the last attempt failed |", "|---|---|---|"]
    lines += [f"| {w['scenario']} | {w['attempts']} | {w['why']} |" for w in lost[:n]]
    return "\n".join(lines)


SENSITIVITY_STRATEGIES = ("engine", "engine_reserve256", "engine_margins0", "engine_no_chain")
SENSITIVITY: tuple[tuple[str, WorldParams], ...] = (
    ("none of the real-card effects (the measured truth, noise only)",
     WorldParams(effects=False, drift=((1.0, 0.0, 0.0),))),
    ("free memory shrinks by 256 MiB before every decode", WorldParams(drift_mib=256)),
    ("PyTorch 2.9's conv3d path on 30% of installations (video decoders 2-3x the memory)",
     WorldParams(conv3d_regression=0.3)),
    ("noise doubled (card 0.30, scenario 0.10, plan 0.06, network 0.30)",
     WorldParams(sigma_card=0.30, sigma_local=0.10, sigma_plan=0.06, sigma_net=0.30)),
    ("remote requests fail 10% of the time", WorldParams(remote_failure=0.10)),
)


def sensitivity(jobs: int | None = None, sset: str = "reduced") -> list[dict[str, Any]]:
    """The engine and some what-if variants in harsher (and milder) worlds, on ``sset``."""
    out = []
    for label, params in SENSITIVITY:
        res = run(sset=sset, params=params, strategies=SENSITIVITY_STRATEGIES, jobs=jobs)
        out.append({"world": label, "scenarios": res["scenarios"],
                    "strategies": {n: {k: res["strategies"][n][k] for k in
                                       ("label", "ooms", "lost", "wasted_attempts", "median_regret", "p95_regret")}
                                   for n in SENSITIVITY_STRATEGIES}})
    return out


# ---- tuning ---------------------------------------------------------------------------------------

#: what the sweep varies, and the defaults shipped before it. ``exact_margin`` is swept for information only and
#: never chosen here: the world's exact-tiling truth is an assumption (no GPU row), and a margin tuned against an
#: assumption only encodes it; it stays at the value set from the CPU measurement until a GPU measures it.
#: What ships (DecodeSettings defaults; exact_margin: the families' profile value), for "shipped before this sweep".
DEFAULTS = {"reserve_mib": DecodeSettings().reserve_bytes // 2**20, "exact_margin": 1.15,
            "exact_tolerance": DecodeSettings().exact_tolerance, "tight_speedup": DecodeSettings().tight_speedup}
RESERVES_MIB = (64, 128, 256, 384, 512)
MARGINS = (1.0, 1.15, 1.3)
TOLERANCES = (1.0, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0)
#: Stage 3 of the sweep: ``tight_speedup`` (None: no plan goes into the reserve while one fits the budget).
TIGHT_SPEEDUPS: tuple[float | None, ...] = (None, 1.1, 1.25, 1.5, 2.0)


def _variant(reserve_mib: float, margin: float, tolerance: float,
             tight: float | str | None = "default") -> tuple[str, tuple[str, dict[str, object]]]:
    name = f"r{reserve_mib:g}_m{margin:g}_t{tolerance:g}"
    label = f"reserve {reserve_mib:g} MiB, exact_margin {margin:g}, exact_tolerance {tolerance:g}"
    spec: dict[str, object] = {"reserve_bytes": int(reserve_mib * 2**20), "exact_margin": margin,
                               "exact_tolerance": tolerance}
    if tight != "default":  # stage 3; before it, the shipped tight_speedup
        name, label, spec["tight_speedup"] = f"{name}_s{tight}", f"{label}, tight_speedup {tight}", tight
    return name, (label, spec)


def choose(metrics: Mapping[str, Mapping[str, Any]], *, drift_cap: float | None = None) -> str:
    """The tuning rule: fewest lost images, then (with ``drift_cap``) the tile-drift images above the cap (0 when
    met), then the smallest p95 regret above the 20% target (0 when met), then (with ``drift_cap``) the fewest
    tile-drift images (lossless first, when the latency targets tie), then the fewest OOM attempts, then the
    smallest p95 regret."""
    def score(n: str) -> tuple[float, ...]:
        m = metrics[n]
        over = max(0.0, m.get("drift", 0) - drift_cap) if drift_cap is not None else 0.0
        fewer = float(m.get("drift", 0)) if drift_cap is not None else 0.0
        return (m["lost"], over, max(0.0, m["p95_regret"] - TARGETS["p95_regret"]), fewer, m["ooms"],
                m["p95_regret"])

    return min(metrics, key=score)


def tune(jobs: int | None = None) -> dict[str, Any]:
    """Sweep reserve x exact_margin (exact_tolerance and tight_speedup at their defaults) and choose the reserve
    among the rows at the shipped exact_margin (see :data:`DEFAULTS`), then sweep exact_tolerance at that pair,
    then tight_speedup at those three, on the tuning set; returns the stages' metrics and the chosen values."""
    stage1 = dict(_variant(r, m, DEFAULTS["exact_tolerance"]) for r in RESERVES_MIB for m in MARGINS)
    res1 = run(sset="tuning", strategies=(), variants=stage1, jobs=jobs)
    m1 = {n: res1["strategies"][n] for n in stage1}
    best1 = choose({n: v for n, v in m1.items() if stage1[n][1]["exact_margin"] == DEFAULTS["exact_margin"]})
    spec = stage1[best1][1]
    r, m = int(spec["reserve_bytes"]) / 2**20, float(spec["exact_margin"])  # type: ignore[call-overload, arg-type]
    stage2 = dict(_variant(r, m, t) for t in TOLERANCES)
    res2 = run(sset="tuning", strategies=(), variants=stage2, jobs=jobs)
    m2 = {n: res2["strategies"][n] for n in stage2}
    best2 = choose(m2, drift_cap=drift_cap("tuning"))
    tol = float(stage2[best2][1]["exact_tolerance"])  # type: ignore[arg-type]
    stage3 = dict(_variant(r, m, tol, s) for s in TIGHT_SPEEDUPS)
    res3 = run(sset="tuning", strategies=(), variants=stage3, jobs=jobs)
    m3 = {n: res3["strategies"][n] for n in stage3}
    chosen = stage3[choose(m3, drift_cap=drift_cap("tuning"))][1]
    return {"set": res1["describe"], "scenarios": res1["scenarios"], "stage1": m1, "stage2": m2, "stage3": m3,
            "chosen": {"reserve_mib": int(chosen["reserve_bytes"]) / 2**20,  # type: ignore[call-overload]
                       "exact_margin": chosen["exact_margin"], "exact_tolerance": chosen["exact_tolerance"],
                       "tight_speedup": chosen["tight_speedup"]},
            "elapsed_s": res1["elapsed_s"] + res2["elapsed_s"] + res3["elapsed_s"]}


def tune_markdown(t: dict[str, Any]) -> str:
    def table(ms: Mapping[str, Mapping[str, Any]]) -> list[str]:
        out = ["| variant | OOM errors | lost | wasted attempts | regret median | regret p95 | tile-drift images |",
               "|---|---|---|---|---|---|---|"]
        for m in ms.values():
            out.append(f"| {m['label']} | {m['ooms']} | {m['lost']} | {m['wasted_attempts']} | "
                       f"{_f(m['median_regret'])} | {_f(m['p95_regret'])} | {m.get('drift', 0)} |")
        return out

    c = t["chosen"]
    return "\n".join([
        f"Tuning set ({t['scenarios']} scenarios: {t['set']}). Rule: stage 1 (the reserve): fewest lost images, "
        "then the smallest p95 regret above the 20% target, then the fewest OOM attempts, then the smallest p95. "
        "Stage 2 (exact_tolerance) adds, after the lost images, issue 15's tile-drift target: at most "
        f"{drift_cap('tuning'):.0f} drift images on this set ({TARGETS['drift_reduction']:.0%} fewer than the "
        f"{DRIFT_BEFORE['tuning']} the engine drew here before exact tiles with host buffers), and, after the p95 "
        "target, the fewest drift images (lossless first when the latency targets tie). Both were added after the "
        "first sweeps, whose rule counted latency only and chose 1.0, which issue 15 rules out. "
        "`exact_margin` is swept but not chosen: the world's exact-tiling truth is an assumption (no GPU row), "
        "and a margin tuned against it would only encode the assumption (a first run of this sweep let the "
        "rule pick it, and it picked 1.3, the top of the assumed range). It stays 1.15 (set from the CPU "
        "measurement) until a GPU measures exact tiling; the reserve is chosen among the 1.15 rows.", "",
        f"Stage 1: reserve x exact_margin, exact_tolerance {DEFAULTS['exact_tolerance']:g}:", "", *table(t["stage1"]), "",
        f"Stage 2: exact_tolerance at reserve {c['reserve_mib']:g} MiB, exact_margin {c['exact_margin']:g}:", "",
        *table(t["stage2"]), "",
        f"Stage 3: tight_speedup (a lossless plan into the reserve when estimated this many times faster; None: "
        f"never while a plan fits the budget) at exact_tolerance {c['exact_tolerance']:g}, with stage 2's rule:", "",
        *table(t["stage3"]), "",
        f"Chosen: reserve {c['reserve_mib']:g} MiB, exact_margin {c['exact_margin']:g}, exact_tolerance "
        f"{c['exact_tolerance']:g}, tight_speedup {c['tight_speedup']} (shipped before this sweep: reserve "
        f"{DEFAULTS['reserve_mib']} MiB, exact_margin {DEFAULTS['exact_margin']}, exact_tolerance "
        f"{DEFAULTS['exact_tolerance']}, tight_speedup {DEFAULTS['tight_speedup']})."])


def _headline(res: dict[str, Any], what: str) -> list[str]:
    e = res["strategies"]["engine"]
    t = res.get("targets", {})
    met = ", ".join(f"{k.replace('_', ' ')} {'met' if v else '**MISSED**'}" for k, v in t.items())
    return [f"{what}: {res['scenarios']} scenarios ({res['per_seed']} per world seed; {res['describe']}), "
            f"{res['elapsed_s']:.0f} s wall on {res['jobs']} processes.", "", markdown(res), "",
            f"Targets for this engine (0 OOMs, 0 lost, median regret <= 5%, p95 <= 20%{_drift_target(res)}): {met}. "
            f"Measured: {e['ooms']} OOM attempts, {e['lost']} lost, median {_f(e['median_regret'])}, p95 "
            f"{_f(e['p95_regret'])}, {e['drift']} tile-drift images; {e.get('drift_video', 0)} drifting videos of "
            f"{e.get('videos', 0)} (counted, no target: diffusers' video tiles and chunks; `auto` plans no exact "
            f"video tiles). Of the OOM attempts, {e.get('floor_ooms', 0)} "
            f"are GPU plans run on purpose with only their floor claimed (estimate / 1.25: nothing fits and the plan "
            f"nearly does, or the last GPU plan before the CPU after a new decision); the other "
            f"{e['ooms'] - e.get('floor_ooms', 0)} had their estimate claimed and needed more; "
            f"{e.get('claims_refused', 0)} more claims were refused before any decoding.", *_forced(res)]


def _forced(res: dict[str, Any]) -> list[str]:
    cap, n = drift_cap(res.get("set", "")), res.get("drift_forced")
    if cap is None or n is None:
        return []
    return ["", f"The drift and p95 targets pull against each other: in {n} scenarios every lossless execution is more "
                f"than 20% slower than the fastest (drifting) one, so any strategy within the drift cap ({cap:.0f}) "
                f"has more than 20% regret in at least {max(0, n - int(cap))} of them."]


def _drift_target(res: dict[str, Any]) -> str:
    cap = drift_cap(res.get("set", ""))
    if cap is None:
        return ""
    return (f", tile-drift images <= {cap:.0f}: {TARGETS['drift_reduction']:.0%} fewer than the "
            f"{DRIFT_BEFORE[res['set']]:,} before issue 15")


def section(res: dict[str, Any], sens: list[dict[str, Any]] | None = None, *, cdf: Any = None,
            tuning: dict[str, Any] | None = None, tuning_res: dict[str, Any] | None = None) -> str:
    """The docs/benchmarks.md section of ``hybrid-vae bench --simulate``: the scoring set (targets judged there),
    the tuning set and its sweep, what-ifs, sensitivity, the engine's losses and worst cases."""
    lines = [
        "## Simulated scenario matrix: this engine against every peer strategy", "",
        "`hybrid-vae bench --simulate` (`bench/matrix.py`, `bench/strategies.py`; the world: `bench/world.py`, "
        "`bench/truth.py`, `bench/interp.py`, `bench/geometry.py`). Regret = seconds / fastest execution that "
        "succeeds in that scenario - 1, over delivered images; failed attempts count in the seconds. Where each "
        "truth comes from: *The simulated world* below.",
        "", "### Scoring set (the targets are judged here)", "",
        *_headline(res, "Scoring set"), "",
        *([f"![regret distribution](img/{cdf.name})", ""] if cdf is not None else []),
        "Why the engine's slow cases are slow (scenarios with regret > 20%):", "",
        "| cause | scenarios |", "|---|---|",
        *[f"| {c} | {n} |" for c, n in res.get("engine_causes", {}).items()], "",
        "Images the engine lost (first 8):", "", lost_markdown(res)]
    if tuning_res is not None:
        lines += ["", "### Tuning set (defaults are chosen here, never on the scoring set)", "",
                  *_headline(tuning_res, "Tuning set")]
    if tuning is not None:
        lines += ["", "#### The sweep", "", tune_markdown(tuning)]
    lines += ["", "### The engine under other rules (what-if, scoring set)", "", what_if_markdown(res)]
    if sens:
        lines += ["", "### Sensitivity (reduced set, other worlds)", "",
                  "| world | variant | OOM errors | lost | wasted attempts | regret median | regret p95 |",
                  "|---|---|---|---|---|---|---|"]
        for w in sens:
            for _n, m in w["strategies"].items():
                lines.append(f"| {w['world']} | {m['label']} | {m['ooms']} | {m['lost']} | {m['wasted_attempts']} | "
                             f"{_f(m['median_regret'])} | {_f(m['p95_regret'])} |")
    lines += ["", "### The engine's worst cases (scoring set)", "", worst_markdown(res), "", WORLD_MD, "",
              f"World knobs: `{json.dumps(res['world'])}`."]
    return "\n".join(lines)
