"""Learned timings: how far this machine's measured decode seconds are from the engine's estimates.

The engine's seconds come from GPU profiles (the seed's tables, the H200 data, or
``hybrid-vae calibrate``) and a generic model for cards without one. Each successful local decode
adds one observation ``measured / estimated`` to an exponentially weighted moving average (EWMA, in
log space, so x2 and x0.5 weigh the same) per key

    (card name, family, path, size bucket)

where ``path`` is ``full``, ``tiled``, ``tiled-exact`` or ``tiled-offload`` (exact tiles with host memory)
and the size bucket is the output megapixels per item
(frames included) rounded to a power of two (``0.25MP``, ``1MP``, ``4MP``, ...). Every observation
also updates a card-wide entry ``(card, *, *, *)``. ``decide(..., learned=...)`` multiplies a local
plan's seconds by the exact key's factor once it has ``min_count`` observations, else by the
card-wide factor once that has ``min_count`` (most of what is learned is "this card is slower than
its profile says", which holds across families, sizes and paths; one card-wide factor for both
paths cannot flip a full-vs-tiled choice, per-path factors taken from other sizes could), and says
so in the plan's ``seconds_source`` (``"...; x0.82 learned from 12 decodes"``, ``"... (card-wide)"``).

Learned peaks: the memory a local GPU plan really needed, as ``measured / estimated`` peak bytes per key
``(card, family, path)`` and card-wide per path ``(card, *, path)`` (the store's ``peak|...`` entries; no size
buckets: in the simulated benchmark they left more out-of-memory errors at the same regret, 22 against 16 on the
scoring set, since a bucket seen once hides what the family showed at other sizes). The
measured peak is PyTorch's allocated peak of the decode (``torch.cuda.max_memory_allocated``); an out-of-memory
error of a plan whose estimate was claimed says only that it needed more than the claim found free, so it counts
as ``max(claimed / estimate, current factor) x`` :data:`OOM_STEP` (the claim is the estimate, so at least 5% above
the factor already applied). The factor is an upper envelope, not a mean: a
higher ratio replaces it at once (one decode that needed 6% more than estimated is enough to expect it again),
a lower one pulls it down like an EWMA (an OOM caused by another process's allocation is forgotten over later
decodes). ``decide`` multiplies a local plan's peak by the family's factor (else the card-wide one) from the
first observation, only when it is above 1: a learned peak never makes an estimate smaller than the memory
model's (its margins are what keeps a decode from running out of memory on a card nobody measured), and says
so in ``peak_source`` (``"...; x1.06 learned peak from 3 decodes"``).

Everything in this module except :class:`LearnedStore` is pure data and math. The store is a small
JSON file (at most ``max_entries`` keys, the least recently updated dropped first) at, in order:
the path given, env ``HYBRID_VAE_LEARNED``, or ``<user cache dir>/hybrid-vae/learned.json``.
Reset it with ``hybrid-vae calibrate --reset-learned`` (or delete the file). A broken file never
stops a decode: it reads as empty and the error is kept in :attr:`LearnedStore.error`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybrid_vae.policy.env import env_name, read_env

if TYPE_CHECKING:
    from hybrid_vae.policy.model import Decision, DecodeJob, Plan

log = logging.getLogger("hybrid_vae.learned")

ENV_LEARNED = env_name("learned")
LEARN_PATHS: frozenset[str] = frozenset({"full", "tiled", "tiled-exact", "tiled-offload", "tiled-halo", "tiled-exact3d"})


def learn_path(plan: Plan) -> str:
    """The path key a plan's timings are learned under: ``full``, ``tiled``, ``tiled-exact``, ``tiled-offload``,
    ``tiled-halo`` (exact Wan tiles, priced as local tiles of their regions: their own key, so a card-wide
    factor of image exact tiles never scales them), ``tiled-exact3d`` (exact HunyuanVideo tiles, host buffers;
    likewise; 16- and 4-frame tiles share it; with their buffers on the GPU they are ``tiled-exact``, as image
    exact tiles in memory: a plan does not say whether it is a video's, so there a card-wide peak entry of that
    path mixes the two models -- a known limit), or its path (remote and cpu plans are not learned:
    :data:`LEARN_PATHS`)."""
    if plan.path == "tiled" and plan.groupnorm == "exact":
        if plan.host_output:  # exact video tiles: Wan's halo tiles, HunyuanVideo's 3-D tiles with host buffers
            return "tiled-exact3d" if plan.offloaded else "tiled-halo"
        return "tiled-offload" if plan.offloaded else "tiled-exact"
    return plan.path
MAX_ENTRIES = 512
FORMAT_VERSION = 1
#: One observation moves the factor at most this far (first decode of a process: cuDNN warm-up).
RATIO_CLAMP = (0.25, 4.0)
ANY = "*"  # family and bucket of a card-wide entry
SECONDS, PEAK = "seconds", "peak"  # what an entry learns (LearnedEntry.what)
#: One peak observation (measured / estimated bytes) is clamped to this range.
PEAK_CLAMP = (0.5, 2.0)
#: An out-of-memory error of a plan whose estimate was claimed raises its peak factor at least this much.
OOM_STEP = 1.05


def size_bucket(voxels: float) -> str:
    """The size bucket of ``voxels`` output pixels (x frames) per item: megapixels rounded to a power of 2.

    >>> size_bucket(1024 * 1024), size_bucket(832 * 1216), size_bucket(512 * 512)
    ('1MP', '1MP', '0.25MP')
    """
    mp = max(float(voxels), 1.0) / 2**20
    exp = max(-6, min(12, round(math.log2(mp))))
    return f"{2.0**exp:g}MP"


def job_voxels(job: DecodeJob) -> int:
    """Output pixels x frames of one item of ``job`` (what :func:`size_bucket` buckets)."""
    return job.width * job.height * (job.frames or 1)


def entry_key(card: str, family: str, path: str, bucket: str) -> str:
    """The store's key: ``card|family|path|bucket`` (card name as the probe reports it)."""
    return f"{card}|{family}|{path}|{bucket}"


def peak_key(card: str, family: str, path: str) -> str:
    """The store's key of a learned peak: ``peak|card|family|path`` (``family`` ``*``: card-wide)."""
    return f"{PEAK}|{card}|{family}|{path}"


@dataclasses.dataclass(frozen=True)
class LearnedEntry:
    """One key's learned factor.

    Attributes:
        card, family, path, bucket: the key (see module docs; a peak entry's bucket is ``*``).
        factor: EWMA of measured / estimated seconds, or for a peak entry the upper envelope of measured /
            estimated peak bytes (1.0 = the estimate was right).
        count: observations so far.
        updated: UNIX time of the last observation (the oldest entries are dropped first).
        what: ``"seconds"`` (a timing) or ``"peak"`` (memory).
    """

    card: str
    family: str
    path: str
    bucket: str
    factor: float
    count: int
    updated: float
    what: str = SECONDS

    @property
    def key(self) -> str:
        if self.what == PEAK:
            return peak_key(self.card, self.family, self.path)
        return entry_key(self.card, self.family, self.path, self.bucket)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _entry_from(obj: object) -> LearnedEntry | None:
    """An entry from decoded JSON, or None when a field is missing or out of range."""
    if not isinstance(obj, Mapping):
        return None
    try:
        e = LearnedEntry(card=str(obj["card"]), family=str(obj["family"]), path=str(obj["path"]),
                         bucket=str(obj["bucket"]), factor=float(obj["factor"]), count=int(obj["count"]),
                         updated=float(obj["updated"]), what=str(obj.get("what", SECONDS)))
    except (KeyError, TypeError, ValueError):
        return None
    if e.what not in (SECONDS, PEAK):
        return None
    lo, hi = PEAK_CLAMP if e.what == PEAK else RATIO_CLAMP
    path_ok = e.path in LEARN_PATHS or (e.what == SECONDS and e.path == ANY and e.family == ANY and e.bucket == ANY)
    if not (lo <= e.factor <= hi) or e.count < 1 or not path_ok or not math.isfinite(e.updated):
        return None
    return e


@dataclasses.dataclass(frozen=True)
class Learned:
    """A snapshot of learned factors; pass it to ``decide(..., learned=...)``.

    Attributes:
        entries: entries by :func:`entry_key`.
        min_count: observations a key needs before its factor is applied (fewer: shown, not used).
    """

    entries: Mapping[str, LearnedEntry] = dataclasses.field(default_factory=dict)
    min_count: int = 3

    def lookup(self, card: str, family: str, path: str, voxels: float) -> LearnedEntry | None:
        """The entry for this key, applied or not."""
        return self.entries.get(entry_key(card, family, path, size_bucket(voxels)))

    def factor(self, card: str, family: str, path: str, voxels: float) -> tuple[float, LearnedEntry | None]:
        """``(factor, entry)`` to apply to a local plan's seconds: the exact key's entry, else the
        card-wide one (``entry.family == "*"``), each only from ``min_count`` observations; ``(1.0, None)``
        when none applies."""
        if path not in LEARN_PATHS:
            return 1.0, None
        for e in (self.lookup(card, family, path, voxels), self.entries.get(entry_key(card, ANY, ANY, ANY))):
            if e is not None and e.count >= self.min_count:
                return e.factor, e
        return 1.0, None

    def peak_factor(self, card: str, family: str, path: str) -> tuple[float, LearnedEntry | None]:
        """``(factor, entry)`` to apply to a local plan's peak bytes: the family's learned peak, else the card-wide
        one for this path, from the first observation; ``(1.0, None)`` when none applies or the family's is not
        above 1 (a learned peak never lowers the memory model's estimate)."""
        if path not in LEARN_PATHS:
            return 1.0, None
        for fam in (family, ANY):
            e = self.entries.get(peak_key(card, fam, path))
            if e is not None:
                return (e.factor, e) if e.factor > 1.0 else (1.0, None)
        return 1.0, None

    def for_card(self, card: str, family: str | None = None) -> list[LearnedEntry]:
        """Entries of one card (and family, with the card-wide entry), sorted by key."""
        return sorted((e for e in self.entries.values()
                       if e.card == card and (family is None or e.family in (family, ANY))), key=lambda e: e.key)

    def to_dict(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "min_count": self.min_count,
                "entries": [e.to_dict() for e in sorted(self.entries.values(), key=lambda e: e.key)]}

    @classmethod
    def from_dict(cls, data: object, *, min_count: int = 3) -> Learned:
        """Parse :meth:`to_dict` output; malformed entries are skipped (a warning names how many)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"learned timings must be a JSON object with 'entries', got {type(data).__name__}")
        raw = data.get("entries", [])
        if not isinstance(raw, list):
            raise ValueError("'entries' must be a list")
        entries: dict[str, LearnedEntry] = {}
        bad = 0
        for obj in raw:
            e = _entry_from(obj)
            if e is None:
                bad += 1
            else:
                entries[e.key] = e
        if bad:
            log.warning("hybrid-vae: skipped %d malformed learned-timing entries", bad)
        return cls(entries=entries, min_count=min_count)


def _check(path: str, family: str, alpha: float, unit: str, **values: float) -> None:
    """The arguments :func:`observe` and :func:`observe_peak` share: a learned path, a real family, alpha in (0, 1]
    and positive finite ``values`` (in ``unit``)."""
    if path not in LEARN_PATHS:
        raise ValueError(f"path={path!r}: only {sorted(LEARN_PATHS)} decodes are learned")
    for name, v in values.items():
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name}={v!r}: must be a positive number of {unit}")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha={alpha!r}: must be in (0, 1]")
    if family == ANY:
        raise ValueError(f"family={family!r} is reserved for card-wide entries")


def observe(learned: Learned, *, card: str, family: str, path: str, voxels: float, estimated_s: float,
            measured_s: float, now: float, alpha: float = 0.2, max_entries: int = MAX_ENTRIES) -> Learned:
    """Return ``learned`` with one more observation (pure; the input is unchanged).

    Args:
        estimated_s: the engine's estimate *without* any learned factor (see
            :meth:`LearnedStore.record_plan`, which divides the applied factor out).
        measured_s: the decode's wall time.
        alpha: EWMA weight of a new observation once a key has ``1 / alpha`` observations; before
            that the factor is the plain (log) mean, so early observations are not over-weighted
            toward the prior.
        max_entries: keys kept; the least recently updated are dropped.

    Raises:
        ValueError: a non-positive or non-finite time, an unknown path, or alpha outside (0, 1].
    """
    _check(path, family, alpha, "seconds", estimated_s=estimated_s, measured_s=measured_s)
    lo, hi = RATIO_CLAMP
    ratio = min(hi, max(lo, measured_s / estimated_s))
    entries = dict(learned.entries)
    for fam, pth, bucket in ((family, path, size_bucket(voxels)), (ANY, ANY, ANY)):
        key = entry_key(card, fam, pth, bucket)
        old = entries.get(key)
        if old is None:
            factor, count = ratio, 1
        else:
            count = old.count + 1
            a = max(alpha, 1.0 / count)
            factor = math.exp((1 - a) * math.log(old.factor) + a * math.log(ratio))
        entries[key] = LearnedEntry(card=card, family=fam, path=pth, bucket=bucket, factor=factor, count=count,
                                    updated=now)
    return _bounded(learned, entries, max_entries)


def _bounded(learned: Learned, entries: dict[str, LearnedEntry], max_entries: int) -> Learned:
    """``entries`` as a snapshot like ``learned``, the least recently updated dropped beyond ``max_entries``."""
    if len(entries) > max_entries:
        keep = sorted(entries.values(), key=lambda e: (e.updated, e.key))[-max_entries:]
        entries = {e.key: e for e in keep}
    return Learned(entries=entries, min_count=learned.min_count)


def observe_peak(learned: Learned, *, card: str, family: str, path: str, estimated_bytes: float,
                 measured_bytes: float, now: float, oom: bool = False, alpha: float = 0.2,
                 max_entries: int = MAX_ENTRIES) -> Learned:
    """Return ``learned`` with one more peak observation for ``(card, family, path)`` and ``(card, *, path)``
    (pure; the input is unchanged).

    Args:
        estimated_bytes: the plan's estimated peak *without* a learned peak factor (see
            :meth:`LearnedStore.record_peak`, which divides the applied factor out).
        measured_bytes: the decode's allocated peak; with ``oom``, the bytes known free when it ran (its claim).
        oom: the plan ran out of memory: the ratio becomes ``max(measured / estimated, current factor) x``
            :data:`OOM_STEP` (it needed more than was free).
        alpha: how far a *lower* ratio pulls the factor down (a higher one replaces it).

    Raises:
        ValueError: a non-positive or non-finite byte count, an unknown path, or alpha outside (0, 1].
    """
    _check(path, family, alpha, "bytes", estimated_bytes=estimated_bytes, measured_bytes=measured_bytes)
    lo, hi = PEAK_CLAMP
    entries = dict(learned.entries)
    for fam in (family, ANY):
        key = peak_key(card, fam, path)
        old = entries.get(key)
        ratio = measured_bytes / estimated_bytes
        if oom:
            ratio = max(ratio, old.factor if old is not None else 1.0) * OOM_STEP
        ratio = min(hi, max(lo, ratio))
        if old is None or ratio >= old.factor:
            factor = ratio
        else:
            factor = math.exp((1 - alpha) * math.log(old.factor) + alpha * math.log(ratio))
        entries[key] = LearnedEntry(card=card, family=fam, path=path, bucket=ANY, factor=factor,
                                    count=(old.count if old is not None else 0) + 1, updated=now, what=PEAK)
    return _bounded(learned, entries, max_entries)


def user_cache_dir() -> Path:
    """``<cache>/hybrid-vae``: XDG_CACHE_HOME or ~/.cache, %LOCALAPPDATA% on Windows, ~/Library/Caches on macOS."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hybrid-vae"


def default_path() -> Path:
    """``$HYBRID_VAE_LEARNED``, else ``<cache>/hybrid-vae/learned.json`` (see :func:`user_cache_dir`)."""
    env = read_env().learned
    if env:
        return Path(env).expanduser()
    return user_cache_dir() / "learned.json"


class LearnedStore:
    """The learned factors in a small JSON file. Reads never raise; writes are atomic (temp file + rename).

    Two processes recording at the same moment may lose one observation (last writer wins); nothing
    else is at risk, and an observation is cheap to lose.

    Args:
        path (`str | Path | None`): the file; None: env ``HYBRID_VAE_LEARNED`` or the user cache dir.
        max_entries (`int`, defaults to 512): keys kept (the least recently updated are dropped).
        alpha (`float`, defaults to 0.2): EWMA weight of a new observation (see :func:`observe`).
        min_count (`int`, defaults to 3): observations before a factor is applied.
    """

    def __init__(self, path: str | Path | None = None, *, max_entries: int = MAX_ENTRIES, alpha: float = 0.2,
                 min_count: int = 3) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries={max_entries}: must be >= 1")
        self.path = Path(path).expanduser() if path not in (None, "") else default_path()
        self.max_entries, self.alpha, self.min_count = max_entries, alpha, min_count
        self.error: str | None = None

    def load(self) -> Learned:
        """The stored factors; empty when the file is missing or broken (then :attr:`error` says why)."""
        self.error = None
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return Learned(min_count=self.min_count)
        except (OSError, UnicodeDecodeError) as exc:
            self.error = f"{self.path}: cannot read learned timings: {exc}"
        else:
            try:
                return Learned.from_dict(json.loads(text), min_count=self.min_count)
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                self.error = (f"{self.path}: not a learned-timings file ({exc}); ignored; "
                              "reset it with `hybrid-vae calibrate --reset-learned`")
        log.warning("hybrid-vae: %s", self.error)
        return Learned(min_count=self.min_count)

    def save(self, learned: Learned) -> None:
        """Write ``learned`` atomically (creates the folder)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".learned-", suffix=".json", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(learned.to_dict(), f, indent=1)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def record(self, *, card: str, family: str, path: str, voxels: float, estimated_s: float, measured_s: float,
               now: float | None = None) -> LearnedEntry:
        """Add one observation and save; returns the updated entry."""
        new = observe(self.load(), card=card, family=family, path=path, voxels=voxels, estimated_s=estimated_s,
                      measured_s=measured_s, now=time.time() if now is None else now, alpha=self.alpha,
                      max_entries=self.max_entries)
        self.save(new)
        e = new.lookup(card, family, path, voxels)
        assert e is not None
        return e

    def record_plan(self, *, card: str, family: str, path: str, voxels: float, plan_seconds: float,
                    measured_s: float, applied: Learned | None) -> LearnedEntry | None:
        """Record a decode that ran a plan whose estimate may already include a learned factor.

        ``plan_seconds`` is ``plan.estimate.seconds`` as ``decide(..., learned=applied)`` produced it;
        the factor ``applied`` gave is divided out so the EWMA always compares against the raw model.
        Returns None (nothing recorded) for paths that are not learned or non-positive times.
        """
        if path not in LEARN_PATHS or not (measured_s > 0 and plan_seconds > 0):
            return None
        f = applied.factor(card, family, path, voxels)[0] if applied is not None else 1.0
        return self.record(card=card, family=family, path=path, voxels=voxels, estimated_s=plan_seconds / f,
                           measured_s=measured_s)

    def record_decision(self, decision: Decision, plan: Plan, measured_s: float, *,
                        applied: Learned | None) -> LearnedEntry | None:
        """Record a successful decode of ``plan`` (one of ``decision.plans``) that took ``measured_s``.

        Nothing is recorded for remote/cpu plans and for simulated or CPU-only GPU states (the time
        would belong to another device than the key's card). ``applied`` is the snapshot passed to
        ``decide``. Never raises for an unwritable file: logs and returns None.
        """
        gpu = decision.gpu
        if learn_path(plan) not in LEARN_PATHS or gpu.simulated or not gpu.is_accelerator:
            return None
        try:
            return self.record_plan(card=gpu.name, family=decision.job.family, path=learn_path(plan),
                                    voxels=job_voxels(decision.job), plan_seconds=plan.estimate.seconds,
                                    measured_s=measured_s, applied=applied)
        except OSError as exc:
            log.warning("hybrid-vae: could not save learned timings to %s: %s", self.path, exc)
            return None

    def record_peak(self, decision: Decision, plan: Plan, measured_bytes: int, *, applied: Learned | None,
                    oom: bool = False) -> LearnedEntry | None:
        """Record the peak of a local GPU decode of ``plan`` (one of ``decision.plans``): its allocated peak, or
        with ``oom`` the bytes its claim found free before it ran out of memory (:func:`observe_peak`).

        The peak factor ``applied`` gave the plan is divided out. Nothing is recorded for remote/cpu plans and
        simulated or CPU-only GPU states. Never raises for an unwritable file: logs and returns None.
        """
        gpu, path = decision.gpu, learn_path(plan)
        if path not in LEARN_PATHS or gpu.simulated or not gpu.is_accelerator or measured_bytes <= 0:
            return None
        card, family = gpu.name, decision.job.family
        f = applied.peak_factor(card, family, path)[0] if applied is not None else 1.0
        try:
            new = observe_peak(self.load(), card=card, family=family, path=path,
                               estimated_bytes=plan.estimate.peak_bytes / f, measured_bytes=measured_bytes,
                               now=time.time(), oom=oom, alpha=self.alpha, max_entries=self.max_entries)
            self.save(new)
        except OSError as exc:
            log.warning("hybrid-vae: could not save learned peaks to %s: %s", self.path, exc)
            return None
        return new.entries.get(peak_key(card, family, path))

    def reset(self) -> int:
        """Delete the file; returns how many entries it held (0 when there was none or it was broken)."""
        n = len(self.load().entries) if self.path.exists() else 0
        self.path.unlink(missing_ok=True)
        return n


def merge_observations(learned: Learned, observations: Iterable[tuple[str, str, str, float, float, float]], *,
                       now: float = 0.0, alpha: float = 0.2) -> Learned:
    """Fold ``(card, family, path, voxels, estimated_s, measured_s)`` tuples into ``learned`` (bench, tests)."""
    for i, (card, family, path, voxels, est, meas) in enumerate(observations):
        learned = observe(learned, card=card, family=family, path=path, voxels=voxels, estimated_s=est,
                          measured_s=meas, now=now + i, alpha=alpha)
    return learned
