"""The engine's inputs and outputs as frozen data: job, settings, network, plans, decision."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from hybrid_vae.policy.gpu import GiB, GpuState
from hybrid_vae.policy.profiles import Dtype
from pydantic import BaseModel, ConfigDict, Field, field_validator

Path_ = Literal["full", "tiled", "remote", "cpu"]
Mode = Literal["auto", "full", "tiled", "remote"]
ResponseFormat = Literal["raw", "png", "jpg", "mp4"]
MiB = 1024**2


class DecodeSettings(BaseModel):
    """What the user chose. Every field has a safe default; remote decode is off unless enabled.

    Keyword-only construction; unknown keys are errors (``extra="forbid"``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = Field("auto", description="auto: fastest plan that fits; full/tiled/remote: tried first when possible (fallbacks stay).")
    allow_remote: bool = Field(False, description="Send latents to a remote endpoint. The endpoint's operator sees the images.")
    endpoints: dict[str, str] = Field(default_factory=dict, description="Family -> endpoint URL; overrides the built-in endpoints.")
    use_builtin_endpoints: bool = Field(True, description="Use the families' built-in (Hugging Face) endpoints when no override is set.")
    allow_remote_custom_vae: bool = Field(False, description="Allow remote decode of a custom/fine-tuned VAE's latents on an endpoint that serves another VAE.")
    reserve_bytes: int = Field(128 * MiB, ge=0, le=64 * GiB, description="Memory left untouched for other processes and estimate error (the estimates already sit 0-10% above measured peaks; docs/benchmarks.md weighs 64-256 MiB).")
    tile_overlap_px: int = Field(64, ge=0, le=512, description="Output pixels shared by neighbouring tiles of local-GroupNorm tiling (multiple of the family's compression). That output differs from a full decode; more overlap hides seams, costs time. Exact tiling needs no overlap.")
    tile_groupnorm: Literal["auto", "exact", "local"] = Field("auto", description="auto: exact tiling (whole-image GroupNorm statistics, output = full decode; needs memory per image pixel) whenever a full or exact plan fits, per-tile ('local') tiling only when none does or it is estimated exact_tolerance times faster; exact: never local tiles; local: never exact tiles (the least memory, colours drift).")
    exact_tolerance: float = Field(1.2, ge=1.0, le=100, description="tile_groupnorm=auto: a local-tiled plan is chosen over a fitting exact one only when estimated this many times faster (1.2: the largest value that keeps the simulated matrix's p95 latency regret under 20%, docs/benchmarks.md).")
    min_tile_px: int | None = Field(None, ge=64, le=4096, description="Smallest tile tried; None: the family's.")
    remote_format: Literal["auto", "raw", "png", "jpg"] = Field("auto", description="Response format; auto picks by measured bandwidth and remote_quality.")
    remote_quality: Literal["lossless", "high"] = Field("lossless", description="lossless: raw or png only; high: jpg allowed.")
    remote_deadline_s: float = Field(60.0, gt=0, le=3600, description="Time a remote plan may take before the next plan runs.")
    allow_cpu: bool = Field(True, description="Decode on the CPU as the last resort.")
    generic_speed_factor: float = Field(5.0, gt=0, le=1000, description="An unprofiled card is assumed this many times slower than an H200.")

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: dict[str, str]) -> dict[str, str]:
        for fam, url in v.items():
            if not (url.startswith("http://") or url.startswith("https://")):
                raise ValueError(f"endpoint for {fam!r} must start with http:// or https://, got {url!r}")
        return v


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
    """

    rtt_s: float = 0.15
    down_bytes_per_s: float = 50e6 / 8
    up_bytes_per_s: float = 20e6 / 8
    source: Literal["measured", "assumed"] = "assumed"
    available: bool = True
    server_seconds_per_voxel: float | None = None
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
    """Estimated peak allocated bytes and seconds of a plan, and where each number came from."""

    peak_bytes: int
    seconds: float
    peak_source: str
    seconds_source: str
    bytes_up: int = 0
    bytes_down: int = 0

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
    endpoint: str | None = None
    response_format: ResponseFormat | None = None

    @property
    def label(self) -> str:
        """Short human text, e.g. ``tiled 384px/64``, ``tiled 512px exact``, ``full (item by item)``, ``remote png``."""
        if self.path == "tiled" and self.groupnorm == "exact":
            return f"tiled {self.tile_px}px exact"
        if self.path == "tiled":
            parts = []
            if self.tile_px is not None:
                parts.append(f"{self.tile_px}px/{self.overlap_px}")
            if self.frame_chunk is not None:
                parts.append(f"{self.frame_chunk}-frame chunks")
            return "tiled " + ", ".join(parts)
        if self.path == "remote":
            return f"remote {self.response_format}"
        if self.path == "full" and self.slice_batch:
            return "full (item by item)"
        return self.path

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
    """The ordered plan chain (first = chosen, the rest = fallbacks) and why."""

    plans: tuple[Plan, ...]
    reason: str
    options: tuple[Option, ...]
    gpu: GpuState
    job: DecodeJob
    available_bytes: int
    budget_bytes: int
    gpu_profile: str | None
    sources: tuple[str, ...] = ()
    identity: EndpointIdentity | None = None

    @property
    def chosen(self) -> Plan:
        return self.plans[0]

    @property
    def fallbacks(self) -> tuple[Plan, ...]:
        return self.plans[1:]

    def to_dict(self) -> dict[str, Any]:
        c = self.chosen
        return {
            "decision": {**c.to_dict(), "reason": self.reason},
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
