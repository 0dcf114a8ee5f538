"""``hybrid-vae probe`` and ``hybrid-vae explain``: what the engine sees and what it would decide."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hybrid_vae.policy import (
    DecodeJob,
    DecodeSettings,
    GiB,
    GpuState,
    HybridVAEError,
    LatentError,
    ProfileError,
    decide,
    load_profiles,
    parse_simulation,
    probe,
)
from hybrid_vae.policy.model import Decision, Plan
from hybrid_vae.policy.profiles import Profiles
from pydantic import ValidationError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("probe", help="show the GPU memory the engine sees now")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default=None, help="cuda:N, mps or cpu (default: current CUDA device)")
    p.set_defaults(func=cmd_probe)

    e = sub.add_parser("explain", help="show the decision for a decode (simulate a card with --gpu/--free-gib)")
    e.add_argument("--family", required=True, help="sd15, sdxl, sd3, flux, hunyuanvideo, wan, or one from your profile")
    e.add_argument("--width", type=int, required=True, help="output width in pixels")
    e.add_argument("--height", type=int, required=True, help="output height in pixels")
    e.add_argument("--batch", type=int, default=1)
    e.add_argument("--frames", type=int, default=None, help="output frames (video families)")
    e.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="dtype the VAE decodes in (default: the family's, e.g. float32 for stock SDXL)")
    e.add_argument("--gpu", default=None, help="simulate this card; a profiled name fills in its total")
    e.add_argument("--total-gib", type=float, default=None, help="simulated total memory")
    e.add_argument("--free-gib", type=float, default=None, help="simulated free memory")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--remote", dest="remote", action="store_true", default=None, help="allow remote decode")
    g.add_argument("--no-remote", dest="remote", action="store_false", help="never decode remotely")
    e.add_argument("--endpoint", default=None, help="remote endpoint URL for this family")
    e.add_argument("--mode", choices=["auto", "full", "tiled", "remote"], default="auto")
    e.add_argument("--reserve-gib", type=float, default=None, help="memory kept free (default 0.125)")
    e.add_argument("--groupnorm", choices=["auto", "exact", "local"], default="auto",
                   help="tiles: exact (same image as a full decode), local (least memory) or auto (default)")
    e.add_argument("--profile", default=None, help="your profile YAML, merged over the built-ins")
    e.add_argument("--custom-vae", action="store_true",
                   help="the VAE is not the family's stock VAE (used when --vae is not given)")
    e.add_argument("--vae", default=None, metavar="PATH_OR_HUB_ID",
                   help="your VAE: with --remote, whether the endpoint serves it is read from the identity cache or "
                        "checked now with a random canary latent (one small request; never your data)")
    e.add_argument("--learned", nargs="?", const="", default=None, metavar="PATH",
                   help="apply learned timings (alone: $HYBRID_VAE_LEARNED or the user cache file; "
                        "reset with `hybrid-vae calibrate --reset-learned`)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_explain)


def _fail(msg: str, code: int) -> int:
    print(f"hybrid-vae: error: {msg}", file=sys.stderr)
    return code


def cmd_probe(args: argparse.Namespace) -> int:
    try:
        state = probe(args.device)
    except ProfileError as exc:
        return _fail(str(exc), 2)
    if args.json:
        print(json.dumps(state.to_dict(), indent=2))
        return 0
    print(f"device     {state.device}  ({state.name})")
    print(f"source     {state.source}{' (SIMULATED)' if state.simulated else ''}")
    print(f"total      {state.total_bytes / GiB:.2f} GiB")
    print(f"free       {state.free_bytes / GiB:.2f} GiB  + torch cache {state.torch_reusable_bytes / GiB:.2f} GiB")
    if state.uuid:
        print(f"uuid       {state.uuid}")
    if state.note:
        print(f"note       {state.note}")
    return 0


def simulated_state(profiles: Profiles, gpu: str | None, total_gib: float | None, free_gib: float | None) -> GpuState | None:
    """The card given on the command line, or None to probe the real one."""
    if gpu is None and total_gib is None and free_gib is None:
        return None
    for flag, v in (("--total-gib", total_gib), ("--free-gib", free_gib)):
        if v is not None and v < 0:
            raise LatentError(f"{flag} {v}: memory cannot be negative; give GiB >= 0")
    parts = [f"name={gpu or 'Simulated GPU'}"]
    if total_gib is None:
        prof = profiles.gpu(gpu) if gpu else None
        if prof is None:
            if free_gib is None:
                raise LatentError(f"--gpu {gpu!r} is not a profiled card; give --total-gib and --free-gib")
            total_gib = free_gib
        else:
            total_gib = prof.total_gib
    parts.append(f"total_gib={total_gib}")
    parts.append(f"free_gib={free_gib if free_gib is not None else total_gib}")
    return parse_simulation(",".join(parts))


def plan_output(p: Plan) -> str:
    """What a plan's pixels are against a full local decode: ``= full``, ``tile drift`` (tiles with their
    own GroupNorm statistics) or ``lossy`` (jpg/mp4 answers)."""
    if p.path == "tiled" and p.groupnorm == "local":
        return "tile drift"
    if p.path == "remote" and p.response_format in ("jpg", "mp4"):
        return "lossy"
    return "= full"


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        profiles = load_profiles(args.profile)
    except ProfileError as exc:
        return _fail(f"{exc}\n(the built-in profiles are unchanged; fix the file or drop --profile)", 1)
    try:
        state = simulated_state(profiles, args.gpu, args.total_gib, args.free_gib)
        if state is None:
            state = probe(total_for=lambda n: (p.total_gib if (p := profiles.gpu(n)) else None))
        kw: dict[str, Any] = {"mode": args.mode, "tile_groupnorm": args.groupnorm}
        if args.remote is not None:
            kw["allow_remote"] = args.remote
        if args.endpoint:
            kw["endpoints"] = {args.family: args.endpoint}
        if args.reserve_gib is not None:
            if not 0 <= args.reserve_gib <= 64:
                raise LatentError(f"--reserve-gib {args.reserve_gib}: give GiB between 0 and 64")
            kw["reserve_bytes"] = int(args.reserve_gib * GiB)
        settings = DecodeSettings(**kw)
        job = DecodeJob(family=args.family, width=args.width, height=args.height, batch=args.batch,
                        frames=args.frames, dtype=args.dtype, custom_vae=args.custom_vae)
        identity, identity_note = _identity(args, profiles, settings, job)
        learned_info: dict[str, Any] | None = None
        learned = None
        if getattr(args, "learned", None) is not None:
            from hybrid_vae.policy.learned import LearnedStore

            store = LearnedStore(args.learned or None)
            learned = store.load()
            learned_info = {"path": str(store.path), "error": store.error, "min_count": learned.min_count,
                            "entries": [e.to_dict() for e in learned.for_card(state.name, job.family)]}
        decision = decide(job, state, profiles, settings, learned=learned, identity=identity)
    except (LatentError, ProfileError) as exc:
        return _fail(str(exc), 2)
    except ValidationError as exc:  # settings built from the flags
        flags = {"reserve_bytes": "--reserve-gib", "endpoints": "--endpoint", "mode": "--mode"}
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "settings"
        return _fail(f"{flags.get(field, field)}: {err['msg']} (value: {err.get('input')!r}); see --help", 2)
    except HybridVAEError as exc:
        return _fail(str(exc), 1)
    if args.json:
        out = decision.to_dict()
        if learned_info is not None:
            out["learned"] = learned_info
        if identity_note:
            out["identity_note"] = identity_note
        print(json.dumps(out, indent=2, default=str))
    else:
        print(render(decision, identity_note=identity_note))
        if learned_info is not None:
            print(render_learned(learned_info))
    return 0


def _identity(args: argparse.Namespace, profiles: Profiles, settings: DecodeSettings,
              job: DecodeJob) -> tuple[Any, str | None]:
    """``(verdict or None, note)`` for ``explain``: the identity of the endpoint against ``--vae`` (cached, or a
    canary now), or a note saying why it was not checked."""
    import dataclasses

    from hybrid_vae.policy.decide import endpoint_for

    fam = profiles.family(job.family)
    url, _ = endpoint_for(dataclasses.replace(job, custom_vae=False), fam, settings)
    if url is None:
        return None, None
    if not args.vae:
        return None, (f"not checked for {url}: give --vae to prove whether it serves your VAE "
                      f"(until then the VAE counts as {'custom' if job.custom_vae else 'stock'}: --custom-vae)")
    from hybrid_vae.extension.cli_local import load_vae
    from hybrid_vae.extension.orchestrator import HybridDecoder
    from hybrid_vae.extension.remote import RemoteClient

    vae = load_vae(args.vae, fam)
    dec = HybridDecoder(settings=settings, remote=RemoteClient(max_retries=0), profile_path=args.profile)
    verdict = dec.endpoint_identity(job, fam, vae, device="cpu")
    return verdict, None


def render_learned(info: dict[str, Any]) -> str:
    """The learned-timing lines of ``explain`` (entries of this card and family)."""
    head = f"Learned   {info['path']}"
    if info.get("error"):
        return f"{head}: ignored ({info['error']})"
    entries = info["entries"]
    if not entries:
        return f"{head}: nothing learned for this card and family yet"
    lines = [f"{head} (applied from {info['min_count']} decodes)"]
    for e in entries:
        used = "applied" if e["count"] >= info["min_count"] else "not yet applied"
        lines.append(f"          {e['path']:<6} {e['bucket']:>7}: x{e['factor']:.2f} from {e['count']} decodes ({used})")
    return "\n".join(lines)


def render_identity(d: Decision, note: str | None = None) -> str | None:
    """The ``Identity`` line of ``explain``: the canary verdict for the endpoint, or why there is none."""
    import datetime

    ident = d.identity
    if ident is None:
        return f"Identity  {note}" if note else None
    when = datetime.datetime.fromtimestamp(ident.checked_at, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    how = "from the identity cache" if ident.source == "cache" else "canary run now"
    return f"Identity  {ident.endpoint}: {ident.text}; {how}, checked {when}; fingerprint {ident.fingerprint[:12]}"


def render(d: Decision, *, identity_note: str | None = None) -> str:
    """A short readable table of a decision."""
    g, j, c = d.gpu, d.job, d.chosen
    sim = " SIMULATED" if g.simulated else ""
    frames = f" x {j.frames} frames" if j.frames else ""
    lines = [
        f"GPU       {g.name}{sim}: {g.total_bytes / GiB:.2f} GiB total, {g.free_bytes / GiB:.2f} GiB free "
        f"(+{g.torch_reusable_bytes / GiB:.2f} cache), source {g.source}; profile: {d.gpu_profile or 'none'}",
        f"Job       {j.family} {j.width}x{j.height}{frames}, batch {j.batch}, {c.dtype}",
        f"Decision  {c.label}: peak {c.estimate.peak_bytes / GiB:.2f} GiB, {c.estimate.seconds:.3f} s",
        f"Reason    {d.reason}",
        "Chain     " + " -> ".join(p.label for p in d.plans),
        *([line] if (line := render_identity(d, identity_note)) else []),
        "",
        f"  {'option':<26} {'peak GiB':>9} {'seconds':>9}  {'output':<10}  fits  why",
    ]
    for o in d.options:
        p = o.plan
        lines.append(f"  {p.label:<26} {p.estimate.peak_bytes / GiB:>9.2f} {p.estimate.seconds:>9.3f}  "
                     f"{plan_output(p):<10}  {'yes' if o.feasible else 'no ':<4}  {o.why}")
    lines += ["", f"Sources   peak: {c.estimate.peak_source}", f"          seconds: {c.estimate.seconds_source}"]
    return "\n".join(lines)
