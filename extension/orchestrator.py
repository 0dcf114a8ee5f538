"""``HybridDecoder``: validate -> probe -> decide -> run the plan chain -> pixels, or a saved latent.

::

    from hybrid_vae.extension.orchestrator import HybridDecoder
    dec = HybridDecoder(settings=DecodeSettings(), latent_dir="./hybrid-vae-latents")
    result = dec.decode(latents, vae, family="sdxl")
    result.tensor              # float in [-1, 1], [B, 3, H, W] (video: [B, 3, F, H, W])
    result.report.infotext()   # "tiled 384px/64, 0.75 GiB budget < 4.79 GiB full"

Failure handling, plan by plan (:func:`error_kind` sorts every exception in one place): an
out-of-memory error (``torch.OutOfMemoryError``, its CUDA alias, or a ``RuntimeError`` saying "out of
memory") is recorded, the ``except`` block is left so the traceback's frames (and the tensors they
hold) are freed, ``gc.collect()`` and ``torch.cuda.empty_cache()`` run, and the next plan starts. A
:class:`~policy.errors.RemoteError`, a :class:`~policy.errors.PlanError`, a backend error (CUDA, cuDNN,
a missing kernel, a decode whose output is NaN/inf) also moves on. A programming error (``TypeError``,
``AttributeError``, ...) is a bug, not a shortage: it is logged at ERROR with its traceback and reported
as ``internal error: TypeError: ...`` in the infotext and report; the next plan still delivers the
image, except in strict mode (``HybridDecoder(strict=True)`` or env ``HYBRID_VAE_STRICT=1``, which the
test suite sets), where it is raised. A :class:`~policy.errors.LatentError` stops at once: bad input is
not retried.
When every plan failed, the latent is saved with :func:`extension.latents.save_latent` and
:class:`~policy.errors.DecodeFailedError` names the file and the command that decodes it later.

Claims: before a local plan runs on CUDA, its estimated peak and the reserve (a plan chosen into the reserve:
its estimated peak) are allocated in one block and handed back to PyTorch's cache (:func:`claim_memory`), so
another process cannot take that memory during the decode. When the memory went elsewhere after the probe, the
claim is refused in milliseconds, before any decoding: the attempt is recorded as ``claim refused: ...``, and
(once per decode) the GPU is probed again and the decision made again from what is free now, into the reserve
for no plan (a plan that already failed in this decode is not tried again). Plans the decision already knew to
exceed the free memory (``near_fit``), and after the new decision a GPU plan with only CPU plans behind it,
claim only their estimate / ``NEAR_FIT`` (:func:`~policy.decide.claim_bytes`): the estimate carries margins and
an OOM costs one attempt, the CPU far more, but below that floor they cannot fit, and the next plan goes without an OOM.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from hybrid_vae.extension.executors import ProgressFn, run_plan, vae_device_dtype
from hybrid_vae.extension.geometry import resolve_family
from hybrid_vae.extension.identity import CANARY_DEADLINE_S, IdentityChecker
from hybrid_vae.extension.latents import pack_flux, save_latent, to_vae_space, unpack_flux, validate_latents
from hybrid_vae.extension.stream import settings_for_vae
from hybrid_vae.policy.decide import claim_bytes, decide, describe_plan, endpoint_for
from hybrid_vae.policy.env import env_name, read_env
from hybrid_vae.policy.errors import (
    ArgumentError,
    DecodeFailedError,
    HybridVAEError,
    LatentError,
    PlanError,
    ProfileError,
    RemoteConnectError,
    RemoteError,
    RemoteStatusError,
    RemoteTimeoutError,
)
from hybrid_vae.policy.estimate import upcast_dtype
from hybrid_vae.policy.gpu import GpuState
from hybrid_vae.policy.gpu import probe as probe_gpu
from hybrid_vae.policy.learned import Learned, LearnedStore
from hybrid_vae.policy.model import Decision, DecodeJob, DecodeSettings, EndpointIdentity, Estimate, NetworkStats, Plan
from hybrid_vae.policy.profiles import Family, Profiles, ProfileStore

if TYPE_CHECKING:
    import torch

log = logging.getLogger("hybrid_vae.orchestrator")

__all__ = ["DEFAULT_LATENT_DIR", "ENV_STRICT", "DecodeReport", "DecodeResult", "HybridDecoder", "RemoteDecoder",
           "RemoteInfo", "error_kind", "is_oom"]

DEFAULT_LATENT_DIR = "./hybrid-vae-latents"
#: Env var: ``1`` raises programming errors met inside a plan instead of falling back (tests set it).
ENV_STRICT = env_name("strict")
#: Exceptions that mean a bug in hybrid-vae (or a VAE class it does not understand), not a shortage of
#: memory or a failing backend. ``NotImplementedError`` is not here: torch raises it for a kernel a backend
#: lacks (MPS), which another plan (cpu) can run.
INTERNAL_ERRORS: tuple[type[BaseException], ...] = (TypeError, AttributeError, NameError, AssertionError, KeyError,
                                                    IndexError, ZeroDivisionError, ImportError)
ErrorKind = Literal["oom", "remote", "plan", "internal", "backend"]


class NonFiniteOutputError(RuntimeError):
    """A plan finished but its pixels hold NaN/inf (float16 overflow, a broken kernel): a backend failure."""


class RemoteResultLike(Protocol):
    tensor: Any
    endpoint: str
    bytes_up: int
    bytes_down: int
    seconds: float


class RemoteDecoder(Protocol):
    """What the orchestrator needs from a remote client (``extension.remote`` implements it)."""

    def decode(self, latents: Any, *, plan: Plan, job: DecodeJob, family: Family, deadline_s: float,
               height: int, width: int) -> RemoteResultLike: ...

    def network_stats(self) -> Mapping[str, NetworkStats]: ...


@dataclasses.dataclass(frozen=True)
class RemoteInfo:
    """What a remote decode cost. ``endpoint`` is the URL that answered; ``skipped``: ``"host (why)"`` of each
    member of an endpoint pool that failed before it (``extension.endpoints``)."""

    endpoint: str
    bytes_up: int
    bytes_down: int
    seconds: float
    skipped: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DecodeReport:
    """What happened in one decode, truthfully.

    Attributes:
        chosen: the plan the decision put first.
        ran: the plan that produced the image.
        attempts: ``(plan label, error text or None, seconds)`` per plan tried, in order.
        seconds: wall time of the whole decode (validation to result).
        peak_bytes: measured peak allocated bytes of the successful attempt (CUDA only, else None).
        decision: the full decision (chain, options, GPU state).
        simulated: the GPU state was simulated (``HYBRID_VAE_SIMULATE_GPU``).
        device: the torch device the successful local plan ran on ("remote" for remote).
        remote: endpoint, bytes and seconds when a remote plan produced the image.
        profile_error: why the user's profile file was ignored (the built-ins were used), if it was.
        groupnorm: ``local``/``exact`` GroupNorm statistics of the tiled image decode that ran (else None).
        notes: what the engine changed from what was asked (a float16 decode upcast to float32).
    """

    chosen: Plan
    ran: Plan
    attempts: tuple[tuple[str, str | None, float], ...]
    seconds: float
    peak_bytes: int | None
    decision: Decision
    simulated: bool
    device: str
    remote: RemoteInfo | None = None
    profile_error: str | None = None
    groupnorm: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        """The decision's one-line reason (rendered from ``decision.reason_code`` and its parameters)."""
        return self.decision.reason

    @property
    def fell_back(self) -> bool:
        return self.ran is not self.chosen

    def infotext(self, *, timing: bool = True) -> str:
        """One truthful line for the image's metadata.

        E.g. ``tiled 384px/64, 0.75 GiB budget < 4.79 GiB full, 0.41 s``, ``cpu full decode, no GPU, 9.1 s`` or
        ``full, fell back from remote raw (HTTP 503), 0.30 s``. When a canary found that the endpoint serves
        another VAE (or could not check it), the line says so: ``..., endpoint serves another VAE (canary
        7.8 dB < 35 dB)``. ``timing=False`` leaves the seconds out (a line that is the same for the same run).
        """
        d, ran = self.decision, self.ran
        if self.fell_back:
            first_err = next((e for _, e, _ in self.attempts if e), "failed")
            text = f"{describe_plan(ran)}, fell back from {self.chosen.label} ({first_err})"
        elif ran.path == "remote":
            host = _host(self.remote.endpoint if self.remote else ran.endpoint or "")
            text = f"remote {ran.response_format} via {host}"
            if self.remote is not None and self.remote.skipped:
                text += f" (after {', '.join(self.remote.skipped)})"
        else:
            text = d.summary  # rendered by policy.decide from the same numbers as the reason
        ident = d.identity
        if ident is not None and (ident.verdict != "same" or ran.path == "remote"):
            text += f", {ident.text}"
        if timing:
            text += f", {self.seconds:.2f} s"
        if any(n.startswith("float16 asked for, decoded in float32") for n in self.notes):
            text += ", float16 upcast to float32 (force_upcast)"
        if self.simulated:
            text += f" [simulated {d.gpu.name}, ran on {self.device}]"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.to_dict(),
            "ran": self.ran.to_dict(),
            "attempts": [{"plan": lab, "error": err, "seconds": round(s, 4)}
                         for lab, err, s in self.attempts],
            "seconds": round(self.seconds, 4),
            "peak_bytes": self.peak_bytes,
            "reason": self.reason,
            "reason_code": self.decision.reason_code,
            "reason_params": dict(self.decision.reason_params),
            "simulated": self.simulated,
            "device": self.device,
            "remote": dataclasses.asdict(self.remote) if self.remote else None,
            "profile_error": self.profile_error,
            "groupnorm": self.groupnorm,
            "notes": list(self.notes),
            "infotext": self.infotext(),
            "decision": self.decision.to_dict(),
        }


@dataclasses.dataclass(frozen=True)
class DecodeResult:
    """The decoded tensor (float in [-1, 1]), PIL images when ``output="pil"``, and the report."""

    tensor: Any
    report: DecodeReport
    images: list[Any] | None = None


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc or url


def is_oom(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError`` is the same class) and for
    ``RuntimeError``s whose text says "out of memory" (older torch, MPS, some ROCm paths)."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def claim_memory(device: str, nbytes: int) -> bool:
    """Ask the CUDA caching allocator for ``nbytes`` at once and hand them back to its cache, so the decode that
    follows finds them there (another process can no longer take them), or learn in milliseconds, before any
    decoding, that they are not free now. Returns False when refused; True when claimed, and on any device but
    CUDA (nothing to claim). Other errors propagate."""
    import torch

    if not device.startswith("cuda") or nbytes <= 0:
        return True
    try:
        block = torch.empty(nbytes, dtype=torch.uint8, device=device)
    except Exception as exc:  # only an out-of-memory error is an answer; the rest is raised
        if is_oom(exc):
            return False
        raise
    del block
    return True


def error_kind(exc: BaseException) -> ErrorKind:
    """What a plan's exception means for the decode loop: ``oom`` and ``backend`` (CUDA/cuDNN/driver, NaN
    output, anything else a runtime raises) and ``remote``/``plan`` fall back quietly; ``internal`` (a
    programming error, :data:`INTERNAL_ERRORS`) is a bug: reported as one, raised in strict mode."""
    if is_oom(exc):
        return "oom"
    if isinstance(exc, RemoteError):
        return "remote"
    if isinstance(exc, PlanError):
        return "plan"
    if isinstance(exc, INTERNAL_ERRORS):
        return "internal"
    return "backend"


def _strict_from_env() -> bool:
    return read_env().strict


def _short_error(exc: BaseException) -> str:
    if is_oom(exc):
        return "out of memory"
    if error_kind(exc) == "internal":
        text = str(exc).splitlines()[0] if str(exc) else ""
        return f"internal error: {type(exc).__name__}: {text}"[:200]
    if isinstance(exc, RemoteStatusError):
        return f"HTTP {exc.status}"
    if isinstance(exc, RemoteTimeoutError):
        return "timeout"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _forces_upcast(vae: Any, fam: Family) -> bool:
    """The VAE's config ``force_upcast`` when it has one, else the family's."""
    cfg = getattr(vae, "config", None)
    force = getattr(cfg, "force_upcast", None) if cfg is not None else None
    return bool(force) if force is not None else fam.force_upcast


def _vae_dtype_for(vae: Any, fam: Family) -> str | None:
    """The dtype the VAE decodes in: float32 when it forces an upcast, else its weights' dtype."""
    if _forces_upcast(vae, fam):
        return "float32"
    _, dtype = vae_device_dtype(vae)
    name = str(dtype).replace("torch.", "")
    return name if name in ("float16", "bfloat16", "float32") else None


def _check_finite(out: Any) -> None:
    """Raise :class:`NonFiniteOutputError` when a decoded tensor holds NaN/inf (it would save as a black image)."""
    import torch

    if isinstance(out, torch.Tensor) and out.is_floating_point() and not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise NonFiniteOutputError(f"decoded pixels hold {bad} NaN/inf values of {out.numel()} (float16 overflow?)")


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A validated decode: the family, the unpacked latent, the job, the GPU state and the settings it runs with."""

    family: str
    fam: Family
    profiles: Profiles
    profile_error: str | None
    z: Any  # the unpacked latent, pipeline space
    job: DecodeJob
    gpu: GpuState
    settings: DecodeSettings
    network: Mapping[str, NetworkStats] | None
    save_meta: dict[str, Any]
    run_dev: str
    upcast: str | None  # what the engine changed from what was asked (float16 -> float32), if anything
    strict: bool


@dataclasses.dataclass(frozen=True)
class _Attempt:
    """One plan's run: its output, or the short error text (``oom``: it ran out of memory)."""

    seconds: float
    out: Any = None
    error: str | None = None
    oom: bool = False
    peak: int | None = None
    remote: RemoteInfo | None = None
    refused: int = 0  # bytes of its memory claim, refused before it ran (0: not refused)


def _output_size(z: Any, fam: Family, frames: int | None) -> tuple[int, int, int | None]:
    """Output height, width and frames (video, else None) of an unpacked latent.

    Raises:
        LatentError: ``frames`` given and not what the latent decodes to.
    """
    sc = fam.spatial_compression
    out_h, out_w = int(z.shape[-2]) * sc, int(z.shape[-1]) * sc
    if not fam.video:
        return out_h, out_w, None
    n_frames = (int(z.shape[2]) - 1) * fam.temporal_compression + 1
    if frames is not None and frames != n_frames:
        raise LatentError(f"frames={frames}, but {int(z.shape[2])} latent frames decode to "
                          f"{n_frames}; leave frames unset or pass the matching latent")
    return out_h, out_w, n_frames


def _log_failure(plan: Plan, exc: BaseException, kind: ErrorKind, *, strict: bool) -> None:
    """Log a failed plan as what it is: an internal error (a bug) at ERROR with its traceback, an OOM, a remote
    or plan refusal, or a backend failure (with its traceback)."""
    if kind == "internal":
        log.error("hybrid-vae: internal error in %s (a bug, please report it); %s", plan.label,
                  "strict mode: raising" if strict else "trying the next plan", exc_info=exc)
    elif kind == "oom":
        log.warning("hybrid-vae: %s ran out of memory; trying the next plan", plan.label)
    elif kind in ("remote", "plan"):
        log.warning("hybrid-vae: %s failed: %s", plan.label, exc)
    else:
        log.warning("hybrid-vae: %s failed; trying the next plan", plan.label, exc_info=exc)


def to_pil(tensor: torch.Tensor) -> list[Any]:
    """[-1, 1] ``[B, 3, H, W]`` -> list of PIL images (video ``[B, 3, F, H, W]`` -> all frames, in order)."""
    import torch
    from PIL import Image

    t = tensor.detach().float().cpu()
    if t.dim() == 5:
        t = t.permute(0, 2, 1, 3, 4).reshape(-1, *t.shape[1:2], *t.shape[3:])
    arr = ((t.clamp(-1, 1) + 1) * 127.5).round().to(dtype=torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


class HybridDecoder:
    """Decides and runs every VAE decode; never loses an image.

    Args:
        settings (`DecodeSettings`, defaults to `DecodeSettings()`): the user's choices.
        profile_path (`str | Path | None`): a user profile YAML merged over the built-ins; a broken
            file is reported in the decode report and the built-ins stay in force.
        profile_store (`ProfileStore | None`): share a store between decoders (tests); default: a new one.
        latent_dir (`str | Path`, defaults to `"./hybrid-vae-latents"`): where a latent is saved when
            every plan fails.
        remote (`RemoteDecoder | None`): the remote client; without one, remote plans are never chosen.
        probe (`Callable[[], GpuState] | None`): reads the GPU; default :func:`policy.gpu.probe`
            (which honours ``HYBRID_VAE_SIMULATE_GPU``).
        device (`str | None`): where GPU plans run; default: the probed device, or when the GPU is
            simulated, CUDA if present, else wherever the VAE is (so the simulated plan runs for real).
        before_plan (`Callable[[Plan], None] | None`): called before each attempt (fault injection in
            tests and the demo; may raise like a decode would).
        on_decision (`Callable[[Decision], None] | None`): called once the decision is made, before
            any plan runs (a UI shows the plan, the CLI decides whether to draw a progress bar).
        learned (`LearnedStore | None`): learned timings and peaks: applied to the decision; the time (and on
            CUDA the allocated peak) of each successful local GPU decode is recorded, and an out-of-memory error
            of a plan whose estimate was claimed raises its peak factor (default: none; pass ``LearnedStore()``
            for the user's file).
        report_log_level (`int`, defaults to `logging.INFO`): level of the one line logged per decode
            (family, size and the infotext); SD.Next passes DEBUG when its decision log is off.
        strict (`bool | None`, defaults to `None`): raise a programming error met inside a plan instead of
            reporting it and falling back; None reads env ``HYBRID_VAE_STRICT`` at each decode (the tests set
            it; a user's decode never should, so an image is never lost to a bug in one plan).
        identity (`IdentityChecker | None`): proves an endpoint serves the local VAE before remote is used
            (:mod:`extension.identity`); default: a checker with the user's cache file. Share one between
            decoders to share its in-process state (the verdicts persist in its file anyway).
    """

    def __init__(self, *, settings: DecodeSettings | None = None, profile_path: str | Path | None = None,
                 profile_store: ProfileStore | None = None, latent_dir: str | Path = DEFAULT_LATENT_DIR,
                 remote: RemoteDecoder | None = None, probe: Callable[[], GpuState] | None = None,
                 device: str | None = None, before_plan: Callable[[Plan], None] | None = None,
                 on_decision: Callable[[Decision], None] | None = None,
                 learned: LearnedStore | None = None, report_log_level: int = logging.INFO,
                 strict: bool | None = None, identity: IdentityChecker | None = None,
                 claim: Callable[[str, int], bool] = claim_memory) -> None:
        self.settings = settings or DecodeSettings()
        self.claim = claim
        self.strict = strict
        self.profile_path = profile_path
        self.store = profile_store or ProfileStore()
        self.latent_dir = Path(latent_dir)
        self.remote = remote
        self._probe = probe
        self.device = device
        self.before_plan = before_plan
        self.on_decision = on_decision
        self.learned = learned
        self.report_log_level = report_log_level
        self._identity = identity

    @property
    def identity(self) -> IdentityChecker:
        """The endpoint identity checker (created on first use)."""
        if self._identity is None:
            self._identity = IdentityChecker()
        return self._identity

    def _gpu(self, total_for: Callable[[str], float | None]) -> GpuState:
        return self._probe() if self._probe is not None else probe_gpu(total_for=total_for)

    def _run_device(self, gpu: GpuState, vae: Any) -> str:
        import torch

        if self.device is not None:
            return self.device
        if gpu.simulated:
            if torch.cuda.is_available():
                return "cuda"
            return str(vae_device_dtype(vae)[0])
        if gpu.device.startswith(("cuda", "mps")):
            return gpu.device
        return str(vae_device_dtype(vae)[0])

    def decode(self, latents: torch.Tensor, vae: Any, *, family: str | None = None, height: int | None = None,
               width: int | None = None, frames: int | None = None, vae_id: str | None = None,
               custom_vae: bool = False, output: Literal["pt", "pil"] = "pt", dtype: str | None = None,
               progress: ProgressFn | None = None) -> DecodeResult:
        """Decode ``latents`` (as the pipeline produced them: normalised, Flux possibly packed).

        Steps: validate and build the job (:meth:`_prepare`), decide (:meth:`_decide`), run the plan chain
        (:meth:`_attempt` per plan) until one delivers (:meth:`_finish`), else save the latent and raise.

        Args:
            latents (`torch.Tensor`): ``[B, C, h, w]``, packed ``[B, N, C*4]`` (Flux; give height/width),
                or video ``[B, C, T, h, w]``.
            vae: the diffusers VAE to decode with (any device; restored afterwards).
            family (`str | None`): the family key (``sd15``, ``sdxl``, ``sd3``, ``flux``, ``hunyuanvideo``, ``wan``);
                None: from the VAE's geometry (:func:`extension.geometry.resolve_family`). A VAE whose
                structure contradicts the given family, or whose geometry matches none, is decoded as the
                local-only ``unmatched`` family (memory model scaled from its config, never remote).
            height, width (`int | None`): output pixels; required for packed latents.
            frames (`int | None`): output frames of a video (default: from the latent, ``1 + 4 (T - 1)``).
            vae_id (`str | None`), custom_vae (`bool`): which VAE; a custom VAE is never sent to an
                endpoint serving another one unless the settings allow it.
            output (`"pt" | "pil"`, defaults to `"pt"`): ``"pil"`` also fills ``result.images``.
            dtype (`str | None`): the decode dtype; default: float32 when the VAE forces an upcast,
                else the VAE's own dtype.
            progress (`ProgressFn | None`): ``progress(done, total)`` per tile/chunk/item.

        Raises:
            ArgumentError: ``output`` is not ``"pt"`` or ``"pil"`` (also a ``ValueError``).
            LatentError, ProfileError: bad input (before any VAE runs).
            DecodeFailedError: every plan failed; ``latent_path`` holds the saved latent.
        """
        import torch

        t_start = time.perf_counter()
        if output not in ("pt", "pil"):
            raise ArgumentError(f"output={output!r}: use 'pt' (tensor in [-1, 1]) or 'pil'")
        p = self._prepare(latents, vae, family=family, height=height, width=width, frames=frames, vae_id=vae_id,
                          custom_vae=custom_vae, dtype=dtype)
        decision, snapshot = self._decide(p, latents, vae)
        if self.on_decision is not None:
            self.on_decision(decision)
        z_vae = to_vae_space(p.z.to(torch.float32), p.fam)
        attempts: list[tuple[str, str | None, float]] = []
        plans, i, redecided = list(decision.plans), 0, False
        failed: set[str] = set()  # labels of plans that ran and failed: a new decision does not try them again
        while i < len(plans):
            plan, i = plans[i], i + 1
            # after the new decision, a plan with nothing but the CPU behind it claims only its floor (its estimate
            # carries margins; an OOM costs one attempt, the CPU far more)
            last_gpu = redecided and all(q.path == "cpu" for q in plans[i:])
            a = self._attempt(plan, p, latents, vae, z_vae, progress, claim=decision, floor=last_gpu)
            if a.refused:
                attempts.append((plan.label, a.error, a.seconds))
                if not redecided:  # once per decode: the memory moved since the probe; decide again from now
                    redecided = True
                    p, (decision, snapshot) = self._redecide(p, latents, vae, refused=a.refused)
                    plans, i = [q for q in decision.plans if q.label not in failed], 0
                continue
            # outside the except block: the traceback and the frames it pinned are gone
            attempts.append((plan.label, a.error, a.seconds))
            if a.error is None:
                if self.learned is not None:
                    self.learned.record_decision(decision, plan, a.seconds, applied=snapshot)
                    if a.peak:
                        self.learned.record_peak(decision, plan, a.peak, applied=snapshot)
                return self._finish(p, decision, plan, a, tuple(attempts), t_start, output)
            if a.oom and self.learned is not None and not last_gpu:
                n = plan.estimate.peak_bytes
                if n <= decision.available_bytes:  # its estimate was claimed when it started, and it needed more
                    self.learned.record_peak(decision, plan, n, applied=snapshot, oom=True)
            failed.add(plan.label)
            if plan.path == "remote":
                self._remote_failed(plan, a.error)
            if a.oom or plan.path != "remote":
                _release_memory()
        listing = "; ".join(f"{lab}: {err}" for lab, err, _ in attempts)
        path = self._save(latents, p.family, p.fam, {**p.save_meta, "reason": f"every plan failed: {listing}"})
        raise DecodeFailedError(f"every plan failed ({listing}). {self._later(path)}", latent_path=path,
                                attempts=tuple((lab, err or "") for lab, err, _ in attempts))

    def _claim_refused(self, plan: Plan, decision: Decision, p: _Prepared, *, floor: bool) -> int:
        """Claim what :func:`~policy.decide.claim_bytes` says for a local GPU plan before it runs
        (:func:`claim_memory`): the bytes refused when that much is not free now, else 0 (also for remote and CPU
        plans, which claim nothing)."""
        n = claim_bytes(plan, decision, floor=floor)
        if n <= 0 or self.claim(p.run_dev, n):
            return 0
        log.info("hybrid-vae: %s: %.2f GiB not free at decode time (claim refused)", plan.label, n / 2**30)
        return n

    def _redecide(self, p: _Prepared, latents: torch.Tensor, vae: Any, *,
                  refused: int) -> tuple[_Prepared, tuple[Decision, Learned | None]]:
        """A fresh probe and a new decision after a claim of ``refused`` bytes was refused: the probe's available
        memory is capped under that (:meth:`GpuState.capped`; a probe counts all of torch's cache, which a refused
        claim has just shown cannot give that much), so the new decision does not pick the same plan again; and
        with memory moving, it does not choose a plan into the reserve (``tight_speedup`` None)."""
        gpu = self._gpu(lambda n: (g.total_gib if (g := p.profiles.gpu(n)) else None))
        gpu = gpu.capped(refused - 1, f"capped under a refused claim of {refused / 2**30:.2f} GiB")
        p = dataclasses.replace(p, gpu=gpu, settings=p.settings.model_copy(update={"tight_speedup": None}))
        return p, self._decide(p, latents, vae)

    def _prepare(self, latents: torch.Tensor, vae: Any, *, family: str | None, height: int | None,
                 width: int | None, frames: int | None, vae_id: str | None, custom_vae: bool,
                 dtype: str | None) -> _Prepared:
        """Validate the latent against its family and build the job, GPU state and settings of this decode.

        Raises:
            LatentError, ProfileError: bad input (before any VAE runs).
        """
        profiles, perr = self.store.get(self.profile_path)
        if perr is not None:
            log.warning("hybrid-vae: profile ignored, built-ins used: %s", perr)
        family, profiles, how = resolve_family(vae, profiles, family)
        fam = profiles.family(family)
        log.debug("hybrid-vae: family %s (%s)", family, how)
        validate_latents(latents, fam, family_name=family, height=height, width=width,
                         families=profiles.families)
        z = unpack_flux(latents, height or 0, width or 0, spatial_compression=fam.spatial_compression) \
            if latents.dim() == 3 else latents
        out_h, out_w, n_frames = _output_size(z, fam, frames)
        if dtype is not None and dtype not in ("float16", "bfloat16", "float32"):
            raise LatentError(f"dtype={dtype!r}: use float16, bfloat16 or float32")
        job_dtype, upcast = upcast_dtype(dtype, _forces_upcast(vae, fam))  # type: ignore[arg-type]
        if upcast is not None:
            log.warning("hybrid-vae: %s", upcast)
        gpu = self._gpu(lambda n: (p.total_gib if (p := profiles.gpu(n)) else None))
        vdev, _ = vae_device_dtype(vae)
        job = DecodeJob(family=family, width=out_w, height=out_h, batch=int(z.shape[0]), frames=n_frames,
                        dtype=job_dtype or _vae_dtype_for(vae, fam), vae_id=vae_id,  # type: ignore[arg-type]
                        custom_vae=custom_vae,
                        vae_resident=gpu.simulated or not gpu.is_accelerator or vdev.type != "cpu")
        settings = self.settings
        if self.remote is None and settings.allow_remote:
            settings = settings.model_copy(update={"allow_remote": False})
        return _Prepared(
            family=family, fam=fam, profiles=profiles, profile_error=str(perr) if perr else None, z=z, job=job,
            gpu=gpu, settings=settings_for_vae(settings, vae, fam),
            network=self.remote.network_stats() if self.remote is not None else None,
            save_meta={"height": out_h, "width": out_w, "frames": n_frames, "batch": job.batch, "vae_id": vae_id,
                       "custom_vae": custom_vae, "vae_class": type(vae).__name__},
            run_dev=self._run_device(gpu, vae), upcast=upcast,
            strict=_strict_from_env() if self.strict is None else self.strict)

    def _decide(self, p: _Prepared, latents: torch.Tensor, vae: Any) -> tuple[Decision, Learned | None]:
        """The decision (with the learned timings and the endpoint's identity verdict) and the learned snapshot
        it used.

        Raises:
            DecodeFailedError: nothing can decode this job (no plan at all); the latent is saved.
        """
        try:
            snapshot = self.learned.load() if self.learned is not None else None
            identity = self.endpoint_identity(p.job, p.fam, vae, settings=p.settings, network=p.network,
                                              device=p.run_dev)
            return decide(p.job, p.gpu, p.profiles, p.settings, p.network, learned=snapshot,
                          identity=identity), snapshot
        except ProfileError as exc:
            path = self._save(latents, p.family, p.fam, {**p.save_meta, "reason": f"no plan: {exc}"})
            raise DecodeFailedError(f"no plan can decode this job: {exc}. {self._later(path)}",
                                    latent_path=path) from None

    def _attempt(self, plan: Plan, p: _Prepared, latents: torch.Tensor, vae: Any, z_vae: torch.Tensor,
                 progress: ProgressFn | None, *, claim: Decision | None = None, floor: bool = False) -> _Attempt:
        """Run one plan: its output, or its error (sorted by :func:`error_kind`, logged; strict mode raises
        internal errors). A :class:`~policy.errors.LatentError` is raised (bad input is not retried). With
        ``claim`` (the decision the plan comes from), its memory (:func:`~policy.decide.claim_bytes`; ``floor``: only
        the near-fit floor) is claimed after ``before_plan`` (which may free memory for it, as in ComfyUI) and before
        it runs; a refusal returns the bytes refused in ``refused``."""
        import torch

        t0 = time.perf_counter()
        run_dev = p.run_dev
        use_cuda = plan.path in ("full", "tiled") and run_dev.startswith("cuda")
        base = 0
        if use_cuda:
            torch.cuda.synchronize(run_dev)
            torch.cuda.reset_peak_memory_stats(run_dev)
            base = torch.cuda.memory_allocated(run_dev)
        try:
            if self.before_plan is not None:
                self.before_plan(plan)
            refused = self._claim_refused(plan, claim, p, floor=floor) if claim is not None else 0
            if refused:
                return _Attempt(seconds=time.perf_counter() - t0,
                                error=f"claim refused: {refused / 2**30:.2f} GiB not free at decode time",
                                refused=refused)
            if use_cuda and claim is not None:  # the claimed block was handed back: not the decode's peak
                torch.cuda.reset_peak_memory_stats(run_dev)
            if plan.path == "remote":
                out, remote_info = self._run_remote(plan, p, latents)
                peak = None
            else:
                out, remote_info = run_plan(plan, vae, z_vae, family=p.fam, device=run_dev, progress=progress), None
                if use_cuda:
                    torch.cuda.synchronize(run_dev)
                peak = max(0, torch.cuda.max_memory_allocated(run_dev) - base) if use_cuda else None
            _check_finite(out)
            return _Attempt(seconds=time.perf_counter() - t0, out=out, peak=peak, remote=remote_info)
        except LatentError:
            raise
        except Exception as exc:
            kind = error_kind(exc)
            _log_failure(plan, exc, kind, strict=p.strict)
            if kind == "internal" and p.strict:
                raise
            return _Attempt(seconds=time.perf_counter() - t0, error=_short_error(exc), oom=kind == "oom")

    def _run_remote(self, plan: Plan, p: _Prepared, latents: torch.Tensor) -> tuple[Any, RemoteInfo]:
        if self.remote is None:
            raise PlanError("no remote client configured")
        rr = self.remote.decode(latents, plan=plan, job=p.job, family=p.fam, deadline_s=p.settings.remote_deadline_s,
                                height=p.job.height, width=p.job.width)
        return rr.tensor, RemoteInfo(rr.endpoint, int(rr.bytes_up), int(rr.bytes_down), float(rr.seconds),
                                     tuple(getattr(rr, "skipped", ())))

    def _finish(self, p: _Prepared, decision: Decision, plan: Plan, a: _Attempt,
                attempts: tuple[tuple[str, str | None, float], ...], t_start: float,
                output: Literal["pt", "pil"]) -> DecodeResult:
        """The result of the plan that delivered: the report, its log line, PIL images when asked."""
        job = p.job
        report = DecodeReport(
            chosen=decision.chosen, ran=plan, attempts=attempts, seconds=time.perf_counter() - t_start,
            peak_bytes=a.peak, decision=decision, simulated=p.gpu.simulated,
            device="remote" if plan.path == "remote" else ("cpu" if plan.path == "cpu" else p.run_dev),
            remote=a.remote, profile_error=p.profile_error,
            groupnorm=plan.groupnorm if (plan.path == "tiled" or (plan.path == "cpu" and plan.tile_px is not None))
            and not p.fam.video else None,
            notes=(p.upcast,) if p.upcast else ())
        log.log(self.report_log_level, "hybrid-vae: %s %dx%d%s: %s", p.family, job.width, job.height,
                f" x{job.batch}" if job.batch > 1 else "", report.infotext())
        images = to_pil(a.out) if output == "pil" else None
        return DecodeResult(tensor=a.out, report=report, images=images)

    def endpoint_identity(self, job: DecodeJob, fam: Family, vae: Any, *, settings: DecodeSettings | None = None,
                          network: Mapping[str, NetworkStats] | None = None,
                          device: str | None = None) -> EndpointIdentity | None:
        """The canary verdict for the endpoint ``job`` would be sent to (cached, or checked now: one small remote
        request and one small local decode on ``device``), or None when remote is not a candidate (off, no
        remote client, no endpoint, circuit open) or there is no local VAE to compare with (then the name-based
        custom-VAE rule applies). ``decode`` calls it; ``hybrid-vae explain --vae`` too."""
        settings = settings or self.settings
        if self.remote is None or not settings.allow_remote:
            return None
        url, _ = endpoint_for(dataclasses.replace(job, custom_vae=False), fam, settings)
        stats = network.get(url) if network is not None and url is not None else None
        if url is None or (stats is not None and not stats.available):
            return None
        fingerprint = self.identity.fingerprint(vae)
        if fingerprint is None:
            return None
        remote = self.remote
        sc = fam.spatial_compression
        est = Estimate(peak_bytes=0, seconds=0.0, peak_source="identity canary", seconds_source="identity canary")

        def decode_remote(c: torch.Tensor) -> torch.Tensor:
            h, w = int(c.shape[-2]) * sc, int(c.shape[-1]) * sc
            frames = (int(c.shape[2]) - 1) * fam.temporal_compression + 1 if fam.video else None
            plan = Plan(path="remote", estimate=est, dtype=job.dtype or fam.default_dtype, endpoint=url,
                        response_format="raw")
            cjob = dataclasses.replace(job, width=w, height=h, batch=1, frames=frames)
            sent = pack_flux(c) if fam.packed else c
            return remote.decode(sent, plan=plan, job=cjob, family=fam, height=h, width=w,
                                 deadline_s=min(settings.remote_deadline_s, CANARY_DEADLINE_S)).tensor

        def decode_local(c: torch.Tensor) -> torch.Tensor:
            plan = Plan(path="full", estimate=est, dtype=job.dtype or fam.default_dtype)
            return run_plan(plan, vae, to_vae_space(c, fam), family=fam, device=device)

        return self.identity.check(endpoint=url, family=job.family, fingerprint=fingerprint, fam=fam,
                                   decode_local=decode_local, decode_remote=decode_remote)

    def _remote_failed(self, plan: Plan, error: str) -> None:
        """A remote plan failed: when the endpoint could not be reached, whatever answers there next may be
        another server (with another VAE), so its identity verdicts are checked again."""
        if plan.endpoint and error.startswith(RemoteConnectError.__name__):
            n = self.identity.forget(plan.endpoint)
            if n:
                log.info("hybrid-vae: %s unreachable; its identity verdict will be checked again", plan.endpoint)

    def _save(self, latents: torch.Tensor, family: str, fam: Family, meta: dict[str, Any]) -> Path | None:
        try:
            path = save_latent(latents, self.latent_dir, family=family, profile=fam, meta=meta)
        except (OSError, HybridVAEError, RuntimeError) as exc:
            log.error("hybrid-vae: could not save the latent to %s: %s", self.latent_dir, exc)
            return None
        log.error("hybrid-vae: decode failed; latent saved to %s", path)
        return path

    def _later(self, path: Path | None) -> str:
        if path is None:
            return f"The latent could NOT be saved to {self.latent_dir} (see the log)."
        return (f"The latent is saved in {path}; decode it later with `hybrid-vae decode {path} --vae <VAE>` "
                "(family and size are in the file).")
