"""Tile geometry shared by the estimator and the tiled executor, so estimates describe what runs.

Tiles are *equalised*: an axis of ``length`` latent pixels, with tiles of at most ``tile`` and
``overlap`` shared pixels between neighbours, is cut into the fewest tiles that fit, all of the same
size. Unlike diffusers' tiling (fixed stride, thin leftover tiles at the edge) the decoded area then
only shrinks as the tile cap grows, which makes "the largest tile that fits" also the fastest.
"""

from __future__ import annotations

import math


def axis_tiles(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Cut ``[0, length)`` into equal tiles of at most ``tile`` that overlap by at least ``overlap``.

    Returns ``(start, size)`` pairs in order; one pair ``(0, length)`` when the axis fits in one tile.

    Raises:
        ValueError: when ``tile <= overlap`` or a value is not positive.
    """
    if length <= 0 or tile <= 0 or overlap < 0:
        raise ValueError(f"length, tile must be > 0 and overlap >= 0, got length={length}, tile={tile}, overlap={overlap}")
    if length <= tile:
        return [(0, length)]
    if tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap})")
    n = math.ceil((length - overlap) / (tile - overlap))
    size = min(tile, math.ceil((length + (n - 1) * overlap) / n))
    stride = (length - size) / (n - 1)
    starts = [round(i * stride) for i in range(n)]
    return [(s, size) for s in starts]


def grid(height: int, width: int, tile: int, overlap: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Tiles along height and width (latent pixels) for a square tile cap."""
    return axis_tiles(height, tile, overlap), axis_tiles(width, tile, overlap)


def temporal_chunks(frames: int, chunk: int, overlap: int) -> list[tuple[int, int]]:
    """Latent-frame chunks of ``chunk`` frames with ``overlap`` frames shared (equalised like tiles)."""
    return axis_tiles(frames, chunk, overlap) if frames > chunk else [(0, frames)]


def halo_region(tile: int, halo: int, frame: int, step: int) -> tuple[int, int]:
    """Exact video tiles (Wan) priced as diffusers' tiles: ``(region, overlap)`` in output pixels, the ``tile`` plus
    ``halo`` on both sides, at most the ``frame``'s longer side, overlapping by two halos (less than the region by
    one latent ``step``)."""
    region = min(tile + 2 * halo, frame)
    return region, min(2 * halo, region - step)


def diffusers_axis(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """The tiles diffusers' own tiling visits: fixed stride ``tile - overlap``, edge tiles clipped.

    Used for video VAEs, whose tiling runs inside diffusers (``enable_tiling(...)``).
    """
    if length <= tile:
        return [(0, length)]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap})")
    return [(s, min(tile, length - s)) for s in range(0, length, stride)]


def partition(length: int, tile: int) -> list[tuple[int, int]]:
    """Cut ``[0, length)`` into consecutive tiles of at most ``tile`` (no overlap), as equal as
    :func:`axis_tiles` makes them: the cores of exact tiling (extension/stream.py), which reads one
    pixel of context around each core instead of overlapping tiles."""
    tiles = axis_tiles(length, tile, 0)
    starts = [s for s, _ in tiles] + [length]
    return [(starts[i], starts[i + 1] - starts[i]) for i in range(len(tiles)) if starts[i + 1] > starts[i]]
