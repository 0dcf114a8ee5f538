"""The simulated world of ``hybrid-vae bench --simulate``: what a decode *really* needs and costs.

Nothing here comes from the engine's estimator (:mod:`policy.estimate`, the memory constants of
``families.yaml``); ``tests/test_bench.py`` checks that the world runs with the estimator switched off. The
world is three layers, each in its own module:

* :mod:`bench.interp`: the measured curves (H200 peak bytes and seconds, CPU host bytes and seconds),
  interpolated from ``profiles/measured/*.jsonl``.
* :mod:`bench.truth`: the truth of each *plan kind* (full, local tiles, exact tiles, cpu; a registry a new
  kind is added to): measured where a measurement exists, an explicit assumption with its own spread where
  none does (the engine's own tiler, exact tiles, Wan, the CPU path's video decodes).
* this module: scenarios, cards, the effects a real machine adds to a decode and the estimator does not
  model, and running an attempt.

Effects (drawn per *installation* = world seed x card, or per scenario; every range is an assumption, sized
from what users of SD.Next/ComfyUI/PyTorch report, sources in ``docs/benchmarks.md``):

* **cuDNN workspace** (per installation): the H200 rows contain that run's workspace (``cudnn.benchmark`` on
  and off gave the same peaks); another card/driver/cuDNN adds ``U(-32, +96)`` MiB to every GPU decode.
* **Allocator block rounding** (per scenario): ``U(0, 48)`` MiB on top of the allocated peak (a warm UI
  process; under a memory cap a cold process needed 1.00x its allocated peak on the H200).
* **Fragmentation** (per installation): a fraction ``U(0, 0.3)`` of the torch cache cannot hold the decode's
  large blocks. Each scenario says how much of its free memory is torch cache (the engine sees that split, as
  NVML free + ``reserved - active``). The probe also reads PyTorch's inactive split bytes (free blocks in
  segments that hold live tensors), which the engine does not count as available: the world reports them as the
  unusable part x ``U(1.0, 1.5)`` per installation (some split blocks are large enough for some of the decode's
  tensors; assumed, no GPU here has measured a UI's cache), at most the whole cache (:meth:`World.seen`).
* **Free memory moving between the probe and the decode** (per scenario): 60% nothing; 25% it shrinks by
  ``U(0, 64)`` MiB; 10% by ``U(64, 400)`` MiB; 3% by ``U(0.4, 2)`` GiB; 2% it grows by ``U(0, 512)`` MiB.
* **Host memory** (per scenario, the same in every world): the RAM free is 4, 8, 16 or 32 GiB (15/35/35/15%),
  which the engine's probe reports; a ``cpu`` plan whose host peak exceeds it fails (``MemoryError``), so the
  CPU path can lose an image too, and so does an offloaded exact plan whose host buffers do not fit.
* **Seconds**: lognormal noise per card (sigma 0.15), per scenario (0.05), per decode (0.03), per network
  (0.15), and a user CPU 0.15-0.6x as slow as the measuring machine's two shared cores.

Draws are seeded by (world seed, card, scenario, plan), so every strategy meets the same world (common random
numbers) and a different seed is a different world.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import zlib
from typing import Literal

from hybrid_vae.bench import truth, world_exact3d, world_offload  # noqa: F401  (they register their kinds)
from hybrid_vae.bench.geometry import comfy_axis, tiledvae_axis
from hybrid_vae.bench.interp import MemoryCurves, TimeFits, curves
from hybrid_vae.policy.gpu import GiB, GpuState
from hybrid_vae.policy.model import DecodeJob, NetworkStats, Plan
from hybrid_vae.policy.profiles import Family, Profiles, dtype_bytes

__all__ = ["NETWORKS", "Attempt", "Card", "Exec", "NetworkCase", "Scenario", "World", "WorldParams", "comfy_axis",
           "tiledvae_axis"]
MiB = 1024**2
Geometry = Literal["engine", "diffusers", "comfy", "tiledvae", "exact", "offload", "halo", "exact3d"]
#: Cards whose speed the world takes from the seed document's measured tables (profiles/gpus.yaml).
SEED_CARDS = ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4080", "NVIDIA GeForce RTX 4070 Ti",
              "NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3080", "NVIDIA GeForce RTX 3070", "NVIDIA H200")
#: Cards with no measured table: (name, total GiB, seconds vs an H200 at 2 bytes, at 4 bytes). ASSUMED from an
#: RTX 3070's measured 4.8x (fp16) / 6.8x (fp32): a 3050 Laptop 0.45x a 3070, a 3060 Laptop 0.75x, an RTX 2060
#: 0.65x, an RTX 4060 0.9x.
EXTRA_CARDS: tuple[tuple[str, float, float, float], ...] = (
    ("NVIDIA GeForce RTX 3050 Laptop GPU", 4.0, 10.6, 15.1),
    ("NVIDIA GeForce RTX 3060 Laptop GPU", 6.0, 6.3, 9.0),
    ("NVIDIA GeForce RTX 2060", 6.0, 7.4, 10.5),
    ("NVIDIA GeForce RTX 4060", 8.0, 5.3, 7.5),
)
SERVER_FACTOR = (1.5, 3.0)  # a hosted endpoint's GPU against an H200, per world (assumed)
PNG_BYTES_PER_PX = (1.0, 2.0)  # a photo's PNG: 1-2 MiB per megapixel
FORMAT_BYTES = {"raw": 3.0, "jpg": 0.35, "mp4": 0.08}
FORMAT_S_PER_MP = {"raw": 0.0, "png": 0.15, "jpg": 0.04, "mp4": 0.06}  # encode + decode (assumed)
#: (probability, low MiB, high MiB) of free memory shrinking (negative: growing) between probe and decode
REPORTED_DRIFT: tuple[tuple[float, float, float], ...] = (
    (0.60, 0.0, 0.0), (0.25, 0.0, 64.0), (0.10, 64.0, 400.0), (0.03, 400.0, 2048.0), (0.02, -512.0, 0.0))
HOST_FREE_GIB: tuple[tuple[float, float], ...] = ((0.15, 4.0), (0.35, 8.0), (0.35, 16.0), (0.15, 32.0))


@dataclasses.dataclass(frozen=True)
class WorldParams:
    """Knobs of the world. The defaults are the headline world.

    Args:
        seed (`int`): every random draw. card_seed (`int | None`): the per-card speed draws (None: ``seed``).
        sigma_card / sigma_local / sigma_plan / sigma_net (`float`): lognormal noise on seconds.
        remote_failure (`float`, 0.02): chance a remote request fails (HTTP 503).
        drift (`tuple`): the mixture of free-memory changes between probe and decode (:data:`REPORTED_DRIFT`).
        drift_mib (`float | None`): instead of the mixture, every decode loses exactly this much (tests).
        effects (`bool`, True): cuDNN workspace, block rounding, fragmentation, host memory; False with
            ``spread=False`` and no drift gives the bare measured truth (tests).
        spread (`bool`, True): assumed factors drawn from their ranges; False: each at its midpoint.
        conv3d_regression (`float`, 0): share of installations whose video decoder takes the PyTorch 2.9
            conv3d path (2-3x the memory; a sensitivity world, not the headline).
        warm_replies (`int`, 2): earlier replies of the same request the remote client has timed before the
            scenario's decode (:meth:`World.seen`); 0: the engine ranks the endpoint at its assumed speed.
    """

    seed: int = 0
    card_seed: int | None = None
    sigma_card: float = 0.15
    sigma_local: float = 0.05
    sigma_plan: float = 0.03
    sigma_net: float = 0.15
    remote_failure: float = 0.02
    drift: tuple[tuple[float, float, float], ...] = REPORTED_DRIFT
    drift_mib: float | None = None
    effects: bool = True
    spread: bool = True
    conv3d_regression: float = 0.0
    warm_replies: int = 2

    @classmethod
    def quiet(cls, **kw: object) -> WorldParams:
        """The bare measured truth: no noise, no drift, no effects, assumptions at their midpoints."""
        base: dict[str, object] = dict(sigma_card=0.0, sigma_local=0.0, sigma_plan=0.0, sigma_net=0.0,
                                       remote_failure=0.0, drift=((1.0, 0.0, 0.0),), effects=False, spread=False)
        return cls(**{**base, **kw})  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class NetworkCase:
    """A link to the remote endpoint (symmetric bandwidth)."""

    name: str
    rtt_s: float
    mbit: float

    def stats(self) -> NetworkStats:
        """What the engine is told: the client's measured figures (no noise)."""
        bps = self.mbit * 1e6 / 8
        return NetworkStats(rtt_s=self.rtt_s, down_bytes_per_s=bps, up_bytes_per_s=bps, source="measured")


NETWORKS: tuple[NetworkCase | None, ...] = (None, NetworkCase("10 Mbit/s 150 ms", 0.150, 10.0),
                                            NetworkCase("500 Mbit/s 20 ms", 0.020, 500.0))


@dataclasses.dataclass(frozen=True)
class Card:
    name: str
    total_gib: float
    profiled: bool
    assumed_speed: tuple[float, float] | None = None  # (2-byte, 4-byte) x H200 for cards without a measured table


def world_cards() -> list[Card]:
    """Every card the world knows: the seed's measured cards and the assumed ones (:data:`EXTRA_CARDS`)."""
    from hybrid_vae.policy import load_profiles

    profiles = load_profiles("")
    out = [Card(g.name, g.total_gib, True) for g in profiles.gpus if g.name in SEED_CARDS]
    out += [Card(n, t, profiles.gpu(n) is not None, (s16, s32)) for n, t, s16, s32 in EXTRA_CARDS]
    return out


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One decode in one situation, as the engine can see it.

    ``cache_frac``: the share of the free memory that is this process's torch cache (``reserved - active``),
    the rest NVML free.
    """

    variant: str  # label: sd15, sdxl, sdxl-fp16fix, flux, sd3, hunyuanvideo, wan
    family: str
    dtype: str
    width: int
    height: int
    batch: int
    frames: int | None
    card: Card
    free_frac: float
    network: NetworkCase | None
    cache_frac: float = 0.0
    split_frac: float = 0.0  # share of the torch cache the probe reads as inactive split blocks (World.seen)
    server_spv: float | None = None  # the endpoint's seconds per voxel the client inferred (World.seen)

    def net_stats(self) -> NetworkStats | None:
        """What the engine is told about the network: :meth:`NetworkCase.stats` and the server speed the client
        inferred from earlier replies (:meth:`World.seen`)."""
        if self.network is None:
            return None
        return dataclasses.replace(self.network.stats(), server_seconds_per_voxel=self.server_spv,
                                   server_inferred=self.server_spv is not None)

    @functools.cached_property
    def local_key(self) -> str:
        return (f"{self.variant}|{self.dtype}|{self.width}x{self.height}x{self.batch}x{self.frames}|"
                f"{self.card.name}|{self.free_frac:g}|{self.cache_frac:.3f}")

    @functools.cached_property
    def key(self) -> str:
        return f"{self.local_key}|{self.network.name if self.network else 'none'}"

    @property
    def size_label(self) -> str:
        s = f"{self.width}x{self.height}"
        if self.frames:
            s = f"{self.frames}x{s}"
        return s + (f" x{self.batch}" if self.batch > 1 else "")

    def job(self) -> DecodeJob:
        return DecodeJob(self.family, self.width, self.height, batch=self.batch, frames=self.frames,
                         dtype=self.dtype)  # type: ignore[arg-type]

    @functools.cached_property
    def host_gib(self) -> float:
        """Host RAM free in this scenario (GiB; see the module docs), the same in every world: the probe reports
        it to the engine and the world holds a decode's host bytes against it."""
        x, acc = _rng("host", self.local_key).random(), 0.0
        for prob, gib in HOST_FREE_GIB:
            acc += prob
            if x < acc:
                return gib
        return HOST_FREE_GIB[-1][1]

    def gpu(self) -> GpuState:
        """What the probe reports: NVML free + the torch cache, together ``free_frac`` of the card, and the host
        memory available."""
        total = int(self.card.total_gib * GiB)
        avail = int(total * self.free_frac)
        cache = int(avail * self.cache_frac)
        host = int(self.host_gib * GiB)
        return GpuState(name=self.card.name, total_bytes=total, free_bytes=avail - cache, torch_reusable_bytes=cache,
                        torch_fragmented_bytes=int(cache * min(1.0, self.split_frac)), source="simulated",
                        device="simulated", simulated=True, host_available_bytes=host, host_total_bytes=2 * host)


@dataclasses.dataclass(frozen=True)
class Exec:
    """A concrete decode as the world runs it.

    ``kind`` selects its truth in :data:`bench.truth.KINDS` (default: from ``path`` and ``geometry``).
    ``path`` full: ``items`` batch items per decoder call (0: the whole batch). tiled: one pass per ``tiles``
    entry (tile height, tile width in output px; ComfyUI runs three and averages them), cut by ``geometry``;
    ``frame_chunk``: latent frames per temporal chunk (video; None: all). ``geometry="comfy"`` on a full decode:
    finished items go to the host (ComfyUI's output device).
    """

    path: Literal["full", "tiled", "cpu", "remote"]
    items: int = 0
    tiles: tuple[tuple[int, int], ...] = ()
    overlap_px: int = 0
    geometry: Geometry = "engine"
    frame_chunk: int | None = None
    frame_overlap: int = 0
    fmt: str | None = None
    kind: str = ""
    budget: int = -1  # offloaded exact tiles: the device bytes of their whole-image buffers
    host_out: bool = False  # video chunks: finished frames streamed to host memory (the engine's executor)
    tile_frames: int = 0  # exact 3-D video tiles: output frames per tile (0: the executor's default)

    def __post_init__(self) -> None:  # one key per execution: no overlap without chunks
        if self.frame_chunk is None and self.frame_overlap:
            object.__setattr__(self, "frame_overlap", 0)
        if not self.kind:
            k = {"full": "full", "cpu": "cpu", "remote": "remote"}.get(self.path) or \
                {"exact": "tiled-exact", "offload": "tiled-offload", "halo": "tiled-halo",
                 "exact3d": "tiled-exact3d"}.get(self.geometry, "tiled-local")
            object.__setattr__(self, "kind", k)

    @functools.cached_property
    def key(self) -> str:
        return (f"{self.path}|{self.items}|{self.tiles}|{self.overlap_px}|{self.geometry}|{self.frame_chunk}|"
                f"{self.fmt}|{self.kind}" + (f"|{self.budget}" if self.geometry in ("offload", "exact3d") else "")
                + ("|host-out" if self.host_out else "") + (f"|{self.tile_frames}f" if self.tile_frames else ""))

    @classmethod
    def from_plan(cls, plan: Plan, fam: Family, batch: int) -> Exec:
        """The execution of one of the engine's plans (a new plan kind maps here to its registered truth)."""
        if plan.path == "remote":
            return cls("remote", fmt=plan.response_format)
        if plan.path == "cpu":
            tiles = ((plan.tile_px, plan.tile_px),) if plan.tile_px is not None else ()
            if plan.groupnorm == "exact" and not fam.video:  # exact tiles on the CPU (extension/stream.py)
                return cls("cpu", items=1, tiles=tiles, geometry="exact")
            return cls("cpu", items=1 if plan.slice_batch else 0, tiles=tiles, overlap_px=plan.overlap_px,
                       geometry="diffusers" if fam.video else "engine",
                       frame_chunk=plan.frame_chunk if fam.video else None, frame_overlap=plan.frame_overlap)
        chunk = plan.frame_chunk if fam.video else None
        if plan.path == "full" or plan.tile_px is None:
            return cls("full", items=1 if plan.slice_batch else batch, frame_chunk=chunk,
                       frame_overlap=plan.frame_overlap if chunk else 0, host_out=plan.host_output)
        if plan.groupnorm == "exact" and not fam.video and plan.device_budget is not None:
            return cls("tiled", tiles=((plan.tile_px, plan.tile_px),), geometry="offload", budget=plan.device_budget)
        if plan.groupnorm == "exact" and not fam.video:
            return cls("tiled", tiles=((plan.tile_px, plan.tile_px),), geometry="exact")
        if plan.groupnorm == "exact" and fam.architecture == "wan":  # exact Wan tiles (extension/stream_wan.py)
            return cls("tiled", tiles=((plan.tile_px, plan.tile_px),), geometry="halo", host_out=True)
        if plan.groupnorm == "exact" and fam.architecture == "hunyuanvideo":  # extension/stream_hunyuan.py
            host = plan.device_budget is not None  # the whole-video buffers in host memory (those the budget keeps
            # on the GPU apart), else all on the GPU
            return cls("tiled", tiles=((plan.tile_px, plan.tile_px),), geometry="exact3d",
                       budget=(plan.device_budget or 0) if host else -1,
                       host_out=host, tile_frames=plan.tile_frames or 0)
        if plan.groupnorm == "exact":
            raise ValueError(f"the simulated world has no truth for exact video tiles of {fam.architecture} "
                             f"({plan.label!r}); register one in bench/truth.py")
        geo: Geometry = "diffusers" if fam.video else "engine"
        return cls("tiled", tiles=((plan.tile_px, plan.tile_px),), overlap_px=plan.overlap_px, geometry=geo,
                   frame_chunk=chunk, frame_overlap=plan.frame_overlap, host_out=plan.host_output)


@dataclasses.dataclass(frozen=True)
class Attempt:
    ok: bool
    seconds: float
    oom: bool = False
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Install:
    """One card's software stack in one world (per world seed x card); see the module docs."""

    workspace: float  # bytes added to every GPU decode (cuDNN workspace against the H200 run's)
    frag: float  # share of the torch cache that cannot hold the decode's blocks
    tiler: float  # the engine's local tiler's peak / diffusers' at the same tile (assumed)
    exact_buf: float  # exact tiling: whole-image buffers / a full decode's measured peak (assumed)
    exact_tile: float  # exact tiling: one tile's working set / a full decode of the tile (assumed)
    out_copies: float  # 3-channel output copies held while stitching items/chunks/tiles (assumed)
    wan_cpu_gpu: float  # Wan's CPU/GPU peak ratio (bench.truth.WAN_CPU_GPU; the engine assumes 0.74)
    cpu_speed: float  # a user's CPU decode seconds / the measuring machine's
    conv3d: float  # video decoder peak factor (1: no PyTorch 2.9 conv3d regression)
    server: float  # the remote endpoint's seconds / an H200's


@dataclasses.dataclass(frozen=True)
class Conditions:
    """What happens to one scenario between the probe and the decode, hidden from the engine."""

    drift: float  # bytes free memory shrinks by (negative: grows)
    overhead: float  # allocator block rounding, bytes
    host_free: float  # host RAM free for a CPU decode, bytes


def _rng(*parts: object) -> random.Random:
    return random.Random(zlib.crc32("|".join(str(p) for p in parts).encode()))


def _u(rng: random.Random, lo: float, hi: float, spread: bool) -> float:
    return rng.uniform(lo, hi) if spread else (lo + hi) / 2


def _mixture(rng: random.Random, mix: tuple[tuple[float, float, float], ...]) -> float:
    x, acc = rng.random(), 0.0
    for p, lo, hi in mix:
        acc += p
        if x < acc:
            return rng.uniform(lo, hi)
    return rng.uniform(mix[-1][1], mix[-1][2])


class World:
    """Ground truth for scenarios. Deterministic for given ``params``.

    Args:
        profiles (`Profiles`): family layouts (compression, video, endpoints) and the seed's GPU tables
            (card speeds); never the families' memory or time constants.
        params (`WorldParams`, defaults to the headline world), or its fields as keywords.
    """

    def __init__(self, profiles: Profiles, params: WorldParams | None = None, **kw: object) -> None:
        self.profiles = profiles
        self.params = p = dataclasses.replace(params or WorldParams(), **kw)  # type: ignore[arg-type]
        self.seed = p.seed
        self.card_seed = p.seed if p.card_seed is None else p.card_seed
        self.mem, self.time = curves()
        self._card_cache: dict[tuple[str, int], tuple[float, float]] = {}
        self._cache: dict[tuple[str, str], Attempt] = {}
        self._truth: dict[tuple[str, str], truth.Truth] = {}

    @property
    def curves(self) -> tuple[MemoryCurves, TimeFits]:
        return self.mem, self.time

    # -- cards --
    def card_factor(self, card: Card, dsize: int, px: float) -> float:
        """True time of ``card`` against the H200 for a region of ``px`` pixels (seed tables, or assumed)."""
        if card.assumed_speed is not None:
            return card.assumed_speed[0 if dsize == 2 else 1]
        ends = self._card_cache.get((card.name, dsize))
        if ends is None:
            prof = self.profiles.gpu(card.name)
            if prof is None or prof.name == "NVIDIA H200":
                ends = (1.0, 1.0)
            else:
                pts: dict[int, float] = {}
                for r in prof.rows:
                    rb = dtype_bytes(r.dtype) if r.dtype else (4 if r.model == "sdxl" else 2)
                    if rb == dsize and r.size in (512, 1024) and r.source == "seed":
                        pts[r.size] = r.time_s / self.time.full(dsize, r.size * r.size)
                ends = (pts.get(512, pts.get(1024, 5.0)), pts.get(1024, pts.get(512, 5.0)))
            self._card_cache[(card.name, dsize)] = ends
        lo, hi = ends
        x = min(1.0, max(0.0, math.log2(max(px, 1.0) / 512**2) / 2))
        return lo + (hi - lo) * x

    def card_noise(self, card: Card) -> float:
        """This card's systematic speed factor against its table (the same for every decode on it)."""
        return _rng(self.card_seed, "card", card.name).lognormvariate(0.0, self.params.sigma_card)

    # -- hidden draws --
    @functools.lru_cache(maxsize=64)  # noqa: B019 (one world per run; bounded)
    def install(self, card: Card) -> Install:
        """This card's installation in this world."""
        p = self.params
        rng = _rng(self.seed, "install", card.name)
        s = p.spread
        ws = _u(rng, -32.0, 96.0, s) * MiB if p.effects else 0.0
        frag = _u(rng, 0.0, 0.3, s) if p.effects else 0.0
        regress = rng.random() < p.conv3d_regression
        conv3d = _u(rng, 2.0, 3.0, s) if regress else 1.0
        return Install(workspace=ws, frag=frag, tiler=_u(rng, 0.88, 1.12, s), exact_buf=_u(rng, 0.26, 0.42, s),
                       exact_tile=_u(rng, 0.45, 0.85, s), out_copies=_u(rng, 1.0, 2.0, s),
                       wan_cpu_gpu=_u(rng, *truth.WAN_CPU_GPU, s), cpu_speed=_u(rng, 0.15, 0.6, s), conv3d=conv3d,
                       server=_u(_rng(self.seed, "server"), *SERVER_FACTOR, s))

    def seen(self, sc: Scenario) -> Scenario:
        """``sc`` as a probe sees it in this world: with the torch cache's inactive split blocks (the unusable
        part of the cache x ``U(1.0, 1.5)`` per installation, see the module docs), and the endpoint's speed as
        the client inferred it from earlier replies (:meth:`warm_server_spv`)."""
        split = self.install(sc.card).frag * _rng(self.seed, "split", sc.card.name).uniform(1.0, 1.5)
        return dataclasses.replace(sc, split_frac=min(1.0, split), server_spv=self.warm_server_spv(sc))

    def warm_server_spv(self, sc: Scenario) -> float | None:
        """The server seconds per voxel the remote client holds after ``WorldParams.warm_replies`` earlier replies to the
        same request (a user generating at one size), each drawn like :meth:`_remote` (its own round trip,
        rate and noise) and folded by the client's own code (:func:`extension.remote.netstats.record`: the time
        to the headers less the round trip and upload the engine is told). None without a network, an endpoint
        or with ``WorldParams.warm_replies`` 0."""
        from hybrid_vae.extension.remote.netstats import DEFAULT_ALPHA, EndpointStats, record
        from hybrid_vae.extension.remote_wire import Reply

        fam = self.profiles.family(sc.family)
        net, p = sc.network, self.params
        if net is None or not fam.endpoints or p.warm_replies <= 0:
            return None
        told = net.stats()
        stats = EndpointStats(DEFAULT_ALPHA)  # the client's default
        stats.rtt, stats.up = told.rtt_s, told.up_bytes_per_s
        lat, vox = self._latent_bytes(sc, fam), sc.batch * (sc.frames or 1) * sc.height * sc.width
        server = truth.server_seconds(self, sc) * self.install(sc.card).server
        for k in range(p.warm_replies):
            rng = _rng(self.seed, "warm", sc.key, k)
            rtt = net.rtt_s * rng.lognormvariate(0.0, p.sigma_net)
            bps = net.mbit * 1e6 / 8 / rng.lognormvariate(0.0, p.sigma_net)
            ttfb = (rtt + lat / bps + server) * rng.lognormvariate(0.0, p.sigma_plan)
            record(stats, Reply(200, {}, b"", 0.0, ttfb, ttfb), int(lat), vox, now=0.0)
        return stats.server_spv

    @staticmethod
    def _latent_bytes(sc: Scenario, fam: Family) -> float:
        sc_ = fam.spatial_compression
        lat_frames = ((sc.frames or 1) - 1) // fam.temporal_compression + 1 if fam.video else 1
        return sc.batch * fam.latent_channels * lat_frames * (sc.height // sc_) * (sc.width // sc_) * \
            dtype_bytes(sc.dtype)

    def conditions(self, sc: Scenario) -> Conditions:
        p = self.params
        rng = _rng(self.seed, "cond", sc.local_key)
        drift = p.drift_mib * MiB if p.drift_mib is not None else _mixture(rng, p.drift) * MiB
        overhead = rng.uniform(0.0, 48.0) * MiB if p.effects else 0.0
        return Conditions(drift=drift, overhead=overhead, host_free=sc.host_gib * GiB if p.effects else math.inf)

    def available(self, sc: Scenario) -> float:
        """Memory the decode can really use: NVML free less the drift, plus the unfragmented torch cache (the true
        unusable part, not what the probe reads)."""
        g = sc.gpu()
        return g.free_bytes - self.conditions(sc).drift + g.torch_reusable_bytes * (1 - self.install(sc.card).frag)

    def probe_now(self, sc: Scenario) -> GpuState:
        """What a probe sees at decode time: the scenario's state after the free memory moved (the torch cache
        is this process's own and stays)."""
        g = sc.gpu()
        return dataclasses.replace(g, free_bytes=max(0, int(g.free_bytes - self.conditions(sc).drift)))

    # -- truth --
    def truth(self, sc: Scenario, ex: Exec) -> truth.Truth:
        """The bare truth of ``ex`` in ``sc`` (:mod:`bench.truth`), before this scenario's effects."""
        ck = (sc.local_key, ex.key)
        got = self._truth.get(ck)
        if got is None:
            got = self._truth[ck] = truth.of(self, sc, ex)
        return got

    def true_peak(self, sc: Scenario, ex: Exec) -> float:
        """Peak bytes the GPU must hold for ``ex``: the plan kind's truth plus workspace and block rounding."""
        t = self.truth(sc, ex)
        if t.gpu_bytes <= 0:
            return 0.0
        ws = max(self.install(sc.card).workspace, -0.1 * t.gpu_bytes)
        return t.gpu_bytes + ws + self.conditions(sc).overhead

    def allocated_peak(self, sc: Scenario, ex: Exec) -> float:
        """What ``torch.cuda.max_memory_allocated`` reports for ``ex``: the true peak less the allocator's block
        rounding (which is reserved, not allocated)."""
        return self.true_peak(sc, ex) - self.conditions(sc).overhead if self.truth(sc, ex).gpu_bytes > 0 else 0.0

    def base_seconds(self, sc: Scenario, ex: Exec) -> tuple[float, float]:
        """(noise-free seconds of the whole execution, seconds of its largest single region)."""
        t = self.truth(sc, ex)
        return t.seconds, t.biggest_s

    # -- attempts --
    def local_factor(self, sc: Scenario, ex: Exec) -> float:
        p = self.params
        shared = _rng(self.seed, "local", sc.local_key).lognormvariate(0.0, p.sigma_local)
        own = _rng(self.seed, "plan", sc.local_key, ex.key).lognormvariate(0.0, p.sigma_plan)
        return self.card_noise(sc.card) * shared * own

    def attempt(self, sc: Scenario, ex: Exec) -> Attempt:
        """What happens when ``ex`` runs in scenario ``sc`` (cached; the same for every strategy)."""
        ck = (sc.key if ex.path == "remote" else sc.local_key, ex.key)
        got = self._cache.get(ck)
        if got is None:
            got = self._remote(sc, ex) if ex.path == "remote" else self._local(sc, ex)
            self._cache[ck] = got
        return got

    def _local(self, sc: Scenario, ex: Exec) -> Attempt:
        t = self.truth(sc, ex)
        f = self.local_factor(sc, ex)
        fail = _rng(self.seed, "oom", sc.local_key, ex.key).uniform(0.70, 1.00)
        if t.host_bytes > self.conditions(sc).host_free:
            return Attempt(False, t.biggest_s * f * fail * 0.1, error="host out of memory")
        if t.gpu_bytes > 0 and self.true_peak(sc, ex) > self.available(sc):
            return Attempt(False, t.biggest_s * f * fail, oom=True, error="out of memory")
        return Attempt(True, t.seconds * f)

    def _remote(self, sc: Scenario, ex: Exec) -> Attempt:
        fam = self.profiles.family(sc.family)
        net = sc.network
        if net is None or not fam.endpoints:
            return Attempt(False, 0.0, error="no endpoint" if net is not None else "no network")
        p = self.params
        rng = _rng(self.seed, "net", sc.key)
        rtt = net.rtt_s * rng.lognormvariate(0.0, p.sigma_net)
        bps = net.mbit * 1e6 / 8 / rng.lognormvariate(0.0, p.sigma_net)
        png = rng.uniform(*PNG_BYTES_PER_PX)
        failed = rng.random() < p.remote_failure
        up = rtt + self._latent_bytes(sc, fam) / bps
        if failed:
            return Attempt(False, up, error="HTTP 503")
        vox = sc.batch * (sc.frames or 1) * sc.height * sc.width
        fmt = ex.fmt or "raw"
        per_px = png if fmt == "png" else FORMAT_BYTES[fmt]
        server = truth.server_seconds(self, sc) * self.install(sc.card).server
        own = _rng(self.seed, "fmt", sc.key, fmt).lognormvariate(0.0, p.sigma_plan)
        secs = (up + server + vox * per_px / bps + vox / 1e6 * FORMAT_S_PER_MP[fmt]) * own
        return Attempt(True, secs)
