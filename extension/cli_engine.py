"""``hybrid-vae probe`` and ``hybrid-vae explain``: what the engine sees and what it would decide."""

from __future__ import annotations

import argparse
import dataclasses
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
    probe,
)
from hybrid_vae.policy.errors import SettingsError, short_repr
from hybrid_vae.policy.estimate import decoded_work, upcast_dtype
from hybrid_vae.policy.gpu import simulated_gpu, vendor_note, with_host
from hybrid_vae.policy.model import Decision, Plan, build_settings, field_choices
from hybrid_vae.policy.profiles import Family, Profiles
from hybrid_vae.policy.reasons import fragmented_text
from hybrid_vae.policy.tiles import halo_region


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
    e.add_argument("--endpoint", action="append", default=[], metavar="URL",
                   help="remote endpoint URL for this family; repeat for a pool (tried best first, failing over)")
    e.add_argument("--mode", choices=field_choices("mode"), default="auto")
    e.add_argument("--reserve-gib", type=float, default=None, help="memory kept free (default 0.0625, the settings' reserve)")
    e.add_argument("--groupnorm", choices=field_choices("tile_groupnorm"), default="auto",
                   help="tiles: exact (same image as a full decode; whole-image buffers in host memory when "
                        "needed), offload (exact, buffers in host memory as far as needed), local (least memory, "
                        "colours may drift) or auto (lossless first; default)")
    e.add_argument("--host-gib", type=float, default=None,
                   help="simulated host memory available (default: this machine's)")
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


def fail(msg: str, code: int) -> int:
    """Print ``hybrid-vae: error: MSG`` to stderr; returns the exit code (every subcommand's one error line)."""
    print(f"hybrid-vae: error: {msg}", file=sys.stderr)
    return code


def cmd_probe(args: argparse.Namespace) -> int:
    try:
        state = probe(args.device)
    except ProfileError as exc:
        return fail(str(exc), 2)
    if args.json:
        print(json.dumps(state.to_dict(), indent=2))
        return 0
    print(f"device     {state.device}  ({state.name})")
    print(f"source     {state.source}{' (SIMULATED)' if state.simulated else ''}")
    print(f"total      {state.total_bytes / GiB:.2f} GiB")
    cache = f"{state.torch_reusable_bytes / GiB:.2f} GiB"
    if state.torch_fragmented_bytes:
        cache += f" ({state.torch_fragmented_bytes / GiB:.2f} GiB of it fragmented, not counted)"
    print(f"free       {state.free_bytes / GiB:.2f} GiB  + torch cache {cache}")
    if state.uuid:
        print(f"uuid       {state.uuid}")
    if state.note:
        print(f"note       {state.note}")
    if (vendor := vendor_note(state.name)) is not None:
        print(f"vendor     {vendor}")
    return 0


#: How the command line spells the simulation's fields (errors name the flag, not the env var).
SIM_FLAGS = {"free_gib": "--free-gib", "total_gib": "--total-gib", "name": "--gpu", "host_gib": "--host-gib"}
#: DecodeSettings fields -> the explain flags that set them (a value the model refuses is reported by its flag).
FLAGS = {"mode": "--mode", "tile_groupnorm": "--groupnorm", "allow_remote": "--remote", "endpoints": "--endpoint",
         "reserve_bytes": "--reserve-gib"}


def _flag_error(flag: str, value: object, msg: str) -> ProfileError:
    """``--gpu 'X': not a profiled card; ...``: the flag, the value and the fix on one line."""
    shown = "" if value is None else f" {value:g}" if isinstance(value, float) else f" {short_repr(value)}"
    exc = ProfileError(f"{flag}{shown}: {msg}")
    exc.key_path = flag
    return exc


def simulated_state(profiles: Profiles, gpu: str | None, total_gib: float | None, free_gib: float | None,
                    host_gib: float | None = None) -> GpuState | None:
    """The card given on the command line (``--gpu``/``--total-gib``/``--free-gib``), or None to probe
    the real one. A profiled ``--gpu`` fills in the total; otherwise the total is ``--total-gib``, or
    taken equal to ``--free-gib`` (said in the state's note, which ``explain`` prints). Host memory:
    ``host_gib`` (``--host-gib``), else this machine's.

    Raises:
        ProfileError: naming the flag, the value and the fix.
    """
    if gpu is None and total_gib is None and free_gib is None:
        return None
    if gpu is not None and (not gpu.strip() or len(gpu) > 200):
        raise _flag_error("--gpu", gpu, "give a card name, e.g. 'NVIDIA GeForce RTX 3070'")
    prof = profiles.gpu(gpu) if gpu else None
    if total_gib is None and prof is None and free_gib is None:
        raise _flag_error("--gpu", gpu, "not a profiled card; give --free-gib (and --total-gib)") if gpu \
            else _flag_error("--total-gib", total_gib, "give --free-gib too")
    if total_gib is not None:
        note = "simulated by --gpu/--total-gib/--free-gib"
    elif prof is not None:
        note = f"simulated; total from the {prof.name} profile"
    else:
        note = "simulated; total not given, taken equal to free (--total-gib sets it)"
    state = simulated_gpu(gpu, free_gib=free_gib, total_gib=total_gib,
                          total_for=lambda n: (p.total_gib if (p := profiles.gpu(n)) else None),
                          origin="command line", fields=SIM_FLAGS, note=note, host_gib=host_gib)
    return with_host(state)


def plan_output(p: Plan) -> str:
    """What a plan's pixels are against a full local decode: ``= full``, ``tile drift`` (tiles with their
    own GroupNorm statistics), ``chunk blend`` (temporal chunks only: overlapping frames blended) or
    ``lossy`` (jpg/mp4 answers)."""
    if p.groupnorm == "local" and (p.path == "tiled" or (p.path == "cpu" and (p.tile_px or p.frame_chunk))):
        return "tile drift" if p.tile_px is not None else "chunk blend"
    if p.path == "remote" and p.response_format in ("jpg", "mp4"):
        return "lossy"
    return "= full"


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        profiles = load_profiles(args.profile)
    except ProfileError as exc:
        return fail(f"{exc}; the built-in profiles are unchanged (fix the file or drop --profile)", 1)
    try:
        state = simulated_state(profiles, args.gpu, args.total_gib, args.free_gib, getattr(args, "host_gib", None))
        if state is None:
            state = probe(total_for=lambda n: (p.total_gib if (p := profiles.gpu(n)) else None))
        kw: dict[str, Any] = {"mode": args.mode, "tile_groupnorm": args.groupnorm}
        if args.remote is not None:
            kw["allow_remote"] = args.remote
        if args.endpoint:
            kw["endpoints"] = {args.family: "|".join(args.endpoint)}
        if args.reserve_gib is not None:
            kw["reserve_bytes"] = args.reserve_gib  # in GiB: scaled and checked by the model's limits
        settings = build_settings(kw, names=FLAGS, scales={"reserve_bytes": GiB})
        fam = profiles.family(args.family)
        dtype, upcast = upcast_dtype(args.dtype, fam.force_upcast)
        job = DecodeJob(family=args.family, width=args.width, height=args.height, batch=args.batch,
                        frames=args.frames, dtype=dtype, custom_vae=args.custom_vae)
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
    except (LatentError, ProfileError, SettingsError) as exc:
        return fail(str(exc), 2)
    except HybridVAEError as exc:
        return fail(str(exc), 1)
    notes = (upcast,) if upcast else ()
    if args.json:
        out = decision.to_dict()
        out["notes"] = [*notes, *([v] if (v := vendor_note(decision.gpu.name)) else [])]
        if learned_info is not None:
            out["learned"] = learned_info
        if identity_note:
            out["identity_note"] = identity_note
        print(json.dumps(out, indent=2, default=str))
    else:
        print(render(decision, profiles=profiles, notes=notes, identity_note=identity_note))
        if learned_info is not None:
            print(render_learned(learned_info))
    return 0


def _identity(args: argparse.Namespace, profiles: Profiles, settings: DecodeSettings,
              job: DecodeJob) -> tuple[Any, str | None]:
    """``(verdict or None, note)`` for ``explain``: the identity of the endpoint against ``--vae`` (cached, or a
    canary now), or a note saying why it was not checked."""

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
    """The learned lines of ``explain`` (timing and peak entries of this card and family)."""
    head = f"Learned   {info['path']}"
    if info.get("error"):
        return f"{head}: ignored ({info['error']})"
    entries = info["entries"]
    if not entries:
        return f"{head}: nothing learned for this card and family yet"
    lines = [f"{head} (applied from {info['min_count']} decodes)"]
    for e in entries:
        if e.get("what") == "peak":
            used = "applied" if e["factor"] > 1 else "not applied: at most the estimate"
            n = f"{e['count']} decode{'s' * (e['count'] != 1)}"
            lines.append(f"          {e['path']:<6} peak {e['family']}: x{e['factor']:.2f} from {n} ({used})")
            continue
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


LEGEND = (
    "Legend    * the chosen plan; Chain: it, then the fallbacks tried in order if it fails",
    "          full: the whole image at once; tiled 384px/64: local tiles of 384 px overlapping by 64 px, each "
    "through the whole decoder",
    "          (its own GroupNorm statistics, so colours can drift: \"tile drift\"); tiled 512px exact: tiles "
    "computed layer by layer with the",
    "          whole image's statistics (same pixels as full, more memory); N-latent-frame chunks: a video decoded "
    "N latent frames at a time",
    "          (each latent frame is several output frames; overlaps blended: \"chunk blend\"); cpu: float32 on "
    "the CPU, always fits, slow",
    "          peak: estimated peak allocated memory; budget: free + torch's cache (memory torch holds unused) - "
    "reserve (left for others)",
    "          decoded: pixels x frames decoded per output one (overlaps are decoded twice, so smaller tiles and "
    "shorter chunks are slower);",
    "          output: = full (same pixels as a full decode), tile drift, chunk blend, lossy (jpg/mp4 answers); "
    "voxel: one pixel of one frame",
    "          exact+host: exact tiles whose whole-image (video: whole-video) buffers live partly in host memory "
    "((all): every one); host GiB: those buffers, copy s: estimated copy time",
    "          x 4 frames: exact video tiles of that many output frames (else the family's default, 16: fewer "
    "frames hold less on the GPU, copy more)",
)


def plan_work(d: Decision, p: Plan, fam: Family | None) -> float:
    """Voxels a plan decodes per output voxel (1.0: each once; overlaps make it larger)."""
    if fam is None or p.path not in ("full", "tiled", "cpu") or (p.groupnorm == "exact" and not fam.video):
        return 1.0
    j = d.job
    tile, overlap = p.tile_px, p.overlap_px
    if p.groupnorm == "exact" and tile is not None:  # exact video tiles: each decodes its halo on both sides
        tile, overlap = halo_region(tile, (fam.tiling.exact_halo_latent or 0) * fam.spatial_compression,
                                    max(j.width, j.height), fam.spatial_compression)
    voxels, _, _ = decoded_work(j, fam, tile_px=tile, overlap_px=overlap, frame_chunk=p.frame_chunk,
                                frame_overlap=p.frame_overlap)
    return voxels / (j.height * j.width * (j.frames or 1))


def gpu_line(d: Decision, profiles: Profiles | None) -> list[str]:
    """The GPU header: the card, what was simulated, the profile and its kind, and vendor notes."""
    g = d.gpu
    name = "a card" if g.simulated and g.name == "Simulated GPU" else g.name
    what = " (SIMULATED; no --gpu name)" if name == "a card" else " (SIMULATED)" if g.simulated else ""
    gp = profiles.gpu(d.gpu_profile) if profiles is not None and d.gpu_profile else None
    prof = "none (generic speed)" if d.gpu_profile is None else f"{d.gpu_profile} ({gp.source if gp else 'measured'})"
    lines = [f"GPU       {name}{what}: {g.total_bytes / GiB:.2f} GiB total, {g.free_bytes / GiB:.2f} GiB free "
             f"(+{g.usable_cache_bytes / GiB:.2f} GiB torch cache{fragmented_text(g.torch_fragmented_bytes)}), "
             f"read from {g.source}; profile: {prof}"]
    notes = [g.note] if g.simulated and g.note else []
    if gp is not None and gp.note:
        notes.append(gp.note)
    if (v := vendor_note(g.name)) is not None:
        notes.append(v)
    return lines + [f"          {n}" for n in notes]


def render(d: Decision, *, profiles: Profiles | None = None, notes: tuple[str, ...] = (),
           identity_note: str | None = None) -> str:
    """A readable table of a decision: header, the options (chosen one marked), a legend, the sources."""
    j, c = d.job, d.chosen
    fam = profiles.families.get(j.family) if profiles is not None else None
    dtype = j.dtype or (fam.default_dtype if fam is not None else c.dtype)
    frames = f" x {j.frames} frames" if j.frames else ""
    g = d.gpu
    host = "unknown" if g.host_available_bytes is None else f"{g.host_available_bytes / GiB:.2f} GiB available"
    cpu_note = "; the cpu plan runs float32" if dtype != "float32" else ""
    lines = [
        *gpu_line(d, profiles),
        f"Host      {host}",
        f"Job       {j.family} {j.width}x{j.height}{frames}, batch {j.batch}, decoded in {dtype}{cpu_note}",
        *(f"Note      {n}" for n in notes),
        f"Decision  {c.label}: peak {c.estimate.peak_bytes / GiB:.2f} GiB, {c.estimate.seconds:.3f} s" + (
            f"; host {c.estimate.host_bytes / GiB:.2f} GiB" if c.estimate.host_bytes else "") + (
            f", {c.estimate.transfer_bytes / 1e9:.1f} GB copied in {c.estimate.transfer_seconds:.3f} s"
            if c.estimate.transfer_bytes else ""),
        f"Reason    {d.reason}",
        "Chain     " + " -> ".join(p.label for p in d.plans),
        *([line] if (line := render_identity(d, identity_note)) else []),
        "",
    ]
    width = max(26, *(len(o.plan.label) for o in d.options))
    lines.append(f"  {'option':<{width}} {'peak GiB':>9} {'seconds':>9} {'host GiB':>9} {'copy s':>7} {'decoded':>8}  "
                 f"{'output':<11}  fits  why")
    for o in d.options:
        p = o.plan
        e = p.estimate
        mark = "*" if p is c or p == c else " "
        copy = f"{e.transfer_seconds:>7.3f}" if e.transfer_bytes else f"{'-':>7}"
        host = f"{e.host_bytes / GiB:>9.2f} {copy}" if e.host_bytes else f"{'-':>9} {'-':>7}"
        lines.append(f"{mark} {p.label:<{width}} {e.peak_bytes / GiB:>9.2f} {e.seconds:>9.3f} {host} "
                     f"{plan_work(d, p, fam):>7.2f}x  {plan_output(p):<11}  {'yes' if o.feasible else 'no ':<4}  {o.why}")
    lines += ["", *LEGEND, "", f"Sources   peak: {c.estimate.peak_source}", f"          seconds: {c.estimate.seconds_source}"]
    return "\n".join(lines)
