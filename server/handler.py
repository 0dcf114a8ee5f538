"""A Hugging Face Inference Endpoints custom handler (``handler.py`` at the root of a model repository).

The toolkit that runs Inference Endpoints calls ``EndpointHandler(path)`` once, then
``handler(data)`` per request with ``data = {"inputs": ..., "parameters": {...}}``. This handler
decodes with the same code as ``hybrid-vae serve`` (parsing, bounds, engine-planned full/tiled decode).

``inputs`` may be the latent's raw little-endian bytes (a toolkit that passes ``tensor/binary`` bodies
through, as Hugging Face's own VAE endpoints do) or the same bytes base64-encoded in a JSON body
(the public toolkit: ``{"inputs": "<base64>", "parameters": {"shape": [1, 4, 64, 64], "dtype": "float16",
...}}``; the public toolkit keeps only the last of repeated query keys, so send ``shape`` in the JSON).
It returns a ``PIL.Image`` for ``output_type="pil"`` (serialised by the toolkit per ``Accept``),
``bytes`` for ``mp4``, and for tensors a dict ``{"shape", "dtype", "data": base64}`` (JSON-serialisable).

The family comes from env ``HYBRID_VAE_FAMILY`` or is recognised from the VAE's config.
See ``server/README.md`` for the repository layout and the custom-container alternative.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

from hybrid_vae.policy.env import env_name, read_env
from hybrid_vae.policy.profiles import load_profiles
from hybrid_vae.server.protocol import BadRequest, encode_output, latent_from_body, normalise, parse_request, to_uint8
from hybrid_vae.server.service import DecodeService, ServedVAE

ENV_FAMILY = env_name("family")


def detect_family(path: str | Path) -> str:
    """Recognise the family from a diffusers VAE config (``config.json`` in ``path`` or ``path/vae``)."""
    p = Path(path)
    cfg_file = p / "config.json" if (p / "config.json").is_file() else p / "vae" / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read a VAE config at {cfg_file} ({exc}); set {ENV_FAMILY}") from None
    cls = cfg.get("_class_name", "")
    if cls == "AutoencoderKLHunyuanVideo":
        return "hunyuanvideo"
    if cls == "AutoencoderKLWan":
        return "wan"
    if cls == "AutoencoderKL":
        ch, sf = cfg.get("latent_channels", 4), cfg.get("scaling_factor", 0.18215)
        if ch == 16:
            return "sd3" if abs(sf - 1.5305) < 1e-3 else "flux"
        if ch == 4:
            return "sdxl" if abs(sf - 0.13025) < 1e-4 else "sd15"
    raise ValueError(f"cannot tell the family of {cls or 'this VAE'} ({cfg_file}); set {ENV_FAMILY}")


def _items(params: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for k, v in params.items():
        if k == "shape" and isinstance(v, str) and v.startswith("["):
            v = json.loads(v)
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if x is None:
                continue
            out.append((k, ("true" if x else "false") if isinstance(x, bool) else str(x)))
    return out


class EndpointHandler:
    """Decode endpoint for Hugging Face Inference Endpoints.

    Args:
        path (`str`, defaults to `""`): the repository folder (a diffusers VAE, or a pipeline with ``vae/``).
        family (`str | None`): the family key; default env ``HYBRID_VAE_FAMILY``, else from the config.
        device (`str | None`): default: CUDA when available, else CPU.
        max_output_pixels (`int`, defaults to `2**27`): largest output per request (voxels).
    """

    def __init__(self, path: str = "", *, family: str | None = None, device: str | None = None,
                 max_output_pixels: int = 2**27) -> None:
        from hybrid_vae.server.app import default_device
        from hybrid_vae.server.cli import load_vae

        self.family = family or read_env().family or detect_family(path or ".")
        self.device = device or default_device()
        profiles = load_profiles()
        vae = load_vae(self.family, path or ".", device=self.device)
        self.served = ServedVAE(self.family, profiles.family(self.family), vae, device=self.device)
        self.service = DecodeService({self.family: self.served}, profiles=profiles, device=self.device,
                                     max_output_pixels=max_output_pixels)
        self.served.get()

    def __call__(self, data: dict[str, Any]) -> Any:
        """Decode one request; raises ``ValueError`` (the toolkit answers 400 with its text) on bad input."""
        inputs = data.get("inputs")
        if isinstance(inputs, str):
            try:
                inputs = base64.b64decode(inputs, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("inputs: expected the latent's bytes, or those bytes base64-encoded") from None
        if not isinstance(inputs, (bytes, bytearray)):
            raise ValueError(f"inputs: expected bytes or base64 text, got {type(inputs).__name__}")
        params = data.get("parameters") or {}
        try:
            req = parse_request(_items(params), family_name=self.family, family=self.served.family,
                                accept=str(params.get("accept", "")) or None)
            hold, smallest = self.service.admit(self.served, req)
            with self.service.reserved(hold, smallest):
                z = latent_from_body(bytes(inputs), req)
                vae = self.served.get()
                z = normalise(z, req, family=self.served.family, vae_config=getattr(vae, "config", None))
                x, _meta = self.service.decode_now(self.served, z, req)
                if req.output_type == "pil" and req.frames is None:
                    from PIL import Image

                    return Image.fromarray(to_uint8(x)[0].permute(1, 2, 0).numpy(), "RGB")
                body, headers = encode_output(x, req)
        except BadRequest as exc:
            raise ValueError(f"{exc.field or 'request'}: {exc}") from None
        if headers.get("content-type") == "video/mp4":
            return body
        return {"shape": json.loads(headers["shape"]), "dtype": headers["dtype"],
                "data": base64.b64encode(body).decode("ascii")}
