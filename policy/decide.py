"""``decide(job, gpu, profiles, settings, network=None) -> Decision``: a pure function.

Rules (each is tested):
- Candidates: full (whole batch), full item by item (batch > 1), temporal chunks (video), tiled at
  every tile cap from the family's smallest up to the image size -- for image families with an
  exact-tiling model both ``exact`` (whole-image GroupNorm statistics; output = a full decode) and
  ``local`` (per-tile statistics; least memory) --, exact tiles whose whole-image buffers live partly in
  host memory ("offloaded", label ``exact+host``: the buffers get the device memory the tile leaves, the
  rest goes to the host; one of them with every buffer in host memory at the smallest tile), remote
  (when allowed and an endpoint serves this family's VAE), cpu.
- ``tile_groupnorm="auto"``: lossless plans first: while a full, exact or offloaded exact plan fits, a
  local-tiled plan is chosen only when it is estimated ``exact_tolerance`` faster; ``exact``: no local
  tiles; ``offload``: tiled plans are offloaded exact ones only; ``local``: no exact tiles.
- An offloaded plan also needs its host buffers to fit the probed available host memory minus
  ``host_reserve_bytes`` (unknown host memory: no offloaded plans).
- A GPU plan is feasible when its estimated peak <= available - reserve
  (available = NVML free + torch's reusable cache).
- ``auto`` chooses the feasible plan with the smallest estimated seconds (ties: the larger tile);
  see ``tile_groupnorm`` for exact vs local tiles.
  Forced modes put their path first when it is feasible and otherwise say why and fall back to auto.
- Never a GPU plan first whose estimate exceeds what is available. When nothing fits the budget,
  the smallest tile is tried first only if it fits inside the reserve; else remote, else cpu.
- Fallbacks: after a GPU plan, plans that need at least a quarter less memory (so an OOM retry can
  succeed), remote by speed, and cpu last: one item at a time (video: in the VAE's temporal chunks), then,
  when the frame is larger than the smallest tile, cpu in local tiles (host memory bounded by the tile).
- Learned timings (``learned=``, see :mod:`policy.learned`) scale local plans' seconds, never memory.
- Identity (``identity=``, a canary verdict from ``extension.identity``): for the endpoint it names, it
  replaces the name-based custom-VAE rule: ``same`` allows remote, ``other`` ("endpoint serves another
  VAE") and ``unverified`` refuse it unless ``allow_remote_custom_vae``. Without a verdict (no local VAE to
  compare, ``explain`` without ``--vae``) the name-based rule (``job.custom_vae``) applies.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

from hybrid_vae.policy import passes
from hybrid_vae.policy.errors import ProfileError
from hybrid_vae.policy.estimate import (
    CPU_SECONDS_PER_VOXEL,
    SpeedModel,
    check_job,
    cpu_seconds,
    decode_dtype,
    exact_peak_bytes,
    exact_schedule,
    exact_seconds,
    exact_tiles,
    latent_frames,
    local_seconds,
    offload_costs,
    offload_peak_bytes,
    offload_seconds,
    peak_bytes,
    remote_estimate,
    spatial_tiles,
)
from hybrid_vae.policy.gpu import GpuState
from hybrid_vae.policy.gpu import format_gib as _gib
from hybrid_vae.policy.learned import Learned, job_voxels, learn_path
from hybrid_vae.policy.model import (
    Decision,
    DecodeJob,
    DecodeSettings,
    EndpointIdentity,
    Estimate,
    NetworkArg,
    NetworkStats,
    Option,
    Plan,
    ResponseFormat,
    split_endpoints,
)
from hybrid_vae.policy.profiles import Family, Profiles, dtype_bytes

LOSSY = frozenset({"jpg", "mp4"})


def endpoint_for(job: DecodeJob, fam: Family, settings: DecodeSettings) -> tuple[str | None, str]:
    """The endpoint URL for this job, or None and the reason remote is not possible."""
    if not settings.allow_remote:
        return None, "remote decode is off (opt-in: the endpoint sees the images)"
    if fam.inferred:
        return None, "never remote for a VAE whose geometry matches no family"
    if job.custom_vae and not settings.allow_remote_custom_vae:
        return None, f"custom VAE {job.vae_id or ''} differs from the endpoint's; remote not allowed for it".replace("  ", " ")
    url = settings.endpoints.get(job.family)
    if url:
        n = len(split_endpoints(url))
        return url, "configured endpoint" if n == 1 else f"configured pool of {n} endpoints (best first, failover)"
    if settings.use_builtin_endpoints and fam.endpoints:
        ep = fam.endpoints[0]
        return ep.url, f"built-in {ep.provider} endpoint serving {ep.vae}"
    return None, f"no endpoint serves {job.family}; set one in settings (e.g. your own `hybrid-vae serve`)"


def identity_gate(url: str | None, why: str, identity: EndpointIdentity | None,
                  settings: DecodeSettings) -> tuple[str | None, str]:
    """Apply a canary verdict to the endpoint :func:`endpoint_for` chose: ``(url or None, why)``.

    A verdict about another URL (or none) changes nothing. ``same``: remote allowed; ``other`` /
    ``unverified``: refused unless ``settings.allow_remote_custom_vae`` (then allowed, and ``why`` says so).
    """
    if url is None or identity is None or identity.endpoint != url:
        return url, why
    if identity.verdict == "same":
        return url, f"{why}; {identity.text}"
    if settings.allow_remote_custom_vae:
        return url, f"{why}; {identity.text}, allowed by allow_remote_custom_vae"
    return None, f"{identity.text}; remote not used for it (allow_remote_custom_vae overrides)"


def _net_for(network: NetworkArg, url: str) -> NetworkStats:
    if network is None:
        return NetworkStats()
    if isinstance(network, NetworkStats):
        return network
    if isinstance(network, Mapping):
        got = network.get(url)
        return got if got is not None else NetworkStats()
    raise TypeError(f"network must be NetworkStats, a mapping of endpoint -> NetworkStats, or None; got {type(network).__name__}")


def _formats(job: DecodeJob, fam: Family, settings: DecodeSettings) -> list[ResponseFormat]:
    if settings.remote_format != "auto":
        return [settings.remote_format]
    if fam.video:
        return ["raw"] if settings.remote_quality == "lossless" else ["raw", "mp4"]
    return ["raw", "png"] if settings.remote_quality == "lossless" else ["raw", "png", "jpg"]


def _tile_caps(job: DecodeJob, fam: Family, settings: DecodeSettings) -> list[int]:
    step = max(fam.tiling.tile_step_px, fam.spatial_compression)
    lo = settings.min_tile_px or fam.tiling.min_tile_px
    lo = max(step, (lo // step) * step)
    hi = max(job.width, job.height)
    caps = list(range(lo, hi, step))
    if not caps and hi > fam.spatial_compression * 2:
        caps = [max(fam.spatial_compression * 2, (hi // 2 // step) * step or step)]
    return [c for c in caps if c < hi]


def _actual_tile(job: DecodeJob, fam: Family, cap: int, overlap: int) -> int:
    """The tile size that runs under a cap: equalised tiles for images, the cap itself for video."""
    if fam.video:
        return cap
    ty, tx = spatial_tiles(job, fam, cap, overlap)
    return max(max(s for _, s in ty), max(s for _, s in tx)) * fam.spatial_compression


def describe_plan(plan: Plan) -> str:
    """``plan.label`` for the infotext, where a CPU plan also says whether it decodes the whole frame or tiles:
    ``cpu full decode``, ``cpu full decode (item by item)``, ``cpu full frames, 4-latent-frame chunks``,
    ``cpu tiled 256px/64``."""
    if plan.path != "cpu":
        return plan.label
    chunks = f", {plan.frame_chunk}-latent-frame chunks" if plan.frame_chunk is not None else ""
    if plan.tile_px is not None:
        return f"cpu tiled {plan.tile_px}px/{plan.overlap_px}{chunks}"
    if chunks:
        return f"cpu full frames{chunks}"
    return "cpu full decode" + (" (item by item)" if plan.slice_batch else "")


def _cpu_plans(job: DecodeJob, fam: Family, settings: DecodeSettings, overlap: int) -> list[Plan]:
    """The CPU plans, last in every chain. The first decodes one item at a time (video: in the VAE's temporal
    chunks); the second, for a frame larger than the smallest tile, in local tiles, so its host memory is
    bounded by the tile: a float32 CPU decode needs about 3.8 KB of host memory per output pixel (962 MiB at
    512 px measured by bench/cpu_memory.py, so ~15 GiB at 2048 px), more than many hosts have free."""
    secs = cpu_seconds(job, fam)
    chunk = fam.tiling.frame_chunk
    chunk = chunk if fam.video and chunk is not None and latent_frames(job, fam) > chunk else None
    fov = min(fam.tiling.frame_chunk_overlap, chunk - 1) if chunk is not None else 0
    est = Estimate(peak_bytes=0, seconds=secs, peak_source="cpu: host memory (not estimated)",
                   seconds_source=f"generic CPU model (assumed): {CPU_SECONDS_PER_VOXEL:g} s per output voxel x "
                                  f"{fam.timing.relative_cost:g}, float32; the same for every family on the SD "
                                  "decoder (sd15, sdxl, sd3, flux)")
    plans = [Plan(path="cpu", dtype="float32", estimate=est, slice_batch=job.batch > 1, frame_chunk=chunk,
                  frame_overlap=fov)]
    caps = [c for c in _tile_caps(job, fam, settings) if c > 2 * overlap]
    tile = _actual_tile(job, fam, caps[0], overlap) if caps else None
    if tile is not None and tile < max(job.width, job.height):
        sc = fam.spatial_compression
        ty, tx = spatial_tiles(job, fam, tile, overlap)
        grow = sum(s for _, s in ty) * sum(s for _, s in tx) * sc * sc / (job.width * job.height)
        est_t = dataclasses.replace(est, seconds=secs * grow,
                                    seconds_source=f"{est.seconds_source}; x{grow:.2f} for the tiles' overlaps")
        plans.append(Plan(path="cpu", dtype="float32", estimate=est_t, tile_px=tile, overlap_px=overlap,
                          slice_batch=True, frame_chunk=chunk, frame_overlap=fov))
    return plans


def _offload_sizes(sizes: list[int]) -> list[int]:
    """A few of the exact tile sizes (ascending) for offloaded plans: the smallest and those nearest 512 and
    1024 px (each candidate costs a pass schedule, and decide() stays under a millisecond; larger tiles leave
    less room for buffers on the GPU, smaller ones take more steps, so the optimum is broad, and tiles of
    ``2^k`` px split the usual image sizes evenly at every resolution)."""
    picks = {sizes[0]} | {min(sizes, key=lambda t: (abs(t - target), t)) for target in (512, 1024)}
    return sorted(t for t in picks if t <= 1024 or t == sizes[0])


def _offload_sizes_to_cost(plans: list[Plan], sizes: list[int], budget: int, settings: DecodeSettings) -> list[int]:
    """The tile sizes worth an offloaded candidate: with the same tile an offloaded plan is never faster than
    the in-memory one (same compute plus copies) and never than a full decode, so only sizes larger than
    the largest in-memory exact tile that fits, and none when a full decode fits (``tile_groupnorm="offload"``:
    all). Keeps ``decide()`` cheap where nothing needs host memory."""
    offload_sizes = _offload_sizes(sizes)
    if settings.tile_groupnorm == "offload":
        return offload_sizes
    fits = [p for p in plans if p.estimate.peak_bytes <= budget]
    if any(p.path == "full" for p in fits):
        return []
    inmem = max((p.tile_px or 0 for p in fits if p.groupnorm == "exact"), default=0)
    return [t for t in offload_sizes if t > inmem]


def _tiled_reason(c: Plan, gpu_plans: list[Plan], feasible: list[Plan], settings: DecodeSettings) -> str:
    """The rest of a tiled decision's reason: why exact, exact with host memory, or tiles that may drift."""
    inmem = [p for p in gpu_plans if p.groupnorm == "exact" and not p.offloaded]
    least = min(inmem, key=lambda p: p.estimate.peak_bytes) if inmem else None
    if c.groupnorm == "exact" and c.offloaded:
        e = c.estimate
        gpu_alone = f"exact tiling on the GPU alone needs {_gib(least.estimate.peak_bytes)}; " if least else ""
        return (f"; {gpu_alone}{_gib(e.host_bytes)} of whole-image buffers in host memory, "
                f"{e.transfer_bytes / 1e9:.1f} GB copied (est. {e.transfer_seconds:.2f} s, overlapped); "
                f"output equals a full decode")
    if c.groupnorm == "exact":
        return "; output equals a full decode"
    lossless = [p for p in feasible if p.path == "full" or p.groupnorm == "exact"]
    if lossless:
        quickest = min(lossless, key=lambda p: p.estimate.seconds)
        return (f"; {quickest.label} fits but is estimated {quickest.estimate.seconds:.2f} s, over "
                f"{settings.exact_tolerance:g}x this plan's, so tile colours may differ from a full decode")
    exacts = [p for p in gpu_plans if p.groupnorm == "exact"]
    if not exacts:
        return ""
    smallest = min(exacts, key=lambda p: p.estimate.peak_bytes)
    host = f" with {_gib(smallest.estimate.host_bytes)} in host memory" if smallest.estimate.host_bytes else ""
    return (f"; no lossless plan fits: exact tiling needs {_gib(smallest.estimate.peak_bytes)}{host}, so tile "
            f"colours may differ from a full decode")


def decide(job: DecodeJob, gpu: GpuState, profiles: Profiles, settings: DecodeSettings | None = None,
           network: NetworkArg = None, learned: Learned | None = None,
           identity: EndpointIdentity | None = None) -> Decision:
    """Choose how to decode ``job`` on ``gpu``; pure: the same inputs give the same decision.

    Args:
        job (`DecodeJob`): what to decode.
        gpu (`GpuState`): memory now (see :func:`policy.gpu.probe`).
        profiles (`Profiles`): families and GPU profiles.
        settings (`DecodeSettings`, defaults to `DecodeSettings()`): the user's choices.
        network (`NetworkStats | Mapping[str, NetworkStats] | None`): what is known about endpoints;
            None assumes a 50 Mbit/s, 150 ms link.
        learned (`Learned | None`): learned timing factors of this machine (read by the caller from
            :class:`policy.learned.LearnedStore`); they scale local plans' seconds and are named in
            each plan's ``seconds_source``.
        identity (`EndpointIdentity | None`): the canary verdict for the endpoint this job would use
            (see :func:`identity_gate`); shown in the reason when it refuses remote, and in ``Decision.identity``.

    Raises:
        ProfileError: unknown family. LatentError: a job that cannot be decoded (size, frames, batch).
    """
    settings = settings or DecodeSettings()
    fam = profiles.family(job.family)
    check_job(job, fam)
    dtype = decode_dtype(job, fam)
    gp = profiles.gpu(gpu.name)
    speed = SpeedModel(fam, gp, dtype_bytes(dtype), settings)
    on_gpu = gpu.is_accelerator
    available = gpu.available_bytes if on_gpu else 0
    budget = available - settings.reserve_bytes
    sc = fam.spatial_compression
    overlap = (settings.tile_overlap_px // sc) * sc
    peak_src = f"{job.family} memory model: {fam.memory.source}"
    shown_budget = max(0, budget)  # memory under the reserve is "no budget", never a negative number

    def with_learned(plan: Plan) -> Plan:
        if learned is None:
            return plan
        factor, entry = learned.factor(gpu.name, job.family, learn_path(plan), job_voxels(job))
        if entry is None:
            return plan
        wide = " (card-wide)" if entry.family != job.family else ""
        est = dataclasses.replace(plan.estimate, seconds=plan.estimate.seconds * factor,
                                  seconds_source=plan.estimate.seconds_source
                                  + f"; x{factor:.2f} learned from {entry.count} decodes{wide}")
        return dataclasses.replace(plan, estimate=est)

    def local(path: str, *, tile: int | None = None, chunk: int | None = None, slice_batch: bool = False) -> Plan:
        ov = overlap if tile is not None else 0
        fov = min(fam.tiling.frame_chunk_overlap, chunk - 1) if chunk is not None else 0
        secs = local_seconds(job, fam, speed, tile_px=tile, overlap_px=ov, frame_chunk=chunk,
                             frame_overlap=fov, slice_batch=slice_batch)
        est = Estimate(
            peak_bytes=peak_bytes(job, fam, tile_px=tile, overlap_px=ov, frame_chunk=chunk, slice_batch=slice_batch),
            seconds=secs, peak_source=peak_src, seconds_source=speed.source)
        return with_learned(Plan(path=path, estimate=est, dtype=dtype, tile_px=tile, overlap_px=ov,  # type: ignore[arg-type]
                                 frame_chunk=chunk, frame_overlap=fov, slice_batch=slice_batch))

    sched_mem = exact_schedule(fam, offload=False) if not fam.video else None
    sched_off = exact_schedule(fam, offload=True) if not fam.video else None
    moves: dict[int, list[tuple[int, int]]] = {}  # offloaded plans' bytes moved per buffer, by tile

    def exact(tile: int) -> Plan:
        t = fam.timing
        est = Estimate(
            peak_bytes=exact_peak_bytes(job, fam, tile), seconds=exact_seconds(job, fam, speed, tile, sched=sched_mem),
            peak_source=f"{job.family} exact-tiling model: analytic buffers + tile, x{fam.memory.exact_margin:g} margin",
            seconds_source=f"{speed.source}; exact tiling x{t.exact_time_factor:g} + {t.exact_passes} passes x tiles (assumed)")
        return with_learned(Plan(path="tiled", estimate=est, dtype=dtype, tile_px=tile, slice_batch=True,
                                 groupnorm="exact"))

    def offloaded(tile: int, room: float) -> Plan | None:
        """Exact tiles whose whole-image buffers get what ``room`` bytes of device memory leave after the
        tile; None when that is all of them (the in-memory exact plan covers it)."""
        if tile not in moves and sched_off is not None:
            moves[tile] = passes.traffic(sched_off, job.height // sc, job.width // sc, tile)
        device_budget, c = offload_costs(job, fam, tile, room, sched=sched_off, moves=moves.get(tile))
        if c.host_bytes == 0:
            return None
        secs, copy_s, copy_src = offload_seconds(job, fam, speed, tile, c, gp, sched=sched_mem)
        est = Estimate(
            peak_bytes=offload_peak_bytes(job, fam, tile, c), seconds=secs,
            peak_source=(f"{job.family} exact-tiling schedule: {_gib(c.device_bytes)} of whole-image buffers on the "
                         f"GPU, {_gib(c.host_bytes)} in host memory, + tile, x{fam.memory.exact_margin:g} margin"),
            seconds_source=f"{speed.source}; exact tiling compute (assumed factors); {copy_src}",
            host_bytes=c.host_bytes, transfer_bytes=c.moved_bytes, transfer_seconds=copy_s)
        return with_learned(Plan(path="tiled", estimate=est, dtype=dtype, tile_px=tile, slice_batch=True,
                                 groupnorm="exact", device_budget=device_budget))

    # ---- candidates -------------------------------------------------------------------------
    gpu_plans: list[Plan] = []
    chunk = fam.tiling.frame_chunk
    lat_frames = latent_frames(job, fam)
    use_chunks = fam.video and chunk is not None and lat_frames > chunk
    gpu_plans.append(local("full"))
    if job.batch > 1:
        gpu_plans.append(local("full", slice_batch=True))
    if use_chunks:
        gpu_plans.append(local("tiled", chunk=chunk, slice_batch=True))
    can_exact = not fam.video and fam.memory.exact_buffer_elements is not None
    gn = settings.tile_groupnorm
    seen: set[int] = set()
    for cap in _tile_caps(job, fam, settings):
        if cap <= 2 * overlap:
            continue  # the overlap would swallow the tile
        tile = _actual_tile(job, fam, cap, overlap)
        if tile in seen or tile >= max(job.width, job.height):
            continue
        seen.add(tile)
        if gn in ("auto", "local") or not can_exact:
            gpu_plans.append(local("tiled", tile=tile, chunk=chunk if use_chunks else None, slice_batch=True))
    exact_sizes: list[int] = []
    if can_exact and gn != "local":
        for cap in _tile_caps(job, fam, settings):
            ty, tx = exact_tiles(job, fam, cap)
            tile = max(max(s for _, s in ty), max(s for _, s in tx))
            if tile not in exact_sizes and tile < max(job.width, job.height):
                exact_sizes.append(tile)
        if gn != "offload":
            gpu_plans += [exact(tile) for tile in exact_sizes]
    can_offload = (can_exact and gn != "local" and fam.decoder is not None and on_gpu
                   and fam.memory.exact_offload_tile_elements is not None and bool(exact_sizes))
    sizes = _offload_sizes_to_cost(gpu_plans, exact_sizes, budget, settings) if can_offload else []
    if sizes:
        # the budget's worth of buffers on the GPU at a few tile sizes, and everything in host memory at the
        # smallest (device memory bounded by the tile: the lossless plan of last resort)
        for tile in sizes:
            p = offloaded(tile, budget)
            if p is not None:
                gpu_plans.append(p)
        p = offloaded(exact_sizes[0], 0)
        if p is not None and all(q.estimate.peak_bytes != p.estimate.peak_bytes or q.tile_px != p.tile_px
                                 for q in gpu_plans):
            gpu_plans.append(p)
    if use_chunks and chunk is not None:
        # Shorter temporal chunks before giving up on the GPU (whole frames, then the smallest tile).
        # Not measured: they are never estimated faster than the VAE's default chunk (more launches,
        # smaller kernels), so they are only chosen when the default chunk does not fit.
        by_tile = {p.tile_px: p for p in gpu_plans if p.frame_chunk == chunk}
        smallest_tile = min((p.tile_px for p in gpu_plans if p.tile_px is not None), default=None)
        short = chunk // 2
        while short >= 1:
            for t_px in (None, smallest_tile) if smallest_tile is not None else (None,):
                p = local("tiled", tile=t_px, chunk=short, slice_batch=True)
                ref = by_tile.get(t_px)
                if ref is not None and p.estimate.seconds <= ref.estimate.seconds:
                    est = dataclasses.replace(p.estimate, seconds=ref.estimate.seconds * 1.05,
                                              seconds_source=p.estimate.seconds_source
                                              + f"; shorter chunks: at least the {chunk}-latent-frame chunks' time")
                    p = dataclasses.replace(p, estimate=est)
                gpu_plans.append(p)
            short //= 2

    options: list[Option] = []
    feasible: list[Plan] = []
    host_room = None if gpu.host_available_bytes is None else gpu.host_available_bytes - settings.host_reserve_bytes

    def host_ok(p: Plan) -> bool:
        return not p.estimate.host_bytes or (host_room is not None and p.estimate.host_bytes <= host_room)

    for p in gpu_plans:
        host = p.estimate.host_bytes
        if not on_gpu:
            options.append(Option(p, False, f"no GPU ({gpu.note or gpu.source})"))
        elif p.estimate.peak_bytes > budget:
            options.append(Option(p, False, f"needs {_gib(p.estimate.peak_bytes)} > {_gib(shown_budget)} budget"))
        elif not host_ok(p):
            room = "unknown (no psutil, no /proc/meminfo)" if host_room is None else \
                f"{_gib(max(0, host_room))} available - {_gib(settings.host_reserve_bytes)} reserve"
            options.append(Option(p, False, f"needs {_gib(host)} of host memory > {room}"))
        else:
            feasible.append(p)
            extra = f", {_gib(host)} in host memory" if host else ""
            options.append(Option(p, True, f"needs {_gib(p.estimate.peak_bytes)} <= {_gib(shown_budget)} budget{extra}"))

    remote: Plan | None = None
    # a canary verdict for the endpoint replaces the name-based custom-VAE rule (proven, not guessed)
    job_for_url = dataclasses.replace(job, custom_vae=False) if identity is not None else job
    url, remote_why = endpoint_for(job_for_url, fam, settings)
    if identity is not None and url != identity.endpoint:
        url, remote_why = endpoint_for(job, fam, settings)  # the verdict is about another endpoint
    gated = url
    url, remote_why = identity_gate(url, remote_why, identity, settings)
    refused_by_identity = gated is not None and url is None
    if url is not None:
        net = _net_for(network, url)
        if not net.available:
            remote_why = f"endpoint {url} unavailable ({net.note or 'circuit open'})"
        else:
            best: tuple[float, Plan] | None = None
            for fmt in _formats(job, fam, settings):
                est = remote_estimate(job, fam, net, fmt)
                plan = Plan(path="remote", estimate=est, dtype=dtype, endpoint=url, response_format=fmt)
                # a lossy format must win clearly (20%) over a lossless one to be chosen
                score = est.seconds * (1.25 if fmt in LOSSY else 1.0)
                if best is None or score < best[0]:
                    best = (score, plan)
            assert best is not None
            remote = best[1]
            options.append(Option(remote, True, f"{remote_why}; {remote.response_format} est. {remote.estimate.seconds:.2f} s"))
    cpu_plans = _cpu_plans(job, fam, settings, overlap) if settings.allow_cpu else []
    cpu: Plan | None = cpu_plans[0] if cpu_plans else None
    options += [Option(p, True, "last resort" if p is cpu else "last resort, host memory bounded by the tile")
                for p in cpu_plans]

    has_exact = any(p.path == "full" or p.groupnorm == "exact" for p in feasible)
    penalise_local = settings.tile_groupnorm == "auto" and has_exact and not fam.video

    def rank(p: Plan) -> tuple[float, float]:
        # seconds first (local tiles x exact_tolerance while an exact plan fits); ties: the larger tile
        secs = p.estimate.seconds
        if penalise_local and p.path == "tiled" and p.groupnorm == "local":
            secs *= settings.exact_tolerance
        return (secs, -(p.tile_px or math.inf) if p.path != "remote" else 0.0)

    # ---- choose -----------------------------------------------------------------------------
    pool = feasible + ([remote] if remote is not None else [])
    reason_prefix = ""
    chosen: Plan | None = None
    full = gpu_plans[0]
    if settings.mode == "full":
        fulls = [p for p in feasible if p.path == "full"]
        if fulls:
            chosen = min(fulls, key=rank)
        else:
            reason_prefix = f"full requested but needs {_gib(full.estimate.peak_bytes)} > {_gib(shown_budget)}; "
    elif settings.mode == "tiled":
        tiled = [p for p in feasible if p.path == "tiled"]
        if tiled:
            chosen = min(tiled, key=lambda p: (p.groupnorm != "exact", p.offloaded, -(p.tile_px or 0),
                                               p.estimate.seconds))
        else:
            reason_prefix = "tiled requested but no tile fits; "
    elif settings.mode == "remote":
        if remote is not None:
            chosen = remote
        else:
            reason_prefix = f"remote requested but {remote_why}; "
    if chosen is None and pool:
        chosen = min(pool, key=rank)
    squeezed = False
    if chosen is None and on_gpu:
        # nothing fits the budget: the smallest plan may still fit inside the reserve
        smallest = min((p for p in gpu_plans if host_ok(p)), key=lambda p: p.estimate.peak_bytes)
        if smallest.estimate.peak_bytes <= available:
            chosen, squeezed = smallest, True
    if chosen is None:
        if cpu is None:
            raise ProfileError("nothing can decode this job: no GPU plan fits, remote is unavailable and "
                               "allow_cpu is off; enable remote or allow_cpu", key_path="allow_cpu", value=False)
        chosen = cpu

    # ---- fallbacks --------------------------------------------------------------------------
    chain: list[Plan] = [chosen]
    last_peak = chosen.estimate.peak_bytes if chosen.path in ("full", "tiled") else math.inf
    local_pool = sorted((p for p in feasible if p is not chosen), key=rank)
    for p in local_pool:
        if p.estimate.peak_bytes <= 0.75 * last_peak and len(chain) < 4:
            chain.append(p)
            last_peak = p.estimate.peak_bytes
    smallest_fit = min(feasible, key=lambda p: p.estimate.peak_bytes) if feasible else None
    if smallest_fit is not None and smallest_fit not in chain and smallest_fit.estimate.peak_bytes < last_peak:
        chain.append(smallest_fit)
    if remote is not None and remote not in chain:
        # remote goes before the first local fallback slower than it
        pos = next((i for i, p in enumerate(chain) if i > 0 and p.estimate.seconds > remote.estimate.seconds), len(chain))
        chain.insert(pos, remote)
    chain += [p for p in cpu_plans if p not in chain]

    # ---- reason -----------------------------------------------------------------------------
    reason = reason_prefix + _reason(chosen, squeezed=squeezed, full=full, budget=budget, available=available,
                                     feasible=feasible, gpu_plans=gpu_plans, rank=rank, remote_why=remote_why,
                                     remote=remote, on_gpu=on_gpu, fam=fam, job=job, settings=settings,
                                     can_exact=can_exact)
    if refused_by_identity and chosen.path != "cpu":  # the cpu reason names remote_why already
        reason += f"; remote: {remote_why}"
    if fam.inferred:
        reason += f"; {fam.inferred}"
    if not on_gpu:
        reason += f" [no GPU: {gpu.note or gpu.source}]"
    elif budget < 0:  # said as what it is, never as a negative budget
        reason += (f" [{_gib(available)} available ({_gib(gpu.free_bytes)} free + {_gib(gpu.torch_reusable_bytes)} "
                   f"cache) is under the {_gib(settings.reserve_bytes)} reserve: no budget]")
    else:
        reason += (f" [{_gib(available)} available ({_gib(gpu.free_bytes)} free + {_gib(gpu.torch_reusable_bytes)} "
                   f"cache) - {_gib(settings.reserve_bytes)} reserve = {_gib(budget)} budget]")
    summary = _summary(chosen, squeezed=squeezed, full=full, budget=budget, available=available, on_gpu=on_gpu,
                       requested=settings.mode == chosen.path)
    if fam.inferred:
        summary += ", VAE matches no family: local only"

    return Decision(plans=tuple(chain), reason=reason, options=tuple(options), gpu=gpu, job=job,
                    available_bytes=available, budget_bytes=budget, gpu_profile=gp.name if gp else None,
                    sources=profiles.sources, summary=summary, identity=identity)


def _reason(c: Plan, *, squeezed: bool, full: Plan, budget: int, available: int, feasible: list[Plan],
            gpu_plans: list[Plan], rank: Callable[[Plan], tuple[float, float]], remote_why: str,
            remote: Plan | None, on_gpu: bool, fam: Family, job: DecodeJob, settings: DecodeSettings,
            can_exact: bool) -> str:
    """Why ``c`` was chosen, with the memory arithmetic; every comparison it states holds."""
    need, full_need = c.estimate.peak_bytes, full.estimate.peak_bytes
    budget = max(0, budget)  # memory under the reserve is "no budget", never a negative number
    if squeezed:
        return (f"squeezed into the reserve: {c.label} needs {_gib(need)} > {_gib(budget)} budget, "
                f"<= {_gib(available)} available; nothing fits the budget")
    if c.path == "full" and not c.slice_batch:
        return f"full fits: needs {_gib(need)} of {_gib(budget)}"
    if c.path == "full":
        return (f"batch of {job.batch} needs {_gib(full_need)} > {_gib(budget)}; "
                f"one at a time needs {_gib(need)}")
    if c.path == "tiled":
        if full_need <= budget:
            why = "requested" if settings.mode == "tiled" else "estimated faster than full"
            reason = f"{c.label} {why}: needs {_gib(need)} of {_gib(budget)}; full would fit too ({_gib(full_need)})"
        else:
            reason = f"{c.label}: needs {_gib(need)} of {_gib(budget)}; full needs {_gib(full_need)} > {_gib(budget)}"
        if c.groupnorm == "exact" or not fam.video:
            reason += _tiled_reason(c, gpu_plans, feasible, settings)
        return reason
    if c.path == "remote":
        local_best = min(feasible, key=rank) if feasible else None
        vs = (f"faster than {local_best.label} ({local_best.estimate.seconds:.2f} s)" if local_best
              else "no GPU" if not on_gpu else "nothing local fits" + (f" {_gib(budget)}" if budget > 0 else ""))
        return f"remote {c.response_format} est. {c.estimate.seconds:.2f} s, {vs}"
    why = "no GPU" if not on_gpu else f"no GPU plan fits {_gib(available)}"
    if on_gpu and settings.tile_groupnorm in ("exact", "offload") and can_exact:
        why += f" (local tiles are off: tile_groupnorm={settings.tile_groupnorm})"
    if settings.mode == "remote" and remote is None:  # the "remote requested but ..." prefix said why already
        return f"{describe_plan(c)}: {why}"
    return f"{describe_plan(c)}: {why}; remote: {remote_why if remote is None else 'failed before'}"


def _summary(c: Plan, *, squeezed: bool, full: Plan, budget: int, available: int, on_gpu: bool,
             requested: bool) -> str:
    """The infotext clause for ``c`` when it runs: short, and every comparison it states holds."""
    need, full_need = c.estimate.peak_bytes, full.estimate.peak_bytes
    budget = max(0, budget)
    if squeezed:
        return f"{c.label}, squeezed into the reserve: {_gib(need)} > {_gib(budget)} budget"
    if c.path == "full":
        return f"{c.label}, {_gib(need)} of {_gib(budget)} budget"
    if c.path == "tiled":
        if full_need > budget:
            return f"{c.label}, {_gib(budget)} budget < {_gib(full_need)} full"
        return f"{c.label}, {'as requested' if requested else 'faster than full'}, {_gib(need)} of {_gib(budget)} budget"
    if c.path == "remote":
        return f"remote {c.response_format}"
    return f"{describe_plan(c)}, " + ("no GPU" if not on_gpu else f"no GPU plan fits {_gib(available)} available")
