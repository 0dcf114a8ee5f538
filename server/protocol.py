"""The server side of the hybrid-inference VAE protocol: parse a request, encode a response.

Pure functions (torch, PIL and PyAV are imported inside them). The request is parsed as the Hugging
Face inference toolkit parses query strings: numeric strings become numbers, ``true``/``false`` in any
case become booleans, floats arrive as strings, and ``shape`` is repeated (``shape=1&shape=4&...``).
Every problem raises :class:`BadRequest` naming the field, the value and the fix.

Responses (``shared/notes/remote-protocol.md``):

================  ======================  ============================================================
output_type       extra                   body
================  ======================  ============================================================
``pil`` (image)                           JPEG or PNG (``image_format``, else the ``Accept`` header)
``pil`` (video)                           float [0, 1] frames ``[B*F, 3, H, W]`` + ``shape``/``dtype``
``pt``            partial_postprocess     uint8 ``[B, H, W, 3]`` (video ``[B*F, H, W, 3]``)
``pt``            not partial             float [-1, 1] ``[B, 3, H, W]`` / ``[B, 3, F, H, W]``
``mp4``                                   H.264 mp4, the B videos' frames one after another
================  ======================  ============================================================
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from hybrid_vae.extension import remote_wire
from hybrid_vae.policy.profiles import DTYPE_BYTES

if TYPE_CHECKING:
    import torch
    from hybrid_vae.policy.profiles import Family

OUTPUT_TYPES = ("pil", "pt", "mp4")
MAX_DIM = 1 << 20


class BadRequest(Exception):
    """A request the server refuses; ``status`` (default 400) and ``field`` go into the JSON error."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 400,
                 headers: dict[str, str] | None = None) -> None:
        self.field, self.status, self.headers = field, status, headers or {}
        super().__init__(message)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": str(self)}
        if self.field:
            out["field"] = self.field
        return out


def toolkit_value(v: str) -> Any:
    """The inference toolkit's conversion: digit strings -> int, true/false (any case) -> bool."""
    if v.isdigit():
        return int(v)
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def _bool(params: dict[str, list[str]], name: str, default: bool) -> bool:
    vals = params.get(name)
    if not vals:
        return default
    v = toolkit_value(vals[-1])
    if isinstance(v, bool):
        return v
    if v in (0, 1):
        return bool(v)
    raise BadRequest(f"{name}={vals[-1]!r}: use true or false", field=name)


def _float(params: dict[str, list[str]], name: str, *, positive: bool = False) -> float | None:
    vals = params.get(name)
    if not vals or vals[-1] in ("", "None", "null"):
        return None
    try:
        v = float(vals[-1])
    except ValueError:
        raise BadRequest(f"{name}={vals[-1]!r} is not a number", field=name) from None
    if not math.isfinite(v) or (positive and v <= 0) or abs(v) > 1e6:
        raise BadRequest(f"{name}={vals[-1]!r}: must be a finite number{' > 0' if positive else ''}", field=name)
    return v


def _int(params: dict[str, list[str]], name: str) -> int | None:
    vals = params.get(name)
    if not vals or vals[-1] in ("", "None", "null"):
        return None
    v = toolkit_value(vals[-1])
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= MAX_DIM:
        raise BadRequest(f"{name}={vals[-1]!r}: must be a positive integer (pixels)", field=name)
    return v


def _shape(params: dict[str, list[str]]) -> tuple[int, ...]:
    vals = params.get("shape")
    if not vals:
        raise BadRequest("shape is missing: send it repeated, shape=1&shape=4&shape=64&shape=64", field="shape")
    if len(vals) == 1 and not vals[0].isdigit():  # also accept "[1,4,64,64]" or "1,4,64,64"
        vals = [p.strip() for p in vals[0].strip("[]() ").split(",") if p.strip()]
    out = []
    for v in vals:
        if not v.isdigit() or not 0 < int(v) <= MAX_DIM:
            raise BadRequest(f"shape value {v!r} is not a positive integer", field="shape")
        out.append(int(v))
    if not 3 <= len(out) <= 5:
        raise BadRequest(f"shape {out} has {len(out)} dimensions; send 3-D packed, 4-D or 5-D latents", field="shape")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class DecodeRequest:
    """A parsed, checked decode request (nothing allocated yet).

    ``batch``/``frames``/``height``/``width`` describe the OUTPUT (frames is None for images);
    ``packed`` marks 3-D Flux latents that are unpacked with ``height``/``width``.
    """

    family: str
    shape: tuple[int, ...]
    dtype: str
    output_type: str
    image_format: str
    partial_postprocess: bool
    scaling_factor: float | None
    shift_factor: float | None
    do_scaling: bool
    batch: int
    frames: int | None
    height: int
    width: int
    packed: bool
    fps: int = 16

    @property
    def body_bytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]

    @property
    def voxels(self) -> int:
        return self.batch * (self.frames or 1) * self.height * self.width


def parse_request(items: Iterable[tuple[str, str]], *, family_name: str, family: Family,
                  accept: str | None = None) -> DecodeRequest:
    """Parse query items (repeated keys kept) into a :class:`DecodeRequest` checked against ``family``.

    Raises:
        BadRequest: naming the field (``shape``, ``dtype``, ``output_type``, ``height``, ...).
    """
    params: dict[str, list[str]] = {}
    for k, v in items:
        params.setdefault(k, []).append(v)
    shape = _shape(params)
    dtype = (params.get("dtype") or ["float16"])[-1]
    if dtype not in DTYPE_BYTES:
        raise BadRequest(f"dtype={dtype!r}: use float16, bfloat16 or float32", field="dtype")
    output_type = (params.get("output_type") or ["pil"])[-1]
    if output_type not in OUTPUT_TYPES:
        raise BadRequest(f"output_type={output_type!r}: use pil, pt or mp4", field="output_type")
    fmt = (params.get("image_format") or [""])[-1].lower()
    if not fmt:
        fmt = "png" if accept and "image/png" in accept else "jpg"
    fmt = {"jpeg": "jpg"}.get(fmt, fmt)
    if fmt not in ("jpg", "png"):
        raise BadRequest(f"image_format={fmt!r}: use jpg or png", field="image_format")
    fps = _int(params, "fps") or 16
    if fps > 240:
        raise BadRequest(f"fps={fps}: use 1 to 240", field="fps")
    height, width = _int(params, "height"), _int(params, "width")
    sc, c = family.spatial_compression, family.latent_channels
    packed, frames = False, None
    if len(shape) == 3:
        if not family.packed:
            raise BadRequest(f"shape {list(shape)} is 3-D; family {family_name} takes 4-D [B, {c}, h, w]", field="shape")
        if height is None or width is None:
            raise BadRequest("packed 3-D latents need height and width (pixels)", field="height")
        if height % (2 * sc) or width % (2 * sc):
            raise BadRequest(f"height={height}, width={width}: packed latents need multiples of {2 * sc}",
                             field="height")
        if shape[2] != c * 4 or shape[1] != (height // (2 * sc)) * (width // (2 * sc)):
            raise BadRequest(f"packed shape {list(shape)} does not match height={height}, width={width} "
                             f"([B, (H/16)*(W/16), {c * 4}] expected)", field="shape")
        packed, h, w = True, height, width
    elif family.video:
        if len(shape) != 5 or shape[1] != c:
            raise BadRequest(f"shape {list(shape)}: family {family_name} takes 5-D [B, {c}, T, h, w]", field="shape")
        frames = (shape[2] - 1) * family.temporal_compression + 1
        h, w = shape[3] * sc, shape[4] * sc
    else:
        if len(shape) != 4 or shape[1] != c:
            raise BadRequest(f"shape {list(shape)}: family {family_name} takes 4-D [B, {c}, h, w]", field="shape")
        h, w = shape[2] * sc, shape[3] * sc
    if output_type == "mp4" and frames is None:
        raise BadRequest("output_type=mp4 is for video families; use pil or pt", field="output_type")
    if output_type == "pil" and frames is None and shape[0] != 1:
        raise BadRequest(f"output_type=pil returns one image but the batch is {shape[0]}; send one latent per "
                         "request or use output_type=pt", field="shape")
    return DecodeRequest(family=family_name, shape=shape, dtype=dtype, output_type=output_type, image_format=fmt,
                         partial_postprocess=_bool(params, "partial_postprocess", False),
                         scaling_factor=_float(params, "scaling_factor", positive=True),
                         shift_factor=_float(params, "shift_factor"), do_scaling=_bool(params, "do_scaling", False),
                         batch=shape[0], frames=frames, height=h, width=w, packed=packed, fps=fps)


def latent_from_body(body: bytes, req: DecodeRequest) -> torch.Tensor:
    """The request's latent as a tensor (little-endian bytes; a copy, so the body can be freed)."""
    import numpy as np
    import torch

    if len(body) != req.body_bytes:
        raise BadRequest(f"body has {len(body)} bytes; shape {list(req.shape)} {req.dtype} needs {req.body_bytes}",
                         field="shape")
    size = DTYPE_BYTES[req.dtype]
    arr = np.frombuffer(body, dtype=f"<i{size}").reshape(req.shape).astype(f"=i{size}")
    t = torch.from_numpy(arr)
    return t.view({"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[req.dtype])


def normalise(z: torch.Tensor, req: DecodeRequest, *, family: Family, vae_config: Any = None) -> torch.Tensor:
    """Latents -> VAE space, float32. ``scaling_factor``/``shift_factor`` from the request win;
    ``do_scaling`` (legacy) applies the model's own normalisation; neither: already scaled."""
    import torch
    from hybrid_vae.extension.latents import to_vae_space, unpack_flux

    z = z.float()
    if req.packed:
        z = unpack_flux(z, req.height, req.width, spatial_compression=family.spatial_compression)
    if req.scaling_factor is not None or req.shift_factor is not None:
        if req.scaling_factor is not None:
            z = z / req.scaling_factor
        return z + req.shift_factor if req.shift_factor else z
    if not req.do_scaling:
        return z
    cfg = vae_config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None and len(mean) == z.shape[1]:
        view = [1, len(mean)] + [1] * (z.dim() - 2)
        return z * torch.tensor(std).view(view) + torch.tensor(mean).view(view)
    sf = getattr(cfg, "scaling_factor", None)
    if sf:
        shift = getattr(cfg, "shift_factor", None)
        z = z / float(sf)
        return z + float(shift) if shift else z
    return to_vae_space(z, family)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 [0, 255] as diffusers' postprocess does (clamp, scale, round)."""
    import torch

    return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def tensor_response(t: torch.Tensor) -> tuple[bytes, dict[str, str]]:
    """Little-endian bytes of ``t`` with the ``shape`` (JSON list) and ``dtype`` headers."""
    import torch

    name = str(t.dtype).rsplit(".", 1)[-1]
    c = t.detach().cpu().contiguous()
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[c.element_size()]
    arr = c.view(as_int).numpy()
    body = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return body, {"shape": json.dumps(list(c.shape)), "dtype": name, "content-type": "tensor/binary"}


def encode_output(x: torch.Tensor, req: DecodeRequest, *, jpeg_quality: int = 95,
                  mp4_crf: int = 18) -> tuple[bytes, dict[str, str]]:
    """Encode a decoded float [-1, 1] tensor (``[B, 3, H, W]`` or ``[B, 3, F, H, W]``) as asked."""
    import torch

    video = x.dim() == 5
    if req.output_type == "pt" and not req.partial_postprocess:
        return tensor_response(x.to(getattr(torch, req.dtype)))
    if video and req.output_type == "pil":  # the toolkit's video convention: float frames in [0, 1]
        frames = x.permute(0, 2, 1, 3, 4).reshape(-1, *x.shape[1:2], *x.shape[3:])
        return tensor_response((frames.float() / 2 + 0.5).clamp(0, 1).to(getattr(torch, req.dtype)))
    u8 = to_uint8(x)
    hwc = u8.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[3], x.shape[4], 3) if video else u8.permute(0, 2, 3, 1)
    hwc = hwc.contiguous()
    if req.output_type == "pt":
        return tensor_response(hwc)
    if req.output_type == "mp4":
        return encode_mp4(hwc.numpy(), fps=req.fps, crf=mp4_crf), {"content-type": "video/mp4"}
    from PIL import Image

    img = Image.fromarray(hwc[0].numpy(), "RGB")
    buf = io.BytesIO()
    if req.image_format == "png":
        img.save(buf, format="PNG", compress_level=1)
        return buf.getvalue(), {"content-type": "image/png"}
    img.save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue(), {"content-type": "image/jpeg"}


def encode_mp4(frames: Any, *, fps: int = 16, crf: int = 18) -> bytes:
    """H.264 mp4 (yuv420p) of uint8 ``[N, H, W, 3]`` frames (``extension.remote_wire.encode_mp4``); 501 without PyAV."""
    try:
        return remote_wire.encode_mp4(frames, fps=fps, crf=crf)
    except ImportError:
        raise BadRequest("output_type=mp4 needs PyAV on the server (pip install -e '.[server]' in the hybrid-vae checkout); "
                         "use output_type=pt", field="output_type", status=501) from None
