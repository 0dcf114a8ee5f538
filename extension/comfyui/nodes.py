"""The "Hybrid VAE Decode" ComfyUI node: LATENT + VAE -> IMAGE, decided full / tiled / remote by the engine.

What the node does with ComfyUI's objects (``comfy.sd.VAE`` and the ``LATENT`` dict):

* ``LATENT["samples"]`` holds latents in the VAE's own space (ComfyUI applies the model's latent format
  inside the sampler), ``[B, C, h, w]`` or video ``[B, C, T, h, w]``. The node normalises them with the
  family's factors (``(z - shift) * scaling``, or ``(z - mean) / std``) because the engine and the
  endpoints take latents as diffusion pipelines hand them over.
* **Local plans** keep ComfyUI's model management in charge of the weights (loading, offloading, low-VRAM
  casting). A full decode is ComfyUI's own ``vae.decode``. A tiled decode of a standard image VAE (ComfyUI's
  ``AutoencoderKL``/``AutoencodingEngine`` with the SD ``Decoder``: SD1.x, SDXL, SD3, Flux) runs the engine's
  one-pass tiler over ``first_stage_model.decode`` after ``load_models_gpu`` for the tile, exactly as
  ComfyUI's own tiled decode calls it; any other VAE (video, TAESD, ...) gets ComfyUI's
  ``vae.decode_tiled(tile_x, tile_y, overlap[, tile_t, overlap_t])`` with the engine's tile, overlap and
  temporal chunk in latent units. Why not always ``decode_tiled``: ComfyUI's 2-D version averages three
  passes with differently shaped tiles (``tile_x // 2 x tile_y * 2``, ...): at least three times the decoder
  work at the same memory, and with the engine's small tiles the half-width passes need many more (320 px in
  192 px tiles: 9,984 latent pixels through the decoder against 2,304). A VAE whose
  ``first_stage_model`` is a diffusers model (wrappers from other node packs) is decoded by the engine's
  executors directly.
* **Remote** is opt-in: a non-empty ``endpoint`` enables it for that family (the endpoint must serve the
  same VAE as the one wired in: the endpoint's operator sees the images). A bearer token is read from the
  environment variable ``HYBRID_VAE_TOKEN`` (never from a widget, so it does not land in saved workflows).
* **Fallbacks**: the engine's chain (remote -> local full/tiled -> CPU); when every plan fails the latent is
  saved under ComfyUI's output folder (``hybrid-vae-latents/``) and the error names the file. A VAE the
  engine has no family for (audio, 16x/32x image VAEs, ...) is decoded by plain ``vae.decode``, and the
  text says so.
* ``free_memory_first`` (default on) first asks ComfyUI to make room for a full decode exactly as its own
  VAE Decode node does (``load_models_gpu`` with the VAE's ``memory_used_decode``), then the engine decides
  from what is free. Off: the engine decides from what is free now, keeping the diffusion model loaded and
  tiling instead.

Outputs: ``IMAGE`` (float ``[N, H, W, C]`` in [0, 1]; video frames one after another) and a ``STRING`` with
the decision line, e.g. ``Hybrid VAE: tiled 384px/64, 0.75 GiB budget < 4.79 GiB full, 1.20 s | sd15 (VAE)``.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hybrid_vae.extension.latents import from_vae_space
from hybrid_vae.extension.orchestrator import DEFAULT_LATENT_DIR, HybridDecoder
from hybrid_vae.policy.model import DecodeSettings
from hybrid_vae.policy.profiles import Family, Profiles, ProfileStore

log = logging.getLogger("hybrid_vae.comfyui")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "ComfyVAEAdapter", "HybridVAEDecode", "comfy_family",
           "comfy_kl_like"]

ENV_TOKEN = "HYBRID_VAE_TOKEN"
MODES = ("auto", "full", "tiled", "remote")
TILINGS = ("auto", "exact", "offload", "local")  # DecodeSettings.tile_groupnorm


def _compression(vae: Any) -> tuple[int | None, int | None]:
    """(spatial, temporal) decode compression of a ComfyUI VAE (its own helpers when present)."""
    fn = getattr(vae, "spacial_compression_decode", None)
    spatial = fn() if callable(fn) else getattr(vae, "upscale_ratio", None)
    if isinstance(spatial, (tuple, list)):
        spatial = spatial[-1]
    fn = getattr(vae, "temporal_compression_decode", None)
    temporal = fn() if callable(fn) else None
    return (int(spatial) if isinstance(spatial, (int, float)) else None,
            int(temporal) if isinstance(temporal, (int, float)) else None)


def _is_diffusers_vae(model: Any) -> bool:
    try:
        from diffusers import ModelMixin
    except ImportError:
        return False
    return isinstance(model, ModelMixin) and callable(getattr(model, "decode", None))


def comfy_family(vae: Any, z: Any, profiles: Profiles) -> tuple[str | None, str]:
    """The engine family of a ComfyUI VAE and latent, or ``(None, why not)``.

    Image VAEs (``latent_dim`` 2, 8x): 4 channels -> sd15 (SD1.x and SDXL decoders are the same network;
    pick ``sdxl`` by hand for an SDXL endpoint), 16 -> flux (pick ``sd3`` by hand). Video VAEs (``latent_dim``
    3, 8x spatial, 4x temporal, 16 channels): ``WanVAE`` -> wan, others -> hunyuanvideo.
    """
    fsm = getattr(vae, "first_stage_model", None)
    if fsm is not None and _is_diffusers_vae(fsm):
        from hybrid_vae.extension.dropin import infer_family

        try:
            fam, how = infer_family(z, vae=fsm, profiles=profiles)
        except ValueError as exc:
            return None, str(exc)
        return fam, how
    channels = getattr(vae, "latent_channels", None)
    if channels is None:
        channels = int(z.shape[1])
    dim = int(getattr(vae, "latent_dim", 2))
    spatial, temporal = _compression(vae)
    cls = type(fsm).__name__ if fsm is not None else "?"
    if dim == 3:
        key = "wan" if "wan" in cls.lower() else "hunyuanvideo"
        need_t = profiles.families[key].temporal_compression if key in profiles.families else None
        if temporal is not None and temporal != need_t:
            return None, f"video VAE {cls} with {temporal}x temporal compression"
    elif dim == 2:
        key = {4: "sd15", 16: "flux"}.get(int(channels), "")
    else:
        return None, f"{dim}-D latents ({cls}) are not images"
    prof = profiles.families.get(key)
    if prof is None or prof.latent_channels != channels or (spatial is not None and spatial != prof.spatial_compression):
        return None, f"{cls}: {channels} latent channels, {spatial}x; no matching family"
    return key, f"ComfyUI VAE {cls}, {channels} channels"


class ComfyVAEAdapter(torch.nn.Module):
    """Shows a ``comfy.sd.VAE`` to the engine's executors as a diffusers-style VAE.

    Its ``decode`` runs ComfyUI's ``vae.decode`` (full) or ``vae.decode_tiled`` with the tile the executor
    set through diffusers' tiling attributes (``tile_sample_min_size``/``tile_overlap_factor`` for images;
    ``tile_sample_min_height``/``..._width``, strides and ``tile_sample_min_num_frames`` for video), and
    returns float [-1, 1] ``[B, C, H, W]`` / ``[B, C, F, H, W]``. With ``engine_tiles`` (ComfyUI's standard
    image VAEs, :func:`comfy_kl_like`) it also has ``post_quant_conv = None`` and a ``decoder`` that runs one
    tile through ``first_stage_model.decode``, so the engine's one-pass tiler runs instead of
    ``decode_tiled``; without it there is no ``post_quant_conv`` and the engine never tiles ComfyUI's weights
    itself. A zero-size parameter carries ComfyUI's device and dtype for the engine (moving it moves nothing
    else). ``calls`` lists what ran, for the report.

    Args:
        comfy_vae: the ``comfy.sd.VAE`` (``decode``, ``decode_tiled``, ``device``, ``vae_dtype``).
        family (`Family`): the engine family (compression factors, video or not).
        engine_tiles (`bool`, defaults to `False`): let the engine's tiler run ``first_stage_model.decode``
            per tile (only for decoders that are ``decoder(post_quant_conv(z))``).
    """

    _vae: Any

    def __init__(self, comfy_vae: Any, family: Family, *, engine_tiles: bool = False) -> None:
        super().__init__()
        object.__setattr__(self, "_vae", comfy_vae)  # not a submodule: ComfyUI owns its weights
        self._fam = family
        dev = getattr(comfy_vae, "device", None) or "cpu"
        dtype = getattr(comfy_vae, "vae_dtype", None) or torch.float32
        self._anchor = torch.nn.Parameter(torch.empty(0, device=dev, dtype=dtype), requires_grad=False)
        self.config = types.SimpleNamespace(force_upcast=False, out_channels=int(getattr(comfy_vae, "output_channels", 3)))
        self.use_tiling = False
        self.calls: list[str] = []
        self.decoder: torch.nn.Module
        if engine_tiles:
            # the engine's tiler calls decoder(post_quant_conv(tile)); here decoder = first_stage_model.decode
            self.post_quant_conv = None
            self.decoder = _ComfyTileDecoder(comfy_vae, self.calls)
        else:
            self.decoder = torch.nn.Identity()  # the executors' progress hook needs a module; ComfyUI reports its own
        sc = family.spatial_compression
        if family.video:
            self.use_framewise_decoding = False
            self.tile_sample_min_height = self.tile_sample_min_width = 256
            self.tile_sample_stride_height = self.tile_sample_stride_width = 192
            self.tile_sample_min_num_frames = 16
            self.tile_sample_stride_num_frames = 12
        else:
            self.tile_sample_min_size = 512
            self.tile_latent_min_size = 512 // sc
            self.tile_overlap_factor = 0.25

    def tile_args(self) -> dict[str, int] | None:
        """``decode_tiled`` keyword arguments (latent units) for the tiling attributes now set; None: untiled."""
        sc, tc = self._fam.spatial_compression, self._fam.temporal_compression
        if self._fam.video:
            framewise = bool(getattr(self, "use_framewise_decoding", False))
            if not self.use_tiling and not framewise:
                return None
            args: dict[str, int] = {}
            if self.use_tiling:
                args.update(tile_x=self.tile_sample_min_width // sc, tile_y=self.tile_sample_min_height // sc,
                            overlap=max(0, self.tile_sample_min_width - self.tile_sample_stride_width) // sc)
            else:  # temporal chunks only: tiles as large as the frame
                args.update(tile_x=1 << 16, tile_y=1 << 16, overlap=0)
            if framewise:
                args["tile_t"] = max(2, self.tile_sample_min_num_frames // tc)
                args["overlap_t"] = max(1, (self.tile_sample_min_num_frames - self.tile_sample_stride_num_frames) // tc)
            return args
        if not self.use_tiling:
            return None
        tile = int(self.tile_sample_min_size)
        return {"tile_x": tile // sc, "tile_y": tile // sc, "overlap": round(self.tile_overlap_factor * tile) // sc}

    def decode(self, z: torch.Tensor, return_dict: bool = True, **_: Any) -> Any:
        args = self.tile_args()
        if args is None:
            self.calls.append("vae.decode")
            out = self._vae.decode(z)
        else:
            self.calls.append("vae.decode_tiled(" + ", ".join(f"{k}={v}" for k, v in args.items()) + ")")
            out = self._vae.decode_tiled(z, **args)
        x = out.movedim(-1, 1).to(dtype=z.dtype, device=z.device).mul(2.0).sub(1.0)
        if x.shape[1] > 3:
            x = x[:, :3]
        return (x,) if not return_dict else types.SimpleNamespace(sample=x)


class _ComfyTileDecoder(torch.nn.Module):
    """One tile through ComfyUI's ``first_stage_model.decode``, as ComfyUI's tiled decode calls it: the VAE
    loaded by ``load_models_gpu`` for the tile's memory first, the tile cast to ``vae.vae_dtype`` on
    ``vae.device``, the result handed back in the caller's dtype and device."""

    _vae: Any

    def __init__(self, comfy_vae: Any, calls: list[str]) -> None:
        super().__init__()
        object.__setattr__(self, "_vae", comfy_vae)
        self._calls = calls
        self._loaded = False
        self.tiles = 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        vae = self._vae
        if not self._loaded:
            estimate = getattr(vae, "memory_used_decode", None)
            try:
                from comfy import model_management
            except ImportError:
                model_management = None
            if model_management is not None and callable(estimate) and getattr(vae, "patcher", None) is not None:
                model_management.load_models_gpu([vae.patcher], memory_required=int(estimate(z.shape, vae.vae_dtype)))
            self._loaded = True
        out: torch.Tensor = vae.first_stage_model.decode(z.to(device=vae.device, dtype=vae.vae_dtype))
        self.tiles += 1
        if self.tiles == 1:
            self._calls.append("first_stage_model.decode per tile (engine tiler)")
        return out.to(device=z.device, dtype=z.dtype)


#: ComfyUI first-stage models whose decode is ``decoder(post_quant_conv(z))`` with the SD ``Decoder``.
KL_MODELS = frozenset({"AutoencoderKL", "AutoencodingEngine", "AutoencodingEngineLegacy"})


def comfy_kl_like(vae: Any) -> bool:
    """True for ComfyUI's standard image VAEs (SD1.x, SDXL, SD3, Flux), which the engine's tiler may run."""
    fsm = getattr(vae, "first_stage_model", None)
    dec = getattr(fsm, "decoder", None)
    return (int(getattr(vae, "latent_dim", 2)) == 2 and type(fsm).__name__ in KL_MODELS
            and isinstance(dec, torch.nn.Module) and type(dec).__name__ == "Decoder" and callable(getattr(fsm, "decode", None)))


def _to_image(x: Any) -> Any:
    """float [-1, 1] ``[B, 3, H, W]`` / ``[B, 3, F, H, W]`` -> ComfyUI IMAGE ``[N, H, W, 3]`` in [0, 1] on the CPU."""
    x = x.detach().float().cpu()
    img = (x.clamp(-1.0, 1.0) + 1.0) / 2.0
    if img.dim() == 5:
        return img.permute(0, 2, 3, 4, 1).reshape(-1, img.shape[3], img.shape[4], img.shape[1]).contiguous()
    return img.movedim(1, -1).contiguous()


def _comfy_latent_dir() -> Path:
    try:
        import folder_paths  # ComfyUI's module

        return Path(folder_paths.get_output_directory()) / "hybrid-vae-latents"
    except (ImportError, AttributeError):
        return Path(DEFAULT_LATENT_DIR)


def _make_room(vae: Any, z: Any) -> str | None:
    """Ask ComfyUI to free memory for a full decode, as its VAE Decode node does; None when not in ComfyUI."""
    patcher = getattr(vae, "patcher", None)
    estimate = getattr(vae, "memory_used_decode", None)
    if patcher is None or not callable(estimate):
        return None
    try:
        from comfy import model_management
    except ImportError:
        return None
    need = int(estimate(z.shape, getattr(vae, "vae_dtype", None)))
    model_management.load_models_gpu([patcher], memory_required=need)
    return f"asked ComfyUI for {need / 1024**3:.2f} GiB"


class HybridVAEDecode:
    """ComfyUI node "Hybrid VAE Decode" (see the module docstring)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        families = sorted(ProfileStore().get()[0].families)
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The latent to decode."}),
                "vae": ("VAE", {"tooltip": "The VAE that runs local plans (and that the endpoint must match)."}),
            },
            "optional": {
                "endpoint": ("STRING", {"default": "", "multiline": False,
                                        "tooltip": "Remote decode endpoint (hybrid-inference protocol). Empty: remote off. "
                                                   "The endpoint's operator sees the images."}),
                "family": (["auto", *families], {"default": "auto",
                                                 "tooltip": "VAE family; auto: from the VAE (4 ch -> sd15, 16 ch -> flux)."}),
                "mode": (list(MODES), {"default": "auto", "tooltip": "auto: fastest plan that fits; others: tried first."}),
                "free_memory_first": ("BOOLEAN", {"default": True,
                                                  "tooltip": "Let ComfyUI unload models for a full decode before deciding."}),
                "tiling": (list(TILINGS), {"default": "auto",
                                           "tooltip": "Tiles: auto (lossless first), exact (same image as a full decode; "
                                                      "host memory when VRAM is short), offload (exact, whole-image "
                                                      "buffers in host memory), local (least memory, colours drift)."}),
            },
        }

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("IMAGE", "decision")
    OUTPUT_TOOLTIPS = ("The decoded image(s); video frames one after another.", "What ran and why.")
    FUNCTION = "decode"
    CATEGORY = "latent/hybrid-vae"
    DESCRIPTION = ("VAE decode that picks full, tiled or remote decode from the free VRAM, and falls back "
                   "(remote down -> local, out of memory -> smaller tiles) so the image is never lost.")

    def __init__(self) -> None:
        # per node instance (ComfyUI keeps it between runs): the remote client's breaker and measurements
        self._remote: dict[str, Any] = {}
        self._store = ProfileStore()

    def _remote_client(self, endpoint: str) -> Any:
        from hybrid_vae.extension.remote import RemoteClient

        if endpoint not in self._remote:
            token = os.environ.get(ENV_TOKEN) or None
            self._remote[endpoint] = RemoteClient(token=token, trusted_endpoints=[endpoint] if token else [])
        return self._remote[endpoint]

    def decode(self, samples: dict[str, Any], vae: Any, endpoint: str = "", family: str = "auto", mode: str = "auto",
               free_memory_first: bool = True, tiling: str = "auto", *,
               probe: Callable[[], Any] | None = None) -> tuple[Any, str]:
        z = samples["samples"]
        if getattr(vae, "latent_dim", 2) == 2 and z.dim() == 5:
            z = z[:, :, 0]  # as ComfyUI's VAE.decode does for image VAEs
        thrower = getattr(vae, "throw_exception_if_invalid", None)
        if callable(thrower):
            thrower()
        profiles, _ = self._store.get()
        endpoint = (endpoint or "").strip()
        if family == "auto":
            key, how = comfy_family(vae, z, profiles)
        else:
            key, how = family, "chosen"
        if key is None:
            log.warning("hybrid-vae: %s; using ComfyUI's own vae.decode", how)
            image = vae.decode(z)
            if image.dim() == 5:
                image = image.reshape(-1, *image.shape[-3:])
            return image, f"Hybrid VAE: ComfyUI vae.decode ({how}; the engine has no family for it)"
        fam = profiles.family(key)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {', '.join(MODES)}")
        if tiling not in TILINGS:
            raise ValueError(f"tiling={tiling!r}: use one of {', '.join(TILINGS)}")
        room = _make_room(vae, z) if free_memory_first else None
        fsm = getattr(vae, "first_stage_model", None)
        target = fsm if fsm is not None and _is_diffusers_vae(fsm) else \
            ComfyVAEAdapter(vae, fam, engine_tiles=comfy_kl_like(vae))
        settings = DecodeSettings(mode=mode, allow_remote=bool(endpoint), tile_groupnorm=tiling,  # type: ignore[arg-type]
                                  endpoints={key: endpoint} if endpoint else {})
        decoder = HybridDecoder(settings=settings, profile_store=self._store, latent_dir=_comfy_latent_dir(),
                                remote=self._remote_client(endpoint) if endpoint else None, probe=probe)
        result = decoder.decode(from_vae_space(z.float(), fam), target, family=key, output="pt")
        text = f"Hybrid VAE: {result.report.infotext()} | {key} ({how})"
        calls = getattr(target, "calls", None)
        if calls and result.report.ran.path != "remote":
            text += f" | ComfyUI {calls[-1]}"
        elif fsm is not None and target is fsm:
            text += " | engine executors (diffusers VAE)"
        if room:
            text += f" | {room}"
        log.info("%s", text)
        return _to_image(result.tensor), text


NODE_CLASS_MAPPINGS = {"HybridVAEDecode": HybridVAEDecode}
NODE_DISPLAY_NAME_MAPPINGS = {"HybridVAEDecode": "Hybrid VAE Decode"}
