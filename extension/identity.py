"""Proof of identity before remote decode: is the endpoint's VAE the one decoding locally?

Why: an endpoint serves one fixed VAE. Latents of another VAE (a fine-tune, a merge, a renamed file, a
ComfyUI graph with any VAE wired in) decode there into a wrong picture, silently (7.8 dB PSNR against the
local decode in a real ComfyUI). Names cannot prove which VAE a file holds; a decode can.

How: before the first remote decode for an (endpoint, local VAE) pair, a small seeded random latent -- the
*canary*, never user data -- is decoded by the local VAE and by the endpoint over the unchanged
hybrid-inference protocol (a ``raw`` request, 8-bit pixels, exactly what a remote plan asks for), and the two
images are compared:

* PSNR >= ``min_psnr_db`` (default 35 dB): ``same``, remote may be used;
* below: ``other`` -- "endpoint serves another VAE" -- remote is refused unless the user allows it
  (``allow_remote_custom_vae``);
* the canary failed (endpoint down, error, timeout): ``unverified``, remote refused for this decode (not cached;
  the endpoint's circuit breaker stops repeated attempts).

Why 35 dB (docs/benchmarks.md, "Endpoint identity", measured on the fixture VAE, CPU): the same weights in
bfloat16 / float16 score 53 / 61 dB on the 8-bit canary against float32 (equal weights and dtype: 100, i.e.
identical bytes), a 30-step decoder-only fine-tune 30 dB, other weights 9 dB; in a real ComfyUI the same SD-size
VAE served by ``hybrid-vae serve`` scored 89 dB and another one 10 dB (docs/hosts.md). The canary's PSNR tracks
the PSNR of a real picture decoded by both VAEs within about 2 dB, so "same" means *decodes like your VAE*
(remote pixels within about 4.5 levels RMS of 255 of the local ones), not bit-identical weights: a copy with
3% weight noise (40 dB on a picture) passes. ``min_psnr_db`` sets a stricter check.

The verdict is cached per (endpoint, family, weights fingerprint) in a small JSON file in the user's cache
dir (``$HYBRID_VAE_IDENTITY``, else ``<cache>/hybrid-vae/identity.json``; at most ``max_entries`` pairs, the
oldest dropped), and checked again when either side may have changed: the local weights (a new fingerprint),
the endpoint (after ``ttl_s``, default 24 h, or once a remote decode could not connect: a restarted server may
serve another VAE). A re-check that gets a different answer from the endpoint is logged.

The fingerprint (:func:`weights_fingerprint`) hashes every tensor's name, shape and dtype and a few evenly
spaced values of each (16 by default): O(number of tensors), not O(parameters), so it costs about the same
for a 1 M or a 100 M parameter VAE (docs/benchmarks.md). Its limit: a change that touches only unsampled values
(a single edited bias element) goes unnoticed; a fine-tune, a merge, a LoRA patch or a dtype change changes the
sampled values and is caught.

Against Hugging Face's endpoints the canary is one ordinary ``raw`` request of a 64x64 px image (1 KiB up,
12 KiB down); no server-side support is needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybrid_vae.policy.env import env_name, read_env
from hybrid_vae.policy.errors import HybridVAEError
from hybrid_vae.policy.learned import user_cache_dir
from hybrid_vae.policy.model import EndpointIdentity

if TYPE_CHECKING:
    import torch
    from hybrid_vae.policy.profiles import Family

log = logging.getLogger("hybrid_vae.identity")

__all__ = ["CANARY_SEED", "DEFAULT_MIN_PSNR_DB", "ENV_IDENTITY", "IdentityChecker", "IdentityStore", "canary_latent",
           "psnr_8bit", "weights_fingerprint"]

ENV_IDENTITY = env_name("identity")
FORMAT = "hybrid-vae-identity/1"
#: Seed of the canary latent: fixed, so an endpoint's answer can be compared across checks.
CANARY_SEED = 0x5EED
#: Latent pixels per side of the canary (64 px for 8x VAEs).
CANARY_LATENT_PX = 8
DEFAULT_MIN_PSNR_DB = 35.0
DEFAULT_TTL_S = 24 * 3600.0
#: Longest a canary request may take (the endpoint's full deadline is for real decodes).
CANARY_DEADLINE_S = 15.0
MAX_ENTRIES = 256
MAX_FILE_BYTES = 1024 * 1024
#: PSNR reported for identical images.
PSNR_IDENTICAL = 100.0

DecodeFn = Callable[["torch.Tensor"], "torch.Tensor"]


def canary_latent(family: Family, *, seed: int = CANARY_SEED, size: int = CANARY_LATENT_PX) -> torch.Tensor:
    """The canary: standard-normal latents in the pipeline's (normalised) space, ``[1, C, size, size]``, or
    ``[1, C, 1, size, size]`` (one frame) for video families. Seeded: the same bytes on every machine."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (1, family.latent_channels, 1, size, size) if family.video else (1, family.latent_channels, size, size)
    return torch.randn(shape, generator=g, dtype=torch.float32)


def _weights_module(vae: Any) -> Any:
    """The module holding the VAE's weights: ``vae.identity_weights`` when an adapter names one (ComfyUI's
    ``first_stage_model`` behind the node's adapter), else the VAE itself."""
    return getattr(vae, "identity_weights", None) or vae


def weights_fingerprint(vae: Any, *, per_tensor: int = 16) -> str | None:
    """A cheap fingerprint of a VAE's weights: SHA-256 over every tensor's name, shape and dtype and
    ``per_tensor`` evenly spaced values of each (first and last included). None when there are no weights
    (no local VAE to compare with).

    Cost: one small gather per tensor and one copy to the host, whatever the tensors' sizes. Offloaded (meta)
    tensors contribute their name, shape and dtype only.
    """
    import torch

    module = _weights_module(vae)
    state = getattr(module, "state_dict", None)
    if not callable(state):
        return None
    tensors = sorted(state(keep_vars=True).items())
    if not tensors:
        return None
    h = hashlib.sha256(b"hybrid-vae-fingerprint/1;")
    samples: dict[Any, list[torch.Tensor]] = {}
    with torch.no_grad():
        for name, t in tensors:
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            n = t.numel()
            if n == 0 or t.device.type == "meta":
                continue
            flat = t.detach().reshape(-1)
            step = max(1, (n - 1) // max(1, per_tensor - 1))
            # evenly spaced values (a strided view, no index tensor) and the last one
            samples.setdefault((t.device, t.dtype), []).extend((flat[: step * (per_tensor - 1) + 1 : step], flat[-1:]))
        for key in sorted(samples, key=str):  # one copy to the host per device and dtype
            h.update(torch.cat(samples[key]).to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    import torch

    return ((x.detach().float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def psnr_8bit(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB, peak 255) of two [-1, 1] images after 8-bit quantisation; :data:`PSNR_IDENTICAL` when equal.

    Raises:
        ValueError: the shapes differ (the endpoint's VAE does not even produce this image size).
    """
    ua, ub = _to_uint8(a), _to_uint8(b)
    if ua.shape != ub.shape:
        raise ValueError(f"shapes differ: local {tuple(ua.shape)}, endpoint {tuple(ub.shape)}")
    mse = float((ua.double() - ub.double()).pow(2).mean())
    return PSNR_IDENTICAL if mse == 0 else min(PSNR_IDENTICAL, 10 * math.log10(255.0**2 / mse))


def _key(endpoint: str, family: str, fingerprint: str) -> str:
    return f"{endpoint}|{family}|{fingerprint}"


class IdentityStore:
    """Verdicts in a small JSON file. Reads never raise (a broken or oversized file is ignored and said so in
    :attr:`error`); writes are atomic (temp file + rename); at most ``max_entries`` pairs, the oldest dropped.

    Args:
        path (`str | Path | None`): the file; None: ``$HYBRID_VAE_IDENTITY``, else
            ``<user cache dir>/hybrid-vae/identity.json``.
        max_entries (`int`, defaults to 256): pairs kept.
        ttl_s (`float`, defaults to 24 h): a verdict older than this is checked again.
    """

    def __init__(self, path: str | Path | None = None, *, max_entries: int = MAX_ENTRIES,
                 ttl_s: float = DEFAULT_TTL_S) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries={max_entries}: must be >= 1")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s={ttl_s}: must be > 0 seconds")
        env = read_env().identity
        self.path = Path(path).expanduser() if path not in (None, "") else (
            Path(env).expanduser() if env else user_cache_dir() / "identity.json")
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self.error: str | None = None
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict[str, Any]]:
        """key -> entry; empty when the file is missing, too large or broken."""
        self.error = None
        try:
            size = self.path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise ValueError(f"{size} bytes > {MAX_FILE_BYTES}")
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError(f"not a {FORMAT} file")
            return {k: v for k, v in data["entries"].items() if isinstance(v, dict)}
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self.error = f"{self.path}: identity cache ignored ({exc}); delete the file to reset it"
            log.warning("hybrid-vae: %s", self.error)
            return {}

    def _save(self, entries: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".identity-", suffix=".json", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"format": FORMAT, "entries": entries}, f, indent=1)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, endpoint: str, family: str, fingerprint: str, *, now: float | None = None) -> EndpointIdentity | None:
        """The stored verdict of this pair when younger than ``ttl_s`` (``source="cache"``), else None."""
        e = self.load().get(_key(endpoint, family, fingerprint))
        if e is None:
            return None
        try:
            checked = float(e["checked_at"])
            if (time.time() if now is None else now) - checked > self.ttl_s or e["verdict"] not in ("same", "other"):
                return None
            return EndpointIdentity(endpoint=endpoint, family=family, fingerprint=fingerprint, verdict=e["verdict"],
                                    psnr_db=float(e["psnr_db"]), threshold_db=float(e["threshold_db"]),
                                    checked_at=checked, source="cache")
        except (KeyError, TypeError, ValueError):
            return None

    def previous_answer(self, endpoint: str, family: str, fingerprint: str) -> str | None:
        """The SHA-256 of the endpoint's last canary answer for this pair (expired entries too)."""
        e = self.load().get(_key(endpoint, family, fingerprint))
        return str(e.get("answer_sha")) if e and e.get("answer_sha") else None

    def put(self, verdict: EndpointIdentity, *, answer_sha: str) -> None:
        """Store a ``same``/``other`` verdict (``unverified`` ones are not kept). A failed write is logged."""
        if verdict.verdict not in ("same", "other"):
            return
        with self._lock:
            entries = self.load()
            entries[_key(verdict.endpoint, verdict.family, verdict.fingerprint)] = {
                "endpoint": verdict.endpoint, "family": verdict.family, "fingerprint": verdict.fingerprint,
                "verdict": verdict.verdict, "psnr_db": verdict.psnr_db, "threshold_db": verdict.threshold_db,
                "checked_at": verdict.checked_at, "answer_sha": answer_sha}
            if len(entries) > self.max_entries:
                keep = sorted(entries.items(), key=lambda kv: float(kv[1].get("checked_at", 0)))[-self.max_entries:]
                entries = dict(keep)
            try:
                self._save(entries)
            except OSError as exc:
                log.warning("hybrid-vae: could not write the identity cache %s: %s (the verdict holds for this "
                            "process only)", self.path, exc)

    def forget(self, endpoint: str | None = None) -> int:
        """Drop the verdicts of ``endpoint`` (all when None); returns how many were dropped."""
        with self._lock:
            entries = self.load()
            keep = {k: v for k, v in entries.items() if endpoint is not None and v.get("endpoint") != endpoint}
            dropped = len(entries) - len(keep)
            if dropped:
                try:
                    self._save(keep)
                except OSError as exc:
                    log.warning("hybrid-vae: could not write the identity cache %s: %s", self.path, exc)
            return dropped


class IdentityChecker:
    """Runs canaries and keeps their verdicts (one canary per pair, also when decodes run in parallel).

    Args:
        store (`IdentityStore | None`): where verdicts persist; default: the user cache file.
        min_psnr_db (`float`, defaults to 35.0): the PSNR a match needs (see the module docstring).
        seed (`int`), latent_px (`int`, defaults to 8): the canary (:func:`canary_latent`).
    """

    def __init__(self, store: IdentityStore | None = None, *, min_psnr_db: float = DEFAULT_MIN_PSNR_DB,
                 seed: int = CANARY_SEED, latent_px: int = CANARY_LATENT_PX) -> None:
        if not 0 < min_psnr_db <= PSNR_IDENTICAL:
            raise ValueError(f"min_psnr_db={min_psnr_db}: give dB in (0, {PSNR_IDENTICAL:g}]")
        self.store = store or IdentityStore()
        self.min_psnr_db, self.seed, self.latent_px = float(min_psnr_db), seed, latent_px
        self._lock = threading.Lock()
        self._pair_locks: dict[str, threading.Lock] = {}
        self.canaries = 0  # canary decodes run by this checker (tests, benchmarks)

    def fingerprint(self, vae: Any) -> str | None:
        return weights_fingerprint(vae)

    def lookup(self, endpoint: str, family: str, fingerprint: str) -> EndpointIdentity | None:
        return self.store.get(endpoint, family, fingerprint)

    def forget(self, endpoint: str) -> int:
        return self.store.forget(endpoint)

    def check(self, *, endpoint: str, family: str, fingerprint: str, fam: Family, decode_local: DecodeFn,
              decode_remote: DecodeFn) -> EndpointIdentity:
        """The verdict for this pair: a valid cached one, else a canary decoded by ``decode_remote`` (the
        endpoint; :class:`~policy.errors.HybridVAEError` -> ``unverified``) and ``decode_local``, both given
        the canary in the pipeline's space and returning [-1, 1] images."""
        key = _key(endpoint, family, fingerprint)
        with self._lock:
            pair_lock = self._pair_locks.setdefault(key, threading.Lock())
        with pair_lock:  # a second decode of the same pair waits for the first canary's verdict
            known = self.store.get(endpoint, family, fingerprint)
            if known is not None:
                return known
            return self._canary(endpoint, family, fingerprint, fam, decode_local, decode_remote)

    def _canary(self, endpoint: str, family: str, fingerprint: str, fam: Family, decode_local: DecodeFn,
                decode_remote: DecodeFn) -> EndpointIdentity:
        base = {"endpoint": endpoint, "family": family, "fingerprint": fingerprint, "threshold_db": self.min_psnr_db}
        z = canary_latent(fam, seed=self.seed, size=self.latent_px)
        self.canaries += 1
        t0 = time.perf_counter()
        # the endpoint's answer is awaited on a helper thread while the local VAE decodes on this one (the caller's
        # thread keeps the VAE: host contexts such as ComfyUI's inference mode are per thread): max, not sum
        box: dict[str, Any] = {}

        def ask() -> None:
            try:
                box["remote"] = decode_remote(z)
            except BaseException as exc:  # handed to the caller's thread below
                box["error"] = exc

        helper = threading.Thread(target=ask, name="hybrid-vae-canary", daemon=True)
        helper.start()
        local: torch.Tensor | None = None
        local_error: Exception | None = None
        try:
            local = decode_local(z)
        except Exception as exc:  # the local VAE failed on 64 px (OOM, broken VAE): no verdict; the plans decide next
            local_error = exc
        helper.join()
        error = box.get("error")
        if error is not None and not isinstance(error, HybridVAEError):
            raise error
        if error is not None:
            why = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
            log.warning("hybrid-vae: identity canary on %s failed: %s; remote not used until it answers", endpoint, why)
            return EndpointIdentity(**base, verdict="unverified", psnr_db=None, checked_at=time.time(), detail=why)
        if local is None:
            text = str(local_error).splitlines()[0][:120] if str(local_error) else ""
            why = f"local canary decode failed: {type(local_error).__name__}: {text}"
            log.warning("hybrid-vae: identity canary for %s: %s", endpoint, why, exc_info=local_error)
            return EndpointIdentity(**base, verdict="unverified", psnr_db=None, checked_at=time.time(), detail=why)
        remote = box["remote"]
        try:
            psnr = psnr_8bit(local, remote)
        except ValueError as exc:
            log.warning("hybrid-vae: identity canary on %s: %s", endpoint, exc)
            psnr = 0.0
        answer = hashlib.sha256(_to_uint8(remote).numpy().tobytes()).hexdigest()
        before = self.store.previous_answer(endpoint, family, fingerprint)
        if before is not None and before != answer:
            log.warning("hybrid-vae: %s answers the identity canary differently than at the last check", endpoint)
        verdict = EndpointIdentity(**base, verdict="same" if psnr >= self.min_psnr_db else "other",
                                   psnr_db=round(psnr, 2), checked_at=time.time())
        self.store.put(verdict, answer_sha=answer)
        log.info("hybrid-vae: identity canary on %s (%s): %s, %.3f s", endpoint, family, verdict.text,
                 time.perf_counter() - t0)
        return verdict

