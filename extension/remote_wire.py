"""Wire format of the hybrid-inference VAE protocol, client side: request bytes, response parsing with
bounds (shape/dtype checks, decompression-bomb guard, mp4 frame checks), error bodies. ``origin`` and
``is_loopback`` come from :mod:`policy.trust` (the token policy) and are re-exported here.

No HTTP here (see :mod:`extension.remote`); torch, PIL and PyAV are imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from hybrid_vae.policy.errors import LatentError, RemoteProtocolError
from hybrid_vae.policy.trust import is_loopback, origin  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    import torch

#: Element sizes of the dtypes the protocol carries.
WIRE_DTYPES: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4, "uint8": 1}


@dataclasses.dataclass
class Reply:
    """One HTTP answer, read in full (bounded), with its timings (monotonic seconds)."""

    status: int
    headers: dict[str, str]
    body: bytes
    t_start: float
    t_headers: float
    t_end: float


def error_text(reply: Reply) -> str:
    """A short message from an error body: JSON ``error``/``detail``, else a snippet of text/HTML."""
    ctype = reply.headers.get("content-type", "")
    text = reply.body[:4096].decode("utf-8", "replace")
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            for key in ("error", "detail", "message"):
                if key in data:
                    return str(data[key])[:300]
        return json.dumps(data)[:300]
    except ValueError:
        pass
    if "html" in ctype or text.lstrip().startswith("<"):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.I | re.S)
        text = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", text, flags=re.I | re.S)
        text = re.sub(r"<[^>]+>", " ", text)
        if title:
            text = title.group(1) + ": " + text
    snippet = re.sub(r"\s+", " ", text).strip()[:200]
    return f"non-JSON {ctype or 'body'}: {snippet!r}"


def retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def tensor_bytes(t: torch.Tensor) -> bytes:
    """C-contiguous little-endian bytes of ``t`` in its own dtype (bf16 as its raw 2-byte pattern)."""
    import torch

    name = str(t.dtype).rsplit(".", 1)[-1]
    if name not in WIRE_DTYPES:
        raise LatentError(f"dtype={name}: the protocol carries float16, bfloat16, float32 or uint8; cast the latent first")
    c = t.detach().to("cpu").contiguous()
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[WIRE_DTYPES[name]]
    arr = c.view(as_int).numpy()
    if sys.byteorder == "big":
        arr = arr.byteswap()
    return arr.tobytes()


def tensor_from_bytes(body: bytes, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`tensor_bytes` (copies ``body``)."""
    import numpy as np
    import torch

    size = WIRE_DTYPES[dtype]
    arr = np.frombuffer(body, dtype=f"<{'u' if size == 1 else 'i'}{size}").reshape(list(shape))
    t = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
    want = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "uint8": torch.uint8}[dtype]
    return t.view(want)


def short(exc: BaseException) -> str:
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\][^')\"]*", text)
    return (m.group(0) if m else text)[:200]


def parse_tensor(reply: Reply, endpoint: str, expect: Sequence[Sequence[int]] | None) -> torch.Tensor:
    sh, dt = reply.headers.get("shape"), reply.headers.get("dtype")
    if sh is None or dt is None:
        raise RemoteProtocolError(f"tensor response without {'shape' if sh is None else 'dtype'} header",
                                  endpoint=endpoint)
    try:
        shape = json.loads(sh)
    except ValueError:
        raise RemoteProtocolError(f"shape header {sh[:80]!r} is not a JSON list", endpoint=endpoint) from None
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 6
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape)):
        raise RemoteProtocolError(f"shape header {sh[:80]!r} is not a list of 1-6 non-negative ints", endpoint=endpoint)
    if dt not in WIRE_DTYPES:
        raise RemoteProtocolError(f"dtype header {dt[:40]!r} is not one of {', '.join(WIRE_DTYPES)}", endpoint=endpoint)
    if expect is not None and shape not in [list(s) for s in expect]:
        raise RemoteProtocolError(f"shape header {shape} does not match the request (expected "
                                  f"{' or '.join(str(list(s)) for s in expect)})", endpoint=endpoint)
    if expect is not None and dt != "uint8" and all(len(s) and s[-1] == 3 for s in expect):
        raise RemoteProtocolError(f"dtype {dt} for a uint8 (partial_postprocess) request", endpoint=endpoint)
    need = math.prod(shape) * WIRE_DTYPES[dt]
    if len(reply.body) != need:
        what = "truncated body" if len(reply.body) < need else "body longer than shape x dtype"
        raise RemoteProtocolError(f"{what}: {len(reply.body)} bytes, shape {shape} {dt} needs {need}",
                                  endpoint=endpoint)
    return tensor_from_bytes(reply.body, dt, shape)


def parse_image(body: bytes, endpoint: str, expect: tuple[int, int] | None, fmt: str, max_pixels: int) -> Any:
    """Open an image with only the asked decoder; check the declared size before decoding pixels."""
    from PIL import Image, UnidentifiedImageError

    want = "JPEG" if fmt == "jpg" else "PNG"
    try:
        img = Image.open(io.BytesIO(body), formats=[want])
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise RemoteProtocolError(f"body is not a {want} image ({short(exc)}); first bytes {body[:16]!r}",
                                  endpoint=endpoint) from None
    w, h = img.size
    if w * h > max_pixels or (expect is not None and (w, h) != tuple(expect)):
        wanted = f"{expect[0]}x{expect[1]}" if expect else f"at most {max_pixels} pixels"
        raise RemoteProtocolError(f"image declares {w}x{h}, expected {wanted}; not decoded", endpoint=endpoint)
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise RemoteProtocolError(f"broken {want} ({short(exc)})", endpoint=endpoint) from None
    return img.convert("RGB")


def has_av() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def encode_mp4(frames: Any, *, fps: int = 16, crf: int = 18) -> bytes:
    """H.264 mp4 (yuv420p) of uint8 ``[N, H, W, 3]`` frames (array or tensor) with PyAV, no system ffmpeg.

    Used by ``hybrid-vae serve`` and by the drop-in's local decodes, so both give the same mp4.

    Raises:
        ImportError: PyAV is missing (``pip install av``).
    """
    import av

    arr = frames.numpy() if hasattr(frames, "numpy") else frames
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = int(arr.shape[2]), int(arr.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for f in arr:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def read_mp4(body: bytes, endpoint: str, size: tuple[int, int] | None, frames: int | None, *,
              decode: bool) -> Any:
    """Check an mp4's declared frame size before decoding; with ``decode`` return uint8 ``[F, H, W, 3]``
    (at most ``frames`` + 1 frames are decoded, and exactly ``frames`` must be there)."""
    import av
    import numpy as np
    import torch

    got: list[Any] = []
    try:
        with av.open(io.BytesIO(body), mode="r") as c:
            st = c.streams.video[0]
            w, h = st.codec_context.width, st.codec_context.height
            if size is not None and (w, h) != tuple(size):
                raise RemoteProtocolError(f"mp4 frames are {w}x{h}, expected {size[0]}x{size[1]}; not decoded",
                                          endpoint=endpoint)
            if not decode:
                return body
            for frame in c.decode(st):
                got.append(frame.to_ndarray(format="rgb24"))
                if frames is not None and len(got) > frames:
                    break
    except (av.error.FFmpegError, IndexError, ValueError) as exc:
        raise RemoteProtocolError(f"body is not a readable mp4 video ({short(exc)})", endpoint=endpoint) from None
    if not got or (frames is not None and len(got) != frames):
        raise RemoteProtocolError(f"mp4 has {len(got)}{'+' if frames and len(got) > frames else ''} frames, "
                                  f"expected {frames}", endpoint=endpoint)
    return torch.from_numpy(np.stack(got))


def uint8_to_tensor(u8: torch.Tensor, b: int, frames: int | None) -> torch.Tensor:
    x = u8.reshape(b, frames or 1, *u8.shape[-3:]).float().div(127.5).sub(1.0)  # [B, F, H, W, 3]
    x = x.permute(0, 4, 1, 2, 3)  # [B, 3, F, H, W]
    return x.contiguous() if frames is not None else x[:, :, 0].contiguous()


def image_to_tensor(img: Any) -> torch.Tensor:
    import numpy as np
    import torch

    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.float().div(127.5).sub(1.0).permute(2, 0, 1).unsqueeze(0).contiguous()
