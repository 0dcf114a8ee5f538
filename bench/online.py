"""The engine learning as it goes: every decode of a scenario set, per card in a random order, with the learned
timings and peaks of the decodes before it on that card (what the SD.Next option and the ComfyUI input do).

The learned rows of the what-if table (:func:`bench.matrix.train_learned`) warm up in another world first and do
not count the warm-up's OOM attempts. Here nothing is hidden: the first decode on a card is cold, each one after
it decides with what the earlier ones recorded, and every OOM attempt counts, the ones that taught the engine
included. What is recorded after a decode is what the orchestrator records (:mod:`policy.learned`): for the plan
that delivered, its seconds and the world's allocated peak (true peak less block rounding); for a GPU plan of
the first decision that ran out of memory with its estimate claimed, an OOM observation. Plans of a second
decision (after a refused claim) are not recorded (the world does not keep that decision; a small loss of
evidence, not of accounting). Regret is against the same best set as the matrix (:func:`bench.strategies.best_two`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import statistics
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from hybrid_vae.bench.matrix import SETS, ScenarioSet, _world, scenarios
from hybrid_vae.bench.strategies import Outcome, _run_engine, best_two, engine_decision
from hybrid_vae.bench.world import Exec, Scenario, World, WorldParams
from hybrid_vae.policy.learned import Learned, job_voxels, learn_path, observe, observe_peak
from hybrid_vae.policy.profiles import Profiles, load_profiles


def _fold(world: World, sc: Scenario, profiles: Profiles, learned: Learned, o: Outcome, now: float) -> Learned:
    """``learned`` after the decode ``o`` of ``sc``, recorded as the orchestrator records it."""
    d = engine_decision(sc, profiles, learned=learned)
    fam, card, vox = profiles.family(sc.family), sc.card.name, job_voxels(sc.job())
    by_label = {p.label: p for p in d.plans}
    for i, label in enumerate(o.attempts):
        p = by_label.get(label)
        if p is None or p.path not in ("full", "tiled"):
            continue
        ex = Exec.from_plan(p, fam, sc.batch)
        a = world.attempt(sc, ex)
        path = learn_path(p)
        raw_peak = p.estimate.peak_bytes / learned.peak_factor(card, sc.family, path)[0]
        last = i == len(o.attempts) - 1
        if a.ok and last and o.delivered:
            f = learned.factor(card, sc.family, path, vox)[0]
            learned = observe(learned, card=card, family=sc.family, path=path, voxels=vox,
                              estimated_s=p.estimate.seconds / f, measured_s=a.seconds, now=now)
            learned = observe_peak(learned, card=card, family=sc.family, path=path, estimated_bytes=raw_peak,
                                   measured_bytes=world.allocated_peak(sc, ex), now=now)
        elif a.oom and p.estimate.peak_bytes <= d.available_bytes:
            learned = observe_peak(learned, card=card, family=sc.family, path=path, estimated_bytes=raw_peak,
                                   measured_bytes=p.estimate.peak_bytes, now=now, oom=True)
    return learned


def _summary(regrets: list[float], ooms: int, lost: int, drift: int, n: int) -> dict[str, Any]:
    regrets = sorted(regrets)
    p95 = regrets[min(len(regrets) - 1, max(0, math.ceil(0.95 * len(regrets)) - 1))] if regrets else math.nan
    return {"scenarios": n, "ooms": ooms, "lost": lost, "drift": drift,
            "median_regret": statistics.median(regrets) if regrets else math.nan, "p95_regret": p95}


def _run_seed(job: tuple[str, ScenarioSet, WorldParams, int, int]) -> dict[str, Any]:
    """One world seed of :func:`run`: per-engine accumulators and the learning engine's OOMs by quarter."""
    profiles_path, sset, params, seed, order_seed = job
    profiles = load_profiles(profiles_path)
    world = _world(profiles, params, seed)
    acc: dict[str, dict[str, Any]] = {k: {"regrets": [], "ooms": 0, "lost": 0, "drift": 0} for k in ("cold", "online")}
    quarters = [0, 0, 0, 0]
    by_card: dict[str, list[Scenario]] = defaultdict(list)
    for sc in map(world.seen, scenarios(profiles, sset, seed=seed)):
        by_card[sc.card.name].append(sc)
    for card in sorted(by_card):
        seq = random.Random(f"{order_seed}|{seed}|{card}").sample(by_card[card], len(by_card[card]))
        learned = Learned()
        for i, sc in enumerate(seq):
            cache: dict[tuple[object, ...], Any] = {}
            best, _key, _lossless = best_two(world, sc, profiles, cache)
            outs = {"cold": _run_engine(world, sc, profiles, cache=cache),
                    "online": _run_engine(world, sc, profiles, learned=learned, cache=cache)}
            for k, o in outs.items():
                a = acc[k]
                a["ooms"] += o.ooms
                a["lost"] += not o.delivered
                a["drift"] += o.drift and o.delivered
                if o.delivered and best > 0 and math.isfinite(best):
                    a["regrets"].append(o.seconds / best - 1)
            quarters[min(3, 4 * i // len(seq))] += outs["online"].ooms
            learned = _fold(world, sc, profiles, learned, outs["online"], float(i))
    return {"acc": acc, "quarters": quarters}


def run(profiles_path: str = "", *, sset: ScenarioSet | str = "scoring", params: WorldParams | None = None,
        order_seed: int = 1, jobs: int | None = None) -> dict[str, Any]:
    """Cold engine and learning engine over the same decodes, per card in one random order (``order_seed``), one
    process per world seed (``jobs``: at most this many; 1 runs in-process).

    Returns ``{"set", "cold": metrics, "online": metrics, "ooms_by_quarter": [...], "elapsed_s"}``: OOM attempts of
    the learning engine in each quarter of every card's sequence (the early ones teach it)."""
    sset = SETS[sset] if isinstance(sset, str) else sset
    params = params or WorldParams()
    t0 = time.perf_counter()
    work = [(profiles_path, sset, params, seed, order_seed) for seed in sset.seeds]
    jobs = min(len(work), jobs or min(8, os.cpu_count() or 1))
    if jobs <= 1:
        parts = [_run_seed(w) for w in work]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            parts = list(ex.map(_run_seed, work))
    out: dict[str, Any] = {"set": sset.name}
    for k in ("cold", "online"):
        regrets = [r for p in parts for r in p["acc"][k]["regrets"]]
        n = sum(len(p["acc"][k]["regrets"]) + p["acc"][k]["lost"] for p in parts)
        out[k] = _summary(regrets, *(sum(p["acc"][k][f] for p in parts) for f in ("ooms", "lost", "drift")), n)
    out["ooms_by_quarter"] = [sum(p["quarters"][q] for p in parts) for q in range(4)]
    out["elapsed_s"] = time.perf_counter() - t0
    return out


def sets() -> dict[str, ScenarioSet]:
    """The runs of the section: the scoring set, the scoring set without its network variants (each local
    scenario once: no decode repeats an earlier one's memory state, and no remote), and the tuning set."""
    return {"scoring": SETS["scoring"], "scoring, no network (each local scenario once)":
            dataclasses.replace(SETS["scoring"], name="scoring-local", networks=(None,)), "tuning": SETS["tuning"]}


def markdown(res: dict[str, Any]) -> str:
    """One run's table: the cold engine and the learning one over the same decodes."""
    rows = ["| engine | OOM errors | lost images | tile-drift images | regret median | regret p95 |",
            "|---|---|---|---|---|---|"]
    for k, label in (("cold", "cold (nothing learned: the headline)"), ("online", "learning as it goes")):
        m = res[k]
        rows.append(f"| {label} | {m['ooms']} | {m['lost']} | {m['drift']} | {100 * m['median_regret']:.1f}% | "
                    f"{100 * m['p95_regret']:.1f}% |")
    q = res["ooms_by_quarter"]
    rows += ["", f"{res['online']['scenarios']} decodes, {res['elapsed_s']:.0f} s; OOM attempts of the learning engine "
                 f"by quarter of each card's sequence: {q[0]}, {q[1]}, {q[2]}, {q[3]}."]
    return "\n".join(rows)


def section(results: dict[str, dict[str, Any]]) -> str:
    """The docs/benchmarks.md section (``results``: :func:`run` per name of :func:`sets`)."""
    parts = ["## The engine learning as it goes (simulated)", "",
             "Every decode of a set, per card (one world seed x card = one machine) in a random order; the learning "
             "engine decides with what the decodes before it on that machine recorded (`bench/online.py`: the "
             "orchestrator's records, `policy/learned.py`), and all its OOM attempts count, the ones that taught it "
             "included. Same worlds, same best set as the matrix above."]
    for name, res in results.items():
        parts += ["", f"### {name}", "", markdown(res)]
    return "\n".join(parts)
