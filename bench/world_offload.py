"""The truth of offloaded exact tiling (kind ``tiled-offload``: exact tiles whose whole-image buffers live partly
in host memory), registered in :data:`bench.truth.KINDS`.

Kept apart from :mod:`bench.truth` so the world's other truths can change without touching this one. Like the
rest of the world it never calls :mod:`policy.estimate` or reads a family's memory or timing model. What is
*counted* here and what is *assumed*:

* **Bytes** (counted): which buffers live in host memory, their peak, the bytes copied each way and the tile
  steps come from :mod:`policy.passes` for the family's decoder layers (``decoder`` and ``decoder_widths`` in
  families.yaml: the architecture, not a fitted constant) and the plan's device budget: what the executor
  runs and copies (``tests/test_offload.py`` checks the executor's own ledger against these counts).
* **The tile's working set** (assumed, per installation): exact tiling's assumed working set (``exact_tile`` x a
  full decode of the tile, :func:`bench.truth.tiled_exact`) times ``U(1.2, 1.7)``: the CPU ledger measured
  738-749 elements per tile pixel with the buffers in host memory against 512-544 with them on the device
  (the next tile's inputs copied ahead, the finished tile on its way out), 1.36-1.46x.
* **Link bandwidth** (assumed from public figures, per installation): a pinned copy reaches 70-88% of the link's
  raw per-direction rate (PCI Express spec: 3.0 x16 15.75 GB/s, 4.0 x16 31.5, 5.0 x16 63; NVIDIA's CUDA FAQ
  reports up to 6.0 GB/s measured on PCIe 2.0 x16, 75% of its 8 GB/s; ``bandwidthTest`` results commonly posted
  are ~12-13 GB/s on 3.0 x16 and ~24-26 on 4.0 x16, 76-83%). Cards: desktop RTX 20xx/30xx/40xx 4.0 x16 (20xx:
  3.0 x16), H200 5.0 x16, laptop GPUs 4.0 x8 as most laptops wire them.
* **The CPU's staging copies** (assumed, per installation: the machine the card sits in): 8-30 GB/s of strided
  gather/scatter (dual-channel DDR4 to multi-channel DDR5 servers). The engine assumes 16.
* **Overlap** (assumed, per scenario): copies and compute overlap; 55-95% of the shorter of the two is hidden
  (the engine assumes 80%).
* **Host memory**: the buffers in host memory must fit the scenario's free RAM (:attr:`bench.world.Scenario.host_gib`,
  which the engine's probe sees), else the attempt fails like a CPU decode that runs out of host memory.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from hybrid_vae.bench import truth
from hybrid_vae.bench.geometry import axis_tiles
from hybrid_vae.policy import passes
from hybrid_vae.policy.profiles import Family, dtype_bytes

if TYPE_CHECKING:
    from hybrid_vae.bench.world import Exec, Scenario, World

#: Raw per-direction bandwidth of an x16 link, GB/s (PCI Express specification, 128b/130b from 3.0 on).
PCIE_RAW_X16 = {3: 15.75, 4: 31.5, 5: 63.0}
#: (generation, lanes) of the cards' host links from their specifications; anything else: 4.0 x16.
LINKS = {"NVIDIA H200": (5, 16), "NVIDIA GeForce RTX 2060": (3, 16)}
LAPTOP_LINK = (4, 8)


@dataclasses.dataclass(frozen=True)
class Link:
    """One installation's true host<->device rate and its CPU's staging-copy rate (GB/s)."""

    link_gbs: float
    staging_gbs: float
    tile_factor: float  # the offloaded working set / exact tiling's (assumed, see the module docs)


def link(world: World, card: str) -> Link:
    """This card's installation in this world (per world seed x card)."""
    from hybrid_vae.bench.world import _rng

    gen, lanes = LINKS.get(card, LAPTOP_LINK if "Laptop" in card else (4, 16))
    rng = _rng(world.seed, "offload-link", card)
    return Link(PCIE_RAW_X16[gen] * lanes / 16 * rng.uniform(0.70, 0.88), rng.uniform(8.0, 30.0),
                rng.uniform(1.2, 1.7))


def schedule(fam: Family) -> passes.Schedule:
    """The offloaded schedule of the family's decoder (as the executor builds it)."""
    if fam.decoder is None or fam.decoder_widths is None:
        raise ValueError("offloaded exact tiling needs the family's decoder layers (decoder, decoder_widths)")
    d = fam.decoder
    layers = passes.decoder_layers(fam.decoder_widths, d.layers_per_block, latent_channels=fam.latent_channels,
                                   out_channels=d.out_channels, mid_attention=d.mid_attention)
    return passes.schedule(layers, narrow_in_place=False)


def exact_steps(fam: Family, sc: Scenario, tile_px: int) -> int:
    """Tile steps of one item of exact tiling as the executor runs it (counted from its schedule)."""
    s = fam.spatial_compression
    return passes.steps(schedule(fam), sc.height // s, sc.width // s, tile_px)


def costs(world: World, sc: Scenario, ex: Exec) -> passes.Costs:
    """What the executor holds and moves for this execution (memoised on the world)."""
    fam = world.profiles.family(sc.family)
    s = fam.spatial_compression
    key = (sc.family, sc.height // s, sc.width // s, ex.tiles[0][0], dtype_bytes(sc.dtype), sc.batch, ex.budget)
    memo: dict[tuple[object, ...], passes.Costs] = world.__dict__.setdefault("_offload_costs", {})
    got = memo.get(key)
    if got is None:
        got = memo[key] = passes.costs(schedule(fam), *key[1:])  # type: ignore[arg-type]
    return got


def overlapped(world: World, sc: Scenario, compute: float, copy: float, stream: str) -> float:
    """Seconds of compute and copies on the exact tilers' copy stream: the sum less the hidden share of the shorter
    (*Overlap* above, drawn per scenario from the random stream named ``stream``)."""
    from hybrid_vae.bench.world import _rng

    hidden = _rng(world.seed, stream, sc.local_key).uniform(0.55, 0.95)
    return compute + copy - hidden * min(compute, copy)


def tiled_offload(world: World, sc: Scenario, ex: Exec) -> truth.Truth:
    """Offloaded exact tiling: the buffers kept on the device and the tile's working set on the GPU, the rest in
    host memory; exact tiling's compute and the copies at this installation's rates, overlapped."""
    fam = world.profiles.family(sc.family)
    ds = dtype_bytes(sc.dtype)
    px = float(sc.height * sc.width)
    inst, lk, c = world.install(sc.card), link(world, sc.card.name), costs(world, sc, ex)
    tile = ex.tiles[0][0]
    ty, tx = axis_tiles(sc.height, tile, 0), axis_tiles(sc.width, tile, 0)
    tile_px = float((max(v for _, v in ty) + 2) * (max(v for _, v in tx) + 2))
    gpu = c.device_bytes + inst.exact_tile * lk.tile_factor * world.mem.full_peak(ds, tile_px)
    one = truth._img_seconds(world, sc, px) * truth.EXACT_TIME + exact_steps(fam, sc, tile) * truth.EXACT_STEP_S * \
        world.card_factor(sc.card, ds, px)
    compute = one * sc.batch
    copy = c.moved_bytes / (min(lk.link_gbs, lk.staging_gbs) * 1e9)
    secs = overlapped(world, sc, compute, copy, "offload-overlap")
    return truth.Truth(gpu, float(c.host_bytes), secs, secs / sc.batch,
                       "counted bytes x assumed working set, link, staging and overlap")


truth.register("tiled-offload", tiled_offload)
