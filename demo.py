"""``hybrid-vae demo``: the engine end to end, offline, on this CPU.

It encodes the bundled picture with the fixture VAE and decodes it under several simulated GPU budgets
(full, exact tiles, local tiles, an injected out-of-memory error, CPU), then against real ``hybrid-vae serve``
apps on loopback (a verified endpoint, the same endpoint stopped, an endpoint serving another VAE), printing
what the engine decided and how close each result is to the full decode.

This module sits above both layers it runs: it imports ``extension/`` (the engine, the CLI's image writer)
and ``server/`` (the apps the remote cases decode on). ``extension/`` never imports ``server/``
(``tests/test_layers.py``); the ``hybrid-vae`` dispatcher reaches this module by name, like ``serve`` and
``bench``. torch and diffusers are imported inside the handlers only.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybrid_vae.extension.cli_engine import fail
from hybrid_vae.extension.cli_local import psnr, write_images
from hybrid_vae.policy.errors import HybridVAEError

if TYPE_CHECKING:
    import argparse

    import torch


def add_parser(sub: Any) -> None:
    m = sub.add_parser("demo", help="offline demo: fixture VAE, simulated budgets, one PNG per case")
    m.add_argument("--out", default="hybrid-vae-demo", help="folder for the PNGs and demo.json")
    m.add_argument("--size", type=int, default=512, help="picture side in pixels (multiple of 64)")
    m.add_argument("--no-oom", dest="inject_oom", action="store_false",
                   help="skip the case that injects an out-of-memory error into the first plan")
    m.set_defaults(func=cmd_demo)


def _demo_latent(size: int) -> tuple[Any, Any, Any]:
    """(fixture VAE, picture tensor in [-1, 1], normalised latent) for a ``size`` px square picture."""
    import numpy as np
    import torch
    from hybrid_vae.extension.fixture import fixture_image, load_fixture_vae
    from PIL import Image

    torch.manual_seed(0)
    vae: Any = load_fixture_vae()
    img = fixture_image("astronaut", 256)
    if size != 256:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
    return vae, x, z


def _oom_at_decoder(vae: Any) -> Callable[[], None]:
    """Make the decoder's next mid-block forward (every local path runs it) raise ``torch.OutOfMemoryError``
    once; returns the remover."""
    import torch

    state = {"armed": True}

    def hook(_module: Any, _inputs: Any) -> None:
        if state["armed"]:
            state["armed"] = False
            raise torch.OutOfMemoryError("CUDA out of memory (injected by `hybrid-vae demo`)")

    remove: Callable[[], None] = vae.decoder.mid_block.register_forward_pre_hook(hook).remove
    return remove


def demo_remote_cases(out: Path, vae: Any, z: Any, x: Any, reference: Any, card: str, total: float,
                      settings: Any) -> tuple[list[dict[str, Any]], str | None]:
    """Remote cases of the demo: real ``hybrid-vae serve`` apps on loopback.

    ``5-remote``: almost no free VRAM, remote allowed, the endpoint serves the fixture -> a canary latent proves
    it is the same VAE and the server decodes. ``6-remote-down``: that verified endpoint stops -> the remote plan
    fails and the local fallback produces the image. ``7-remote-other-vae``: an endpoint serving another VAE (the
    fixture's architecture, random weights) -> the canary refuses it and the image is decoded locally. Identity
    verdicts go to ``out/identity.json`` (not the user's cache). Returns the rows and, when the server extra is not
    installed, why the cases were skipped.
    """
    import functools

    import torch

    try:
        from hybrid_vae.server.app import create_app
        from hybrid_vae.server.testing import serve_in_thread
    except ImportError as exc:
        return [], f"skipped: {exc.name or exc} missing; pip install -e '.[server]'"
    from diffusers import AutoencoderKL
    from hybrid_vae.extension.identity import IdentityChecker, IdentityStore
    from hybrid_vae.extension.orchestrator import HybridDecoder
    from hybrid_vae.extension.remote import RemoteClient
    from hybrid_vae.policy.gpu import parse_simulation

    identity = IdentityChecker(IdentityStore(out / "identity.json"))
    identity.store.forget()
    rows: list[dict[str, Any]] = []

    def case(name: str, url: str) -> None:
        st = settings.updated(allow_remote=True, endpoints={"sd15": url}, remote_deadline_s=30.0)
        client = RemoteClient(trusted_endpoints=[url], connect_timeout_s=2.0, read_timeout_s=30.0, max_retries=0)
        spec = f"name={card},total_gib={total},free_gib=0.05"
        decoder = HybridDecoder(settings=st, probe=functools.partial(parse_simulation, spec),
                                latent_dir=out / "latents", remote=client, identity=identity)
        t0 = time.perf_counter()
        result = decoder.decode(z, vae, family="sd15", vae_id="hybrid-vae fixture")
        secs = time.perf_counter() - t0
        png = out / f"{name}.png"
        write_images(result, png)
        r = result.report
        ident = r.decision.identity
        rows.append({"case": name, "simulated_free_gib": 0.05, "decision": r.ran.label,
                     "chosen": r.chosen.label, "fell_back": r.fell_back, "reason": r.reason,
                     "reason_code": r.decision.reason_code,
                     "infotext": r.infotext(), "seconds": round(secs, 3),
                     "psnr_vs_full_db": round(psnr(result.tensor, reference), 2),
                     "psnr_vs_picture_db": round(psnr(result.tensor, x), 2),
                     "attempts": [list(a) for a in r.attempts], "png": str(png),
                     "endpoint": url, "remote": r.to_dict().get("remote"),
                     "identity": ident.to_dict() if ident is not None else None})

    with serve_in_thread(create_app(families={"sd15": vae}, device="cpu")) as base:
        case("5-remote", f"{base}/sd15")
    case("6-remote-down", f"{base}/sd15")  # the same endpoint, verified before, now stopped
    torch.manual_seed(1)
    other = AutoencoderKL.from_config(vae.config).eval()
    with serve_in_thread(create_app(families={"sd15": other}, device="cpu")) as base:
        case("7-remote-other-vae", f"{base}/sd15")
    return rows, None


def cmd_demo(args: argparse.Namespace) -> int:

    from hybrid_vae.extension.orchestrator import HybridDecoder
    from hybrid_vae.policy.decide import decide
    from hybrid_vae.policy.gpu import GiB, parse_simulation
    from hybrid_vae.policy.model import DecodeJob, DecodeSettings
    from hybrid_vae.policy.profiles import load_profiles

    if not getattr(args, "verbose", False):  # the table says it all; keep per-decode log lines out
        logging.getLogger("hybrid_vae").setLevel(logging.ERROR)
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # "accelerate not found" notices while loading the fixture
    if args.size < 64 or args.size % 64:
        return fail(f"--size {args.size}: use a multiple of 64 px", 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        vae, x, z = _demo_latent(args.size)
    except FileNotFoundError as exc:
        return fail(str(exc), 1)
    card, total = "NVIDIA GeForce RTX 3070", 8.0
    settings = DecodeSettings()
    # budgets: the largest exact tile (case 2), then the largest local tile below every exact plan
    # (case 2b), each plus 5% on top of the reserve
    job = DecodeJob(family="sd15", width=args.size, height=args.size, dtype="float32")
    big = decide(job, parse_simulation(f"name={card},free_gib={total}"), load_profiles(), settings)
    tiled = [o.plan for o in big.options if o.plan.path == "tiled"]
    exact = [p.estimate.peak_bytes for p in tiled if p.groupnorm == "exact"]
    below = [p for p in tiled if p.groupnorm == "local" and p.estimate.peak_bytes < min(exact, default=0)]

    def budget(peak: float) -> float:
        return (settings.reserve_bytes + peak * 1.05) / GiB

    # (name, simulated free GiB, inject an OOM into the first plan)
    cases: list[tuple[str, float, bool]] = [("1-full", total, False)]
    if exact:
        cases.append(("2-tiled-exact", budget(max(exact)), False))
    if below:
        cases.append(("2b-tiled-local", budget(max(p.estimate.peak_bytes for p in below)), False))
    if args.inject_oom:
        cases.append(("3-oom-fallback", total, True))
    cases.append(("4-cpu", 0.0, False))
    rows: list[dict[str, Any]] = []
    reference: torch.Tensor | None = None
    for name, free, oom in cases:
        spec = f"name={card},total_gib={total},free_gib={free:.4f}"
        decoder = HybridDecoder(settings=settings, probe=functools.partial(parse_simulation, spec),
                                latent_dir=out / "latents")
        remove = _oom_at_decoder(vae) if oom else None
        t0 = time.perf_counter()
        try:
            result = decoder.decode(z, vae, family="sd15", vae_id="hybrid-vae fixture", custom_vae=True)
        except HybridVAEError as exc:
            return fail(f"demo case {name}: {exc}", 1)
        finally:
            if remove is not None:
                remove()
        secs = time.perf_counter() - t0
        if reference is None:
            reference = result.tensor
        png = out / f"{name}.png"
        write_images(result, png)
        r = result.report
        rows.append({"case": name, "simulated_free_gib": round(free, 3), "decision": r.ran.label,
                     "chosen": r.chosen.label, "fell_back": r.fell_back, "reason": r.reason,
                     "reason_code": r.decision.reason_code,
                     "infotext": r.infotext(), "seconds": round(secs, 3),
                     "psnr_vs_full_db": round(psnr(result.tensor, reference), 2),
                     "psnr_vs_picture_db": round(psnr(result.tensor, x), 2),
                     "attempts": [list(a) for a in r.attempts], "png": str(png)})
    remote_rows, remote_skip = demo_remote_cases(out, vae, z, x, reference, card, total, settings)
    rows += remote_rows
    save_pictures(x, reference, out)
    (out / "demo.json").write_text(json.dumps({"size": args.size, "card": card, "cases": rows}, indent=2,
                                              default=str), encoding="utf-8")
    print_demo(rows, size=args.size, card=card, out=out, remote_skip=remote_skip)
    return 0


def save_pictures(x: Any, reference: Any, out: Path) -> None:
    """``0-picture.png`` (the original) and ``0-picture-vs-full.png`` (original | the fixture's full decode)."""
    from PIL import Image

    def img(t: Any) -> Any:
        return Image.fromarray(((t[0].float().permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())

    pic, full = img(x), img(reference)
    pic.save(out / "0-picture.png")
    both = Image.new("RGB", (pic.width * 2 + 8, pic.height), "white")
    both.paste(pic, (0, 0))
    both.paste(full, (pic.width + 8, 0))
    both.save(out / "0-picture-vs-full.png")


def print_demo(rows: list[dict[str, Any]], *, size: int, card: str, out: Path, remote_skip: str | None) -> None:
    """The demo's table (under 100 columns) and, below it, each case's reason wrapped."""
    import textwrap

    vs_picture = rows[0]["psnr_vs_picture_db"] if rows else float("nan")
    print(f"hybrid-vae demo: a {size}x{size} picture, the fixture VAE, a simulated {card.replace('NVIDIA GeForce ', '')} "
          "(decodes run on this CPU)")
    print(textwrap.fill(
        f"The fixture VAE is tiny (16-64 channels, trained on a CPU so the demo needs no download): even its full "
        f"decode is blurry, {vs_picture:.1f} dB PSNR against the original picture. That is the fixture, not the "
        f"engine: compare {out}/0-picture-vs-full.png (original | full decode). Every case below is judged against "
        "the full decode ('vs full'); a real VAE reconstructs far better.", width=100) + "\n")
    print(f"{'case':<15} {'free GiB':>8}  {'decision':<42} {'seconds':>7} {'vs full':>9} {'vs picture':>10}")
    for row in rows:
        dec = row["decision"] + (f" after {row['chosen']} failed" if row["fell_back"] else "")
        p = row["psnr_vs_full_db"]
        ptxt = "identical" if p == math.inf else f"{p:.1f} dB"
        print(f"{row['case']:<15} {row['simulated_free_gib']:>8.2f}  {dec[:42]:<42} {row['seconds']:>7.2f} "
              f"{ptxt:>9} {row['psnr_vs_picture_db']:>7.1f} dB")
    if remote_skip is not None:
        print(f"{'5-remote':<15} {'':>8}  {remote_skip}")
    print("\nWhy:")
    for row in rows:
        why = row["reason"]
        if row["fell_back"]:
            err = str(row["attempts"][0][1] or "failed")
            why = f"{row['chosen']} failed ({err[:70] + '...' if len(err) > 70 else err}); {why}"
        print(textwrap.fill(why, width=100, initial_indent=f"  {row['case']}: ", subsequent_indent="      "))
    print(f"\nwrote {len(rows)} PNGs, 0-picture.png, 0-picture-vs-full.png and demo.json to {out}/")

