"""Profiles: what the engine knows about VAE families and GPUs, as validated pydantic models.

The built-in data lives in ``profiles/families.yaml`` and ``profiles/gpus.yaml``. A user's override
YAML (a settings path, or env ``HYBRID_VAE_PROFILE``) is merged key by key over the built-ins:
mappings merge recursively, GPU entries merge by ``name``, anything else replaces. A broken file
raises :class:`~policy.errors.ProfileError` naming the file, the key path and the value; callers that
must carry on (the SD.Next hook) use :meth:`ProfileStore.get`, which keeps the built-ins in force and
returns the error beside them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from hybrid_vae.policy.env import env_name, read_env
from hybrid_vae.policy.errors import ProfileError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PROFILE = env_name("profile")
DTYPE_BYTES: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4}
Dtype = Literal["float16", "bfloat16", "float32"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemoryModel(_Model):
    """Peak *allocated* bytes of a decode. Coefficients are bytes per output voxel per byte of dtype.

    full:  ``dsize * px * max(bpv * F + extra, B * (batch_bpv * F + extra)) + constant`` (constant once
           ``px >= workspace_min_px``), F = output frames decoded at once, B = items decoded at once.
    tiled (one item at a time): the same with the tile's pixels and ``tile_bytes_per_voxel``, plus
      - diffusers' tiling (video, and the calibration data): ``overlap_bytes_per_voxel`` for every voxel
        decoded twice and ``stitch_bytes_per_voxel`` for every output voxel;
      - the engine's own image tiler: its output buffer (3 channels) and one blended tile, computed
        from what it allocates, not fitted.
    """

    bytes_per_voxel: float = Field(gt=0, le=1e6, description="Full decode: peak bytes per output voxel per dtype byte, one item.")
    batch_bytes_per_voxel: float = Field(gt=0, le=1e6, description="Full decode: per voxel per dtype byte for each item of a batch decoded at once.")
    extra_frame_voxels: float = Field(0.0, ge=0, le=1e7, description="Extra bytes per output *pixel* per dtype byte independent of frames (video causal caches).")
    constant_bytes: float = Field(0.0, ge=0, le=2**34, description="Full decode: workspace bytes (cuDNN) once a region reaches workspace_min_px.")
    workspace_min_px: int = Field(0, ge=0, le=2**31, description="Pixels per frame from which constant_bytes is counted.")
    tile_bytes_per_voxel: float | None = Field(None, gt=0, le=1e6, description="Like bytes_per_voxel for one tile; None: bytes_per_voxel.")
    tile_workspace_bytes: float = Field(0.0, ge=0, le=2**34, description="Tiled: workspace bytes once a tile exceeds tile_workspace_min_px.")
    tile_workspace_min_px: int = Field(0, ge=0, le=2**31, description="Tile pixels above which tile_workspace_bytes is counted.")
    tile_constant_bytes: float = Field(0.0, ge=0, le=2**34, description="Tiled: constant bytes.")
    overlap_bytes_per_voxel: float = Field(0.0, ge=0, le=1e4, description="diffusers' tiling: bytes per voxel decoded beyond the output (overlaps) per dtype byte.")
    stitch_bytes_per_voxel: float = Field(0.0, ge=0, le=1e4, description="diffusers' tiling/chunking: bytes per output voxel per dtype byte held while stitching.")
    exact_buffer_elements: float | None = Field(None, gt=0, le=1e5, description="Exact tiling (extension/stream.py): whole-image buffer elements per output voxel at the widest point, output included (stream_buffer_elements); None: the family cannot tile exactly.")
    exact_tile_elements: float = Field(0.0, ge=0, le=1e5, description="Exact tiling: working-set elements per tile pixel in the decode dtype.")
    exact_tile_f32_elements: float = Field(0.0, ge=0, le=1e5, description="Exact tiling: float32 working-set elements per tile pixel, on top of exact_tile_elements.")
    exact_margin: float = Field(1.15, ge=1.0, le=4.0, description="Safety factor on the analytic exact-tiling peak (not yet measured on a GPU; the CPU measured 0.95-1.03x the analytic figure).")
    exact_offload_tile_elements: float | None = Field(None, gt=0, le=1e5, description="Offloaded exact tiling: device working-set elements per tile pixel (with context) when the whole-image buffers are in host memory: the tile, the next tile's inputs copied ahead, the outputs on their way out; None: no offloaded plans for this family.")
    measured: bool = Field(description="True when fitted on measurements (see source).")
    source: str = Field(min_length=1, max_length=300, description="Where the coefficients come from.")


class DecoderModel(_Model):
    """The decoder's layers as exact tiling runs them (an ``AutoencoderKL`` config, with the family's
    ``decoder_widths`` as its ``block_out_channels``): policy/passes.py builds the pass schedule (whole-image
    buffers, bytes moved when they live in host memory) from it."""

    layers_per_block: int = Field(ge=0, le=8, description="The VAE config's layers_per_block (each up block has one resnet more).")
    mid_attention: bool = Field(True, description="The mid block has its self-attention (mid_block_add_attention).")
    out_channels: int = Field(3, ge=1, le=16, description="Image channels.")


class TilingModel(_Model):
    """Tile sizes the engine may choose from (output pixels)."""

    min_tile_px: int = Field(256, ge=64, le=4096, description="Smallest spatial tile tried; smaller tiles hurt quality.")
    tile_step_px: int = Field(64, ge=8, le=1024, description="Granularity of tile sizes.")
    frame_chunk: int | None = Field(None, ge=1, le=64, description="Latent frames per temporal chunk (video), the VAE's own default.")
    frame_chunk_overlap: int = Field(1, ge=0, le=16, description="Latent frames shared by consecutive temporal chunks.")
    always_chunked: bool = Field(False, description="The VAE always decodes frame chunks (Wan's causal cache): 'full' is already chunked.")
    last_resort_tile_px: int | None = Field(None, ge=64, le=4096, description="Smaller tiles, down to this, planned only when no GPU plan at min_tile_px fits: below the measured tiles the estimates extrapolate, and more tiles mean more seams.")
    exact_tile_frames: int | None = Field(None, ge=1, le=1024, description="Video decoders whose GroupNorms span the whole video (HunyuanVideo): output frames per exact 3-D tile (extension/stream_hunyuan.py; needs decoder and decoder_widths). Set: tile_groupnorm exact/offload plans exact tiles with the whole-video buffers in host memory (frames equal a full decode) where they fit it, else diffusers' tiles; None: none.")
    exact_halo_latent: int | None = Field(None, ge=1, le=256, description="Video decoders without statistics across positions (Wan 2.1): latent pixels of context an exact spatial tile decodes on every side beyond its region (the receptive field after the mid block; extension/stream_wan.py counts it from the decoder: 13 for Wan 2.1). Set: tile_groupnorm exact/offload plans exact tiles (frames equal a full decode, each tile recomputes its halo); None: none.")

    @model_validator(mode="after")
    def _check(self) -> TilingModel:
        if self.last_resort_tile_px is not None and self.last_resort_tile_px >= self.min_tile_px:
            raise ValueError(f"last_resort_tile_px ({self.last_resort_tile_px}) must be smaller than min_tile_px "
                             f"({self.min_tile_px}); remove it or lower it")
        return self


class TimingModel(_Model):
    """How decode seconds are estimated for this family."""

    profile_model: Literal["sd", "none"] = Field("sd", description="'sd': use the GPU profile's sd15 (2-byte) / sdxl (4-byte) rows (same decoder); 'none': generic model only.")
    h200_seconds_per_voxel_fp16: float = Field(gt=0, le=1.0, description="Measured full-decode seconds per output voxel on an H200 at 2-byte dtype.")
    fp32_factor: float = Field(1.3, ge=1.0, le=8.0, description="Slowdown of a 4-byte decode against a 2-byte one.")
    relative_cost: float = Field(1.0, gt=0, le=100, description="Cost against the SD decoder when GPU-profile rows are used.")
    per_tile_h200_s: float = Field(0.009, ge=0, le=10, description="Fixed cost of one tile or chunk on an H200 (launches, blending), scaled by the card's speed.")
    exact_time_factor: float = Field(1.1, ge=1.0, le=10, description="Exact tiling: seconds against a full decode of the same image, before per-step costs (assumed; CPU measured 1.04-1.12x at SD widths).")
    exact_passes: int = Field(28, ge=1, le=1000, description="Exact tiling without a decoder config: passes over the image (2 per resnet, 1 per upsampler, 1 final; 28 for the SD decoder's up blocks); with one, the pass schedule counts the tile steps.")
    exact_step_h200_s: float = Field(0.0002, ge=0, le=10, description="Exact tiling: fixed cost of one tile of one pass on an H200 (launches), scaled by the card's speed (assumed).")


class Endpoint(_Model):
    """A remote endpoint that speaks the hybrid-inference protocol."""

    url: str = Field(min_length=8, max_length=500, pattern=r"^https?://", description="Decode URL.")
    vae: str | None = Field(None, max_length=200, description="The VAE checkpoint it serves; None: whatever the family's default is (user's own endpoint).")
    provider: str = Field("self-hosted", max_length=100, description="Who runs it.")


class Family(_Model):
    """A VAE family: latent layout, normalisation, memory/time models, tiling, endpoints."""

    description: str = Field("", max_length=300)
    architecture: Literal["sd", "hunyuanvideo", "wan"] = Field(description="Decoder architecture (selects executor behaviour).")
    video: bool = Field(False, description="5-D latents [B, C, T, H, W].")
    latent_channels: int = Field(ge=1, le=256)
    spatial_compression: int = Field(8, ge=1, le=64)
    temporal_compression: int = Field(1, ge=1, le=16, description="Output frames per latent frame after the first (video).")
    scaling_factor: float | None = Field(None, gt=0, le=100)
    shift_factor: float | None = Field(None, ge=-100, le=100)
    latents_mean: tuple[float, ...] | None = Field(None, description="Per-channel mean (Wan-style); used with latents_std instead of scaling/shift.")
    latents_std: tuple[float, ...] | None = None
    packed: bool = Field(False, description="Latents may arrive packed [B, (H/16)*(W/16), C*4] (Flux).")
    default_dtype: Dtype = "float16"
    force_upcast: bool = Field(False, description="The VAE decodes in float32 whatever the latent dtype (SDXL's original VAE).")
    weights_bytes_fp16: int = Field(ge=0, le=2**36, description="Decoder weights at 2 bytes per parameter, added when the VAE is not resident.")
    vae_ids: tuple[str, ...] = Field((), description="Checkpoints that count as this family's stock VAE.")
    decoder_widths: tuple[int, ...] | None = Field(None, min_length=1, max_length=8, description="Channel widths of the stock decoder the memory model was fitted on (diffusers' block_out_channels; Wan: base_dim x dim_mult); scales the model for a VAE whose geometry matches no family (policy/geometry.py).")
    inferred: str | None = Field(None, max_length=300, description="Set only on a family the engine made up for a VAE whose geometry matches no family (why); such a family is never decoded remotely.")
    memory: MemoryModel
    decoder: DecoderModel | None = Field(None, description="The decoder's layers, for offloaded exact tiling (None: no offloaded plans).")
    tiling: TilingModel = TilingModel()
    timing: TimingModel
    endpoints: tuple[Endpoint, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> Family:
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("latents_mean and latents_std must be given together")
        if self.latents_mean is not None and len(self.latents_mean) != self.latent_channels:
            raise ValueError(f"latents_mean has {len(self.latents_mean)} values, latent_channels is {self.latent_channels}")
        if self.latents_std is not None and len(self.latents_std) != self.latent_channels:
            raise ValueError(f"latents_std has {len(self.latents_std)} values, latent_channels is {self.latent_channels}")
        if self.latents_mean is None and self.scaling_factor is None:
            raise ValueError("give scaling_factor (and optionally shift_factor), or latents_mean/latents_std")
        if self.decoder is not None and self.decoder_widths is None:
            raise ValueError("decoder (exact tiling's layers) needs decoder_widths (the block_out_channels)")
        return self


class GpuRow(_Model):
    """One measured decode on a card (the seed's tables, the H200 data, or `hybrid-vae calibrate`)."""

    model: str = Field(min_length=1, max_length=40, description="sd15 | sdxl | sdxl_fp16 | flux | ...")
    size: int = Field(ge=64, le=16384, description="Square image side in pixels.")
    time_s: float = Field(gt=0, le=3600, description="Full decode seconds.")
    memory_pct: float | None = Field(None, ge=0, le=100, description="Whole-card VRAM in use during the decode (seed tables): an upper bound, not the need.")
    tiled_time_s: float | None = Field(None, gt=0, le=3600, description="Seconds with diffusers' default tiling.")
    tiled_memory_pct: float | None = Field(None, ge=0, le=100)
    peak_alloc_bytes: int | None = Field(None, ge=0, description="Measured peak allocated bytes (H200 data, calibrate).")
    dtype: Dtype | None = None
    source: str = Field("seed", max_length=200)


class GpuProfile(_Model):
    """A card: its name(s), total memory and measured decodes."""

    name: str = Field(min_length=1, max_length=100, description="As NVML/torch report it, e.g. 'NVIDIA GeForce RTX 3070'.")
    aliases: tuple[str, ...] = ()
    total_gib: float = Field(gt=0, le=4096, description="Total VRAM in GiB.")
    source: Literal["measured", "spec-derived"] = Field("measured", description="measured: rows timed on the card (seed tables, H200, calibrate); spec-derived: times scaled from measured cards by published FP16 throughput and memory bandwidth (bench/spec_profiles.py, docs/spec-profiles.md).")
    note: str = Field("", max_length=300, description="What to know about this card (variants sold under the same name, ...).")
    pcie_gen: int | None = Field(None, ge=1, le=7, description="PCI Express generation of the card's host link (sets the default host<->device bandwidth, policy.estimate.PCIE_GBS).")
    pcie_lanes: int = Field(16, ge=1, le=32, description="PCI Express lanes of the host link.")
    host_link_gbs: float | None = Field(None, gt=0, le=2000, description="Measured host<->device copy bandwidth (GB/s, pinned memory); overrides the PCIe default.")
    rows: tuple[GpuRow, ...] = ()


class Profiles(_Model):
    """Everything the engine knows: families by key, GPU profiles, and which files it came from."""

    families: dict[str, Family]
    gpus: tuple[GpuProfile, ...] = ()
    sources: tuple[str, ...] = Field((), description="Files merged, in order.")

    def family(self, key: str) -> Family:
        """Return the family ``key`` or raise :class:`ProfileError` listing the known ones."""
        try:
            return self.families[key]
        except KeyError:
            known = ", ".join(sorted(self.families))
            raise ProfileError(f"unknown family; known families: {known}", key_path="family", value=key) from None

    def gpu(self, name: str | None) -> GpuProfile | None:
        """The profile whose name or alias matches ``name`` (case and vendor prefixes ignored)."""
        if not name:
            return None
        wanted = _norm_gpu(name)
        best: GpuProfile | None = None
        for g in self.gpus:
            for cand in (g.name, *g.aliases):
                if _norm_gpu(cand) == wanted:
                    best = g
        return best


def _norm_gpu(name: str) -> str:
    s = name.lower().replace("nvidia", "").replace("geforce", "").replace("-", " ")
    return re.sub(r"\s+", " ", s).strip()


def builtin_dir() -> Path:
    """The folder holding the built-in YAML files (``profiles/`` of the repository or installed package)."""
    return Path(__file__).resolve().parent.parent / "profiles"


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ProfileError("is a folder, not a YAML file; give the path of the .yaml file itself", file=path)
    if not path.is_file():
        raise ProfileError("file not found; check the profile path setting or HYBRID_VAE_PROFILE", file=path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ProfileError(f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", file=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read: {exc}", file=path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ProfileError("top level must be a mapping with 'families' and/or 'gpus'", file=path,
                           value=type(data).__name__)
    unknown = set(data) - {"families", "gpus"}
    if unknown:
        key = sorted(unknown)[0]
        raise ProfileError("unknown top-level key; allowed: families, gpus", file=path, key_path=key,
                           value=data[key] if not isinstance(data[key], (dict, list)) else None)
    return data


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def _merge_gpus(base: list[Any], over: Any, path: Path) -> tuple[list[Any], dict[int, int]]:
    if not isinstance(over, list):
        raise ProfileError("must be a list of GPU entries", file=path, key_path="gpus", value=type(over).__name__)
    out = [dict(g) for g in base]
    index = {g.get("name"): i for i, g in enumerate(out)}
    origin: dict[int, int] = {}
    for i, g in enumerate(over):
        if not isinstance(g, dict) or "name" not in g:
            raise ProfileError("each GPU entry is a mapping with a 'name'", file=path, key_path=f"gpus.{i}",
                               value=g if not isinstance(g, dict) else None)
        if g["name"] in index:
            out[index[g["name"]]] = _merge(out[index[g["name"]]], g)
        else:
            index[g["name"]] = len(out)
            out.append(copy.deepcopy(g))
        origin[index[g["name"]]] = i
    return out, origin


def _validate(data: dict[str, Any], sources: list[str], blame: Path | None,
              gpu_origin: dict[int, int] | None = None) -> Profiles:
    try:
        return Profiles.model_validate({**data, "sources": tuple(sources)})
    except ValidationError as exc:
        err = exc.errors()[0]
        parts = [str(p) for p in err["loc"]]
        if gpu_origin and len(parts) > 1 and parts[0] == "gpus" and parts[1].isdigit() and int(parts[1]) in gpu_origin:
            parts[1] = str(gpu_origin[int(parts[1])])  # the index in the user's file
        loc = ".".join(parts)
        value = err.get("input")
        if isinstance(value, (dict, list)):
            value = None
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?); see profiles/example-override.yaml for the allowed keys"
        raise ProfileError(msg, file=blame, key_path=loc, value=value) from None


def load_profiles(override: str | Path | None = None, *, builtin: Path | None = None) -> Profiles:
    """Load the built-in profiles and merge ``override`` (a YAML path) over them.

    Args:
        override (`str | Path | None`, defaults to `None`): a user YAML; ``None`` reads env
            ``HYBRID_VAE_PROFILE`` (unset or empty: built-ins only).
        builtin (`Path | None`): folder with ``families.yaml`` and ``gpus.yaml`` (tests).

    Raises:
        ProfileError: naming the file, key path and value, when any file is broken.
    """
    bdir = builtin or builtin_dir()
    fam_file, gpu_file = bdir / "families.yaml", bdir / "gpus.yaml"
    fam = _read_yaml(fam_file)
    gpus = _read_yaml(gpu_file)
    data: dict[str, Any] = {"families": fam.get("families", {}), "gpus": gpus.get("gpus", [])}
    sources = [str(fam_file), str(gpu_file)]
    base = _validate(data, sources, fam_file)
    if override is None:
        override = read_env().profile
    if override is None or str(override).strip() == "":
        return base
    path = Path(override).expanduser()
    user = _read_yaml(path)
    merged = dict(data)
    if "families" in user:
        if not isinstance(user["families"], dict):
            raise ProfileError("must be a mapping of family name to fields", file=path, key_path="families")
        merged["families"] = _merge(data["families"], user["families"])
    origin: dict[int, int] = {}
    if "gpus" in user:
        merged["gpus"], origin = _merge_gpus(data["gpus"], user["gpus"], path)
    return _validate(merged, [*sources, str(path)], path, origin)


class ProfileStore:
    """Loads profiles once per (override path, file mtimes) and never lets a broken file stop a decode.

    ``get(path)`` returns ``(profiles, error)``: on a broken override the built-ins and the error.
    """

    def __init__(self, *, builtin: Path | None = None) -> None:
        self._builtin = builtin
        self._key: tuple[object, ...] | None = None
        self._value: tuple[Profiles, ProfileError | None] | None = None

    def _stamp(self, path: str | None) -> tuple[object, ...]:
        files = [builtin_dir() if self._builtin is None else self._builtin]
        stamp: list[object] = [path]
        for f in [files[0] / "families.yaml", files[0] / "gpus.yaml", *( [Path(path).expanduser()] if path else [])]:
            try:
                stamp.append(f.stat().st_mtime_ns)
            except OSError:
                stamp.append(None)
        return tuple(stamp)

    def get(self, override: str | Path | None = None) -> tuple[Profiles, ProfileError | None]:
        path = str(override) if override not in (None, "") else read_env().profile
        key = self._stamp(path)
        if self._key == key and self._value is not None:
            return self._value
        try:
            value: tuple[Profiles, ProfileError | None] = (load_profiles(path or "", builtin=self._builtin), None)
        except ProfileError as exc:
            value = (load_profiles("", builtin=self._builtin), exc)
        self._key, self._value = key, value
        return value


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``dtype`` (``float16``, ``bfloat16``, ``float32``)."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ProfileError("unknown dtype; use float16, bfloat16 or float32", key_path="dtype", value=dtype) from None


def merge_mappings(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Key-by-key merge used for profiles (exposed for settings files)."""
    out = _merge(dict(base), dict(over))
    assert isinstance(out, dict)
    return out
