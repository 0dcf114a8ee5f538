"""``decide(job, gpu, profiles, settings, network=None) -> Decision``: a pure function.

Rules (each is tested):
- Candidates: full (whole batch), full item by item (batch > 1), temporal chunks (video), tiled at
  every tile cap from the family's smallest up to the image size -- for image families with an
  exact-tiling model both ``exact`` (whole-image GroupNorm statistics; output = a full decode) and
  ``local`` (per-tile statistics; least memory) --, remote (when allowed and an endpoint serves this
  family's VAE), cpu.
- ``tile_groupnorm="auto"``: while a full or exact-tiled plan fits, a local-tiled plan is chosen
  only when it is estimated ``exact_tolerance`` (1.2x) faster; ``exact``: no local-tiled plans;
  ``local``: no exact-tiled plans.
- A GPU plan is feasible when its estimated peak <= available - reserve
  (available = NVML free + torch's reusable cache).
- ``auto`` chooses the feasible plan with the smallest estimated seconds (ties: the larger tile);
  see ``tile_groupnorm`` for exact vs local tiles.
  Forced modes put their path first when it is feasible and otherwise say why and fall back to auto.
- Never a GPU plan first whose estimate exceeds what is available. When nothing fits the budget,
  the smallest tile is tried first only if it fits inside the reserve; else remote, else cpu.
- Fallbacks: after a GPU plan, plans that need at least a quarter less memory (so an OOM retry can
  succeed), remote by speed, and cpu last.
- Learned timings (``learned=``, see :mod:`policy.learned`) scale local plans' seconds, never memory.
- Identity (``identity=``, a canary verdict from ``extension.identity``): for the endpoint it names, it
  replaces the name-based custom-VAE rule: ``same`` allows remote, ``other`` ("endpoint serves another
  VAE") and ``unverified`` refuse it unless ``allow_remote_custom_vae``. Without a verdict (no local VAE to
  compare, ``explain`` without ``--vae``) the name-based rule (``job.custom_vae``) applies.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from hybrid_vae.policy.errors import ProfileError
from hybrid_vae.policy.estimate import (
    SpeedModel,
    check_job,
    cpu_seconds,
    decode_dtype,
    exact_peak_bytes,
    exact_seconds,
    exact_tiles,
    latent_frames,
    local_seconds,
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
)
from hybrid_vae.policy.profiles import Family, Profiles, dtype_bytes

LOSSY = frozenset({"jpg", "mp4"})


def endpoint_for(job: DecodeJob, fam: Family, settings: DecodeSettings) -> tuple[str | None, str]:
    """The endpoint URL for this job, or None and the reason remote is not possible."""
    if not settings.allow_remote:
        return None, "remote decode is off (opt-in: the endpoint sees the images)"
    if job.custom_vae and not settings.allow_remote_custom_vae:
        return None, f"custom VAE {job.vae_id or ''} differs from the endpoint's; remote not allowed for it".replace("  ", " ")
    url = settings.endpoints.get(job.family)
    if url:
        return url, "configured endpoint"
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

    def exact(tile: int) -> Plan:
        t = fam.timing
        est = Estimate(
            peak_bytes=exact_peak_bytes(job, fam, tile), seconds=exact_seconds(job, fam, speed, tile),
            peak_source=f"{job.family} exact-tiling model: analytic buffers + tile, x{fam.memory.exact_margin:g} margin",
            seconds_source=f"{speed.source}; exact tiling x{t.exact_time_factor:g} + {t.exact_passes} passes x tiles (assumed)")
        return with_learned(Plan(path="tiled", estimate=est, dtype=dtype, tile_px=tile, slice_batch=True,
                                 groupnorm="exact"))

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
    seen: set[int] = set()
    for cap in _tile_caps(job, fam, settings):
        if cap <= 2 * overlap:
            continue  # the overlap would swallow the tile
        tile = _actual_tile(job, fam, cap, overlap)
        if tile in seen or tile >= max(job.width, job.height):
            continue
        seen.add(tile)
        if settings.tile_groupnorm != "exact" or not can_exact:
            gpu_plans.append(local("tiled", tile=tile, chunk=chunk if use_chunks else None, slice_batch=True))
    if can_exact and settings.tile_groupnorm != "local":
        seen_exact: set[int] = set()
        for cap in _tile_caps(job, fam, settings):
            ty, tx = exact_tiles(job, fam, cap)
            tile = max(max(s for _, s in ty), max(s for _, s in tx))
            if tile in seen_exact or tile >= max(job.width, job.height):
                continue
            seen_exact.add(tile)
            gpu_plans.append(exact(tile))
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
                                              + f"; shorter chunks: at least the {chunk}-frame chunks' time")
                    p = dataclasses.replace(p, estimate=est)
                gpu_plans.append(p)
            short //= 2

    options: list[Option] = []
    feasible: list[Plan] = []
    for p in gpu_plans:
        if not on_gpu:
            options.append(Option(p, False, f"no GPU ({gpu.note or gpu.source})"))
        elif p.estimate.peak_bytes <= budget:
            feasible.append(p)
            options.append(Option(p, True, f"needs {_gib(p.estimate.peak_bytes)} <= {_gib(budget)} budget"))
        else:
            options.append(Option(p, False, f"needs {_gib(p.estimate.peak_bytes)} > {_gib(budget)} budget"))

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
    cpu: Plan | None = None
    if settings.allow_cpu:
        cpu = Plan(path="cpu", dtype="float32",
                   estimate=Estimate(peak_bytes=0, seconds=cpu_seconds(job, fam), peak_source="cpu: host memory",
                                     seconds_source="generic CPU model (assumed)"))
        options.append(Option(cpu, True, "last resort"))

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
            reason_prefix = f"full requested but needs {_gib(full.estimate.peak_bytes)} > {_gib(budget)}; "
    elif settings.mode == "tiled":
        tiled = [p for p in feasible if p.path == "tiled"]
        if tiled:
            chosen = min(tiled, key=lambda p: (p.groupnorm != "exact", -(p.tile_px or 0), p.estimate.seconds))
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
        smallest = min(gpu_plans, key=lambda p: p.estimate.peak_bytes)
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
    if cpu is not None and cpu not in chain:
        chain.append(cpu)

    # ---- reason -----------------------------------------------------------------------------
    avail_txt = (f"{_gib(available)} available ({_gib(gpu.free_bytes)} free + {_gib(gpu.torch_reusable_bytes)} cache)"
                 f" - {_gib(settings.reserve_bytes)} reserve = {_gib(budget)}")
    c = chosen
    if c.path == "full" and squeezed:
        reason = (f"squeezed into the reserve: {c.label} needs {_gib(c.estimate.peak_bytes)} > {_gib(budget)} budget, "
                  f"<= {_gib(available)} available; nothing fits the budget")
    elif c.path == "full" and not c.slice_batch:
        reason = f"full fits: needs {_gib(c.estimate.peak_bytes)} of {_gib(budget)}"
    elif c.path == "full":
        reason = (f"batch of {job.batch} needs {_gib(full.estimate.peak_bytes)} > {_gib(budget)}; "
                  f"one at a time needs {_gib(c.estimate.peak_bytes)}")
    elif c.path == "tiled":
        what = "squeezed into the reserve: " if squeezed else ""
        reason = (f"{what}{c.label}: {_gib(c.estimate.peak_bytes)} fits {_gib(budget)}, "
                  f"full needs {_gib(full.estimate.peak_bytes)}")
        exacts = [p for p in gpu_plans if p.groupnorm == "exact"]
        if c.groupnorm == "exact":
            reason += "; output equals a full decode"
        elif exacts and not fam.video:
            fitting = [p for p in feasible if p.groupnorm == "exact"]
            if fitting:
                quickest = min(fitting, key=lambda p: p.estimate.seconds)
                reason += (f"; {quickest.label} fits but is estimated {quickest.estimate.seconds:.2f} s, over "
                           f"{settings.exact_tolerance:g}x this plan's, so tile colours may differ from a full decode")
            else:
                least = min(exacts, key=lambda p: p.estimate.peak_bytes)
                reason += (f"; exact tiling needs {_gib(least.estimate.peak_bytes)}, so tile colours may differ "
                           f"from a full decode")
    elif c.path == "remote":
        local_best = min(feasible, key=rank) if feasible else None
        vs = (f"faster than {local_best.label} ({local_best.estimate.seconds:.2f} s)" if local_best
              else f"nothing local fits {_gib(budget)}")
        reason = f"remote {c.response_format} est. {c.estimate.seconds:.2f} s, {vs}"
    else:
        why = "no GPU" if not on_gpu else f"no GPU plan fits {_gib(available)}"
        if on_gpu and settings.tile_groupnorm == "exact" and can_exact:
            why += " (local tiles are off: tile_groupnorm=exact)"
        reason = f"cpu: {why}; remote: {remote_why if remote is None else 'failed before'}"
    if refused_by_identity and c.path != "cpu":  # the cpu reason names remote_why already
        reason += f"; remote: {remote_why}"
    reason = reason_prefix + reason + f" [{avail_txt}]"

    return Decision(plans=tuple(chain), reason=reason, options=tuple(options), gpu=gpu, job=job,
                    available_bytes=available, budget_bytes=budget, gpu_profile=gp.name if gp else None,
                    sources=profiles.sources, identity=identity)
