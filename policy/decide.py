"""``decide(job, gpu, profiles, settings, network=None) -> Decision``: a pure function.

Rules (each is tested):
- Candidates: full (whole batch), full item by item (batch > 1), temporal chunks (video), tiled at
  every tile cap from the family's smallest up to the image size (and, only when none of these fits, down to
  the family's ``last_resort_tile_px``: below the measured tiles) -- for image families with an
  exact-tiling model both ``exact`` (whole-image GroupNorm statistics; output = a full decode) and
  ``local`` (per-tile statistics; least memory) --, exact tiles whose whole-image buffers live partly in
  host memory ("offloaded", label ``exact+host``: the buffers get the device memory the tile leaves, the
  rest goes to the host; one of them with every buffer in host memory at the smallest tile), remote
  (when allowed and an endpoint serves this family's VAE), cpu.
- ``tile_groupnorm="auto"``: lossless plans first: while a full, exact or offloaded exact plan fits, a
  local-tiled plan is chosen only when it is estimated ``exact_tolerance`` faster; ``exact``: no local
  tiles; ``offload``: tiled plans are offloaded exact ones only; ``local``: no exact tiles.
- Video under ``exact``/``offload`` (on a GPU): Wan's tiled plans are exact halo tiles; HunyuanVideo gets exact
  3-D tiles (:mod:`policy.video_exact`) with every whole-video buffer on the GPU (``exact`` only, where they fit
  the budget), with those that fit the budget beside the tile on the GPU and the rest in host memory, and with
  all of them in host memory (where it holds them), ranked before diffusers' chunks and tiles, which stay
  as the fallback before the CPU (and go first where no exact plan fits). ``auto`` plans no exact video tiles.
- An offloaded plan also needs its host buffers to fit the probed available host memory minus
  ``host_reserve_bytes`` (unknown host memory: no offloaded plans).
- A GPU plan is feasible when its estimated peak <= available - reserve
  (available = NVML free + torch's reusable cache less its fragmented part, ``GpuState.available_bytes``).
- ``auto`` chooses the feasible plan with the smallest estimated seconds (ties: the larger tile);
  see ``tile_groupnorm`` for exact vs local tiles.
  Forced modes put their path first when it is feasible and otherwise say why and fall back to auto.
- ``tight_speedup`` (auto): a lossless GPU plan (full or exact tiles) that fits what is available but not the
  budget goes first when estimated that many times faster than the plan the budget chose, which follows it.
- When nothing fits the budget, the smallest GPU plan goes first if it fits inside the reserve; else remote;
  else the CPU, except that the smallest GPU plan still goes first when its estimate is within ``NEAR_FIT``
  (1.25x) of what is available and the CPU is estimated 10x slower, does not fit host memory or is off
  (``near_fit``: an OOM costs one attempt; the CPU's hours or a swapping host cost more). No other GPU plan
  goes first with an estimate above what is available.
- Fallbacks: after a GPU plan, plans that need at least a quarter less memory (so an OOM retry can
  succeed), remote by speed, and cpu last: one item at a time (video: in the VAE's temporal chunks), then,
  when the frame is larger than the smallest tile, cpu in local tiles (host memory bounded by the tile; video:
  also one latent frame at a time). CPU plans carry their host memory (the float32 GPU estimate x 0.8,
  measured); those that fit the host go first, then the smallest GPU plan, then those that do not fit.
- Learned factors (``learned=``, see :mod:`policy.learned`) scale local plans' seconds, and their peaks where this
  card has needed more than estimated (never less: a learned peak only raises an estimate).
- Identity (``identity=``, a canary verdict from ``extension.identity``): for the endpoint it names, it
  replaces the name-based custom-VAE rule: ``same`` allows remote, ``other`` ("endpoint serves another
  VAE") and ``unverified`` refuse it unless ``allow_remote_custom_vae``. Without a verdict (no local VAE to
  compare, ``explain`` without ``--vae``) the name-based rule (``job.custom_vae``) applies.
- Why: a :data:`policy.reasons.ReasonCode` and its parameters (``Decision.reason_code``/``reason_params``);
  the reason sentence and the infotext clause are rendered from them by :mod:`policy.reasons`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from hybrid_vae.policy import passes
from hybrid_vae.policy.errors import ProfileError
from hybrid_vae.policy.estimate import (
    CPU_EXACT_FACTOR,
    CPU_HOST_PER_GPU_BYTE,
    CPU_SECONDS_PER_VOXEL,
    SpeedModel,
    check_job,
    cpu_exact_host_bytes,
    cpu_host_bytes,
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
    Path_,
    Plan,
    ResponseFormat,
    split_endpoints,
)
from hybrid_vae.policy.profiles import Dtype, Family, GpuProfile, Profiles, dtype_bytes
from hybrid_vae.policy.reasons import Reason, ReasonCode, ReasonValue, UnmetRequest, remote_text
from hybrid_vae.policy.tiles import halo_region
from hybrid_vae.policy.video_exact import video_exact_counts, video_exact_estimate, video_exact_room

LOSSY = frozenset({"jpg", "mp4"})


def remote_route(job: DecodeJob, fam: Family, settings: DecodeSettings) -> tuple[str | None, dict[str, ReasonValue]]:
    """The endpoint URL for this job (or None) and why, as ``remote_*`` reason parameters (see
    :mod:`policy.reasons`; ``remote_code`` says which rule decided)."""
    if not settings.allow_remote:
        return None, {"remote_code": "remote_off"}
    if fam.inferred:
        return None, {"remote_code": "inferred_family"}
    if job.custom_vae and not settings.allow_remote_custom_vae:
        return None, {"remote_code": "custom_vae", "remote_vae_id": job.vae_id or ""}
    url = settings.endpoints.get(job.family)
    if url:
        n = len(split_endpoints(url))
        return url, {"remote_code": "configured"} if n == 1 else {"remote_code": "pool", "remote_pool_size": n}
    if settings.use_builtin_endpoints and fam.endpoints:
        ep = fam.endpoints[0]
        return ep.url, {"remote_code": "builtin", "remote_provider": ep.provider, "remote_vae": ep.vae}
    return None, {"remote_code": "no_endpoint", "family": job.family}


def endpoint_for(job: DecodeJob, fam: Family, settings: DecodeSettings) -> tuple[str | None, str]:
    """The endpoint URL for this job, or None and the reason remote is not possible (:func:`remote_route`,
    rendered by :func:`policy.reasons.remote_text`)."""
    url, route = remote_route(job, fam, settings)
    return url, remote_text(route)


def identity_gate(url: str | None, route: Mapping[str, ReasonValue], identity: EndpointIdentity | None,
                  settings: DecodeSettings) -> tuple[str | None, dict[str, ReasonValue]]:
    """Apply a canary verdict to the endpoint :func:`remote_route` chose: ``(url or None, route)``, where the
    route's parameters gain ``remote_identity`` (``same`` / ``allowed`` / ``refused``) and its text.

    A verdict about another URL (or none) changes nothing. ``same``: remote allowed; ``other`` /
    ``unverified``: refused unless ``settings.allow_remote_custom_vae`` (then allowed, and the reason says so).
    """
    if url is None or identity is None or identity.endpoint != url:
        return url, dict(route)
    gate = "same" if identity.verdict == "same" else "allowed" if settings.allow_remote_custom_vae else "refused"
    return (None if gate == "refused" else url), {**route, "remote_identity": gate,
                                                  "remote_identity_text": identity.text}


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
    ``cpu exact tiles 512px``, ``cpu tiled 256px/64``."""
    if plan.path != "cpu":
        return plan.label
    if plan.groupnorm == "exact":
        return f"cpu exact tiles {plan.tile_px}px"
    chunks = f", {plan.frame_chunk}-latent-frame chunks" if plan.frame_chunk is not None else ""
    if plan.tile_px is not None:
        return f"cpu tiled {plan.tile_px}px/{plan.overlap_px}{chunks}"
    if chunks:
        return f"cpu full frames{chunks}"
    return "cpu full decode" + (" (item by item)" if plan.slice_batch else "")


def _cpu_plans(job: DecodeJob, fam: Family, settings: DecodeSettings, overlap: int) -> list[Plan]:
    """The CPU plans, last in every chain. The first decodes one item at a time (video: in the VAE's temporal
    chunks); for a frame larger than the smallest tile, images then in exact tiles (output equals a full decode;
    whole-image buffers in host memory, about half a full decode's; faster than local tiles on the CPU,
    1.20x against 1.65x a full decode measured; not with ``tile_groupnorm="local"``), then in local tiles, so the
    host memory is bounded by the tile (video: in those tiles one latent frame at a time too, the least host
    memory): a float32 CPU decode needs about 3.8 KB of host memory per output pixel (962 MiB at 512 px measured
    by bench/cpu_memory.py, so ~15 GiB at 2048 px), more than many hosts have free. Each plan's
    ``estimate.host_bytes`` is its host memory (:func:`policy.estimate.cpu_host_bytes`,
    :func:`~policy.estimate.cpu_exact_host_bytes`)."""
    secs = cpu_seconds(job, fam)
    chunk = fam.tiling.frame_chunk
    chunk = chunk if fam.video and chunk is not None and latent_frames(job, fam) > chunk else None
    fov = min(fam.tiling.frame_chunk_overlap, chunk - 1) if chunk is not None else 0
    slice_batch = job.batch > 1
    est = Estimate(peak_bytes=0, seconds=secs,
                   peak_source=f"cpu: host memory = the float32 GPU estimate x {CPU_HOST_PER_GPU_BYTE:g} (measured on "
                               "the SD and HunyuanVideo decoders)",
                   seconds_source=f"generic CPU model (assumed): {CPU_SECONDS_PER_VOXEL:g} s per output voxel x "
                                  f"{fam.timing.relative_cost:g}, float32; the same for every family on the SD "
                                  "decoder (sd15, sdxl, sd3, flux)",
                   host_bytes=cpu_host_bytes(job, fam, tile_px=None, overlap_px=0, frame_chunk=chunk,
                                             slice_batch=slice_batch))
    plans = [Plan(path="cpu", dtype="float32", estimate=est, slice_batch=slice_batch, frame_chunk=chunk,
                  frame_overlap=fov)]
    caps = [c for c in _tile_caps(job, fam, settings) if c > 2 * overlap]
    tile = _actual_tile(job, fam, caps[0], overlap) if caps else None
    if caps and not fam.video and fam.memory.exact_buffer_elements is not None and settings.tile_groupnorm != "local":
        # the largest tile up to 512 px: fewer steps than the smallest, a working set small beside the buffers
        ey, ex = exact_tiles(job, fam, max(c for c in caps if c <= max(512, caps[0])))
        etile = max(max(s for _, s in ey), max(s for _, s in ex))
        if etile < max(job.width, job.height):
            est_e = dataclasses.replace(
                est, seconds=secs * CPU_EXACT_FACTOR, host_bytes=cpu_exact_host_bytes(job, fam, etile),
                peak_source=f"cpu exact tiles: host memory = the exact-tiling model in float32 ({fam.memory.source})",
                seconds_source=f"{est.seconds_source}; x{CPU_EXACT_FACTOR:g} for exact tiles (measured on the CPU)")
            plans.append(Plan(path="cpu", dtype="float32", estimate=est_e, tile_px=etile, slice_batch=True,
                              groupnorm="exact"))
    if tile is not None and tile < max(job.width, job.height):
        sc = fam.spatial_compression
        ty, tx = spatial_tiles(job, fam, tile, overlap)
        grow = sum(s for _, s in ty) * sum(s for _, s in tx) * sc * sc / (job.width * job.height)
        est_t = dataclasses.replace(est, seconds=secs * grow,
                                    seconds_source=f"{est.seconds_source}; x{grow:.2f} for the tiles' overlaps",
                                    host_bytes=cpu_host_bytes(job, fam, tile_px=tile, overlap_px=overlap,
                                                              frame_chunk=chunk, slice_batch=True))
        plans.append(Plan(path="cpu", dtype="float32", estimate=est_t, tile_px=tile, overlap_px=overlap,
                          slice_batch=True, frame_chunk=chunk, frame_overlap=fov))
        if chunk is not None and chunk > 1:  # video: the least host memory, one latent frame at a time
            est_1 = dataclasses.replace(est_t, host_bytes=cpu_host_bytes(job, fam, tile_px=tile, overlap_px=overlap,
                                                                         frame_chunk=1, slice_batch=True))
            plans.append(Plan(path="cpu", dtype="float32", estimate=est_1, tile_px=tile, overlap_px=overlap,
                              slice_batch=True, frame_chunk=1, frame_overlap=0))
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


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """What every step of :func:`decide` reads, derived once from its arguments."""

    job: DecodeJob
    fam: Family
    gpu: GpuState
    gp: GpuProfile | None
    settings: DecodeSettings
    dtype: Dtype
    speed: SpeedModel
    learned: Learned | None
    on_gpu: bool
    available: int  # 0 without a GPU
    budget: int  # available - reserve; negative when the memory is under the reserve
    overlap: int  # local tiles' overlap, a multiple of the family's compression

    @classmethod
    def of(cls, job: DecodeJob, gpu: GpuState, profiles: Profiles, settings: DecodeSettings,
           learned: Learned | None) -> _Inputs:
        fam = profiles.family(job.family)
        check_job(job, fam)
        dtype = decode_dtype(job, fam)
        gp = profiles.gpu(gpu.name)
        available = gpu.available_bytes if gpu.is_accelerator else 0
        sc = fam.spatial_compression
        return cls(job=job, fam=fam, gpu=gpu, gp=gp, settings=settings, dtype=dtype,
                   speed=SpeedModel(fam, gp, dtype_bytes(dtype), settings), learned=learned,
                   on_gpu=gpu.is_accelerator, available=available, budget=available - settings.reserve_bytes,
                   overlap=(settings.tile_overlap_px // sc) * sc)

    @property
    def shown_budget(self) -> int:
        """The budget as said: memory under the reserve is "no budget", never a negative number."""
        return max(0, self.budget)

    @property
    def host_room(self) -> int | None:
        """Host memory offloaded plans may use: available minus the host reserve (None: unknown)."""
        host = self.gpu.host_available_bytes
        return None if host is None else host - self.settings.host_reserve_bytes

    @property
    def can_exact(self) -> bool:
        return not self.fam.video and self.fam.memory.exact_buffer_elements is not None

    @property
    def video_passes(self) -> bool:
        """Video tiles may be exact 3-D tiles (HunyuanVideo, ``extension/stream_hunyuan.py``): the family has
        ``tiling.exact_tile_frames`` and its decoder config, ``tile_groupnorm`` asks for lossless tiles, on a GPU."""
        f = self.fam
        return (f.video and f.tiling.exact_tile_frames is not None and f.decoder is not None
                and f.decoder_widths is not None and f.temporal_compression == 4 and self.on_gpu
                and self.settings.tile_groupnorm in ("exact", "offload"))

    @property
    def video_exact(self) -> bool:
        """Video tiles are exact (halo) tiles: the family has ``tiling.exact_halo_latent`` (Wan 2.1) and
        ``tile_groupnorm`` asks for lossless tiles (``exact``/``offload``); ``auto`` keeps the faster local ones."""
        return (self.fam.video and self.fam.tiling.exact_halo_latent is not None
                and self.settings.tile_groupnorm in ("exact", "offload"))


class _PlanMaker:
    """Builds one decision's local GPU plans with their estimates (learned timings applied)."""

    def __init__(self, x: _Inputs) -> None:
        self.x = x
        self.peak_src = f"{x.job.family} memory model: {x.fam.memory.source}"
        self.sched_mem = exact_schedule(x.fam, offload=False) if not x.fam.video else None
        self.sched_off = exact_schedule(x.fam, offload=True) if not x.fam.video else None
        self.moves: dict[int, list[tuple[int, int]]] = {}  # offloaded plans' bytes moved per buffer, by tile

    def peak_factor(self, path: str) -> float:
        """The learned peak factor of plans learned under ``path`` (1.0: none, or not above 1)."""
        x = self.x
        if x.learned is None:
            return 1.0
        return x.learned.peak_factor(x.gpu.name, x.job.family, path)[0]

    def with_learned(self, plan: Plan) -> Plan:
        """``plan`` with this card's learned seconds factor and learned peak factor applied (and named)."""
        x = self.x
        if x.learned is None:
            return plan
        est = plan.estimate
        factor, entry = x.learned.factor(x.gpu.name, x.job.family, learn_path(plan), job_voxels(x.job))
        if entry is not None:
            wide = " (card-wide)" if entry.family != x.job.family else ""
            est = dataclasses.replace(est, seconds=est.seconds * factor, seconds_source=est.seconds_source
                                      + f"; x{factor:.2f} learned from {entry.count} decodes{wide}")
        pf, pe = x.learned.peak_factor(x.gpu.name, x.job.family, learn_path(plan))
        if pe is not None:
            wide = " (card-wide)" if pe.family != x.job.family else ""
            est = dataclasses.replace(est, peak_bytes=math.ceil(est.peak_bytes * pf), peak_source=est.peak_source
                                      + f"; x{pf:.2f} learned peak from {pe.count} decode{'s' * (pe.count != 1)}{wide}")
        return plan if est is plan.estimate else dataclasses.replace(plan, estimate=est)

    def local(self, path: Path_, *, tile: int | None = None, chunk: int | None = None,
              slice_batch: bool = False) -> Plan:
        x, job, fam = self.x, self.x.job, self.x.fam
        ov = x.overlap if tile is not None else 0
        fov = min(fam.tiling.frame_chunk_overlap, chunk - 1) if chunk is not None else 0
        secs = local_seconds(job, fam, x.speed, tile_px=tile, overlap_px=ov, frame_chunk=chunk,
                             frame_overlap=fov, slice_batch=slice_batch)
        peak = peak_bytes(job, fam, tile_px=tile, overlap_px=ov, frame_chunk=chunk, slice_batch=slice_batch)
        host = False
        if self.host_output(chunk, tile):  # streamed frames, where that holds less than the VAE's own loop
            streamed = peak_bytes(job, fam, tile_px=tile, overlap_px=ov, frame_chunk=chunk, slice_batch=slice_batch,
                                  host_output=True)
            host, peak = (True, streamed) if streamed < peak else (False, peak)
        est = Estimate(peak_bytes=peak, seconds=secs,
                       peak_source=self.peak_src + ("; finished frames to host memory" if host else ""),
                       seconds_source=x.speed.source)
        return self.with_learned(Plan(path=path, estimate=est, dtype=x.dtype, tile_px=tile, overlap_px=ov,
                                      frame_chunk=chunk, frame_overlap=fov, slice_batch=slice_batch,
                                      host_output=host))

    def host_output(self, chunk: int | None, tile: int | None) -> bool:
        """The plan's finished frames stream to host memory (``settings.video_host_output``, off when the VAE
        cannot): HunyuanVideo's temporal chunks when the video has more latent frames than one chunk, Wan's
        spatial tiles when the frame is larger than one tile."""
        x = self.x
        if not x.settings.video_host_output:
            return False
        if x.fam.architecture == "hunyuanvideo" and chunk is not None:
            return ((x.job.frames or 1) - 1) // x.fam.temporal_compression + 1 > chunk
        if x.fam.architecture == "wan" and tile is not None and chunk is None:
            return max(x.job.height, x.job.width) > tile
        return False

    def video_exact(self, tile: int) -> Plan:
        """Exact video tiles (Wan 2.1, ``extension/stream_wan.py``): priced as local tiles of the region each one
        decodes, ``tile`` + the halo on both sides (overlap: two halos), with finished frames in host memory."""
        x, job, fam = self.x, self.x.job, self.x.fam
        halo = (fam.tiling.exact_halo_latent or 0) * fam.spatial_compression
        region, ov = halo_region(tile, halo, max(job.width, job.height), fam.spatial_compression)
        secs = local_seconds(job, fam, x.speed, tile_px=region, overlap_px=ov, frame_chunk=None, frame_overlap=0,
                             slice_batch=True)
        peak = peak_bytes(job, fam, tile_px=region, overlap_px=ov, frame_chunk=None, slice_batch=True,
                          host_output=True)
        est = Estimate(peak_bytes=peak, seconds=secs,
                       peak_source=f"{self.peak_src}; exact tiles: {region} px regions ({tile} px + {halo} px halo "
                                   "each side), finished frames to host memory",
                       seconds_source=f"{x.speed.source}; exact tiles priced as {region} px local tiles")
        return self.with_learned(Plan(path="tiled", estimate=est, dtype=x.dtype, tile_px=tile, slice_batch=True,
                                      groupnorm="exact", host_output=True))

    def video_passes(self, tile: int, *, host: bool = True, frames: int | None = None,
                     room: float | None = None) -> Plan | None:
        """Exact HunyuanVideo tiles with the whole-video buffers in host memory (``host``) or on the GPU (label
        ``exact``), ``frames`` output frames per tile (None: the family's ``tiling.exact_tile_frames``)
        (:func:`policy.video_exact.video_exact_estimate`). With ``room`` (bytes of device memory for the plan),
        the buffers that fit beside the tile stay on the GPU (label ``exact+host``; None when none fits: the
        ``exact+host (all)`` plan covers it); without, every buffer is in host memory (``exact+host (all)``)."""
        x = self.x
        ds = dtype_bytes(x.dtype)
        budget = 0
        if host and room is not None:
            pf = self.peak_factor("tiled-exact3d")  # with_learned scales the whole estimate: the buffers get room / pf
            budget = video_exact_room(x.job, x.fam, tile, ds, room / pf if pf > 1.0 else room, tile_frames=frames)
            if not video_exact_counts(x.job, x.fam, tile, frames, device_budget=budget // ds).device_buffer_elements:
                return None
        est = video_exact_estimate(x.job, x.fam, x.speed, x.gp, tile, ds, host_buffers=host, tile_frames=frames,
                                   device_budget=budget)
        return self.with_learned(Plan(path="tiled", estimate=est, dtype=x.dtype, tile_px=tile, slice_batch=True,
                                      groupnorm="exact", device_budget=budget if host else None, host_output=host,
                                      tile_frames=frames))

    def exact(self, tile: int) -> Plan:
        x, job, fam = self.x, self.x.job, self.x.fam
        t = fam.timing
        est = Estimate(
            peak_bytes=exact_peak_bytes(job, fam, tile),
            seconds=exact_seconds(job, fam, x.speed, tile, sched=self.sched_mem),
            peak_source=f"{job.family} exact-tiling model: analytic buffers + tile, x{fam.memory.exact_margin:g} margin",
            seconds_source=f"{x.speed.source}; exact tiling x{t.exact_time_factor:g} + {t.exact_passes} passes x tiles (assumed)")
        return self.with_learned(Plan(path="tiled", estimate=est, dtype=x.dtype, tile_px=tile, slice_batch=True,
                                      groupnorm="exact"))

    def offloaded(self, tile: int, room: float) -> Plan | None:
        """Exact tiles whose whole-image buffers get what ``room`` bytes of device memory leave after the
        tile; None when that is all of them (the in-memory exact plan covers it)."""
        x, job, fam = self.x, self.x.job, self.x.fam
        sc = fam.spatial_compression
        if tile not in self.moves and self.sched_off is not None:
            self.moves[tile] = passes.traffic(self.sched_off, job.height // sc, job.width // sc, tile)
        pf = self.peak_factor("tiled-offload")  # with_learned scales the whole estimate: the buffers get room / pf
        device_budget, c = offload_costs(job, fam, tile, room / pf if pf > 1.0 else room, sched=self.sched_off,
                                         moves=self.moves.get(tile))
        if c.host_bytes == 0:
            return None
        secs, copy_s, copy_src = offload_seconds(job, fam, x.speed, tile, c, x.gp, sched=self.sched_mem)
        est = Estimate(
            peak_bytes=offload_peak_bytes(job, fam, tile, c), seconds=secs,
            peak_source=(f"{job.family} exact-tiling schedule: {_gib(c.device_bytes)} of whole-image buffers on the "
                         f"GPU, {_gib(c.host_bytes)} in host memory, + tile, x{fam.memory.exact_margin:g} margin"),
            seconds_source=f"{x.speed.source}; exact tiling compute (assumed factors); {copy_src}",
            host_bytes=c.host_bytes, transfer_bytes=c.moved_bytes, transfer_seconds=copy_s)
        return self.with_learned(Plan(path="tiled", estimate=est, dtype=x.dtype, tile_px=tile, slice_batch=True,
                                      groupnorm="exact", device_budget=device_budget))


def _video_chunk(x: _Inputs) -> int | None:
    """The VAE's temporal chunk when a video has more latent frames than it, else None."""
    chunk = x.fam.tiling.frame_chunk
    return chunk if x.fam.video and chunk is not None and latent_frames(x.job, x.fam) > chunk else None


def _candidates(x: _Inputs, make: _PlanMaker) -> list[Plan]:
    """Every local GPU plan, the full decode first: full, full item by item, temporal chunks, local tiles,
    exact tiles, offloaded exact tiles, shorter temporal chunks. Exact HunyuanVideo tiles (``exact``/``offload``)
    come before diffusers' chunks and tiles, which :class:`_Rank` puts after them while one of them fits: they stay
    as the fallback before the CPU (whose video plans are chunked and tiled too, and take hours)."""
    job, fam, gn = x.job, x.fam, x.settings.tile_groupnorm
    chunk = _video_chunk(x)
    plans = [make.local("full")]
    if job.batch > 1:
        plans.append(make.local("full", slice_batch=True))
    tiles: list[int] = []
    for cap in _tile_caps(job, fam, x.settings):
        if cap <= 2 * x.overlap:
            continue  # the overlap would swallow the tile
        tile = _actual_tile(job, fam, cap, x.overlap)
        if tile not in tiles and tile < max(job.width, job.height):
            tiles.append(tile)
    if x.video_passes:  # 3-D tiles tile time too: one as large as the frame still bounds the memory
        tiles3d = [*tiles, max(job.width, job.height)]
        # with host buffers the tile is what the GPU holds: tiles of one latent frame's output frames hold a third of the
        # default's (16 frames), for more steps and copies (each reads two earlier frames of context); the buffers
        # that fit the budget beside the tile stay on the GPU (fewer copies), or none do
        one = fam.temporal_compression
        frame_sets = [None, one] if one < (fam.tiling.exact_tile_frames or 0) else [None]
        made: list[Plan | None] = []
        for frames in frame_sets:
            if gn == "exact" and frames is None:  # every buffer on the GPU (no copies; refused where they do not fit)
                made += [make.video_passes(tile, host=False) for tile in tiles3d]
            made += [make.video_passes(tile, frames=frames, room=x.budget) for tile in tiles3d]
            made += [make.video_passes(tile, frames=frames) for tile in tiles3d]
        plans += [p for p in made if p is not None]
    if chunk is not None:
        plans.append(make.local("tiled", chunk=chunk, slice_batch=True))
    for tile in tiles:
        if x.video_exact:
            plans.append(make.video_exact(tile))
        elif gn in ("auto", "local") or not x.can_exact:
            plans.append(make.local("tiled", tile=tile, chunk=chunk, slice_batch=True))
    exact_sizes = _exact_sizes(x) if x.can_exact and gn != "local" else []
    if gn != "offload":
        plans += [make.exact(tile) for tile in exact_sizes]
    plans += _offloaded_plans(x, make, plans, exact_sizes)
    if chunk is not None:
        plans += _short_chunk_plans(make, plans, chunk)
    return plans


#: Said in a last-resort plan's ``peak_source`` (and how the reason knows the plan is one: an image's equalised
#: tiles can be smaller than the family's smallest tile cap without being a last resort).
LAST_RESORT_NOTE = "a last-resort tile below the family's smallest"


def _last_resort_plans(x: _Inputs, gpu_plans: list[Plan]) -> list[Plan]:
    """Tiled plans below the family's smallest tile, down to ``tiling.last_resort_tile_px``, for a decision where
    no GPU plan fits: before the near-fit rule risks an OOM or the CPU takes minutes to hours. Their memory
    estimates extrapolate below the measured tiles (said in each plan's ``peak_source``). None when the family
    has no such tile or the user set ``min_tile_px``."""
    lo, floor = x.fam.tiling.last_resort_tile_px, x.fam.tiling.min_tile_px
    if lo is None or x.settings.min_tile_px is not None:
        return []
    x2 = dataclasses.replace(x, settings=x.settings.model_copy(update={"min_tile_px": lo}))
    have = {p.label for p in gpu_plans}
    note = f"; {LAST_RESORT_NOTE} ({floor} px): estimate extrapolated, more seams"
    return [dataclasses.replace(p, estimate=dataclasses.replace(p.estimate, peak_source=p.estimate.peak_source + note))
            for p in _candidates(x2, _PlanMaker(x2))
            if p.path == "tiled" and p.tile_px is not None and p.tile_px < floor and p.label not in have]


def _exact_sizes(x: _Inputs) -> list[int]:
    """The exact tile sizes (ascending, smaller than the image), one per tile cap."""
    sizes: list[int] = []
    for cap in _tile_caps(x.job, x.fam, x.settings):
        ty, tx = exact_tiles(x.job, x.fam, cap)
        tile = max(max(s for _, s in ty), max(s for _, s in tx))
        if tile not in sizes and tile < max(x.job.width, x.job.height):
            sizes.append(tile)
    return sizes


def _offloaded_plans(x: _Inputs, make: _PlanMaker, plans: list[Plan], exact_sizes: list[int]) -> list[Plan]:
    """The budget's worth of buffers on the GPU at a few tile sizes, and everything in host memory at the
    smallest (device memory bounded by the tile: the lossless plan of last resort)."""
    fam = x.fam
    can_offload = (x.can_exact and x.settings.tile_groupnorm != "local" and fam.decoder is not None and x.on_gpu
                   and fam.memory.exact_offload_tile_elements is not None and bool(exact_sizes))
    sizes = _offload_sizes_to_cost(plans, exact_sizes, x.budget, x.settings) if can_offload else []
    if not sizes:
        return []
    out = [p for p in (make.offloaded(tile, x.budget) for tile in sizes) if p is not None]
    p = make.offloaded(exact_sizes[0], 0)
    if p is not None and all(q.estimate.peak_bytes != p.estimate.peak_bytes or q.tile_px != p.tile_px
                             for q in plans + out):
        out.append(p)
    return out


def _short_chunk_plans(make: _PlanMaker, plans: list[Plan], chunk: int) -> list[Plan]:
    """Shorter temporal chunks before giving up on the GPU (whole frames, then the smallest tile).

    Not measured: they are never estimated faster than the VAE's default chunk (more launches, smaller
    kernels), so they are only chosen when the default chunk does not fit."""
    by_tile = {p.tile_px: p for p in plans if p.frame_chunk == chunk}
    smallest_tile = min((p.tile_px for p in plans if p.tile_px is not None), default=None)
    out: list[Plan] = []
    short = chunk // 2
    while short >= 1:
        for t_px in (None, smallest_tile) if smallest_tile is not None else (None,):
            p = make.local("tiled", tile=t_px, chunk=short, slice_batch=True)
            ref = by_tile.get(t_px)
            if ref is not None and p.estimate.seconds <= ref.estimate.seconds:
                est = dataclasses.replace(p.estimate, seconds=ref.estimate.seconds * 1.05,
                                          seconds_source=p.estimate.seconds_source
                                          + f"; shorter chunks: at least the {chunk}-latent-frame chunks' time")
                p = dataclasses.replace(p, estimate=est)
            out.append(p)
        short //= 2
    return out


def _host_ok(x: _Inputs, p: Plan) -> bool:
    """An offloaded plan's host buffers fit the probed available host memory minus the host reserve."""
    room = x.host_room
    return not p.estimate.host_bytes or (room is not None and p.estimate.host_bytes <= room)


def _feasibility(x: _Inputs, gpu_plans: list[Plan]) -> tuple[list[Option], list[Plan]]:
    """Each GPU plan as an option that fits or not (and why), and the feasible ones."""
    options: list[Option] = []
    feasible: list[Plan] = []
    budget = _gib(x.shown_budget)
    for p in gpu_plans:
        host = p.estimate.host_bytes
        if not x.on_gpu:
            options.append(Option(p, False, f"no GPU ({x.gpu.note or x.gpu.source})"))
        elif p.estimate.peak_bytes > x.budget:
            options.append(Option(p, False, f"needs {_gib(p.estimate.peak_bytes)} > {budget} budget"))
        elif not _host_ok(x, p):
            room = "unknown (no psutil, no /proc/meminfo)" if x.gpu.host_available_bytes is None else \
                f"{_gib(x.gpu.host_available_bytes)} available - {_gib(x.settings.host_reserve_bytes)} reserve"
            options.append(Option(p, False, f"needs {_gib(host)} of host memory > {room}"))
        else:
            feasible.append(p)
            extra = f", {_gib(host)} in host memory" if host else ""
            options.append(Option(p, True, f"needs {_gib(p.estimate.peak_bytes)} <= {budget} budget{extra}"))
    return options, feasible


def _remote_option(x: _Inputs, network: NetworkArg,
                   identity: EndpointIdentity | None) -> tuple[Plan | None, dict[str, ReasonValue]]:
    """The remote plan (the best response format for the endpoint) or None, and the ``remote_*`` reason
    parameters saying why (see :func:`remote_route`, :func:`identity_gate`)."""
    job, fam, settings = x.job, x.fam, x.settings
    # a canary verdict for the endpoint replaces the name-based custom-VAE rule (proven, not guessed)
    url, route = remote_route(dataclasses.replace(job, custom_vae=False) if identity is not None else job, fam, settings)
    if identity is not None and url != identity.endpoint:
        url, route = remote_route(job, fam, settings)  # the verdict is about another endpoint
    url, route = identity_gate(url, route, identity, settings)
    if url is None:
        return None, route
    net = _net_for(network, url)
    if not net.available:
        return None, {**route, "remote_code": "unavailable", "remote_url": url, "remote_note": net.note}
    best: tuple[float, Plan] | None = None
    for fmt in _formats(job, fam, settings):
        est = remote_estimate(job, fam, net, fmt)
        plan = Plan(path="remote", estimate=est, dtype=x.dtype, endpoint=url, response_format=fmt)
        # a lossy format must win clearly (20%) over a lossless one to be chosen
        score = est.seconds * (1.25 if fmt in LOSSY else 1.0)
        if best is None or score < best[0]:
            best = (score, plan)
    assert best is not None
    return best[1], route


class _Rank:
    """Sort key of plans: seconds first (local tiles x ``exact_tolerance`` while a lossless plan fits,
    ``tile_groupnorm="auto"``, images; local video tiles and chunks after every other plan while an exact
    HunyuanVideo tile plan fits, ``exact``/``offload``); ties: the larger tile."""

    def __init__(self, x: _Inputs, feasible: list[Plan]) -> None:
        has_exact = any(p.path == "full" or p.groupnorm == "exact" for p in feasible)
        self.penalise_local = x.settings.tile_groupnorm == "auto" and has_exact and not x.fam.video
        self.local_last = x.video_passes and has_exact
        self.tolerance = x.settings.exact_tolerance

    def __call__(self, p: Plan) -> tuple[float, float, float]:
        secs = p.estimate.seconds
        local = p.path == "tiled" and p.groupnorm == "local"
        if self.penalise_local and local:
            secs *= self.tolerance
        return (1.0 if self.local_last and local else 0.0, secs,
                -(p.tile_px or math.inf) if p.path != "remote" else 0.0)


@dataclasses.dataclass(frozen=True)
class _Choice:
    plan: Plan
    squeezed: bool = False  # nothing fits the budget; the plan fits inside the reserve
    behind: Plan | None = None  # tight: the plan the budget chose, which goes right after this one
    unmet: UnmetRequest | None = None  # the requested mode that could not run
    near_fit: bool = False  # nothing fits what is available; the plan is within NEAR_FIT of it and the CPU is worse
    cpu: Plan | None = None  # near_fit: the CPU plan it goes before


#: When nothing fits what is available, the smallest GPU plan still goes before the CPU if its estimate is at most
#: this multiple of the available memory and the CPU is estimated :data:`CPU_SLOWER` times slower, or its host
#: memory does not fit. An OOM there costs one attempt (seconds); the CPU costs minutes to hours, and the smallest
#: plans are where the estimates extrapolate (video in one-latent-frame chunks was never measured).
NEAR_FIT = 1.25
#: See :data:`NEAR_FIT`: a CPU decode this many times slower than the GPU plan is worth risking an OOM attempt.
CPU_SLOWER = 10.0


def claim_bytes(plan: Plan, decision: Decision, *, floor: bool = False) -> int:
    """Bytes to claim (allocate at once, hand back to the cache) just before a local GPU plan of ``decision`` runs,
    so memory that went elsewhere since the probe shows as a refused claim, in milliseconds, before any decoding.

    A plan that fits the decision's budget claims its estimated peak plus the reserve (the reserve covers what the
    estimate does not: workspace, rounding, estimate error; when the memory it stood for has gone, the plan no
    longer fits as decided). One that fits only what is available (``squeezed``, or ``tight``: chosen on purpose
    into the reserve) claims its estimate. With ``floor`` (the last GPU plan before the CPU), or a ``near_fit``
    plan above what is available: its estimate / :data:`NEAR_FIT`, the least the near-fit rule believes such a plan
    may need: a refusal there means it cannot fit even at the low end of that band, and the claim refuses no plan
    the band lets through. 0 for remote and CPU plans.
    """
    if plan.path not in ("full", "tiled"):
        return 0
    e = plan.estimate.peak_bytes
    if floor or e > decision.available_bytes:
        return math.ceil(e / NEAR_FIT)
    return e + (decision.available_bytes - decision.budget_bytes) if e <= decision.budget_bytes else e


def _cpu_host_ok(x: _Inputs, p: Plan) -> bool:
    """A CPU plan's host memory fits the probed available host memory minus the host reserve (unknown: fits)."""
    room = x.host_room
    return room is None or p.estimate.host_bytes <= room


def _smallest(x: _Inputs, gpu_plans: list[Plan]) -> Plan | None:
    """The GPU plan with the smallest estimated peak among those whose host buffers fit (None: none, or no GPU)."""
    if not x.on_gpu:
        return None
    return min((p for p in gpu_plans if _host_ok(x, p)), key=lambda p: p.estimate.peak_bytes, default=None)


def _near_fit(x: _Inputs, gpu_plans: list[Plan], cpu: Plan | None) -> Plan | None:
    """The smallest GPU plan when it is within :data:`NEAR_FIT` of the available memory and the CPU (``cpu``: the
    first CPU plan of the chain) is :data:`CPU_SLOWER` times slower, does not fit host memory, or is off."""
    smallest = _smallest(x, gpu_plans)
    if smallest is None or smallest.estimate.peak_bytes > NEAR_FIT * x.available:
        return None
    if cpu is not None and _cpu_host_ok(x, cpu) and cpu.estimate.seconds < CPU_SLOWER * smallest.estimate.seconds:
        return None
    return smallest


def _tight(x: _Inputs, gpu_plans: list[Plan], chosen: Plan) -> Plan | None:
    """The fastest lossless GPU plan (full, or exact tiles) that fits what is available but not the budget, when it
    is estimated ``tight_speedup`` times faster than ``chosen`` (what the budget chose); else None. It uses the
    reserve on purpose; ``chosen`` stays right behind it, so an out-of-memory error costs one attempt."""
    speedup = x.settings.tight_speedup
    if speedup is None or not x.on_gpu:
        return None
    tight = [p for p in gpu_plans if (p.path == "full" or p.groupnorm == "exact")
             and x.budget < p.estimate.peak_bytes <= x.available and _host_ok(x, p)]
    best = min(tight, key=lambda p: (p.estimate.seconds, -(p.tile_px or math.inf)), default=None)
    return best if best is not None and best.estimate.seconds * speedup < chosen.estimate.seconds else None


def _requested(x: _Inputs, feasible: list[Plan], remote: Plan | None, rank: _Rank) -> Plan | None:
    """The plan of the requested mode (``mode`` full/tiled/remote) when one can run, else None."""
    mode = x.settings.mode
    if mode == "full":
        fulls = [p for p in feasible if p.path == "full"]
        return min(fulls, key=rank) if fulls else None
    if mode == "tiled":
        tiled = [p for p in feasible if p.path == "tiled"]
        return min(tiled, key=lambda p: (p.groupnorm != "exact", p.offloaded, -(p.tile_px or 0),
                                         p.estimate.seconds)) if tiled else None
    return remote if mode == "remote" else None


def _choose(x: _Inputs, gpu_plans: list[Plan], feasible: list[Plan], remote: Plan | None, cpu: Plan | None,
            rank: _Rank) -> _Choice:
    """The requested mode's plan when it can run; else the fastest feasible plan or remote; else the smallest
    GPU plan when it fits inside the reserve, or nearly fits what is available while the CPU is far worse
    (:func:`_near_fit`); else the CPU.

    Raises:
        ProfileError: nothing can decode the job (no GPU plan fits, no remote, ``allow_cpu`` off).
    """
    chosen = _requested(x, feasible, remote, rank)
    mode = x.settings.mode
    unmet: UnmetRequest | None = None if mode == "auto" or chosen is not None else mode
    pool = feasible + ([remote] if remote is not None else [])
    if chosen is None and pool:
        chosen = min(pool, key=rank)
    if chosen is not None:
        tight = _tight(x, gpu_plans, chosen) if unmet is None and mode == "auto" else None
        return _Choice(tight, behind=chosen) if tight is not None else _Choice(chosen, unmet=unmet)
    # nothing fits the budget: the smallest plan may still fit inside the reserve
    smallest = _smallest(x, gpu_plans)
    if smallest is not None and smallest.estimate.peak_bytes <= x.available:
        return _Choice(smallest, squeezed=True, unmet=unmet)
    near = _near_fit(x, gpu_plans, cpu)
    if near is not None:
        return _Choice(near, unmet=unmet, near_fit=True, cpu=cpu)
    if cpu is None:
        raise ProfileError("nothing can decode this job: no GPU plan fits, remote is unavailable and "
                           "allow_cpu is off; enable remote or allow_cpu", key_path="allow_cpu", value=False)
    return _Choice(cpu, unmet=unmet)


def _fallback_chain(x: _Inputs, chosen: Plan, feasible: list[Plan], remote: Plan | None, cpu_plans: list[Plan],
                    rank: _Rank, gpu_plans: list[Plan]) -> list[Plan]:
    """The chosen plan, then local plans that need at least a quarter less memory (at most 4 plans), the
    smallest feasible one, remote before the first local fallback slower than it, and the CPU plans last: those
    whose host memory fits first (the near-fitting GPU plan of :func:`_near_fit` before them), then the smallest
    GPU plan, then the CPU plans estimated not to fit host memory (an OOM costs less than a host that swaps)."""
    chain: list[Plan] = [chosen]
    last_peak = chosen.estimate.peak_bytes if chosen.path in ("full", "tiled") else math.inf
    for p in sorted((p for p in feasible if p is not chosen), key=rank):
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
    fits = [p for p in cpu_plans if _cpu_host_ok(x, p)]
    lowest = min((p.estimate.peak_bytes for p in chain if p.path in ("full", "tiled")), default=math.inf)
    near = _near_fit(x, gpu_plans, cpu_plans[0] if cpu_plans else None)
    if near is not None and near.estimate.peak_bytes < lowest:
        chain.append(near)
        lowest = near.estimate.peak_bytes
    chain += [p for p in fits if p not in chain]
    smallest = _smallest(x, gpu_plans)
    if smallest is not None and smallest.estimate.peak_bytes < lowest and len(fits) < len(cpu_plans):
        chain.append(smallest)
    return chain + [p for p in cpu_plans if p not in chain]


def _cpu_option(x: _Inputs, p: Plan, i: int) -> Option:
    """A CPU plan as an option: always allowed (the last resort), with its host memory against what is free."""
    what = ("last resort" if i == 0 else "last resort, exact tiles: whole-image buffers in host memory"
            if p.groupnorm == "exact" else "last resort, host memory bounded by the tile")
    room = x.host_room
    if room is None:
        return Option(p, True, f"{what}; needs {_gib(p.estimate.host_bytes)} of host memory (available unknown)")
    if p.estimate.host_bytes > room:
        return Option(p, True, f"{what}; needs {_gib(p.estimate.host_bytes)} of host memory > "
                               f"{_gib(max(0, room))} (host available - host reserve): tried after the GPU")
    return Option(p, True, f"{what}; {_gib(p.estimate.host_bytes)} of {_gib(room)} host memory")


def decide(job: DecodeJob, gpu: GpuState, profiles: Profiles, settings: DecodeSettings | None = None,
           network: NetworkArg = None, learned: Learned | None = None,
           identity: EndpointIdentity | None = None) -> Decision:
    """Choose how to decode ``job`` on ``gpu``; pure: the same inputs give the same decision.

    Steps: the local candidates (:func:`_candidates`), which fit (:func:`_feasibility`), the remote option
    (:func:`_remote_option`), the choice (:func:`_choose`), the fallback chain (:func:`_fallback_chain`) and
    the reason as a code and its parameters (:func:`_reason`; rendered by :mod:`policy.reasons`).

    Args:
        job (`DecodeJob`): what to decode.
        gpu (`GpuState`): memory now (see :func:`policy.gpu.probe`).
        profiles (`Profiles`): families and GPU profiles.
        settings (`DecodeSettings`, defaults to `DecodeSettings()`): the user's choices.
        network (`NetworkStats | Mapping[str, NetworkStats] | None`): what is known about endpoints;
            None assumes a 50 Mbit/s, 150 ms link.
        learned (`Learned | None`): learned factors of this machine (read by the caller from
            :class:`policy.learned.LearnedStore`); they scale local plans' seconds (named in each plan's
            ``seconds_source``) and raise their peaks where the card needed more than estimated (named in
            ``peak_source``).
        identity (`EndpointIdentity | None`): the canary verdict for the endpoint this job would use
            (see :func:`identity_gate`); shown in the reason when it refuses remote, and in ``Decision.identity``.

    Raises:
        ProfileError: unknown family. LatentError: a job that cannot be decoded (size, frames, batch).
    """
    x = _Inputs.of(job, gpu, profiles, settings or DecodeSettings(), learned)
    gpu_plans = _candidates(x, _PlanMaker(x))
    options, feasible = _feasibility(x, gpu_plans)
    if not feasible and x.on_gpu and (extra := _last_resort_plans(x, gpu_plans)):
        gpu_plans += extra
        options, feasible = _feasibility(x, gpu_plans)
    remote, route = _remote_option(x, network, identity)
    if remote is not None:
        options.append(Option(remote, True, f"{remote_text(route)}; {remote.response_format} "
                                            f"est. {remote.estimate.seconds:.2f} s"))
    cpu_plans = _cpu_plans(job, x.fam, x.settings, x.overlap) if x.settings.allow_cpu else []
    options += [_cpu_option(x, p, i) for i, p in enumerate(cpu_plans)]
    cpu_plans.sort(key=lambda p: not _cpu_host_ok(x, p))  # host memory that fits first (stable)
    rank = _Rank(x, feasible)
    choice = _choose(x, gpu_plans, feasible, remote, cpu_plans[0] if cpu_plans else None, rank)
    if choice.behind is not None:  # tight: the budget's choice and its chain right behind the tight plan
        chain = [choice.plan] + [p for p in _fallback_chain(x, choice.behind, feasible, remote, cpu_plans, rank,
                                                            gpu_plans) if p is not choice.plan]
    else:
        chain = _fallback_chain(x, choice.plan, feasible, remote, cpu_plans, rank, gpu_plans)
    why = _reason(x, choice, gpu_plans=gpu_plans, feasible=feasible, remote=remote, route=route, rank=rank)
    return Decision(plans=tuple(chain), reason_code=why.code, reason_params=why.params, options=tuple(options),
                    gpu=gpu, job=job, available_bytes=x.available, budget_bytes=x.budget,
                    gpu_profile=x.gp.name if x.gp else None, sources=profiles.sources, identity=identity)


def _reason_code(x: _Inputs, choice: _Choice, full: Plan, feasible: list[Plan]) -> ReasonCode:
    c = choice.plan
    if choice.squeezed:
        return "squeezed"
    if choice.behind is not None:
        return "tight_faster"
    if choice.near_fit:
        return "near_fit"
    if c.path == "full":
        return "batch_sliced" if c.slice_batch else "full_fits"
    if c.path == "tiled":
        if full.estimate.peak_bytes > x.shown_budget:
            return "tiled_full_too_big"
        return "tiled_requested" if x.settings.mode == "tiled" else "tiled_faster"
    if c.path == "remote":
        return "remote_faster" if feasible else "remote_no_gpu" if not x.on_gpu else "remote_nothing_fits"
    return "cpu_no_gpu" if not x.on_gpu else "cpu_nothing_fits"


def _reason(x: _Inputs, choice: _Choice, *, gpu_plans: list[Plan], feasible: list[Plan], remote: Plan | None,
            route: Mapping[str, ReasonValue], rank: _Rank) -> Reason:
    """Why ``choice`` was made: its code and the numbers and labels the sentence states."""
    c, full, gpu = choice.plan, gpu_plans[0], x.gpu
    code = _reason_code(x, choice, full, feasible)
    params: dict[str, ReasonValue] = {
        **route, "family": x.job.family, "label": describe_plan(c), "need": c.estimate.peak_bytes,
        "full_need": full.estimate.peak_bytes, "batch": x.job.batch, "budget": x.budget, "available": x.available,
        "on_gpu": x.on_gpu, "free": gpu.free_bytes, "cache": gpu.usable_cache_bytes,
        "fragmented": gpu.torch_fragmented_bytes,
        "reserve": x.settings.reserve_bytes, "gpu_note": None if x.on_gpu else gpu.note or gpu.source,
        "unmet_request": choice.unmet, "inferred": x.fam.inferred,
        "below_tile_px": x.fam.tiling.min_tile_px if LAST_RESORT_NOTE in c.estimate.peak_source else None}
    if (code.startswith("tiled_") or (code == "tight_faster" and c.path == "tiled")) \
            and (c.groupnorm == "exact" or not x.fam.video or x.video_passes):
        params |= _tiles_params(x, c, gpu_plans, feasible)
    if choice.behind is not None:
        params |= {"seconds": c.estimate.seconds, "behind_label": describe_plan(choice.behind),
                   "behind_seconds": choice.behind.estimate.seconds, "tight_speedup": x.settings.tight_speedup}
    elif c.path == "remote":
        params |= {"format": c.response_format, "seconds": c.estimate.seconds}
        local_best = min(feasible, key=rank) if feasible else None
        if local_best is not None:
            params |= {"local_label": local_best.label, "local_seconds": local_best.estimate.seconds}
    elif code == "near_fit":
        cpu = choice.cpu
        params |= {"seconds": c.estimate.seconds,
                   "cpu_seconds": cpu.estimate.seconds if cpu is not None else None,
                   "cpu_host": cpu.estimate.host_bytes if cpu is not None and not _cpu_host_ok(x, cpu) else None,
                   "near_fit": NEAR_FIT}
    elif c.path == "cpu":
        off = x.on_gpu and x.settings.tile_groupnorm in ("exact", "offload") and x.can_exact
        params |= {"local_tiles_off": x.settings.tile_groupnorm if off else None, "remote_planned": remote is not None}
    return Reason.make(code, params)


def _tiles_params(x: _Inputs, c: Plan, gpu_plans: list[Plan], feasible: list[Plan]) -> dict[str, ReasonValue]:
    """A tiled decision's ``tiles`` note and its numbers: why exact, exact with host memory, or tiles that may
    drift (see :data:`policy.reasons.TileNote`)."""
    if c.groupnorm == "exact" and c.offloaded and x.fam.video:
        e = c.estimate
        return {"tiles": "exact_video_host", "host_bytes": e.host_bytes, "transfer_bytes": e.transfer_bytes,
                "transfer_seconds": e.transfer_seconds, "gpu_buffer_budget": c.device_budget or 0}
    if c.groupnorm == "exact" and c.offloaded:
        inmem = [p for p in gpu_plans if p.groupnorm == "exact" and not p.offloaded]
        least = min(inmem, key=lambda p: p.estimate.peak_bytes) if inmem else None
        e = c.estimate
        return {"tiles": "exact_host", "exact_gpu_need": least.estimate.peak_bytes if least else None,
                "host_bytes": e.host_bytes, "transfer_bytes": e.transfer_bytes, "transfer_seconds": e.transfer_seconds}
    if c.groupnorm == "exact":
        return {"tiles": "exact"}
    lossless = [p for p in feasible if p.path == "full" or p.groupnorm == "exact"]
    if lossless:
        quickest = min(lossless, key=lambda p: p.estimate.seconds)
        return {"tiles": "local_lossless_slower", "lossless_label": quickest.label,
                "lossless_seconds": quickest.estimate.seconds, "exact_tolerance": x.settings.exact_tolerance}
    exacts = [p for p in gpu_plans if p.groupnorm == "exact"]
    if not exacts:
        return {}
    smallest = min(exacts, key=lambda p: p.estimate.peak_bytes)
    return {"tiles": "local_no_lossless", "exact_need": smallest.estimate.peak_bytes,
            "exact_host_bytes": smallest.estimate.host_bytes}
