"""The truth of exact HunyuanVideo tiles (kind ``tiled-exact3d``: ``extension/stream_hunyuan.py``, the
whole-video buffers in host memory, ``Exec.budget`` 0, some of them on the GPU, ``Exec.budget`` their bytes there,
or all on the GPU, -1), registered in :data:`bench.truth.KINDS`.

Like the rest of the world it never calls :mod:`policy.estimate` or reads the family's memory, timing or decoder
fields. What is *counted* and what is *assumed*:

* **Counted**: the whole-video buffers on each side (the executor's placement for the plan's budget), one tile's
  region and output, the mid block's keys and values, the elements copied over the link and the tile steps:
  :func:`policy.video_exact.hunyuan_counts` over the passes of diffusers' ``AutoencoderKLHunyuanVideo`` *defaults*
  (:data:`DECODER`: a test keeps them equal to the class's own defaults, so a wrong profile would not move the
  truth), which a test checks against the executor's ledger.
* **The tile's working set** (assumed, per installation): the counted region and output x ``U(1.5, 3.0)`` (the
  region's normalised copy, the convolution's output, the residual sum, the 3-D convolution's workspace; no GPU
  has measured it), plus the keys and values; with host buffers one more counted region and output in flight
  (the copy stream reads the next tile ahead; the last output is on its way out).
* **Seconds**: the world's full decode of the video (measured H200 video rows, :func:`bench.truth.full`) x
  :data:`bench.truth.EXACT_TIME` (assumed, as image exact tiles), a fixed cost per tile step, and the counted
  copies at this installation's link and staging rates (:func:`bench.world_offload.link`, public PCIe figures),
  overlapped with the compute as the image executor's (the same copy stream): 55-95% of the shorter of the two
  hidden, drawn per scenario (assumed, as :mod:`bench.world_offload`).
* **Host memory**: the buffers and the batch's finished videos must fit the scenario's free RAM (with the buffers
  on the GPU they count on the GPU instead, and nothing is copied).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hybrid_vae.bench import truth
from hybrid_vae.policy.profiles import dtype_bytes
from hybrid_vae.policy.video_exact import VideoExactCounts, hunyuan_counts, hunyuan_passes

if TYPE_CHECKING:
    from hybrid_vae.bench.world import Exec, Scenario, World

#: diffusers' ``AutoencoderKLHunyuanVideo`` defaults: block_out_channels, layers_per_block, latent_channels.
DECODER = ((128, 256, 512, 512), 2, 16)
#: Output frames per tile: the executor's default (``hunyuan_exact_decode(tile_frames=16)``); a plan may give fewer.
TILE_FRAMES = 16
#: The tile's working set / its counted region and output (assumed, per installation).
WORKING_SET = (1.5, 3.0)


def counts(world: World, sc: Scenario, ex: Exec) -> VideoExactCounts:
    """What the executor holds and moves for one item of this execution (memoised on the world); ``ex.budget``:
    bytes of whole-video buffers the executor keeps on the GPU (0: none; -1: all)."""
    tc, s = 4, 8
    lat = ((sc.frames or 1) - 1) // tc + 1
    budget = -1 if ex.budget < 0 else ex.budget // dtype_bytes(sc.dtype)
    key = (lat, sc.height // s, sc.width // s, ex.tiles[0][0], ex.tile_frames or TILE_FRAMES, budget)
    memo: dict[tuple[int, ...], VideoExactCounts] = world.__dict__.setdefault("_exact3d_counts", {})
    got = memo.get(key)
    if got is None:
        widths, lpb, lc = DECODER
        ps = hunyuan_passes(widths, lpb, latent_channels=lc, latent=key[:3])
        got = memo[key] = hunyuan_counts(ps, tile_px=key[3], tile_frames=key[4],
                                         out=(1 + tc * (lat - 1), key[1] * s, key[2] * s),
                                         device_budget=None if budget < 0 else budget)
    return got


def tiled_exact3d(world: World, sc: Scenario, ex: Exec) -> truth.Truth:
    """Exact 3-D tiles: the tile's working set, the keys and values and the buffers the budget keeps on the GPU,
    the other whole-video buffers in host memory; the full decode's compute x the exact factor and the copies of
    those, overlapped (every buffer on the GPU: no copies)."""
    from hybrid_vae.bench.world import Exec, _rng
    from hybrid_vae.bench.world_offload import link, overlapped

    ds = dtype_bytes(sc.dtype)
    c = counts(world, sc, ex)
    factor = _rng(world.seed, "exact3d-working-set", sc.card.name).uniform(*WORKING_SET)
    gpu = (c.tile_elements * factor + c.kv_elements) * ds
    out = 3 * (sc.frames or 1) * sc.height * sc.width
    full = truth.full(world, sc, Exec("full", items=1))
    steps = c.steps * truth.EXACT_STEP_S * world.card_factor(sc.card, ds, float(sc.height * sc.width))
    one = full.seconds / sc.batch * truth.EXACT_TIME + steps
    if ex.budget < 0:  # every buffer on the GPU: no copies over the link
        buffers = float((c.buffer_elements + (sc.batch - 1) * out) * ds)
        return truth.Truth(gpu + buffers, 0.0, one * sc.batch, one,
                           "counted elements x assumed working set; measured full decode x assumed factor")
    buffers = float((c.host_buffer_elements + (sc.batch - 1) * out) * ds)
    gpu += (c.tile_elements + c.device_buffer_elements) * ds  # the next tile in flight; the buffers kept on the GPU
    lk = link(world, sc.card.name)
    copy = c.host_moved_elements * ds / (min(lk.link_gbs, lk.staging_gbs) * 1e9)
    one = overlapped(world, sc, one, copy, "exact3d-overlap")
    return truth.Truth(gpu, buffers, one * sc.batch, one,
                       "counted elements x assumed working set; measured full decode x assumed factor; copies at "
                       "assumed link and staging rates and overlap")


truth.register("tiled-exact3d", tiled_exact3d)
