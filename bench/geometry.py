"""How each system cuts a decode into regions: the engine's tiles, diffusers', ComfyUI's, Tiled VAE's, video chunks.

Geometry is a fact of the code that runs, not an estimate: the world counts what each tiler decodes with
these functions (the engine's and diffusers' cuts come from :mod:`policy.tiles`, which the executors use).
"""

from __future__ import annotations

import math

from hybrid_vae.policy.tiles import axis_tiles, diffusers_axis

Axis = list[tuple[int, int]]
__all__ = ["axis_tiles", "comfy_axis", "diffusers_axis", "grid", "tiledvae_axis", "video_geometry"]


def comfy_axis(length: int, tile: int, overlap: int) -> Axis:
    """ComfyUI's ``tiled_scale`` positions: stride ``tile - overlap`` up to ``length - overlap``, clipped."""
    if length <= tile:
        return [(0, length)]
    out = []
    for s in range(0, length - overlap, tile - overlap):
        s = max(0, min(length - overlap, s))
        out.append((s, min(tile, length - s)))
    return out


def tiledvae_axis(length: int, tile: int, pad: int) -> Axis:
    """Tiled VAE (A1111): ``ceil(length / tile)`` equal cores, each padded by ``pad`` on both sides (clipped)."""
    n = max(1, math.ceil(length / tile))
    core = math.ceil(length / n)
    out = []
    for i in range(n):
        a, b = max(0, i * core - pad), min(length, (i + 1) * core + pad)
        out.append((a, b - a))
    return out


def grid(geometry: str, h: int, w: int, th: int, tw: int, overlap: int) -> tuple[Axis, Axis]:
    """Latent tiles along height and width for ``geometry`` (engine, diffusers, comfy, tiledvae)."""
    cut = {"engine": axis_tiles, "diffusers": diffusers_axis, "comfy": comfy_axis, "tiledvae": tiledvae_axis}[geometry]
    return cut(h, th, overlap), cut(w, tw, overlap)


def video_geometry(frames_lat: int, h: int, w: int, *, chunk: int | None, overlap: int, tile: int | None,
                   tile_overlap: int, tc: int, causal_frames: bool = False) -> tuple[float, int, float, int]:
    """(decoded output frames x latent area, decoder calls, largest call's frames x latent area, output frames
    of the largest call) of a video decode.

    diffusers' HunyuanVideo: temporal chunks of ``chunk + 1`` latent frames every ``chunk - overlap`` (each
    decodes ``1 + tc * (k - 1)`` frames), and in each chunk spatial tiles on diffusers' stride.
    ``causal_frames`` (Wan): one latent frame per call with a cache, no frame decoded twice.
    """
    if tile is not None and (h > tile or w > tile):
        ty, tx = diffusers_axis(h, tile, tile_overlap), diffusers_axis(w, tile, tile_overlap)
    else:
        ty, tx = [(0, h)], [(0, w)]
    area = sum(s for _, s in ty) * sum(s for _, s in tx)
    big_area = max(s for _, s in ty) * max(s for _, s in tx)
    n_tiles = len(ty) * len(tx)
    if causal_frames:
        frames = 1 + tc * (frames_lat - 1)
        return float(frames * area), frames_lat * n_tiles, float(tc * big_area), tc
    if chunk is not None and frames_lat > chunk:
        chunks = [min(chunk + 1, frames_lat - i) for i in range(0, frames_lat, max(1, chunk - overlap))]
    else:
        chunks = [frames_lat]
    frames = sum(1 + tc * (k - 1) for k in chunks)
    big_frames = 1 + tc * (max(chunks) - 1)
    return float(frames * area), len(chunks) * n_tiles, float(big_frames * big_area), big_frames
