"""The "Hybrid VAE Decode" ComfyUI node: LATENT + VAE -> IMAGE, decided full / tiled / remote by the engine.

What the node does with ComfyUI's objects (``comfy.sd.VAE`` and the ``LATENT`` dict):

* ``LATENT["samples"]`` holds latents in the VAE's own space (ComfyUI applies the model's latent format
  inside the sampler), ``[B, C, h, w]`` or video ``[B, C, T, h, w]``. The node normalises them with the
  family's factors (``(z - shift) * scaling``, or ``(z - mean) / std``) because the engine and the
  endpoints take latents as diffusion pipelines hand them over.
* **Local plans** keep ComfyUI's model management in charge of the weights (loading, offloading, low-VRAM
  casting): before each plan runs, ComfyUI is asked (``load_models_gpu``) to load the VAE with room for that
  plan's estimated peak, no more. Standard image VAEs (ComfyUI's ``AutoencoderKL``/``AutoencodingEngine`` with
  the LDM ``Decoder``: SD1.x, SDXL, SD3, Flux) then decode through ``first_stage_model.decode`` (full), the
  engine's exact tiler over ComfyUI's own decoder modules (``extension.stream_ldm``: the output equals the
  full decode) or its one-pass local tiler (each tile through ``first_stage_model.decode``: least memory,
  colours may drift, and the decision line says so); any other VAE (video, TAESD, ...) gets ComfyUI's
  ``vae.decode`` / ``vae.decode_tiled(tile_x, tile_y, overlap[, tile_t, overlap_t])`` with the engine's tile,
  overlap and temporal chunk in latent units. Why not always ``decode_tiled``: ComfyUI's 2-D version averages three
  passes with differently shaped tiles (``tile_x // 2 x tile_y * 2``, ...): at least three times the decoder
  work at the same memory, and with the engine's small tiles the half-width passes need many more (320 px in
  192 px tiles: 9,984 latent pixels through the decoder against 2,304). A VAE whose
  ``first_stage_model`` is a diffusers model (wrappers from other node packs) is decoded by the engine's
  executors directly.
* **Remote** is opt-in: a non-empty ``endpoint`` enables it for that family (the endpoint's operator sees the
  images). Before the first remote decode for an (endpoint, VAE) pair, a seeded random canary latent is decoded
  by the wired-in VAE and by the endpoint (``extension.identity``); remote is used only when both agree
  (>= 35 dB), else the line says "endpoint serves another VAE" and the decode stays local, unless
  ``remote_custom_vae`` is on. The verdict is cached per endpoint and weights fingerprint. A bearer token is
  read from the environment variable ``HYBRID_VAE_TOKEN`` (never from a widget, so it does not land in saved
  workflows).
* **Fallbacks**: the engine's chain (remote -> local full/tiled -> CPU); when every plan fails the latent is
  saved under ComfyUI's output folder (``hybrid-vae-latents/``) and the error names the file. A VAE the
  engine has no family for (audio, 16x/32x image VAEs, ...) is decoded by plain ``vae.decode``, and the
  text says so.
* ``free_memory_first`` (default on): the engine counts the memory ComfyUI could free by unloading other
  models on the VAE's GPU as available, and ComfyUI is then asked for the chosen plan's estimate only -- nothing
  for a remote or CPU plan, 1.22 GiB (not ComfyUI's 2.13 GiB full-decode figure) for a 512 px exact-tiled
  SD decode. Off: the engine decides from what is free now, keeping the diffusion model loaded and tiling
  instead.
* ``learn`` (default on): each local decode on a GPU records its time and CUDA peak against the estimate
  (``policy.learned``, a small JSON file in the user cache or at ``HYBRID_VAE_LEARNED``; ``hybrid-vae explain
  --learned`` shows it, ``hybrid-vae calibrate --reset-learned`` deletes it): this card's timings correct the
  ranking, and a peak above the estimate or an out-of-memory error makes the next estimate larger. Off: the
  profiles alone. On the CPU nothing is learned.

Outputs: ``IMAGE`` (float ``[N, H, W, C]`` in [0, 1]; video frames one after another), a ``STRING`` with the
decision line -- the same for the same inputs and memory state (no timing in it), e.g.
``Hybrid VAE: tiled 384px/64, 0.75 GiB budget < 4.79 GiB full | sd15 (...) | local tiles: colours may differ
from a full decode`` -- and a ``FLOAT`` with the decode's seconds.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hybrid_vae.extension.identity import IdentityChecker
from hybrid_vae.extension.latents import from_vae_space
from hybrid_vae.extension.orchestrator import DEFAULT_LATENT_DIR, DecodeReport, HybridDecoder
from hybrid_vae.extension.stream_ldm import ldm_steps
from hybrid_vae.policy.env import read_env
from hybrid_vae.policy.errors import PlanError
from hybrid_vae.policy.gpu import GpuState
from hybrid_vae.policy.gpu import probe as probe_gpu
from hybrid_vae.policy.learned import LearnedStore
from hybrid_vae.policy.model import Plan, build_settings, field_choices
from hybrid_vae.policy.profiles import Family, Profiles, ProfileStore

log = logging.getLogger("hybrid_vae.comfyui")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "ComfyVAEAdapter", "HybridVAEDecode", "comfy_family",
           "comfy_kl_like"]

MODES = field_choices("mode")
TILINGS = field_choices("tile_groupnorm")
#: The node's widgets -> the DecodeSettings fields they set (an error names the widget).
WIDGETS = {"mode": "mode", "tile_groupnorm": "tiling", "endpoints": "endpoint",
           "allow_remote_custom_vae": "remote_custom_vae"}


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


def _load(vae: Any, memory_required: int) -> bool:
    """``load_models_gpu([vae.patcher], memory_required=...)``: ComfyUI loads the VAE and frees (unloads other
    models) until that much is free besides it. False outside ComfyUI (no ``comfy``) or for a VAE without a patcher."""
    patcher = getattr(vae, "patcher", None)
    if patcher is None:
        return False
    try:
        from comfy import model_management
    except ImportError:
        return False
    model_management.load_models_gpu([patcher], memory_required=int(memory_required),
                                     force_full_load=bool(getattr(vae, "disable_offload", False)))
    return True


class ComfyVAEAdapter(torch.nn.Module):
    """Shows a ``comfy.sd.VAE`` to the engine's executors as a diffusers-style VAE.

    With ``engine_tiles`` (ComfyUI's standard image VAEs, :func:`comfy_kl_like`) its ``decode`` runs
    ``first_stage_model.decode`` (full plans), it offers ComfyUI's LDM decoder to the exact tiler through
    :meth:`stream_steps` (``extension.stream_ldm``), and it has ``post_quant_conv = None`` and a ``decoder`` that
    runs one tile through ``first_stage_model.decode``, so the engine's one-pass local tiler runs instead of
    ``decode_tiled``. Without it, ``decode`` runs ComfyUI's ``vae.decode`` (full) or ``vae.decode_tiled`` with the
    tile the executor set through diffusers' tiling attributes (``tile_sample_min_size``/``tile_overlap_factor``
    for images; ``tile_sample_min_height``/``..._width``, strides and ``tile_sample_min_num_frames`` for video),
    and the engine never tiles ComfyUI's weights itself. Output: float [-1, 1] ``[B, C, H, W]`` /
    ``[B, C, F, H, W]``.

    :meth:`prepare` (the orchestrator's ``before_plan``) asks ComfyUI to load the VAE with room for the plan's
    estimated peak before the plan runs. A zero-size parameter carries ComfyUI's device and dtype for the engine
    (moving it moves nothing else); ``identity_weights`` is ComfyUI's model, whose weights the endpoint identity
    check fingerprints. ``calls`` lists what ran, for the report.

    Args:
        comfy_vae: the ``comfy.sd.VAE`` (``decode``, ``decode_tiled``, ``device``, ``vae_dtype``, ``patcher``).
        family (`Family`): the engine family (compression factors, video or not).
        engine_tiles (`bool`, defaults to `False`): let the engine run ``first_stage_model`` itself (only for
            decoders that are ``decoder(post_quant_conv(z))`` with the LDM ``Decoder``).
    """

    _vae: Any

    def __init__(self, comfy_vae: Any, family: Family, *, engine_tiles: bool = False) -> None:
        super().__init__()
        object.__setattr__(self, "_vae", comfy_vae)  # not a submodule: ComfyUI owns its weights
        fsm = getattr(comfy_vae, "first_stage_model", None)
        object.__setattr__(self, "identity_weights", fsm if isinstance(fsm, torch.nn.Module) else None)
        self._fam = family
        self._engine = engine_tiles
        dev = getattr(comfy_vae, "device", None) or "cpu"
        dtype = getattr(comfy_vae, "vae_dtype", None) or torch.float32
        self._anchor = torch.nn.Parameter(torch.empty(0, device=dev, dtype=dtype), requires_grad=False)
        self.config = types.SimpleNamespace(force_upcast=False, out_channels=int(getattr(comfy_vae, "output_channels", 3)))
        self.use_tiling = False
        self.calls: list[str] = []
        self.asked: list[str] = []  # what ComfyUI was asked to free, per plan
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

    def stream_steps(self) -> list[Any]:
        """ComfyUI's LDM decoder as the exact tiler's steps (:func:`extension.stream_ldm.ldm_steps`).

        Raises:
            PlanError: this VAE's decoder is not one the exact tiler runs (the reason is named).
        """
        if not self._engine:
            raise PlanError(f"ComfyUI {type(self.identity_weights).__name__}: the engine does not run its decoder "
                            "itself")
        return ldm_steps(self._vae.first_stage_model)

    def prepare(self, plan: Plan) -> None:
        """Before ``plan`` runs: ComfyUI loads the VAE with room for the plan's estimated peak (local GPU plans of
        engine-run VAEs; ComfyUI's own ``decode``/``decode_tiled`` ask for themselves)."""
        if not self._engine or plan.path not in ("full", "tiled"):
            return
        need = int(plan.estimate.peak_bytes)
        if _load(self._vae, need):
            self._decoder_loaded()
            self.asked.append(f"asked ComfyUI for {need / 1024**3:.2f} GiB ({plan.label})")

    def _decoder_loaded(self) -> None:
        if isinstance(self.decoder, _ComfyTileDecoder):
            self.decoder.loaded = True

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
        if args is None and self._engine:
            self.calls.append("first_stage_model.decode")
            x = self._engine_full(z)
        elif args is None:
            self.calls.append("vae.decode")
            x = self._vae.decode(z).movedim(-1, 1).to(dtype=z.dtype, device=z.device).mul(2.0).sub(1.0)
        else:
            self.calls.append("vae.decode_tiled(" + ", ".join(f"{k}={v}" for k, v in args.items()) + ")")
            x = self._vae.decode_tiled(z, **args).movedim(-1, 1).to(dtype=z.dtype, device=z.device).mul(2.0).sub(1.0)
        if x.shape[1] > 3:
            x = x[:, :3]
        return (x,) if not return_dict else types.SimpleNamespace(sample=x)

    def _engine_full(self, z: torch.Tensor) -> torch.Tensor:
        """``first_stage_model.decode`` on ComfyUI's device and dtype, as ComfyUI's ``VAE.decode`` calls it (without
        its own memory request: :meth:`prepare` asked for the plan's); [-1, 1] in ``z``'s dtype and device."""
        vae = self._vae
        if not getattr(self.decoder, "loaded", False):  # not prepared (the identity canary): ComfyUI's own figure
            estimate = getattr(vae, "memory_used_decode", None)
            if callable(estimate) and _load(vae, int(estimate(z.shape, vae.vae_dtype))):
                self._decoder_loaded()
        out: torch.Tensor = vae.first_stage_model.decode(z.to(device=vae.device, dtype=vae.vae_dtype))
        return out.to(device=z.device, dtype=z.dtype)


class _ComfyTileDecoder(torch.nn.Module):
    """One tile through ComfyUI's ``first_stage_model.decode``, as ComfyUI's tiled decode calls it: the tile cast
    to ``vae.vae_dtype`` on ``vae.device``, the result handed back in the caller's dtype and device. The VAE is
    loaded by :meth:`ComfyVAEAdapter.prepare`; when nothing prepared it (a direct ``run_plan``), by ComfyUI's
    own estimate for one tile on the first tile."""

    _vae: Any

    def __init__(self, comfy_vae: Any, calls: list[str]) -> None:
        super().__init__()
        object.__setattr__(self, "_vae", comfy_vae)
        self._calls = calls
        self.loaded = False
        self.tiles = 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        vae = self._vae
        if not self.loaded:
            estimate = getattr(vae, "memory_used_decode", None)
            if callable(estimate):
                _load(vae, int(estimate(z.shape, vae.vae_dtype)))
            self.loaded = True
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


def freeable_bytes(vae: Any) -> int:
    """Bytes of the VAE's GPU that ComfyUI holds for other loaded models (it unloads them on request); 0 on a
    CPU, outside ComfyUI, or when ComfyUI's model list cannot be read."""
    dev = getattr(vae, "device", None)
    if dev is None or torch.device(dev).type == "cpu":
        return 0
    try:
        from comfy import model_management

        total = 0
        for lm in list(getattr(model_management, "current_loaded_models", [])):
            model = lm.model
            if model is None or model is getattr(vae, "patcher", None) or torch.device(lm.device) != torch.device(dev):
                continue
            total += int(lm.model_loaded_memory())
        return total
    except (ImportError, AttributeError, TypeError, RuntimeError) as exc:
        log.debug("hybrid-vae: cannot read ComfyUI's loaded models (%s); counting none as freeable", exc)
        return 0


def _with_freeable(state: GpuState, freeable: int) -> GpuState:
    """``state`` with ``freeable`` bytes added to its free memory (and said so in its note)."""
    if freeable <= 0 or state.simulated or not state.is_accelerator:
        return state
    note = f"{state.note}; " if state.note else ""
    return dataclasses.replace(state, free_bytes=min(state.total_bytes, state.free_bytes + freeable),
                               note=f"{note}+{freeable / 1024**3:.2f} GiB ComfyUI can free by unloading models")


def decision_line(report: DecodeReport, key: str, how: str, target: Any) -> str:
    """The node's STRING: what ran and why, the same for the same inputs and memory state (no timing in it)."""
    ran = report.ran
    parts = [f"Hybrid VAE: {report.infotext(timing=False)}", f"{key} ({how})"]
    calls = getattr(target, "calls", None)
    if ran.path != "remote" and not isinstance(target, ComfyVAEAdapter):
        parts.append("engine executors (diffusers VAE)")
    elif ran.path in ("tiled", "cpu") and report.groupnorm == "exact":
        parts.append("exact tiles over ComfyUI's decoder")
    elif ran.path != "remote" and calls:
        parts.append(f"ComfyUI {calls[-1]}")
    if ran.path in ("tiled", "cpu") and report.groupnorm == "exact":
        parts.append("exact tiles: equals a full decode")
    elif ran.path in ("tiled", "cpu") and report.groupnorm == "local":
        parts.append("local tiles: colours may differ from a full decode")
    asked = getattr(target, "asked", None)
    if asked:
        parts.append(asked[-1])
    return " | ".join(parts)


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
                                                  "tooltip": "Count what ComfyUI can free by unloading other models as "
                                                             "available; ComfyUI is then asked for the chosen plan's "
                                                             "memory only."}),
                "remote_custom_vae": ("BOOLEAN", {"default": False,
                                                  "tooltip": "Decode remotely even when the endpoint serves another VAE "
                                                             "than the one wired in (its images then come from the "
                                                             "endpoint's VAE)."}),
                "tiling": (list(TILINGS), {"default": "auto",
                                           "tooltip": "Tiles: auto (lossless first), exact (same image as a full decode; "
                                                      "host memory when VRAM is short), offload (exact, whole-image "
                                                      "buffers in host memory), local (least memory, colours drift)."}),
                "learn": ("BOOLEAN", {"default": True,
                                      "tooltip": "Learn this GPU's decode times and memory peaks from each local "
                                                 "decode (a small file in the user cache; HYBRID_VAE_LEARNED moves "
                                                 "it): a peak above the estimate, or an out-of-memory error, makes "
                                                 "the next estimate larger. Off: the profiles alone."}),
            },
        }

    RETURN_TYPES = ("IMAGE", "STRING", "FLOAT")
    RETURN_NAMES = ("IMAGE", "decision", "seconds")
    OUTPUT_TOOLTIPS = ("The decoded image(s); video frames one after another.",
                       "What ran and why (the same line for the same inputs and memory state).",
                       "Seconds the decode took.")
    FUNCTION = "decode"
    CATEGORY = "latent/hybrid-vae"
    DESCRIPTION = ("VAE decode that picks full, tiled or remote decode from the free VRAM, and falls back "
                   "(remote down -> local, out of memory -> smaller tiles) so the image is never lost.")

    def __init__(self) -> None:
        # per node instance (ComfyUI keeps it between runs): the remote client's breaker and measurements, and
        # the identity checker (its verdicts also persist in the user's cache file)
        self._remote: dict[str, Any] = {}
        self._store = ProfileStore()
        self._identity = IdentityChecker()
        self._learned = LearnedStore()

    def _remote_client(self, endpoint: str) -> Any:
        from hybrid_vae.extension.remote import RemoteClient

        if endpoint not in self._remote:
            token = read_env().token
            self._remote[endpoint] = RemoteClient(token=token, trusted_endpoints=[endpoint] if token else [])
        return self._remote[endpoint]

    def decode(self, samples: dict[str, Any], vae: Any, endpoint: str = "", family: str = "auto", mode: str = "auto",
               free_memory_first: bool = True, remote_custom_vae: bool = False, tiling: str = "auto",
               learn: bool = True, *, probe: Callable[[], Any] | None = None) -> tuple[Any, str, float]:
        t0 = time.perf_counter()
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
            return image, f"Hybrid VAE: ComfyUI vae.decode ({how}; the engine has no family for it)", time.perf_counter() - t0
        fam = profiles.family(key)
        settings = build_settings({"mode": mode, "allow_remote": bool(endpoint),
                                   "allow_remote_custom_vae": bool(remote_custom_vae), "tile_groupnorm": tiling,
                                   "endpoints": {key: endpoint} if endpoint else {}}, names=WIDGETS)
        fsm = getattr(vae, "first_stage_model", None)
        target = fsm if fsm is not None and _is_diffusers_vae(fsm) else \
            ComfyVAEAdapter(vae, fam, engine_tiles=comfy_kl_like(vae))
        def read() -> GpuState:
            if probe is not None:
                return probe()  # type: ignore[no-any-return]
            return probe_gpu(total_for=lambda n: (p.total_gib if (p := profiles.gpu(n)) else None))

        gpu_probe = (lambda: _with_freeable(read(), freeable_bytes(vae))) if free_memory_first else read
        prepare = target.prepare if isinstance(target, ComfyVAEAdapter) else None
        decoder = HybridDecoder(settings=settings, profile_store=self._store, latent_dir=_comfy_latent_dir(),
                                remote=self._remote_client(endpoint) if endpoint else None, probe=gpu_probe,
                                before_plan=prepare, identity=self._identity,
                                learned=self._learned if learn else None)
        result = decoder.decode(from_vae_space(z.float(), fam), target, family=key, output="pt")
        text = decision_line(result.report, key, how, target)
        log.info("%s", text)
        return _to_image(result.tensor), text, round(time.perf_counter() - t0, 3)


NODE_CLASS_MAPPINGS = {"HybridVAEDecode": HybridVAEDecode}
NODE_DISPLAY_NAME_MAPPINGS = {"HybridVAEDecode": "Hybrid VAE Decode"}
