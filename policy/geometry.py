"""Which family a VAE belongs to, from its whole geometry; and a local-only family for one that matches none.

A VAE's geometry is what decides how its latents decode: the decoder class, latent channels, spatial and
temporal compression, and the latent normalisation (scaling and shift factors, or per-channel mean/std).
:func:`match_family` matches all of it against the profiles' families (the scaling factor alone would
call any 4-channel ``AutoencoderKL`` with 0.18215 "sd15", whatever its compression). Pure: plain numbers
and mappings in (:func:`geometry_from_config` reads a diffusers ``config``), frozen data out.

A VAE whose geometry matches no family is still decoded, locally only: :func:`unmatched_family` builds a
family from its config, with the memory and time models of the nearest family of the same class scaled to
its decoder's widths (see :func:`width_ratio`), no endpoints, and ``inferred`` saying why, so the
decision's reason says so and :func:`policy.decide.endpoint_for` never sends it remote.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from hybrid_vae.policy.profiles import Family, Profiles

__all__ = ["ARCH_CLASSES", "UNMATCHED", "UNMATCHED_MARGIN", "VaeGeometry", "geometry_from_config", "match_family",
           "structure_differences", "unmatched_family", "width_ratio", "with_family"]

#: The diffusers class of each family architecture (``Family.architecture``).
ARCH_CLASSES: Mapping[str, str] = {"sd": "AutoencoderKL", "hunyuanvideo": "AutoencoderKLHunyuanVideo",
                                   "wan": "AutoencoderKLWan"}
#: The family key of a VAE whose geometry matches no family (see :func:`unmatched_family`).
UNMATCHED = "unmatched"
#: Safety factor on a scaled memory model (assumed: the scaling is an argument from the decoder's shape,
#: not a measurement); it makes the engine pick a smaller tile rather than run out of memory.
UNMATCHED_MARGIN = 1.25
_REL_TOL = 1e-3


@dataclasses.dataclass(frozen=True)
class VaeGeometry:
    """The numbers that decide how a VAE's latents decode.

    Attributes:
        vae_class: the class name (``AutoencoderKL``, ``AutoencoderKLHunyuanVideo``, ``AutoencoderKLWan``, ...).
        latent_channels: channels of the latent (None: unknown).
        spatial_compression: output pixels per latent pixel along each side (None: unknown).
        temporal_compression: output frames per latent frame after the first (1 for images).
        scaling_factor, shift_factor: the latent normalisation (None: not set).
        latents_mean, latents_std: per-channel normalisation (Wan-style), when set.
        decoder_widths: the decoder's channel widths, full resolution first (diffusers' ``block_out_channels``).
        decoder_params: parameters of the decoder, when known (its weights' bytes at 2 bytes each).
        force_upcast: the config asks to decode in float32.
    """

    vae_class: str
    latent_channels: int | None
    spatial_compression: int | None
    temporal_compression: int = 1
    scaling_factor: float | None = None
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    decoder_widths: tuple[int, ...] | None = None
    decoder_params: int | None = None
    force_upcast: bool | None = None

    @property
    def architecture(self) -> str | None:
        """The family architecture of this class, or None for a class the engine does not decode."""
        return next((a for a, c in ARCH_CLASSES.items() if c == self.vae_class), None)

    def describe(self) -> str:
        """E.g. ``AutoencoderKL: 4 channels, 2x spatial, scaling 0.18215``."""
        parts = [f"{self.latent_channels} channels", f"{self.spatial_compression}x spatial"]
        if self.temporal_compression != 1:
            parts.append(f"{self.temporal_compression}x temporal")
        if self.latents_mean is not None:
            parts.append("per-channel mean/std")
        else:
            parts.append(f"scaling {self.scaling_factor:g}" if self.scaling_factor is not None else "no scaling factor")
            if self.shift_factor:
                parts.append(f"shift {self.shift_factor:g}")
        return f"{self.vae_class}: " + ", ".join(parts)


def _get(config: Mapping[str, Any] | object, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _floats(v: Any) -> tuple[float, ...] | None:
    if not isinstance(v, Sequence) or isinstance(v, str) or not v:
        return None
    out = tuple(_num(x) for x in v)
    return None if any(x is None for x in out) else tuple(float(x) for x in out if x is not None)


def _ints(v: Any) -> tuple[int, ...] | None:
    if not isinstance(v, Sequence) or isinstance(v, str) or not v:
        return None
    try:
        return tuple(int(x) for x in v)
    except (TypeError, ValueError):
        return None


def geometry_from_config(vae_class: str, config: Mapping[str, Any] | object, *,
                         decoder_params: int | None = None) -> VaeGeometry:
    """The geometry of a diffusers VAE from its class name and ``config`` (a mapping or an object).

    ``AutoencoderKL``: compression ``2 ** (len(block_out_channels) - 1)`` (one upsampler per block but the
    last, as diffusers' ``vae_scale_factor``); ``AutoencoderKLHunyuanVideo``: ``spatial_compression_ratio``
    and ``temporal_compression_ratio``; ``AutoencoderKLWan``: ``scale_factor_spatial`` /
    ``scale_factor_temporal`` (else from ``dim_mult``, ``temperal_downsample`` and ``patch_size``), widths
    ``base_dim x dim_mult``. Other classes: ``latent_channels`` and the ``block_out_channels`` rule.
    """
    channels = _get(config, "latent_channels") or _get(config, "z_dim")
    widths = _ints(_get(config, "block_out_channels"))
    spatial: int | None = None
    temporal = 1
    if vae_class == "AutoencoderKLWan":
        dims = _ints(_get(config, "dim_mult"))
        base = _get(config, "decoder_base_dim") or _get(config, "base_dim")
        widths = tuple(int(base) * d for d in dims) if dims and isinstance(base, int) else None
        patch = _get(config, "patch_size") or 1
        spatial = _get(config, "scale_factor_spatial") or ((2 ** (len(dims) - 1)) * int(patch) if dims else None)
        down = _get(config, "temperal_downsample")
        temporal = _get(config, "scale_factor_temporal") or (2 ** sum(bool(x) for x in down) if isinstance(down, Sequence) else 1)
    elif vae_class == "AutoencoderKLHunyuanVideo":
        spatial = _get(config, "spatial_compression_ratio")
        temporal = _get(config, "temporal_compression_ratio") or 1
    elif widths:
        spatial = 2 ** (len(widths) - 1)
    upcast = _get(config, "force_upcast")
    return VaeGeometry(
        vae_class=vae_class, latent_channels=int(channels) if isinstance(channels, int) else None,
        spatial_compression=int(spatial) if isinstance(spatial, int) else None, temporal_compression=int(temporal),
        scaling_factor=_num(_get(config, "scaling_factor")), shift_factor=_num(_get(config, "shift_factor")),
        latents_mean=_floats(_get(config, "latents_mean")), latents_std=_floats(_get(config, "latents_std")),
        decoder_widths=widths, decoder_params=decoder_params,
        force_upcast=upcast if isinstance(upcast, bool) else None)


def _close(a: float | None, b: float | None) -> bool:
    return abs((a or 0.0) - (b or 0.0)) <= _REL_TOL * max(1.0, abs(b or 0.0))


def structure_differences(geom: VaeGeometry, fam: Family) -> list[str]:
    """What differs in the decoder's structure: class, channels, spatial and temporal compression."""
    out = []
    if ARCH_CLASSES.get(fam.architecture) != geom.vae_class:
        out.append(f"class {ARCH_CLASSES.get(fam.architecture)}")
    if fam.latent_channels != geom.latent_channels:
        out.append(f"{fam.latent_channels} channels")
    if fam.spatial_compression != geom.spatial_compression:
        out.append(f"{fam.spatial_compression}x spatial")
    if (fam.temporal_compression if fam.video else 1) != geom.temporal_compression:
        out.append(f"{fam.temporal_compression if fam.video else 1}x temporal")
    return out


def _norm_differences(geom: VaeGeometry, fam: Family) -> list[str]:
    if fam.latents_mean is not None and fam.latents_std is not None:
        ok = (geom.latents_mean is not None and geom.latents_std is not None
              and len(geom.latents_mean) == len(fam.latents_mean) and len(geom.latents_std) == len(fam.latents_std)
              and all(_close(a, b) for a, b in zip(geom.latents_mean, fam.latents_mean, strict=True))
              and all(_close(a, b) for a, b in zip(geom.latents_std, fam.latents_std, strict=True)))
        return [] if ok else ["its latents mean/std"]
    out = []
    if geom.scaling_factor is None or not _close(geom.scaling_factor, fam.scaling_factor):
        out.append(f"scaling {fam.scaling_factor:g}")
    if not _close(geom.shift_factor, fam.shift_factor):
        out.append(f"shift {fam.shift_factor or 0:g}")
    return out


def match_family(geom: VaeGeometry, profiles: Profiles) -> tuple[str | None, str]:
    """``(family key, "")`` when every part of ``geom`` matches a family, else ``(None, why)``.

    The reason names the nearest family of the same class and what differs, e.g. ``AutoencoderKL: 4
    channels, 2x spatial, scaling 0.18215 matches no family (nearest sd15 has 8x spatial)``.
    """
    if geom.architecture is None:
        return None, f"{geom.vae_class} is not a VAE class hybrid-vae decodes"
    best: tuple[int, str, list[str]] | None = None
    for key, fam in profiles.families.items():
        if fam.inferred:
            continue
        diffs = structure_differences(geom, fam)
        if f"class {ARCH_CLASSES.get(fam.architecture)}" in diffs:
            continue
        diffs += _norm_differences(geom, fam)
        if not diffs:
            return key, ""
        if best is None or len(diffs) < best[0]:
            best = (len(diffs), key, diffs)
    near = f" (nearest {best[1]} has {', '.join(best[2])})" if best else ""
    return None, f"{geom.describe()} matches no family{near}"


def width_ratio(widths: Sequence[int] | None, reference: Sequence[int] | None) -> float | None:
    """How much memory per output pixel a decoder of ``widths`` needs against ``reference`` (None: unknown).

    A decoder's peak is reached at output resolution, where it holds the output of the upsampler that
    enters full resolution (``widths[1]`` channels) and the last block's activations (``widths[0]``); the
    lower-resolution stages need 1/4 as many pixels per step down. So the ratio is
    ``(widths[0] + widths[1]) / (reference[0] + reference[1])`` (the SD decoder: 128 + 256).
    """
    if not widths or not reference:
        return None

    def full_res(w: Sequence[int]) -> int:
        return int(w[0]) + int(w[1] if len(w) > 1 else w[0])

    return full_res(widths) / full_res(reference)


def unmatched_family(geom: VaeGeometry, profiles: Profiles, why: str) -> Family | None:
    """A local-only family for a VAE whose geometry matches no family; None for a class the engine does not decode.

    Its layout and normalisation come from ``geom``; its memory and time models from the nearest family of
    the same class (same channels first): per-voxel memory coefficients x :func:`width_ratio` x
    :data:`UNMATCHED_MARGIN`, seconds x ratio squared (convolution work grows with input x output
    channels), decoder weights from ``decoder_params`` (else x ratio squared). Not measured; ``explain``
    and the reason say so.
    """
    arch = geom.architecture
    if arch is None or not geom.latent_channels or not geom.spatial_compression:
        return None
    same = [(key, f) for key, f in profiles.families.items() if f.architecture == arch and not f.inferred]
    if not same:
        return None
    base_key, base = min(same, key=lambda kf: (kf[1].latent_channels != geom.latent_channels,
                                               len(structure_differences(geom, kf[1]))))
    ratio = width_ratio(geom.decoder_widths, base.decoder_widths)
    r = ratio if ratio is not None else 1.0
    k = r * UNMATCHED_MARGIN
    m = base.memory
    mem = m.model_copy(update={
        "bytes_per_voxel": m.bytes_per_voxel * k, "batch_bytes_per_voxel": m.batch_bytes_per_voxel * k,
        "extra_frame_voxels": m.extra_frame_voxels * k,
        "tile_bytes_per_voxel": m.tile_bytes_per_voxel * k if m.tile_bytes_per_voxel is not None else None,
        "exact_buffer_elements": m.exact_buffer_elements * k if m.exact_buffer_elements is not None else None,
        "exact_tile_elements": m.exact_tile_elements * k, "exact_tile_f32_elements": m.exact_tile_f32_elements * k,
        "measured": False,
        "source": (f"{base_key}'s model x{k:.3g} "
                   f"(decoder widths {'/'.join(map(str, geom.decoder_widths or ()))} against "
                   f"{'/'.join(map(str, base.decoder_widths or ()))}"
                   f"{'' if ratio is not None else ': unknown, not scaled'}, x{UNMATCHED_MARGIN:g} margin; assumed)")[:300]})
    timing = base.timing.model_copy(update={
        "profile_model": "none", "h200_seconds_per_voxel_fp16": min(1.0, base.timing.h200_seconds_per_voxel_fp16 * r * r)})
    weights = 2 * geom.decoder_params if geom.decoder_params else int(base.weights_bytes_fp16 * r * r)
    mean_std = geom.latents_mean is not None and geom.latents_std is not None and \
        len(geom.latents_mean) == len(geom.latents_std) == geom.latent_channels
    data = {
        "description": f"inferred from the VAE's config: {geom.describe()}"[:300],
        "architecture": arch, "video": base.video, "latent_channels": geom.latent_channels,
        "spatial_compression": geom.spatial_compression,
        "temporal_compression": geom.temporal_compression if base.video else 1,
        "scaling_factor": geom.scaling_factor if geom.scaling_factor and geom.scaling_factor > 0 else
        (None if mean_std else 1.0),
        "shift_factor": geom.shift_factor,
        "latents_mean": geom.latents_mean if mean_std else None, "latents_std": geom.latents_std if mean_std else None,
        "default_dtype": base.default_dtype,
        "force_upcast": geom.force_upcast if geom.force_upcast is not None else base.force_upcast,
        "weights_bytes_fp16": min(weights, 2**36), "decoder_widths": geom.decoder_widths,
        "memory": mem, "tiling": base.tiling, "timing": timing, "endpoints": (),
        "inferred": f"{why}: decoded locally with a memory model scaled from its config, never remote"[:300],
    }
    return Family.model_validate(data)


def with_family(profiles: Profiles, key: str, fam: Family) -> Profiles:
    """``profiles`` with ``fam`` added (or replaced) under ``key``."""
    return profiles.model_copy(update={"families": {**profiles.families, key: fam}})
