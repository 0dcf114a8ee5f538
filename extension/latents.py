"""Latents: checks against a family, Flux (un)packing, normalisation into VAE space, save and load.

Everything here runs *before* a VAE is touched, so bad input fails fast with a message that names
the field, the value and the fix::

    validate_latents(z, fam, family_name="sd15")   # LatentError: latents have 16 channels; ...
    z = unpack_flux(z, 1024, 1024)                 # [1, 4096, 64] -> [1, 16, 128, 128]
    z = to_vae_space(z, fam)                       # z / scaling_factor + shift_factor
    path = save_latent(z, "./hybrid-vae-latents", family="flux", profile=fam, meta={...})
    z, meta = load_latent(path)

torch is imported inside the functions (importing this module is cheap); ``safetensors`` likewise.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybrid_vae.policy.errors import LatentError

if TYPE_CHECKING:
    import torch
    from hybrid_vae.policy.profiles import Family

__all__ = [
    "FORMAT",
    "expected_rank",
    "load_latent",
    "pack_flux",
    "save_latent",
    "to_vae_space",
    "unpack_flux",
    "validate_latents",
]

#: Largest magnitude a (normalised) latent may have: a diffusion pipeline's latents stay within about
#: +-50; values beyond this decode to a black or white image (or overflow), so they are refused.
LATENT_ABS_MAX = 1e4
#: Written into every saved latent's metadata (``format`` key).
FORMAT = "hybrid-vae-latent/1"
#: Metadata keys whose values are JSON (numbers, lists); every other value stays a string.
_JSON_KEYS = frozenset({
    "shape", "height", "width", "frames", "batch", "scaling_factor", "shift_factor", "latents_mean",
    "latents_std", "latent_channels", "spatial_compression", "temporal_compression", "packed", "created_unix",
    "custom_vae",
})
_TENSOR_KEY = "latents"


def expected_rank(family: Family) -> str:
    """Human text of the latent layouts ``family`` accepts, e.g. ``4-D [B, C, h, w]``."""
    if family.video:
        return "5-D [B, C, T, h, w]"
    if family.packed:
        return "4-D [B, C, h, w] or 3-D packed [B, (H/16)*(W/16), C*4]"
    return "4-D [B, C, h, w]"


def _channel_hint(channels: int, family_name: str, families: Mapping[str, Family] | None,
                  video: bool) -> str:
    if not families:
        return "check the family or the latents"
    fits = sorted(k for k, f in families.items() if f.latent_channels == channels and f.video == video)
    if not fits:
        return f"no known {'video' if video else 'image'} family has {channels} latent channels"
    return "pass --family " + " or ".join(fits)


def validate_latents(latents: Any, family: Family, *, family_name: str, height: int | None = None,
                     width: int | None = None, families: Mapping[str, Family] | None = None) -> None:
    """Check that ``latents`` can be decoded by a VAE of ``family``; raise before any VAE runs.

    Args:
        latents (`torch.Tensor`): image families take 4-D ``[B, C, h, w]`` (or, when ``family.packed``,
            3-D packed ``[B, (H/16)*(W/16), C*4]``); video families take 5-D ``[B, C, T, h, w]``.
        family (`Family`): the family's profile (channels, packing, video flag).
        family_name (`str`): the family's key, used in messages.
        height, width (`int | None`, defaults to `None`): output size in pixels. Required for packed
            latents (to unpack them) and then checked against the token count; ignored for 4-D/5-D
            latents, whose size the tensor itself gives.
        families (`Mapping[str, Family] | None`): all known families, to suggest the right one when
            the channel count does not match.

    Raises:
        LatentError: not a tensor, empty, non-float dtype, wrong rank, wrong channel count, packed
            latents without (or with mismatching) height/width, NaN or inf values, values beyond
            :data:`LATENT_ABS_MAX`.
    """
    import torch

    if not isinstance(latents, torch.Tensor):
        raise LatentError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    shape = tuple(latents.shape)
    if not latents.is_floating_point():
        raise LatentError(f"latents dtype is {str(latents.dtype).replace('torch.', '')}; a VAE decodes "
                          "floating-point latents — convert with latents.float() (or .half()/.bfloat16())")
    if latents.numel() == 0:
        raise LatentError(f"latents are empty (shape {list(shape)}); nothing to decode")
    rank = latents.dim()
    c = family.latent_channels
    if family.video:
        if rank != 5:
            hint = " — an image latent? pass an image family, or add the frame axis" if rank == 4 else ""
            raise LatentError(f"latents have shape {list(shape)} ({rank}-D); family {family_name} (video) "
                              f"expects {expected_rank(family)}{hint}")
        got = shape[1]
    elif rank == 4:
        got = shape[1]
    elif rank == 3 and family.packed:
        if height is None or width is None:
            raise LatentError(f"latents are packed {list(shape)} (3-D); give height and width in pixels to "
                              "unpack them (e.g. --height 1024 --width 1024, or the pipeline's height/width)")
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % (2 * family.spatial_compression):
                raise LatentError(f"{name}={v}: packed {family_name} latents need a positive multiple of "
                                  f"{2 * family.spatial_compression} px")
        tokens = (height // (2 * family.spatial_compression)) * (width // (2 * family.spatial_compression))
        if shape[1] != tokens:
            raise LatentError(f"latents have {shape[1]} tokens but height={height}, width={width} give "
                              f"{tokens} ((H/16)*(W/16)); pass the size the latents were generated at")
        if shape[2] != c * 4:
            raise LatentError(f"packed latents have {shape[2]} features; family {family_name} expects "
                              f"{c * 4} ({c} channels x 2x2 patches) — "
                              + _channel_hint(shape[2] // 4, family_name, families, False))
        got = c
    else:
        hint = ""
        if rank == 5:
            hint = " — a video latent? pass a video family (hunyuanvideo, wan)"
        elif rank == 3:
            hint = f" — family {family_name} has no packed layout; add the batch axis with latents[None]"
        raise LatentError(f"latents have shape {list(shape)} ({rank}-D); family {family_name} expects "
                          f"{expected_rank(family)}{hint}")
    if got != c:
        raise LatentError(f"latents have {got} channels; family {family_name} expects {c} — "
                          + _channel_hint(got, family_name, families, family.video))
    finite = torch.isfinite(latents)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        nan = int(torch.isnan(latents).sum())
        raise LatentError(f"latents contain {nan} NaN and {bad - nan} inf values out of {latents.numel()}; "
                          "the sampler diverged (try another dtype, e.g. an fp16-fix VAE or bfloat16, "
                          "or fewer steps)")
    peak = float(latents.detach().abs().max())
    if peak > LATENT_ABS_MAX:
        raise LatentError(f"latents reach {peak:.3g}; a pipeline's latents stay within about +-50, so these would "
                          f"decode to a flat black/white image — check the tensor (scaled twice? another file?); "
                          f"values up to {LATENT_ABS_MAX:g} are accepted")


def unpack_flux(latents: torch.Tensor, height: int, width: int, *,
                spatial_compression: int = 8) -> torch.Tensor:
    """Unpack Flux latents ``[B, (H/16)*(W/16), C*4]`` into ``[B, C, H/8, W/8]``.

    The same layout as diffusers' ``FluxPipeline._unpack_latents``: each token holds a 2x2 patch of
    latent pixels, channel-major (``C, 2, 2``).
    """
    b, n, f = latents.shape
    lh = 2 * (int(height) // (spatial_compression * 2))
    lw = 2 * (int(width) // (spatial_compression * 2))
    if n != (lh // 2) * (lw // 2) or f % 4:
        raise LatentError(f"cannot unpack latents of shape {[b, n, f]} to height={height}, width={width}")
    z = latents.view(b, lh // 2, lw // 2, f // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(b, f // 4, lh, lw)


def pack_flux(latents: torch.Tensor) -> torch.Tensor:
    """Pack ``[B, C, h, w]`` latents into Flux's ``[B, (h/2)*(w/2), C*4]`` (inverse of `unpack_flux`)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise LatentError(f"latent height and width must be even to pack, got {h}x{w}")
    z = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def to_vae_space(latents: torch.Tensor, family: Family) -> torch.Tensor:
    """Undo the diffusion model's latent normalisation: what ``vae.decode`` expects.

    ``z / scaling_factor + shift_factor`` (SD, SDXL, SD3, Flux, HunyuanVideo), or for Wan-style
    families with per-channel statistics ``z * latents_std + latents_mean`` (diffusers' WanPipeline
    writes it ``latents / (1 / std) + mean``). Returns a new tensor in the dtype of ``latents``;
    the input is left untouched.
    """
    import torch

    if family.latents_mean is not None and family.latents_std is not None:
        view = [1, len(family.latents_mean)] + [1] * (latents.dim() - 2)
        mean = torch.tensor(family.latents_mean, dtype=latents.dtype, device=latents.device).view(view)
        std = torch.tensor(family.latents_std, dtype=latents.dtype, device=latents.device).view(view)
        return latents * std + mean
    assert family.scaling_factor is not None  # Family's validator guarantees one of the two
    out = latents / family.scaling_factor
    if family.shift_factor:
        out = out + family.shift_factor
    return out


def from_vae_space(z: torch.Tensor, family: Family) -> torch.Tensor:
    """Inverse of :func:`to_vae_space`: what a pipeline hands to ``vae.decode`` -> the pipeline's latents."""
    import torch

    if family.latents_mean is not None and family.latents_std is not None:
        view = [1, len(family.latents_mean)] + [1] * (z.dim() - 2)
        mean = torch.tensor(family.latents_mean, dtype=z.dtype, device=z.device).view(view)
        std = torch.tensor(family.latents_std, dtype=z.dtype, device=z.device).view(view)
        return (z - mean) / std
    out = z - family.shift_factor if family.shift_factor else z
    assert family.scaling_factor is not None
    return out * family.scaling_factor


def _encode_meta(meta: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in meta.items():
        if v is None:
            continue
        out[str(k)] = v if isinstance(v, str) and k not in _JSON_KEYS else json.dumps(v)
    return out


def _decode_meta(raw: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k in _JSON_KEYS:
            try:
                out[k] = json.loads(v)
            except ValueError:
                out[k] = v
        else:
            out[k] = v
    return out


def save_latent(latents: torch.Tensor, directory: str | Path, *, family: str, profile: Family | None = None,
                meta: Mapping[str, Any] | None = None) -> Path:
    """Save ``latents`` (as given: not normalised, packed if packed) to a new ``.safetensors`` file.

    The metadata holds ``format``, ``family``, ``shape``, ``dtype``, the family's ``scaling_factor``/
    ``shift_factor`` (or ``latents_mean``/``latents_std``), ``created`` (UTC) and whatever ``meta``
    adds (``height``, ``width``, ``frames``, ``vae_id``, ``reason``, ...). The file name is
    ``latent-<UTC time>-<family>-<8 hex of a content hash>.safetensors``; the file is written to a
    temporary name and renamed, so a crash never leaves a half-written latent under the final name.

    Args:
        latents (`torch.Tensor`): the latent (any device; copied to CPU).
        directory (`str | Path`): created when missing.
        family (`str`): the family key.
        profile (`Family | None`): the family's profile, for the normalisation constants.
        meta (`Mapping[str, Any] | None`): extra metadata (``None`` values are left out).

    Returns:
        Path: the file written.
    """
    import torch
    from safetensors.torch import save_file

    folder = Path(directory).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    tensor = latents.detach().to("cpu").contiguous()
    now = time.time()
    info: dict[str, Any] = {
        "format": FORMAT,
        "family": family,
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).replace("torch.", ""),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "created_unix": round(now, 3),
    }
    if profile is not None:
        if profile.latents_mean is not None:
            info["latents_mean"] = list(profile.latents_mean)
            info["latents_std"] = list(profile.latents_std or ())
        else:
            info["scaling_factor"] = profile.scaling_factor
            info["shift_factor"] = profile.shift_factor
        info["latent_channels"] = profile.latent_channels
    info.update({k: v for k, v in (meta or {}).items() if v is not None})
    digest = hashlib.sha256()
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(f"{now}:{os.getpid()}".encode())
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    safe_family = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in family)[:40]
    base = f"latent-{stamp}-{safe_family}-{digest.hexdigest()[:8]}"
    path = folder / f"{base}.safetensors"
    n = 1
    while path.exists():
        path = folder / f"{base}-{n}.safetensors"
        n += 1
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        save_file({_TENSOR_KEY: tensor}, str(tmp), metadata=_encode_meta(info))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_latent(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read a latent written by :func:`save_latent` (or any single-tensor ``.safetensors`` file).

    Returns:
        (tensor, meta): the latent on CPU and its metadata (numbers and lists parsed; ``{}`` when the
        file has none).

    Raises:
        LatentError: the file is missing, not a safetensors file, or holds several tensors none of
            which is named ``latents``.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise LatentError(f"latent file {str(p)!r} not found")
    try:
        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
            raw = f.metadata() or {}
            if _TENSOR_KEY in keys:
                key = _TENSOR_KEY
            elif len(keys) == 1:
                key = keys[0]
            else:
                raise LatentError(f"{p}: holds tensors {keys[:8]}; expected one tensor named {_TENSOR_KEY!r}")
            tensor = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, LatentError):
            raise
        raise LatentError(f"{p}: not a readable .safetensors latent ({exc})") from None
    return tensor, _decode_meta(raw)
