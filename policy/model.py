"""The engine's inputs and outputs as frozen data: job, settings, network, plans, decision."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from hybrid_vae.policy.errors import SettingsError
from hybrid_vae.policy.gpu import GiB, GpuState
from hybrid_vae.policy.profiles import Dtype
from hybrid_vae.policy.reasons import ReasonCode, ReasonValue, reason_text, summary_text
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Path_ = Literal["full", "tiled", "remote", "cpu"]
Mode = Literal["auto", "full", "tiled", "remote"]
ResponseFormat = Literal["raw", "png", "jpg", "mp4"]
MiB = 1024**2
#: Separates the URLs of a family's endpoint pool in :attr:`DecodeSettings.endpoints` (``"https://a/x|https://b/x"``);
#: ``|`` cannot appear unescaped in a URL (RFC 3986), so the split is unambiguous.
ENDPOINT_SEP = "|"


def split_endpoints(spec: str) -> tuple[str, ...]:
    """The URLs of an endpoint setting: ``"https://a/x|https://b/x"`` -> ``("https://a/x", "https://b/x")``."""
    return tuple(u.strip() for u in spec.split(ENDPOINT_SEP) if u.strip())


class DecodeSettings(BaseModel):
    """What the user chose. Every field has a safe default; remote decode is off unless enabled.

    Keyword-only construction; unknown keys are errors (``extra="forbid"``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = Field("auto", description="auto: fastest plan that fits; full/tiled/remote: tried first when possible (fallbacks stay).")
    allow_remote: bool = Field(False, description="Send latents to a remote endpoint. The endpoint's operator sees the images.")
    endpoints: dict[str, str] = Field(default_factory=dict, description="Family -> endpoint URL, or several separated by '|' (a pool: tried in order of measured latency and recent errors, failing over within the deadline; extension/endpoints.py); overrides the built-in endpoints.")
    use_builtin_endpoints: bool = Field(True, description="Use the families' built-in (Hugging Face) endpoints when no override is set.")
    allow_remote_custom_vae: bool = Field(False, description="Allow remote decode of a custom/fine-tuned VAE's latents on an endpoint that serves another VAE.")
    reserve_bytes: int = Field(128 * MiB, ge=0, le=64 * GiB, description="Memory left untouched for other processes and estimate error. 128 MiB: chosen on the simulated benchmark's tuning set by its fixed rule, scored on another (docs/benchmarks.md); more reserve means fewer out-of-memory fallbacks and slower decodes when memory is tight.")
    tile_overlap_px: int = Field(64, ge=0, le=512, description="Output pixels shared by neighbouring tiles of local-GroupNorm tiling (multiple of the family's compression). That output differs from a full decode; more overlap hides seams, costs time. Exact tiling needs no overlap.")
    tile_groupnorm: Literal["auto", "exact", "offload", "local"] = Field("auto", description="auto: lossless plans first (full; exact tiling: whole-image GroupNorm statistics, output = full decode, its whole-image buffers on the GPU or, when they do not fit, partly in host memory), per-tile ('local') tiling only when no lossless plan fits or it is estimated exact_tolerance times faster; exact: never local tiles on the GPU (the CPU's local tiles stay its last resort, after exact tiles on the CPU where host memory holds them); offload: tiled decodes always exact with their whole-image buffers in host memory as far as needed (never local, never all on the GPU); local: never exact tiles (the least memory, colours drift). Wan 2.1 video: exact and offload decode exact halo tiles (frames equal a full decode, 2-3x the tiles' work); HunyuanVideo: exact 3-D tiles (frames equal a full decode), their whole-video buffers on the GPU where they fit (exact only), else in host memory where it holds them (the copies cost time), else diffusers' tiles; auto and local: diffusers' tiles for video.")
    exact_tolerance: float = Field(1.75, ge=1.0, le=100, description="tile_groupnorm=auto: a local-tiled plan is chosen over a fitting lossless one (full, exact, exact with host memory) only when estimated this many times faster. 1.75: chosen on the simulated benchmark's tuning set by its rule (fewest lost images, then tile-drift images at most 10% of the count before exact tiles with host memory, then p95 regret above 20%, then the fewest tile-drift images), scored on another (docs/benchmarks.md); higher: fewer images with tile drift, slower decodes when memory is tight.")
    tight_speedup: float | None = Field(1.5, ge=1.0, le=100, description="auto: a lossless GPU plan (full, or exact tiles) whose estimate fits the available memory but not available - reserve goes first when it is estimated this many times faster than the plan the budget chose, which stays right behind it (an out-of-memory error there costs one attempt, never the image; not after a refused claim, when the memory is moving). 1.5: chosen on the simulated benchmark's tuning set by its rule (stage 3 of the sweep), scored on another (docs/benchmarks.md); lower: faster decodes, more out-of-memory attempts; None: never into the reserve while a plan fits the budget.")
    host_reserve_bytes: int = Field(2 * GiB, ge=0, le=1024 * GiB, description="Host memory left untouched by offloaded exact tiling: a plan is feasible only when its host buffers fit the probed available memory minus this (never swap the machine).")
    min_tile_px: int | None = Field(None, ge=64, le=4096, description="Smallest tile tried; None: the family's, and its last-resort tiles below it when nothing fits (set: no tile below this).")
    video_host_output: bool = Field(True, description="Video: finished frames go to host memory as they are decoded (HunyuanVideo's temporal chunks: the GPU holds one chunk and the previous chunk's blend frames; Wan's spatial tiles: one tile's video and the blend strips next to it), never the whole video; the same frames as diffusers' own chunked or tiled decode. Off, or a VAE that cannot stream (not diffusers' AutoencoderKLHunyuanVideo / AutoencoderKLWan): diffusers' loops, which keep every chunk or tile on the GPU until the end.")
    remote_format: Literal["auto", "raw", "png", "jpg"] = Field("auto", description="Response format; auto picks by measured bandwidth and remote_quality.")
    remote_quality: Literal["lossless", "high"] = Field("lossless", description="lossless: raw or png only; high: jpg allowed.")
    remote_deadline_s: float = Field(60.0, gt=0, le=3600, description="Time a remote plan may take before the next plan runs.")
    allow_cpu: bool = Field(True, description="Decode on the CPU as the last resort.")
    generic_speed_factor: float = Field(5.0, gt=0, le=1000, description="An unprofiled card is assumed this many times slower than an H200.")

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: dict[str, str]) -> dict[str, str]:
        for fam, spec in v.items():
            urls = split_endpoints(spec)
            if not urls:
                raise ValueError(f"endpoint for {fam!r} is empty; give http(s)://host/path (several: join them with '|')")
            for url in urls:
                if not (url.startswith("http://") or url.startswith("https://")):
                    raise ValueError(f"endpoint for {fam!r} must start with http:// or https://, got {url!r}")
            if len(set(urls)) != len(urls):
                raise ValueError(f"endpoint for {fam!r} lists a URL twice ({spec!r}); give each once")
        return v

    def updated(self, **changes: Any) -> DecodeSettings:
        """A copy with ``changes`` applied and checked like a new model (``model_copy(update=...)`` checks nothing).

        Raises:
            pydantic.ValidationError: a value outside the field's type or limits.
        """
        return type(self).model_validate({**self.model_dump(), **changes})


def field_choices(name: str) -> tuple[str, ...]:
    """The values a ``Literal`` field of :class:`DecodeSettings` takes, in order (``field_choices("mode")`` ->
    ``("auto", "full", "tiled", "remote")``); front ends list these instead of a copy."""
    ann = DecodeSettings.model_fields[name].annotation
    if get_origin(ann) is not Literal:
        raise KeyError(f"DecodeSettings.{name} is not a choice field")
    return tuple(str(a) for a in get_args(ann))


def field_expectation(name: str, scale: float = 1) -> str:
    """What a valid value of a :class:`DecodeSettings` field looks like, for error messages: ``one of auto, full,
    tiled, remote``, ``true/false``, ``a number in [0, 65536]`` (the limits divided by ``scale``: a front end whose
    unit is MiB passes ``MiB`` for a field in bytes), ``family -> http(s) URL``."""
    info = DecodeSettings.model_fields[name]
    ann = info.annotation
    if get_origin(ann) is Literal:
        return "one of " + ", ".join(field_choices(name))
    if ann is bool:
        return "true/false"
    if get_origin(ann) is dict:
        return "family -> http(s)://host/path"
    lo, hi, lo_open, hi_open = None, None, False, False
    for m in info.metadata:
        for attr, is_lo, is_open in (("ge", True, False), ("gt", True, True), ("le", False, False), ("lt", False, True)):
            v = getattr(m, attr, None)
            if v is not None:
                if is_lo:
                    lo, lo_open = v / scale, is_open
                else:
                    hi, hi_open = v / scale, is_open
    if lo is None and hi is None:
        return "a number"
    return (f"a number in {'(' if lo_open else '['}{'-inf' if lo is None else _num(lo)}, "
            f"{'inf' if hi is None else _num(hi)}{')' if hi_open else ']'}")


def _num(v: float) -> str:
    """``65536``, ``0.5``: a limit as people write it (``1048576``, never ``1.04858e+06``)."""
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def build_settings(values: Mapping[str, Any], *, names: Mapping[str, str] | None = None,
                   scales: Mapping[str, float] | None = None, base: DecodeSettings | None = None) -> DecodeSettings:
    """:class:`DecodeSettings` from a front end's values, over ``base``.

    Args:
        values: field name -> value, in the front end's unit.
        names: field -> the front end's name for it (``--reserve-gib``, ``tiling``, ``endpoint``); the error
            names that.
        scales: field -> the front end's unit in the field's unit (``GiB`` for ``--reserve-gib`` into
            ``reserve_bytes``): the value is multiplied by it (whole for an int field when finite), and the
            error shows the value and the limits in the unit the user typed.
        base: the settings the values change (default: the model's defaults).

    Raises:
        SettingsError: one line naming the front end's name, the value and what is allowed.
    """
    scales = scales or {}
    converted = {f: _to_field(f, v, scales.get(f, 1)) for f, v in values.items()}
    try:
        return (base or DecodeSettings()).updated(**converted)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        if field not in DecodeSettings.model_fields:
            raise SettingsError(str(err["msg"]), name=field or "settings", value=err.get("input")) from None
        detail = str(err["msg"]).removeprefix("Value error, ")
        msg = detail if field == "endpoints" else f"give {field_expectation(field, scales.get(field, 1))}"
        raise SettingsError(msg, name=(names or {}).get(field, field), value=values.get(field)) from None


def _to_field(field: str, value: Any, scale: float) -> Any:
    """``value`` x ``scale``, whole for an int field when finite (``0.5`` GiB -> ``536870912``); others as given."""
    if scale == 1 or isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    out = value * scale
    return int(out) if DecodeSettings.model_fields[field].annotation is int and math.isfinite(out) else out


@dataclasses.dataclass(frozen=True)
class DecodeJob:
    """One decode: what the latents are and what they should become.

    Attributes:
        family: family key (``sd15``, ``sdxl``, ``sd3``, ``flux``, ``hunyuanvideo``, ``wan``).
        width, height: output size in pixels.
        batch: images (or videos) in the latent.
        frames: output frames for video (``None`` for images).
        dtype: the dtype the VAE decodes in (``None``: the family's default, e.g. float32 for stock SDXL).
        vae_id: the VAE checkpoint (hub id or path) when known.
        custom_vae: the VAE differs from the family's stock VAE (remote endpoints serve stock VAEs).
        vae_resident: the VAE weights are already on the device (else their bytes count toward the peak).
    """

    family: str
    width: int
    height: int
    batch: int = 1
    frames: int | None = None
    dtype: Dtype | None = None
    vae_id: str | None = None
    custom_vae: bool = False
    vae_resident: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class NetworkStats:
    """What is known about reaching one endpoint.

    Attributes:
        rtt_s: round trip of a small request.
        down_bytes_per_s / up_bytes_per_s: throughput.
        source: ``measured`` (the client's running figures) or ``assumed`` (defaults).
        available: False while the endpoint's circuit breaker is open.
        server_seconds_per_voxel: the server's decode speed when measured.
        server_inferred: ``server_seconds_per_voxel`` was inferred from the time to the response headers (the
            endpoint does not report its decode seconds), not reported by the server.
    """

    rtt_s: float = 0.15
    down_bytes_per_s: float = 50e6 / 8
    up_bytes_per_s: float = 20e6 / 8
    source: Literal["measured", "assumed"] = "assumed"
    available: bool = True
    server_seconds_per_voxel: float | None = None
    server_inferred: bool = False
    note: str = ""


Verdict = Literal["same", "other", "unverified"]


@dataclasses.dataclass(frozen=True)
class EndpointIdentity:
    """Whether an endpoint decodes like the local VAE: the verdict of a canary decode (``extension.identity``).

    A small seeded random latent (never user data) is decoded by the local VAE and by the endpoint over the
    unchanged protocol; the two 8-bit images are compared by PSNR.

    Attributes:
        endpoint: the URL that was checked.
        family: the family key the canary was sent as (its normalisation factors went with it).
        fingerprint: the local VAE's weights fingerprint (``extension.identity.weights_fingerprint``).
        verdict: ``same`` (PSNR >= threshold), ``other`` (below it) or ``unverified`` (the canary failed).
        psnr_db: the canary's PSNR (8-bit, peak 255; 100.0 for identical images), None when unverified.
        threshold_db: the PSNR a match needs.
        checked_at: Unix time of the canary decode.
        source: ``canary`` (checked for this decode) or ``cache`` (an earlier verdict, still valid).
        detail: why a canary failed (unverified), else empty.
    """

    endpoint: str
    family: str
    fingerprint: str
    verdict: Verdict
    psnr_db: float | None
    threshold_db: float
    checked_at: float
    source: Literal["canary", "cache"] = "canary"
    detail: str = ""

    @property
    def text(self) -> str:
        """E.g. ``endpoint serves another VAE (canary 7.8 dB < 35 dB)``."""
        if self.verdict == "same":
            return f"endpoint serves this VAE (canary {self.psnr_db:.1f} dB >= {self.threshold_db:g} dB)"
        if self.verdict == "other":
            return f"endpoint serves another VAE (canary {self.psnr_db:.1f} dB < {self.threshold_db:g} dB)"
        return f"endpoint's VAE not verified (canary failed: {self.detail or 'no answer'})"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "text": self.text}


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Estimated peak allocated bytes and seconds of a plan, and where each number came from.

    ``host_bytes``, ``transfer_bytes``, ``transfer_seconds``: offloaded exact tiling's whole-image buffers in
    host memory, the bytes copied between host and device, and the seconds those copies take (overlapped
    with the compute; ``seconds`` is the whole decode).
    """

    peak_bytes: int
    seconds: float
    peak_source: str
    seconds_source: str
    bytes_up: int = 0
    bytes_down: int = 0
    host_bytes: int = 0
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One way to run the decode. Executors take plans; plans are data.

    Attributes:
        path: ``full`` | ``tiled`` | ``remote`` | ``cpu``.
        tile_px: spatial tile cap in output pixels (tiled), else None.
        overlap_px: output pixels shared by neighbouring tiles.
        frame_chunk: latent frames per temporal chunk (video), None for all at once.
        frame_overlap: latent frames shared by consecutive chunks.
        slice_batch: decode the batch one item at a time.
        groupnorm: tiled image plans: ``exact`` (layer by layer over the whole image, output equals a
            full decode) or ``local`` (each tile through the whole decoder with its own statistics).
        device_budget: exact plans: None keeps every whole-image (or whole-video) buffer on the GPU; an int is
            the bytes they may use there, the rest live in host memory ("offloaded", label ``exact+host``; 0:
            every buffer in host memory, label ``exact+host (all)``).
        host_output: video plans: the finished frames go to host memory as each temporal chunk (HunyuanVideo)
            or spatial tile (Wan) is decoded, on diffusers' classes, so the GPU never holds the whole video.
        tile_frames: exact 3-D video tiles (HunyuanVideo): output frames per tile; None: the family's
            ``tiling.exact_tile_frames`` (label ``tiled 256px x 4 frames exact+host (all)`` when set).
        dtype: the dtype the decode runs in.
        endpoint / response_format: for remote plans.
        estimate: the plan's estimated peak and seconds.
    """

    path: Path_
    estimate: Estimate
    dtype: Dtype
    tile_px: int | None = None
    overlap_px: int = 0
    frame_chunk: int | None = None
    frame_overlap: int = 0
    slice_batch: bool = False
    groupnorm: Literal["local", "exact"] = "local"
    device_budget: int | None = None
    endpoint: str | None = None
    response_format: ResponseFormat | None = None
    host_output: bool = False
    tile_frames: int | None = None

    @property
    def label(self) -> str:
        """Short human text, e.g. ``tiled 384px/64``, ``tiled 512px exact``, ``tiled 256px exact+host``,
        ``tiled 4-latent-frame chunks``, ``full (item by item)``, ``remote png``, ``cpu``, ``cpu 512px exact``,
        ``cpu 256px/64``."""
        if self.path == "tiled" and self.groupnorm == "exact":
            host = "" if not self.offloaded else "+host (all)" if self.device_budget == 0 else "+host"
            frames = f" x {self.tile_frames} frames" if self.tile_frames is not None else ""
            return f"tiled {self.tile_px}px{frames} exact{host}"
        if self.path == "tiled":
            parts = []
            if self.tile_px is not None:
                parts.append(f"{self.tile_px}px/{self.overlap_px}")
            if self.frame_chunk is not None:
                parts.append(f"{self.frame_chunk}-latent-frame chunks")
            return "tiled " + ", ".join(parts)
        if self.path == "remote":
            return f"remote {self.response_format}"
        if self.path == "full" and self.slice_batch:
            return "full (item by item)"
        if self.path == "cpu":
            if self.groupnorm == "exact":
                return f"cpu {self.tile_px}px exact"
            parts = [f"{self.tile_px}px/{self.overlap_px}"] if self.tile_px is not None else []
            parts += [f"{self.frame_chunk}-latent-frame chunks"] if self.frame_chunk is not None else []
            return "cpu " + ", ".join(parts) if parts else "cpu"
        return self.path

    @property
    def offloaded(self) -> bool:
        """An exact plan whose whole-image buffers live (partly) in host memory."""
        return self.groupnorm == "exact" and self.device_budget is not None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["label"] = self.label
        return d


@dataclasses.dataclass(frozen=True)
class Option:
    """A candidate plan and whether it fits, with the reason."""

    plan: Plan
    feasible: bool
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.plan.to_dict(), "feasible": self.feasible, "why": self.why}


@dataclasses.dataclass(frozen=True)
class Decision:
    """The ordered plan chain (first = chosen, the rest = fallbacks) and why.

    Why is data: ``reason_code`` (:data:`policy.reasons.ReasonCode`, e.g. ``tiled_full_too_big``) and
    ``reason_params`` (a read-only mapping of the numbers and labels behind it: ``need``, ``budget``,
    ``full_need``, ``available``, ``reserve``, ``label``, ``unmet_request``, ``tiles``, ``remote_code``, ...; see
    :mod:`policy.reasons`). Code that needs to know why reads these. ``reason`` (the full explanation, with the
    memory arithmetic) and ``summary`` (the short clause an image's infotext carries when the chosen plan ran,
    e.g. ``tiled 384px/64, 0.75 GiB budget < 4.79 GiB full``) are rendered from them by :mod:`policy.reasons`.
    """

    plans: tuple[Plan, ...]
    reason_code: ReasonCode
    reason_params: Mapping[str, ReasonValue]
    options: tuple[Option, ...]
    gpu: GpuState
    job: DecodeJob
    available_bytes: int
    budget_bytes: int
    gpu_profile: str | None
    sources: tuple[str, ...] = ()
    identity: EndpointIdentity | None = None

    @property
    def reason(self) -> str:
        """Why this plan, with the memory arithmetic (rendered by :func:`policy.reasons.reason_text`)."""
        return reason_text(self.reason_code, self.reason_params)

    @property
    def summary(self) -> str:
        """The infotext clause when the chosen plan ran (rendered by :func:`policy.reasons.summary_text`)."""
        return summary_text(self.reason_code, self.reason_params)

    @property
    def chosen(self) -> Plan:
        return self.plans[0]

    @property
    def fallbacks(self) -> tuple[Plan, ...]:
        return self.plans[1:]

    def to_dict(self) -> dict[str, Any]:
        c = self.chosen
        return {
            "decision": {**c.to_dict(), "reason": self.reason, "summary": self.summary,
                         "reason_code": self.reason_code, "reason_params": dict(self.reason_params)},
            "fallbacks": [p.to_dict() for p in self.fallbacks],
            "options": [o.to_dict() for o in self.options],
            "gpu": self.gpu.to_dict(),
            "gpu_profile": self.gpu_profile,
            "job": self.job.to_dict(),
            "available_bytes": self.available_bytes,
            "budget_bytes": self.budget_bytes,
            "simulated": self.gpu.simulated,
            "profile_sources": list(self.sources),
            "identity": self.identity.to_dict() if self.identity is not None else None,
        }


NetworkArg = NetworkStats | Mapping[str, NetworkStats] | None
