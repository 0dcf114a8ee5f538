"""What users would otherwise run, as strategies the simulated world can execute.

Each strategy turns a :class:`~bench.world.Scenario` into a sequence of :class:`~bench.world.Exec`
attempts and stops at the first success; an out-of-memory error either moves it to its next attempt
or, where that system gives up, loses the image. Sources for each rule are in the docstrings and in
``shared/notes/peers.md`` / ``memory-and-speed.md``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

from hybrid_vae.bench.world import Exec, Scenario, World
from hybrid_vae.policy.decide import claim_bytes, decide
from hybrid_vae.policy.gpu import GpuState
from hybrid_vae.policy.learned import Learned
from hybrid_vae.policy.model import Decision, DecodeSettings
from hybrid_vae.policy.profiles import Family, Profiles, dtype_bytes


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one strategy did in one scenario.

    Attributes:
        supported: False where the system cannot decode this family at all (Tiled VAE and video).
        delivered: an image came out. seconds: wall time of all attempts (failed ones included).
        attempts: labels of the executions tried, in order. ooms: attempts that ran out of memory.
        wasted: failed attempts (OOMs, failed remote requests, refused claims).
        claims: the engine's claims of a plan's memory refused before the plan ran (no decoding lost; see
            :func:`_run_decision`). floor_ooms: of ``ooms``, those of GPU plans the engine ran on purpose with only
            their floor claimed (estimate / ``NEAR_FIT``: ``near_fit``, or the last GPU plan before the CPU after
            a new decision; :func:`policy.decide.claim_bytes`).
        note: why an image was lost (``out of memory``, ``no endpoint``, ...).
        drift: the image came from spatial tiles with per-tile GroupNorm statistics (an image VAE's
            "local" tiles on the GPU or the CPU, any peer's tiling): its colours differ from a full decode.
        drift_video: the video came from tiles or temporal chunks that differ from its full decode
            (:func:`video_drifts`); counted apart from ``drift`` (issue 15's target counts images).
    """

    supported: bool
    delivered: bool
    seconds: float
    attempts: tuple[str, ...] = ()
    ooms: int = 0
    wasted: int = 0
    note: str = ""
    drift: bool = False
    claims: int = 0
    floor_ooms: int = 0
    drift_video: bool = False


#: Tile geometries whose output equals the full decode (exact tiles, in GPU or host memory; Wan's halo tiles;
#: HunyuanVideo's 3-D tiles).
LOSSLESS_GEOMETRIES = ("exact", "offload", "halo", "exact3d")


def _tiles_drift(ex: Exec) -> bool:
    return ex.path in ("tiled", "cpu") and bool(ex.tiles) and ex.geometry not in LOSSLESS_GEOMETRIES


def drifts(world: World, sc: Scenario, ex: Exec) -> bool:
    """Whether ``ex`` gives an image VAE's output per-tile GroupNorm statistics: spatial tiles of a drifting
    geometry, on the GPU or the CPU (video: :func:`video_drifts`)."""
    return not world.profiles.family(sc.family).video and _tiles_drift(ex)


def video_drifts(world: World, sc: Scenario, ex: Exec) -> bool:
    """Whether ``ex`` gives a video frames that differ from its full decode: spatial tiles of a drifting geometry
    (diffusers' or ComfyUI's: HunyuanVideo's GroupNorms see one tile; Wan's RMS norm is per position, so its tiles
    differ only where a tile's receptive field is cut, less, but still not the full decode), or temporal chunks
    (HunyuanVideo's, each with its own statistics, blended). A remote decode is the server's: not counted."""
    return world.profiles.family(sc.family).video and (_tiles_drift(ex) or ex.frame_chunk is not None)


def _done(world: World, sc: Scenario, ex: Exec) -> dict[str, bool]:
    return {"drift": drifts(world, sc, ex), "drift_video": video_drifts(world, sc, ex)}


def run_chain(world: World, sc: Scenario, chain: Iterator[tuple[str, Exec]] | list[tuple[str, Exec]]) -> Outcome:
    """Run attempts in order until one succeeds."""
    t, ooms, wasted, labels, note = 0.0, 0, 0, [], ""
    for label, ex in chain:
        a = world.attempt(sc, ex)
        t += a.seconds
        labels.append(label)
        if a.ok:
            return Outcome(True, True, t, tuple(labels), ooms, wasted, **_done(world, sc, ex))
        wasted += 1
        ooms += a.oom
        note = a.error or "failed"
    return Outcome(True, False, t, tuple(labels), ooms, wasted, note or "nothing to try")


# ---- this engine ---------------------------------------------------------------------------------


def engine_decision(sc: Scenario, profiles: Profiles, *, reserve_mib: float | None = None,
                    learned: Learned | None = None, cache: dict[tuple[object, ...], Decision] | None = None,
                    gpu: GpuState | None = None, **settings: object) -> Decision:
    """``decide`` for a scenario (remote allowed when there is a network), memoised in ``cache``;
    ``settings`` are further :class:`DecodeSettings` fields (what-if rows), plus ``exact_margin`` (the
    families' exact-tiling margin, a profile value). ``gpu``: what a later probe sees (default: the scenario's)."""
    key = (sc.key, reserve_mib, id(learned) if learned is not None else None, tuple(sorted(settings.items())),
           gpu.free_bytes if gpu is not None else None)
    if cache is not None and key in cache:
        return cache[key]
    margin = settings.pop("exact_margin", None)
    if margin is not None:
        profiles = with_exact_margin(profiles, float(margin))  # type: ignore[arg-type]
    kw: dict[str, object] = {"allow_remote": sc.network is not None, **settings}
    if reserve_mib is not None:
        kw["reserve_bytes"] = int(reserve_mib * 2**20)
    d = decide(sc.job(), gpu or sc.gpu(), profiles, DecodeSettings(**kw),  # type: ignore[arg-type]
               sc.net_stats(), learned=learned)
    if cache is not None:
        cache[key] = d
    return d


_MARGINS: dict[tuple[int, float], Profiles] = {}


def with_exact_margin(profiles: Profiles, margin: float) -> Profiles:
    """``profiles`` with every family's ``memory.exact_margin`` set to ``margin`` (cached per profiles object)."""
    key = (id(profiles), margin)
    got = _MARGINS.get(key)
    if got is None:
        fams = {k: f.model_copy(update={"memory": f.memory.model_copy(update={"exact_margin": margin})})
                for k, f in profiles.families.items()}
        got = _MARGINS[key] = profiles.model_copy(update={"families": fams})
    return got


#: Seconds a refused claim costs: an allocation that fails at once, a probe and a decision (assumed; decide()
#: takes under a millisecond, docs/benchmarks.md "Probe + decide overhead").
CLAIM_S = 0.005
Redecide = Callable[[GpuState], Decision]


def _run_decision(world: World, sc: Scenario, profiles: Profiles, d: Decision, *,
                  chain: bool = True, redecide: Redecide | None = None) -> Outcome:
    """Run the decision's chain as the orchestrator does: before a local GPU plan runs, its memory is claimed
    (:func:`policy.decide.claim_bytes`: the estimated peak and the reserve; a plan chosen into the reserve: its
    estimate; only the floor estimate / ``NEAR_FIT`` for a ``near_fit`` plan and, after a new decision, a GPU plan
    with only CPU plans behind it), which succeeds when
    that much is available now, after the free memory moved (:meth:`World.available`); a refused claim costs
    :data:`CLAIM_S`, and the first one makes the engine decide again (``redecide``) from what a probe sees now
    (:meth:`World.probe_now`), capped under the refused claim (:meth:`GpuState.capped`, as the orchestrator
    does), whose chain skips the plans that already failed."""
    fam = profiles.family(sc.family)
    plans = list(d.plans) if chain else [d.chosen]
    secs, ooms, wasted, claims, labels, note, floor_ooms = 0.0, 0, 0, 0, [], "", 0
    now = world.available(sc)
    i, failed = 0, set()
    while i < len(plans):
        p, i = plans[i], i + 1
        labels.append(p.label)
        last_gpu = redecide is None and claims > 0 and all(q.path == "cpu" for q in plans[i:])
        claim = claim_bytes(p, d, floor=last_gpu)
        floor = 0 < claim < p.estimate.peak_bytes
        if 0 < claim and claim > now:
            secs, wasted, claims = secs + CLAIM_S, wasted + 1, claims + 1
            if redecide is not None and chain:
                d, redecide = redecide(world.probe_now(sc).capped(claim - 1, "refused claim")), None
                plans, i = [q for q in d.plans if q.label not in failed], 0
            continue
        ex = Exec.from_plan(p, fam, sc.batch)
        a = world.attempt(sc, ex)
        secs += a.seconds
        if a.ok:
            return Outcome(True, True, secs, tuple(labels), ooms, wasted, **_done(world, sc, ex), claims=claims,
                           floor_ooms=floor_ooms)
        wasted += 1
        ooms += a.oom
        floor_ooms += a.oom and floor
        failed.add(p.label)
        note = a.error or "failed"
    return Outcome(True, False, secs, tuple(labels), ooms, wasted, note or "nothing to try", claims=claims,
                   floor_ooms=floor_ooms)


def _run_engine(world: World, sc: Scenario, profiles: Profiles, *, chain: bool = True,
                learned: Learned | None = None, cache: dict[tuple[object, ...], Decision] | None = None,
                **settings: object) -> Outcome:
    """The engine's decision for ``sc`` (:func:`engine_decision`) run by :func:`_run_decision`; after a refused
    claim it decides again with the same learned timings and settings."""
    d = engine_decision(sc, profiles, learned=learned, cache=cache, **settings)
    return _run_decision(world, sc, profiles, d, chain=chain,
                         redecide=lambda g: engine_decision(sc, profiles, learned=learned, gpu=g,
                                                            **{**settings, "tight_speedup": None}))


def engine(world: World, sc: Scenario, profiles: Profiles, **kw: Any) -> Outcome:
    """``decide`` with default settings and its fallback chain, run in the world."""
    return _run_engine(world, sc, profiles, cache=kw.get("cache"))


def engine_learned(world: World, sc: Scenario, profiles: Profiles, **kw: Any) -> Outcome:
    """The engine with the learned timings and peaks of a warm-up run (see :func:`bench.matrix.train_learned`)."""
    return _run_engine(world, sc, profiles, learned=kw.get("trained"), cache=kw.get("cache"))


def engine_no_offload(world: World, sc: Scenario, profiles: Profiles, **kw: Any) -> Outcome:
    """WHAT-IF: the engine with host memory unknown, so it never plans exact tiles with whole-image buffers in host
    memory (the engine before issue 15's offloaded exact tiling): the baseline of the tile-drift target."""
    def plan(g: GpuState) -> Decision:
        return decide(sc.job(), dataclasses.replace(g, host_available_bytes=None), profiles,
                      DecodeSettings(allow_remote=sc.network is not None),  # type: ignore[arg-type]
                      sc.net_stats())

    return _run_decision(world, sc, profiles, plan(sc.gpu()), redecide=plan)


def engine_assumed_server(world: World, sc: Scenario, profiles: Profiles, **_: object) -> Outcome:
    """WHAT-IF: the engine before the remote client inferred an endpoint's speed from its replies: it ranks remote
    plans at the assumed speed (``policy.estimate.REMOTE_SPEED_FACTOR``; its decisions are not cached, the cache is
    keyed by scenario)."""
    return _run_engine(world, dataclasses.replace(sc, server_spv=None), profiles)


# ---- peers -----------------------------------------------------------------------------------------


def _default_full(fam: Family, batch: int) -> Exec:
    """diffusers' default decode: the whole batch at once; HunyuanVideo frame-wise (its default), Wan chunked."""
    if fam.video and fam.tiling.frame_chunk is not None:
        return Exec("full", items=batch, frame_chunk=fam.tiling.frame_chunk, frame_overlap=fam.tiling.frame_chunk_overlap)
    return Exec("full", items=batch)


def always_full(world: World, sc: Scenario, profiles: Profiles, **_: object) -> Outcome:
    """diffusers ``vae.decode`` (tiling and slicing off): an OOM is an exception; the image is lost."""
    return run_chain(world, sc, [("full", _default_full(profiles.family(sc.family), sc.batch))])


def sdnext_default(world: World, sc: Scenario, profiles: Profiles, **_: object) -> Outcome:
    """SD.Next ``full_vae_decode``: VAE slicing on by default (one image at a time), tiling off unless
    --lowvram; any exception, OOM included, returns ``[]``: the image is lost."""
    fam = profiles.family(sc.family)
    ex = _default_full(fam, sc.batch)
    if not fam.video:
        ex = Exec("full", items=1)
    return run_chain(world, sc, [("full (sliced)", ex)])


def comfy_formula(fam: Family, sc: Scenario) -> float:
    """ComfyUI's ``memory_used_decode`` for ONE item (bytes): SD 2178, HunyuanVideo 1500*T, Wan 7000 per latent px x 64."""
    s = fam.spatial_compression
    lat_px = (sc.height // s) * (sc.width // s)
    ds = dtype_bytes(sc.dtype)
    if fam.architecture == "hunyuanvideo":
        t = ((sc.frames or 1) - 1) // fam.temporal_compression + 1
        return 1500.0 * t * lat_px * 64 * ds
    if fam.architecture == "wan":
        return 7000.0 * lat_px * 64 * ds
    return 2178.0 * lat_px * 64 * ds


def _comfy_tiled(fam: Family, tile_lat: int) -> Exec:
    """``decode_tiled_``: three passes (t x t, t/2 x 2t, 2t x t/2) averaged; overlap t/4 (16 at t=64)."""
    s = fam.spatial_compression
    t = tile_lat * s
    return Exec("tiled", tiles=((t, t), (t // 2, t * 2), (t * 2, t // 2)), overlap_px=(tile_lat // 4) * s,
                geometry="comfy")


def _comfy_video_tiled(fam: Family) -> Exec:
    """``decode_tiled_3d``: 256 px spatial tiles, overlap 64 px, every frame at once (tile_t=999)."""
    return Exec("tiled", tiles=((256, 256),), overlap_px=64, geometry="diffusers", frame_chunk=None)


def _comfy_retries(fam: Family) -> Iterator[tuple[str, Exec]]:
    if fam.video:
        yield "tiled 3d 256px", _comfy_video_tiled(fam)
        return
    tile = 64
    while tile >= 8:  # current ComfyUI: shrink by 8 latent px after each further OOM
        yield f"tiled x3 {tile * fam.spatial_compression}px", _comfy_tiled(fam, tile)
        tile -= 8


def comfyui(world: World, sc: Scenario, profiles: Profiles, **_: object) -> Outcome:
    """ComfyUI / Forge ``VAE.decode``: items per pass = free memory (NVML + torch cache) / formula, at
    least 1 — so the full decode is always tried; OOM -> tiled (64-latent tiles, three passes), then
    smaller tiles after each further OOM; the last OOM is raised: the image is lost."""
    fam = profiles.family(sc.family)
    per = comfy_formula(fam, sc)
    g = sc.gpu()  # ComfyUI counts NVML free + all of torch's cache (reserved - active)
    k = max(1, min(sc.batch, int((g.free_bytes + g.torch_reusable_bytes) / per)))
    # ComfyUI's own video VAEs decode every frame at once (Wan: causally, frame by frame); finished items go to
    # its output device (the host)
    first = Exec("full", items=k, geometry="comfy")

    def chain() -> Iterator[tuple[str, Exec]]:
        yield f"full x{k}", first
        yield from _comfy_retries(fam)

    return run_chain(world, sc, chain())


def comfy_gated(world: World, sc: Scenario, profiles: Profiles, **_: object) -> Outcome:
    """The formula used as a gate (as Forge's and InvokeAI's users experience it): full only when the
    formula fits the free memory, else tiled with 64-latent tiles at once; OOM -> ComfyUI's tiled retries."""
    fam = profiles.family(sc.family)
    per = comfy_formula(fam, sc)
    g = sc.gpu()
    k = min(sc.batch, int((g.free_bytes + g.torch_reusable_bytes) / per))

    def chain() -> Iterator[tuple[str, Exec]]:
        if k >= 1:
            yield f"full x{k}", Exec("full", items=k, geometry="comfy")
        yield from _comfy_retries(fam)

    return run_chain(world, sc, chain())


def tiledvae_tile(total_gib: float) -> int:
    """Tiled VAE's decoder tile (latent px) from TOTAL VRAM in MiB against thresholds in thousands."""
    mib = total_gib * 1024
    for limit, tile in ((30000, 256), (16000, 192), (12000, 128), (8000, 96)):
        if mib > limit:
            return tile
    return 64


def tiled_vae(world: World, sc: Scenario, profiles: Profiles, **_: object) -> Outcome:
    """Tiled VAE (A1111 multidiffusion-upscaler): always tiles, tile from total VRAM, 11-latent-px pad,
    fast GroupNorm estimate; images only; an OOM is an error (image lost)."""
    fam = profiles.family(sc.family)
    if fam.video:
        return Outcome(False, False, 0.0, note="images only")
    s = fam.spatial_compression
    tile = tiledvae_tile(sc.card.total_gib) * s
    ex = Exec("tiled", tiles=((tile, tile),), overlap_px=11 * s, geometry="tiledvae")
    return run_chain(world, sc, [(f"tiled vae {tile}px", ex)])


def always_remote(world: World, sc: Scenario, profiles: Profiles, **_: object) -> Outcome:
    """diffusers ``remote_decode`` / ComfyUI-HFRemoteVae: raw tensor back, no fallback; no endpoint,
    no network or an HTTP error loses the image."""
    return run_chain(world, sc, [("remote raw", Exec("remote", fmt="raw"))])



Strategy = Callable[..., Outcome]
STRATEGIES: dict[str, tuple[str, Strategy]] = {
    "engine": ("hybrid-vae (this engine)", engine),
    "always_full": ("always full (diffusers default)", always_full),
    "sdnext": ("SD.Next default (full, sliced; OOM -> nothing)", sdnext_default),
    "comfyui": ("ComfyUI/Forge (try full, OOM -> tiled x3)", comfyui),
    "comfy_gated": ("ComfyUI formula as a gate", comfy_gated),
    "tiled_vae": ("Tiled VAE (tile from total VRAM)", tiled_vae),
    "always_remote": ("always remote (no fallback)", always_remote),
}
def engine_with(*, chain: bool = True, **settings: object) -> Strategy:
    """WHAT-IF: the engine with other :class:`DecodeSettings` values or ``exact_margin`` (its rules unchanged);
    ``chain=False``: only the decision's first plan runs (an OOM loses the image)."""

    def run(world: World, sc: Scenario, profiles: Profiles, **kw: Any) -> Outcome:
        return _run_engine(world, sc, profiles, chain=chain, cache=kw.get("cache"), **settings)

    return run


def oracle_but_drift(world: World, sc: Scenario, profiles: Profiles, *, margin: float = 0.0, **kw: Any) -> Outcome:
    """WHAT-IF, a bound, not a strategy anyone can run: knows every hidden draw of the world (true peaks with
    workspace, block rounding and fragmentation, true seconds with their noise, host memory, which remote request
    fails) except the free memory that moves between the probe and the decode. It runs every candidate that would
    succeed without that move with ``margin`` bytes to spare, fastest first. With no margin its OOMs are the ones no
    estimate can avoid at zero regret; with the largest move the world draws (2 GiB) it has none, and its regret is
    the price of that."""
    cond = world.conditions(sc)
    room = world.available(sc) + cond.drift - margin
    chain: list[tuple[float, str, Exec]] = []
    for ex in candidates(sc, profiles, kw.get("cache")):
        if ex.path == "remote":
            a = world.attempt(sc, ex)
            if a.ok:
                chain.append((a.seconds, ex.key, ex))
            continue
        t = world.truth(sc, ex)
        if t.host_bytes > cond.host_free or (t.gpu_bytes > 0 and world.true_peak(sc, ex) > room):
            continue
        chain.append((t.seconds * world.local_factor(sc, ex), ex.key, ex))
    chain.sort(key=lambda c: (c[0], c[1]))
    return run_chain(world, sc, [(ex.kind, ex) for _, _, ex in chain])


def oracle_with(margin_mib: float) -> Strategy:
    """WHAT-IF: :func:`oracle_but_drift` keeping ``margin_mib`` MiB spare."""

    def run(world: World, sc: Scenario, profiles: Profiles, **kw: Any) -> Outcome:
        return oracle_but_drift(world, sc, profiles, margin=margin_mib * 2**20, **kw)

    return run


#: The engine under other settings or rules (what-if rows; never mixed into the headline table).
WHAT_IF: dict[str, tuple[str, Strategy]] = {
    "engine_tolerance12": ("engine, exact tiles up to 1.2x slower (exact_tolerance 1.2)",
                           engine_with(exact_tolerance=1.2)),
    "engine_tolerance135": ("engine, exact tiles up to 1.35x slower (exact_tolerance 1.35, the default before the "
                            "Wan estimate was interpolated from measurements)", engine_with(exact_tolerance=1.35)),
    "engine_no_offload": ("engine without exact tiles in host memory (host memory unknown: before issue 15)",
                          engine_no_offload),
    "engine_local_only": ("engine without exact tiling (tile_groupnorm local)", engine_with(tile_groupnorm="local")),
    "engine_learned": ("engine + learned timings and peaks (after a warm-up of 60 decodes per card)", engine_learned),
    "engine_reserve64": ("engine, reserve 64 MiB", engine_with(reserve_bytes=64 * 2**20)),
    "engine_reserve256": ("engine, reserve 256 MiB", engine_with(reserve_bytes=256 * 2**20)),
    "engine_margins0": ("engine, margins 0 (reserve 0, exact_margin 1.0)",
                        engine_with(reserve_bytes=0, exact_margin=1.0)),
    "engine_no_chain": ("engine without its fallback chain (first plan only)", engine_with(chain=False)),
    "engine_tiles256": ("engine with no tile below 256 px (min_tile_px 256: Wan's 192 px tiles and HunyuanVideo's "
                        "last-resort ones off)", engine_with(min_tile_px=256)),
    "engine_assumed_server": ("engine ranking endpoints at the assumed speed (2x an H200; before the client inferred "
                              "it from replies)", engine_assumed_server),
    "engine_exact": ("engine, lossless tiles only (tile_groupnorm exact: no local image tiles on the GPU; Wan: exact "
                     "halo tiles; HunyuanVideo: exact 3-D tiles, diffusers' tiles where none fits)",
                     engine_with(tile_groupnorm="exact")),
    "engine_no_tight": ("engine without the 'tight plan first' rule (tight_speedup None: never into the reserve "
                        "while a plan fits the budget)", engine_with(tight_speedup=None)),
    "oracle_but_drift": ("bound: an oracle that knows every hidden draw except the free memory moving after the "
                         "probe", oracle_but_drift),
    "oracle_256mib": ("bound: that oracle keeping 256 MiB spare", oracle_with(256)),
    "oracle_2gib": ("bound: that oracle keeping 2 GiB spare (the largest move the world draws)", oracle_with(2048)),
}
ALL: dict[str, tuple[str, Strategy]] = {**STRATEGIES, **WHAT_IF}


def candidates(sc: Scenario, profiles: Profiles, cache: dict[tuple[object, ...], Any] | None = None) -> list[Exec]:
    """Every execution any strategy could run here: the engine's local options at every tile, remote
    raw and png, the CPU, and the peers' own plans. The best successful one defines regret."""
    fam = profiles.family(sc.family)
    # the engine's own decision without a network has every local option (and is cached for it)
    d = engine_decision(dataclasses.replace(sc, network=None), profiles, cache=cache)
    out = {Exec.from_plan(o.plan, fam, sc.batch) for o in d.options}
    if fam.tiling.exact_halo_latent is not None:  # exact video tiles (Wan): planned under tile_groupnorm exact
        d = engine_decision(dataclasses.replace(sc, network=None), profiles, cache=cache, tile_groupnorm="exact")
        out |= {Exec.from_plan(o.plan, fam, sc.batch) for o in d.options if o.plan.groupnorm == "exact"}
    if sc.network is not None and fam.endpoints:  # lossless formats (video: raw only; mp4 is lossy)
        out |= {Exec("remote", fmt="raw")} | (set() if fam.video else {Exec("remote", fmt="png")})
    out.add(_default_full(fam, sc.batch))
    if not fam.video:
        out.add(Exec("full", items=1))
        out.add(_comfy_tiled(fam, 64))
        t = tiledvae_tile(sc.card.total_gib) * fam.spatial_compression
        out.add(Exec("tiled", tiles=((t, t),), overlap_px=11 * fam.spatial_compression, geometry="tiledvae"))
    else:
        out.add(_comfy_video_tiled(fam))
    return sorted(out, key=lambda e: e.key)


def best_two(world: World, sc: Scenario, profiles: Profiles,
             cache: dict[tuple[object, ...], Any] | None = None) -> tuple[float, str, float]:
    """The fastest execution that succeeds in this world, its key, and the seconds of the fastest that succeeds
    without tile drift (inf: none)."""
    best, key, lossless = math.inf, "", math.inf
    for ex in candidates(sc, profiles, cache):
        a = world.attempt(sc, ex)
        if not a.ok:
            continue
        if a.seconds < best:
            best, key = a.seconds, ex.key
        if a.seconds < lossless and not drifts(world, sc, ex) and not video_drifts(world, sc, ex):
            lossless = a.seconds
    return best, key, lossless
