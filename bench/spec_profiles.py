"""Spec-derived GPU profiles: decode times for cards nobody measured here, scaled from the measured ones by
published FP16 throughput and memory bandwidth, validated card by card on the measured ones (leave one out).

::

    python -m hybrid_vae.bench.spec_profiles            # rewrites the spec-derived block of profiles/gpus.yaml
                                                         # and docs/spec-profiles.md
    python -m hybrid_vae.bench.spec_profiles --check    # exit 1 when the files differ from what it would write

Model, per row kind (``sd15``: float16 decodes; ``sdxl``: the stock VAE's float32 decodes) and size::

    log t = c[kind, size] - a * log(throughput[kind]) - b * log(bandwidth)

``throughput`` is the vendor's dense FP16 tensor rate with FP32 accumulate for float16 rows, and the FP32
(= TF32 on Ampere/Ada, plain FP32 on Turing) rate for float32 rows, in TFLOPS; ``bandwidth`` is the
memory bandwidth in GB/s. ``a``, ``b`` and the intercepts are fitted by least squares on the six cards the
seed document measured (RTX 3070, 3080, 3090, 4070 Ti, 4080, 4090: all Ampere/Ada GeForce); each card is
then predicted from a fit on the other five, and those held-out errors are what docs/spec-profiles.md
reports. Turing (RTX 20) and the professional A4000 lie outside the fitted architectures: their numbers
are extrapolations, labelled as such.

Totals are the vendors' nominal memory sizes. Spec sources: NVIDIA's product pages and the Turing, Ampere
GA102 and Ada architecture whitepapers (boost clocks of the reference designs).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GPUS_YAML = ROOT / "profiles" / "gpus.yaml"
DOC = ROOT / "docs" / "spec-profiles.md"
BEGIN = "# ---- spec-derived (python -m hybrid_vae.bench.spec_profiles; do not edit by hand) ----"
END = "# ---- end of spec-derived ----"
SIZES = (512, 1024)
KINDS = ("sd15", "sdxl")


@dataclasses.dataclass(frozen=True)
class Spec:
    """A card's published figures. ``fp16_tc``: dense FP16 tensor TFLOPS with FP32 accumulate; ``fp32``:
    FP32 TFLOPS (TF32 tensor rate on Ampere/Ada equals it on GeForce); ``bw``: GB/s; ``vram``: GB."""

    name: str
    alias: str
    arch: str
    vram: float
    fp32: float
    fp16_tc: float
    bw: float


# Measured cards (the seed's RTX 30/40 tables, profiles/gpus.yaml) and the cards to derive.
MEASURED = (
    Spec("NVIDIA GeForce RTX 4090", "RTX 4090", "Ada", 24, 82.6, 165.2, 1008),
    Spec("NVIDIA GeForce RTX 4080", "RTX 4080", "Ada", 16, 48.7, 97.5, 716.8),
    Spec("NVIDIA GeForce RTX 4070 Ti", "RTX 4070 Ti", "Ada", 12, 40.1, 80.2, 504),
    Spec("NVIDIA GeForce RTX 3090", "RTX 3090", "Ampere", 24, 35.6, 71.2, 936),
    Spec("NVIDIA GeForce RTX 3080", "RTX 3080", "Ampere", 10, 29.8, 59.5, 760),
    Spec("NVIDIA GeForce RTX 3070", "RTX 3070", "Ampere", 8, 20.3, 40.6, 448),
)
DERIVED = (
    Spec("NVIDIA GeForce RTX 3060", "RTX 3060", "Ampere", 12, 12.7, 25.5, 360),
    Spec("NVIDIA GeForce RTX 3060 Ti", "RTX 3060 Ti", "Ampere", 8, 16.2, 32.4, 448),
    Spec("NVIDIA GeForce RTX 3050", "RTX 3050", "Ampere", 8, 9.1, 18.2, 224),
    Spec("NVIDIA GeForce RTX 3070 Ti", "RTX 3070 Ti", "Ampere", 8, 21.7, 43.5, 608),
    Spec("NVIDIA GeForce RTX 3080 Ti", "RTX 3080 Ti", "Ampere", 12, 34.1, 68.2, 912),
    Spec("NVIDIA GeForce RTX 4060", "RTX 4060", "Ada", 8, 15.1, 30.2, 272),
    Spec("NVIDIA GeForce RTX 4060 Ti", "RTX 4060 Ti", "Ada", 8, 22.1, 44.1, 288),
    Spec("NVIDIA GeForce RTX 4070", "RTX 4070", "Ada", 12, 29.1, 58.3, 504),
    Spec("NVIDIA GeForce RTX 4070 SUPER", "RTX 4070 Super", "Ada", 12, 35.5, 71.0, 504),
    Spec("NVIDIA GeForce RTX 4070 Ti SUPER", "RTX 4070 Ti Super", "Ada", 16, 44.1, 88.2, 672),
    Spec("NVIDIA GeForce RTX 4080 SUPER", "RTX 4080 Super", "Ada", 16, 52.2, 104.4, 736),
    Spec("NVIDIA GeForce RTX 2060", "RTX 2060", "Turing", 6, 6.5, 25.8, 336),
    Spec("NVIDIA GeForce RTX 2070", "RTX 2070", "Turing", 8, 7.5, 29.9, 448),
    Spec("NVIDIA GeForce RTX 2070 SUPER", "RTX 2070 Super", "Turing", 8, 9.1, 36.3, 448),
    Spec("NVIDIA GeForce RTX 2080", "RTX 2080", "Turing", 8, 10.1, 40.3, 448),
    Spec("NVIDIA GeForce RTX 2080 Ti", "RTX 2080 Ti", "Turing", 11, 13.4, 53.8, 616),
    Spec("NVIDIA RTX A4000", "RTX A4000", "Ampere (pro)", 16, 19.2, 76.7, 448),
)
#: Notes shown with a derived card (same NVML name, several memory sizes).
NOTES = {"NVIDIA GeForce RTX 4060 Ti": "also sold with 16 GB under the same name; probing reads the real total",
         "NVIDIA GeForce RTX 3060": "the 12 GB card (an 8 GB variant exists); probing reads the real total"}


def measured_times() -> dict[str, dict[tuple[str, int], float]]:
    """Full-decode seconds of the measured cards' seed rows, by card then (kind, size)."""
    from hybrid_vae.policy.profiles import load_profiles

    profiles = load_profiles("")
    out: dict[str, dict[tuple[str, int], float]] = {}
    for spec in MEASURED:
        gp = profiles.gpu(spec.name)
        assert gp is not None, spec.name
        out[spec.name] = {(r.model, r.size): r.time_s for r in gp.rows if r.model in KINDS and r.source == "seed"}
    return out


def _throughput(spec: Spec, kind: str) -> float:
    return spec.fp16_tc if kind == "sd15" else spec.fp32


Times = dict[str, dict[tuple[str, int], float]]
Model = tuple[float, float, dict[tuple[str, int], float]]


def fit(cards: tuple[Spec, ...], times: Times) -> Model:
    """Least squares for ``(a, b, intercepts)`` of the model above on ``cards``."""
    keys = [(k, s) for k in KINDS for s in SIZES]
    rows, ys = [], []
    for spec in cards:
        for j, (kind, size) in enumerate(keys):
            x = [0.0] * len(keys) + [-math.log(_throughput(spec, kind)), -math.log(spec.bw)]
            x[j] = 1.0
            rows.append(x)
            ys.append(math.log(times[spec.name][(kind, size)]))
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(ys), rcond=None)
    return float(coef[-2]), float(coef[-1]), {k: float(c) for k, c in zip(keys, coef[: len(keys)], strict=True)}


def predict(spec: Spec, kind: str, size: int, model: tuple[float, float, dict[tuple[str, int], float]]) -> float:
    a, b, c = model
    return math.exp(c[(kind, size)] - a * math.log(_throughput(spec, kind)) - b * math.log(spec.bw))


def held_out(times: dict[str, dict[tuple[str, int], float]]) -> list[tuple[str, str, int, float, float]]:
    """Each measured card predicted from a fit on the other five: (card, kind, size, measured, predicted)."""
    out = []
    for spec in MEASURED:
        model = fit(tuple(s for s in MEASURED if s is not spec), times)
        for kind in KINDS:
            for size in SIZES:
                out.append((spec.alias, kind, size, times[spec.name][(kind, size)], predict(spec, kind, size, model)))
    return out


def yaml_block(model: tuple[float, float, dict[tuple[str, int], float]]) -> str:
    a, b, _ = model
    lines = [BEGIN,
             f"# Times scaled from the six measured cards above by published FP16 throughput^-{a:.2f} x memory "
             f"bandwidth^-{b:.2f}",
             "# (fit and held-out errors: docs/spec-profiles.md); totals: the vendors' nominal memory sizes."]
    for spec in DERIVED:
        src = f"spec-derived: {spec.arch}, FP16 {spec.fp16_tc:g} TFLOPS, {spec.bw:g} GB/s"
        if spec.arch != "Ampere" and spec.arch != "Ada":
            src += ", extrapolated (no measured card of this architecture)"
        lines += [f"  - name: {spec.name}", f"    aliases: [{spec.alias}]", f"    total_gib: {spec.vram:g}",
                  "    source: spec-derived"]
        if spec.name in NOTES:
            lines.append(f"    note: {NOTES[spec.name]}")
        lines.append("    rows:")
        for kind in KINDS:
            for size in SIZES:
                t = predict(spec, kind, size, model)
                lines.append(f"      - {{model: {kind}, size: {size}, time_s: {t:.3f}, "
                             f"dtype: {'float16' if kind == 'sd15' else 'float32'}, source: \"{src}\"}}")
    lines.append(END)
    return "\n".join(lines) + "\n"


def doc(model: tuple[float, float, dict[tuple[str, int], float]], rows: list[tuple[str, str, int, float, float]]) -> str:
    a, b, _ = model
    errs = [abs(p / m - 1) for *_, m, p in rows]
    out = ["# Spec-derived GPU profiles", "",
           "Written by `python -m hybrid_vae.bench.spec_profiles` (no GPU needed). The cards below were not measured:",
           "their decode times are scaled from the six cards the seed document measured (RTX 3070, 3080, 3090, "
           "4070 Ti, 4080, 4090; full decodes, diffusers' Hybrid Inference guide) by the vendors' published "
           "FP16 throughput (dense tensor TFLOPS, FP32 accumulate; for the stock SDXL VAE's float32 rows, the FP32 "
           "rate) and memory bandwidth:", "",
           f"    seconds = c[kind, size] x throughput^-{a:.2f} x bandwidth^-{b:.2f}", "",
           "`explain` shows such a card as `profile: NAME (spec-derived)`; `hybrid-vae calibrate` measures your "
           "own card and writes a measured profile that replaces it.", "",
           "## Held out: each measured card predicted from the other five", "",
           "| card | row | measured s | predicted s | error |", "|---|---|---:|---:|---:|"]
    for card, kind, size, m, p in rows:
        out.append(f"| {card} | {kind} {size} px | {m:.3f} | {p:.3f} | {100 * (p / m - 1):+.0f}% |")
    out += ["", f"Median absolute held-out error {100 * float(np.median(errs)):.0f}%, largest "
            f"{100 * max(errs):.0f}% ({len(rows)} rows). All six measured cards are Ampere/Ada GeForce; the "
            "Turing cards (RTX 20) and the RTX A4000 are extrapolations (their FP16 tensor rate per FP32 TFLOP "
            "is twice a GeForce Ampere's), so trust them less. Only speed is derived: memory needs come from "
            "each VAE family's model (docs/estimator.md), the card's total from the vendor's memory size.", "",
           "## Derived cards", "", "| card | arch | GB | FP16 TFLOPS | GB/s | sd15 1024 s | sdxl 1024 s |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for spec in DERIVED:
        out.append(f"| {spec.name} | {spec.arch} | {spec.vram:g} | {spec.fp16_tc:g} | {spec.bw:g} | "
                   f"{predict(spec, 'sd15', 1024, model):.3f} | {predict(spec, 'sdxl', 1024, model):.3f} |")
    return "\n".join(out) + "\n"


def with_block(text: str, block: str) -> str:
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        return head + block + tail
    return text.rstrip("\n") + "\n" + block


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = p.parse_args(argv)
    times = measured_times()
    model = fit(MEASURED, times)
    gpus = with_block(GPUS_YAML.read_text(encoding="utf-8"), yaml_block(model))
    text = doc(model, held_out(times))
    if args.check:
        stale = [str(f) for f, want in ((GPUS_YAML, gpus), (DOC, text)) if f.read_text(encoding="utf-8") != want]
        print("up to date" if not stale else f"stale: {', '.join(stale)}")
        return 1 if stale else 0
    GPUS_YAML.write_text(gpus, encoding="utf-8")
    DOC.write_text(text, encoding="utf-8")
    print(f"a={model[0]:.3f} b={model[1]:.3f}; wrote {GPUS_YAML} and {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
