"""``hybrid_decode``: diffusers' ``remote_decode``, except that it decides full / tiled / remote by itself.

Swap the import and keep the call; add the local VAE (or the pipeline) so there is a fallback::

    # from diffusers.utils.remote_utils import remote_decode
    from hybrid_vae.extension.dropin import hybrid_decode as remote_decode

    image = remote_decode(endpoint=URL, tensor=latent, scaling_factor=0.18215, vae=pipe.vae)

It takes ``remote_decode``'s arguments (same names, same defaults: ``processor``, ``do_scaling``,
``scaling_factor``, ``shift_factor``, ``output_type``, ``return_type``, ``image_format``,
``partial_postprocess``, ``input_tensor_type``, ``output_tensor_type``, ``height``, ``width``) and returns
what ``remote_decode`` returns for them: a PIL image (a list for a batch), a tensor for
``output_type="pt"`` (uint8 ``[B, H, W, 3]`` with ``partial_postprocess``, else float in [-1, 1] in the
latent's dtype), mp4 bytes for ``output_type="mp4"``, and a list of PIL frames for a video with
``output_type="pil"``. The difference is what happens underneath: every call goes through
:class:`~extension.orchestrator.HybridDecoder`, which reads the free GPU memory, decides between a full
local decode, a tiled local decode and the endpoint, and falls back along the chain (endpoint down ->
local; out of memory -> smaller tiles -> CPU). With neither a VAE nor a reachable endpoint the latent is
saved and :class:`~policy.errors.DecodeFailedError` names the file.

Where it differs from ``remote_decode`` on purpose:

* remote decode happens only when an ``endpoint`` is given (that counts as opting in for the call) or
  configured in ``settings`` with ``allow_remote=True``; ``endpoint`` may be omitted;
* ``output_type="mp4"`` returns the bytes whatever ``return_type`` says (diffusers raises
  ``UnboundLocalError`` for the default ``return_type="pil"``);
* a batch gives a list of images (``remote_decode`` returns only the first for ``pil``);
* an image decoded locally is not JPEG-compressed: ``image_format`` chooses what the *endpoint* sends;
* remote tensors come back as 8-bit (the engine's client always asks for ``partial_postprocess``), so a
  remote ``output_type="pt"`` result is quantised to 1/127.5 steps, a local one is not.

The decision report (what ran, why, each attempt) goes to ``on_report``, to the ``hybrid_vae`` logger,
and into ``image.info["hybrid_vae"]`` of PIL results. Pass one ``decoder=`` (a ``HybridDecoder`` with a
``RemoteClient``) to many calls to keep the endpoint's circuit breaker and network measurements.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from hybrid_vae.extension import remote_wire
from hybrid_vae.extension.endpoints import join_endpoints, pool_for
from hybrid_vae.extension.geometry import UNMATCHED, resolve_family, vae_geometry
from hybrid_vae.extension.orchestrator import DEFAULT_LATENT_DIR, DecodeReport, HybridDecoder
from hybrid_vae.policy.errors import PlanError
from hybrid_vae.policy.geometry import match_family
from hybrid_vae.policy.model import DecodeSettings, build_settings, split_endpoints
from hybrid_vae.policy.profiles import Profiles, ProfileStore

if TYPE_CHECKING:
    import torch

log = logging.getLogger("hybrid_vae.dropin")

__all__ = ["hybrid_decode", "infer_family"]

OUTPUT_TYPES = ("pil", "pt", "mp4")
#: diffusers pipeline class-name prefixes -> family (longest first where prefixes overlap).
PIPELINE_FAMILIES: tuple[tuple[str, str | None], ...] = (
    ("Flux2", None), ("StableDiffusionXL", "sdxl"), ("StableDiffusion3", "sd3"), ("Flux", "flux"),
    ("HunyuanVideo", "hunyuanvideo"), ("Wan", "wan"), ("StableDiffusion", "sd15"),
    ("LatentConsistencyModel", "sd15"),
)


class _NoLocalVAE:
    """Stands in for the VAE when the caller gave none: every local plan fails at once, with this message."""

    config = None

    def parameters(self) -> Any:
        return iter(())

    def to(self, *args: Any, **kwargs: Any) -> _NoLocalVAE:
        return self

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        raise PlanError("no local VAE: pass vae= (or pipeline= with a .vae) for a local fallback")


class _FixedStore(ProfileStore):
    """A ProfileStore that always answers with given profiles (the caller's scaling/shift factors)."""

    def __init__(self, profiles: Profiles) -> None:
        super().__init__()
        self._fixed = profiles

    def get(self, override: Any = None) -> tuple[Profiles, Any]:
        return self._fixed, None


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return (a or 0.0) == (b or 0.0)
    return abs(float(a) - float(b)) <= 1e-4 * max(1.0, abs(float(b)))


def _family_from_vae(vae: Any, profiles: Profiles) -> str | None:
    """The family whose whole geometry matches ``vae``'s, ``unmatched`` when none does; None when the VAE has no
    readable geometry or is of a class the engine does not decode (:mod:`policy.geometry`)."""
    geom = vae_geometry(vae)
    if geom is None or geom.architecture is None:
        return None
    key, _ = match_family(geom, profiles)
    return key or UNMATCHED


def _family_from_endpoint(spec: str, profiles: Profiles) -> str | None:
    for url in split_endpoints(spec):  # a pool "a|b": the first member that tells
        norm = url.rstrip("/")
        for key, fam in profiles.families.items():
            if any(ep.url.rstrip("/") == norm for ep in fam.endpoints):
                return key
        parts = [p for p in urlsplit(url).path.split("/") if p and p != "predict"]
        if parts and parts[-1] in profiles.families:  # `hybrid-vae serve`: http://host:port/<family>
            return parts[-1]
    return None


def _family_from_tensor(t: Any, profiles: Profiles, scaling: float | None, shift: float | None) -> str | None:
    rank, shape = t.dim(), tuple(t.shape)
    if rank == 3:
        cands = [k for k, f in profiles.families.items() if f.packed and f.latent_channels * 4 == shape[2]]
    elif rank in (4, 5):
        cands = [k for k, f in profiles.families.items() if f.video == (rank == 5) and f.latent_channels == shape[1]]
    else:
        return None
    if scaling is not None:
        for k in cands:
            fam = profiles.families[k]
            if _close(scaling, fam.scaling_factor) and _close(shift, fam.shift_factor):
                return k
    return cands[0] if cands else None


def infer_family(tensor: Any, *, vae: Any = None, pipeline: Any = None, endpoint: str | None = None,
                 scaling_factor: float | None = None, shift_factor: float | None = None,
                 profiles: Profiles | None = None) -> tuple[str, str]:
    """Guess the VAE family of a decode; return ``(family, how it was found)``.

    Order: the VAE's whole geometry (class, channels, compression, scaling/shift or mean/std;
    ``unmatched`` -- local only -- when it matches no family), the pipeline's class name, the endpoint
    (a built-in endpoint URL, or
    ``.../<family>`` of ``hybrid-vae serve``), and last the latent's layout with the given factors
    (3-D packed -> flux; 5-D -> the first video family with that many channels; 4-D -> the family whose
    factors match, else the first with that many channels: sd15 for 4, flux for 16).

    Raises:
        ValueError: nothing matched; pass ``family=``.
    """
    profiles = profiles or ProfileStore().get()[0]
    if vae is not None:
        fam = _family_from_vae(vae, profiles)
        if fam is not None:
            return fam, f"VAE {type(vae).__name__} geometry"
    if pipeline is not None:
        pname = type(pipeline).__name__
        for prefix, fam in PIPELINE_FAMILIES:
            if pname.startswith(prefix):
                if fam is not None and fam in profiles.families:
                    return fam, f"pipeline {pname}"
                break
    if endpoint:
        fam = _family_from_endpoint(endpoint, profiles)
        if fam is not None:
            return fam, "endpoint URL"
    fam = _family_from_tensor(tensor, profiles, scaling_factor, shift_factor)
    if fam is not None:
        return fam, f"latent shape {list(tensor.shape)}"
    raise ValueError(f"cannot tell the VAE family of a latent of shape {list(tensor.shape)}; pass family= "
                     f"(one of {', '.join(sorted(profiles.families))})")


def _check_args(tensor: Any, *, endpoint: str | None, processor: Any, output_type: str, return_type: str, image_format: str,
                partial_postprocess: bool, input_tensor_type: str, output_tensor_type: str, height: int | None,
                width: int | None) -> None:
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    for name, value, allowed in (("output_type", output_type, OUTPUT_TYPES), ("return_type", return_type, OUTPUT_TYPES),
                                 ("image_format", image_format, ("jpg", "png")),
                                 ("input_tensor_type", input_tensor_type, ("binary", "base64")),
                                 ("output_tensor_type", output_tensor_type, ("binary", "base64"))):
        if value not in allowed:
            raise ValueError(f"{name}={value!r}: use one of {', '.join(map(repr, allowed))}")
    if endpoint is not None and not (isinstance(endpoint, str) and endpoint.startswith(("http://", "https://"))):
        raise ValueError(f"endpoint={endpoint!r}: give an http:// or https:// URL, a list of them (tried best first, "
                         "failing over), or None for local decode only")
    if tensor.dim() == 3 and (height is None or width is None):
        raise ValueError("`height` and `width` required for packed latents: pass the pixel size the latents were "
                         "generated at (e.g. height=1024, width=1024)")
    if output_type == "pt" and return_type == "pil" and not partial_postprocess:
        from diffusers.image_processor import VaeImageProcessor
        from diffusers.video_processor import VideoProcessor

        if not isinstance(processor, (VaeImageProcessor, VideoProcessor)):
            raise ValueError("`processor` is required for output_type='pt', return_type='pil' without "
                             "partial_postprocess: pass a VaeImageProcessor/VideoProcessor, or "
                             "partial_postprocess=True, or return_type='pt'")


def _profiles_for(profiles: Profiles, family: str, *, do_scaling: bool, scaling: float | None,
                  shift: float | None) -> Profiles | None:
    """Profiles whose ``family`` carries the caller's normalisation, or None when the built-in one applies."""
    fam = profiles.family(family)
    if scaling is None and do_scaling:
        return None  # the family's own factors, as the endpoint would apply them
    if scaling is None:  # do_scaling=False: the latent is already in VAE space
        update: dict[str, Any] = {"scaling_factor": 1.0, "shift_factor": None, "latents_mean": None, "latents_std": None}
    else:
        if fam.latents_mean is None and _close(scaling, fam.scaling_factor) and _close(shift, fam.shift_factor):
            return None
        update = {"scaling_factor": float(scaling), "shift_factor": None if shift is None else float(shift),
                  "latents_mean": None, "latents_std": None}
    families = dict(profiles.families)
    families[family] = fam.model_copy(update=update)
    return profiles.model_copy(update={"families": families})


def _remote_format(output_type: str, image_format: str, processor: Any) -> str:
    """What to ask the endpoint for: the image format remote_decode would ask for, else raw 8-bit."""
    if output_type == "pil" and processor is None:
        return image_format
    return "raw"


def _settings_for(base: DecodeSettings, *, family: str, endpoint: str | None, remote_format: str,
                  explicit: bool, has_vae: bool) -> DecodeSettings:
    update: dict[str, Any] = {}
    if endpoint:
        update["allow_remote"] = True
        update["endpoints"] = {**base.endpoints, family: endpoint}
    if not explicit:  # the caller did not choose a format: the one remote_decode would ask for
        update["remote_format"] = remote_format
    remote_on = update.get("allow_remote", base.allow_remote)
    if not has_vae and remote_on and base.mode == "auto":
        update["mode"] = "remote"  # nothing local can run: do not try local plans first
    return build_settings(update, names={"endpoints": "endpoint", "remote_format": "image_format"}, base=base) if update else base


def _decoder_for(decoder: HybridDecoder | None, *, settings: DecodeSettings, store: ProfileStore,
                 profiles: Profiles | None, latent_dir: str | Path | None, token: str | None,
                 endpoint: str | None) -> tuple[HybridDecoder, Any]:
    """The decoder for this call, and the remote client it made (to close after the call), if any."""
    from hybrid_vae.extension.remote import RemoteClient

    if decoder is not None:
        dec = copy.copy(decoder)  # never mutate the caller's decoder (it may serve other threads)
        dec.settings = settings
    else:
        dec = HybridDecoder(settings=settings, profile_store=store, latent_dir=latent_dir or DEFAULT_LATENT_DIR)
    if latent_dir is not None:
        dec.latent_dir = Path(latent_dir)
    owned = None
    if dec.remote is None and settings.allow_remote:
        trusted = [endpoint] if (token and endpoint) else list(settings.endpoints.values()) if token else []
        owned = RemoteClient(token=token, trusted_endpoints=trusted)
        dec.remote = owned  # type: ignore[assignment]
    if dec.remote is not None:  # several endpoints per family ("a|b"): a pool over the same client
        dec.remote = pool_for(dec.remote, settings.endpoints)
    if profiles is not None:
        dec.store = _FixedStore(profiles)
    return dec, owned


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    import torch

    return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def _frames_hwc(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] ``[B, 3, H, W]`` / ``[B, 3, F, H, W]`` -> uint8 ``[N, H, W, 3]`` (videos' frames in order)."""
    u8 = _to_uint8(x)
    if u8.dim() == 5:
        return u8.permute(0, 2, 3, 4, 1).reshape(-1, u8.shape[3], u8.shape[4], 3).contiguous()
    return u8.permute(0, 2, 3, 1).contiguous()


def encode_mp4(frames: Any, *, fps: int = 16, crf: int = 18) -> bytes:
    """H.264 mp4 of uint8 ``[N, H, W, 3]`` frames, the same encoder as ``hybrid-vae serve``.

    Raises:
        ImportError: PyAV is missing (``pip install av``).
    """
    try:
        return remote_wire.encode_mp4(frames, fps=fps, crf=crf)
    except ImportError:
        raise ImportError("output_type='mp4' needs PyAV for a local decode: pip install av "
                          "(or use output_type='pil' for frames)") from None


def _pil_list(u8: torch.Tensor, *, info: str, fmt: str | None = None) -> list[Any]:
    from PIL import Image

    out = []
    for a in u8:
        img = Image.fromarray(a.numpy(), "RGB")
        img.info["hybrid_vae"] = info
        if fmt is not None:
            img.format = fmt  # remote_decode labels its images with the endpoint's format
        out.append(img)
    return out


def _shape_output(x: torch.Tensor, *, video: bool, output_type: str, return_type: str, partial_postprocess: bool,
                  processor: Any, image_format: str, out_dtype: torch.dtype, fps: int, info: str) -> Any:
    """A decoded float [-1, 1] tensor -> what remote_decode returns for these arguments."""
    x = x.detach().float().cpu()
    batch = int(x.shape[0])
    if output_type == "mp4":
        return encode_mp4(_frames_hwc(x), fps=fps)
    if output_type == "pt":
        if partial_postprocess:
            u8 = _frames_hwc(x)
            if return_type == "pil":
                imgs = _pil_list(u8, info=info)
                return imgs[0] if len(imgs) == 1 else imgs
            return u8
        t = x.to(out_dtype)
        if processor is None or return_type == "pt":
            return t
        from diffusers.video_processor import VideoProcessor

        if isinstance(processor, VideoProcessor):
            vids = processor.postprocess_video(t.float(), output_type="pil")
            return vids[0] if batch == 1 else vids
        imgs = processor.postprocess(t.float(), output_type="pil")
        return imgs[0] if batch == 1 else imgs
    # output_type == "pil"
    if processor is not None or video:  # the endpoint's tensor convention: frames in [0, 1]
        frames = _frames_hwc(x)
        if return_type == "pt":
            return (frames.permute(0, 3, 1, 2).float() / 255.0).to(out_dtype)
        return _pil_list(frames, info=info)
    imgs = _pil_list(_frames_hwc(x), info=info, fmt="jpeg" if image_format == "jpg" else "png")
    return imgs[0] if batch == 1 else imgs


def _split_positional(args: tuple[Any, ...], tensor: Any, endpoint: Any) -> tuple[Any, Any]:
    """Accept ``hybrid_decode(tensor)`` and diffusers' positional ``remote_decode(endpoint, tensor)``."""
    if not args:
        return tensor, endpoint
    if len(args) == 1 and not isinstance(args[0], str) and tensor is None:
        return args[0], endpoint
    if len(args) == 2 and isinstance(args[0], (str, list, tuple)) and tensor is None and endpoint is None:
        return args[1], args[0]
    raise TypeError("hybrid_decode takes the tensor positionally (hybrid_decode(tensor, ...)) or diffusers' "
                    "order (hybrid_decode(endpoint, tensor, ...)); pass every other argument by keyword")


def hybrid_decode(*args: Any, tensor: torch.Tensor | None = None, endpoint: str | Sequence[str] | None = None,
                  vae: Any = None,
                  pipeline: Any = None, family: str | None = None, processor: Any = None, do_scaling: bool = True,
                  scaling_factor: float | None = None, shift_factor: float | None = None, output_type: str = "pil",
                  return_type: str = "pil", image_format: str = "jpg", partial_postprocess: bool = False,
                  input_tensor_type: str = "binary", output_tensor_type: str = "binary", height: int | None = None,
                  width: int | None = None, settings: DecodeSettings | None = None,
                  decoder: HybridDecoder | None = None, token: str | None = None,
                  latent_dir: str | Path | None = None, fps: int = 16,
                  on_report: Callable[[DecodeReport], None] | None = None, **kw: Any) -> Any:
    """Decode ``tensor`` like diffusers' ``remote_decode``, choosing full, tiled or remote decode by itself.

    Args:
        tensor (`torch.Tensor`): the latents as the pipeline returned them (``output_type="latent"``):
            ``[B, C, h, w]``, Flux packed ``[B, (H/16)*(W/16), 64]`` (give ``height``/``width``), or video
            ``[B, C, T, h, w]``. Also accepted positionally, alone or in diffusers' order after the endpoint.
        endpoint (`str | Sequence[str] | None`, defaults to `None`): a hybrid-inference endpoint, or several
            (a list, or URLs joined by ``|``: a pool, health-checked, tried best first by measured latency and
            recent errors, failing over within the deadline; ``extension/endpoints.py``). Giving one opts this
            call in to remote decode (the endpoint's operator sees the image); the engine still decodes locally
            when that is faster or every endpoint fails. None: local only, unless ``settings`` enable remote.
        vae: the local diffusers VAE (``AutoencoderKL``, ``AutoencoderKLHunyuanVideo``, ``AutoencoderKLWan``).
        pipeline: a diffusers pipeline; its ``.vae`` is used when ``vae`` is None, its class names the family.
        family (`str | None`): ``sd15``, ``sdxl``, ``sd3``, ``flux``, ``hunyuanvideo``, ``wan``; default:
            :func:`infer_family`.
        processor, do_scaling, scaling_factor, shift_factor, output_type, return_type, image_format,
            partial_postprocess, input_tensor_type, output_tensor_type, height, width: as in ``remote_decode``
            (defaults identical). ``scaling_factor=None`` with ``do_scaling=True`` means the family's own
            factors; with ``do_scaling=False`` the latent is taken as already in VAE space.
        settings (`DecodeSettings | None`): the engine's settings (mode, reserve, overlap, deadline, ...). When
            omitted, the endpoint is asked for the format ``remote_decode`` would ask for (``image_format`` for
            ``pil``, else raw 8-bit); when given, its ``remote_format`` is kept.
        decoder (`HybridDecoder | None`): reuse one decoder (and its remote client) across calls; it is
            copied per call, never changed.
        token (`str | None`): bearer token for the endpoint (sent to it only; HTTPS unless loopback).
        latent_dir (`str | Path | None`): where a latent is saved when every plan fails (default
            ``./hybrid-vae-latents``, or the decoder's).
        fps (`int`, defaults to `16`): frame rate of a locally encoded mp4.
        on_report (`Callable[[DecodeReport], None] | None`): receives the decode report.
        **kw: passed to :meth:`HybridDecoder.decode` (``vae_id``, ``custom_vae``, ``dtype``, ``frames``, ``progress``).

    Returns:
        `PIL.Image.Image`, `list[PIL.Image.Image]`, `bytes` or `torch.Tensor`, as ``remote_decode`` would.

    Raises:
        ValueError / TypeError: bad arguments (named, with the fix); LatentError (a ValueError) for a latent
            that does not fit the family.
        DecodeFailedError: every plan failed (endpoint down and no VAE, ...); ``latent_path`` is the saved file.
    """
    tensor, endpoint = _split_positional(args, tensor, endpoint)
    if endpoint is not None and not isinstance(endpoint, str):
        try:
            endpoint = join_endpoints(endpoint)
        except ValueError as exc:
            raise ValueError(f"endpoint={endpoint!r}: {exc}") from None
    _check_args(tensor, endpoint=endpoint, processor=processor, output_type=output_type, return_type=return_type,
                image_format=image_format, partial_postprocess=partial_postprocess, input_tensor_type=input_tensor_type,
                output_tensor_type=output_tensor_type, height=height, width=width)
    assert tensor is not None
    local_vae = vae if vae is not None else getattr(pipeline, "vae", None)
    store = decoder.store if decoder is not None else ProfileStore()
    profiles, _ = store.get(decoder.profile_path if decoder is not None else None)
    if family is None:
        family, how = infer_family(tensor, vae=local_vae, pipeline=pipeline, endpoint=endpoint,
                                   scaling_factor=scaling_factor, shift_factor=shift_factor, profiles=profiles)
        log.debug("hybrid-vae: family %s (from the %s)", family, how)
    if local_vae is not None:  # the VAE's geometry wins over a contradicting family; adds ``unmatched`` when used
        family, profiles, _ = resolve_family(local_vae, profiles, family)
    custom = _profiles_for(profiles, family, do_scaling=do_scaling, scaling=scaling_factor, shift=shift_factor)
    if custom is None and family == UNMATCHED:
        custom = profiles
    base = settings or (decoder.settings if decoder is not None else DecodeSettings())
    explicit = settings is not None and settings.remote_format != "auto"
    fmt = _remote_format(output_type, image_format, processor)
    eff = _settings_for(base, family=family, endpoint=endpoint, remote_format=fmt, explicit=explicit,
                        has_vae=local_vae is not None)
    dec, owned = _decoder_for(decoder, settings=eff, store=store, profiles=custom, latent_dir=latent_dir,
                              token=token, endpoint=endpoint)
    video = tensor.dim() == 5
    packed = tensor.dim() == 3  # remote_decode sends height/width always; only packed latents use them
    try:
        result = dec.decode(tensor, local_vae if local_vae is not None else _NoLocalVAE(), family=family,
                            output="pt", height=height if packed else None, width=width if packed else None, **kw)
    finally:
        if owned is not None:
            owned.close()  # a client made for this call only: release its connections
    info = result.report.infotext()
    if on_report is not None:
        on_report(result.report)
    out_dtype = tensor.dtype if tensor.is_floating_point() else None
    import torch

    return _shape_output(result.tensor, video=video, output_type=output_type, return_type=return_type,
                         partial_postprocess=partial_postprocess, processor=processor, image_format=image_format,
                         out_dtype=out_dtype or torch.float32, fps=fps, info=info)
