"""The decode paths of hybrid-vae's SD.Next runtime: ``processing_vae.vae_decode`` and the pipeline VAE's ``decode``.

:class:`DecodePaths` is a mixin of :class:`extension.sdnext.Runtime` (which owns the hooks and the
per-generation state). For one call it reads the settings, inspects SD.Next's model, runs
:class:`~extension.orchestrator.HybridDecoder`, writes the infotext line and the decision log, or hands
the call back to SD.Next (``str`` reasons below) - it never raises into SD.Next's image pipeline.
``modules.*`` are imported inside the methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shlex
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybrid_vae.extension.geometry import UNMATCHED, resolve_family
from hybrid_vae.extension.orchestrator import DecodeReport, DecodeResult, HybridDecoder
from hybrid_vae.extension.sdnext_ui import (
    Config,
    detect_custom,
    from_vae_space,
    opts_getter,
    raw_decode,
    read_config,
    remote_off_reason,
    resolve_settings,
    token_endpoints,
)
from hybrid_vae.policy.errors import DecodeFailedError, LatentError, ProfileError
from hybrid_vae.policy.learned import LearnedStore
from hybrid_vae.policy.model import Decision, DecodeSettings, Plan, split_endpoints
from hybrid_vae.policy.profiles import Family, Profiles, ProfileStore
from hybrid_vae.policy.reasons import request_text

log = logging.getLogger("hybrid_vae.sdnext")

__all__ = ["INFOTEXT_KEY", "DecodePaths", "decode_command"]

INFOTEXT_KEY = "Hybrid VAE"
LOG_MAX_BYTES = 20 * 1024**2


@dataclasses.dataclass
class _Job:
    model: Any
    vae: Any
    latents: Any
    family: str
    height: int | None
    width: int | None
    cfg: Config
    profiles: Profiles
    settings: DecodeSettings
    notes: list[str]
    custom: bool
    vae_id: str | None
    custom_why: str
    source: str
    vae_type: str


def decode_command(latent: Path | str, vae: str) -> str:
    """A command that decodes a saved latent from SD.Next's own environment, with no install step.

    ``python <extension folder> decode ...`` runs the folder's ``__main__.py`` (the ``hybrid-vae`` CLI) with the
    interpreter SD.Next runs on, so it works whether or not the console script was installed.
    """
    root = Path(__file__).resolve().parent.parent
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(root))} decode {shlex.quote(str(latent))} --vae {shlex.quote(vae)}"


def _state_call(state: Any, name: str, *args: Any) -> Any:
    fn = getattr(state, name, None)
    if callable(fn):
        try:
            return fn(*args)
        except Exception:  # SD.Next's progress bookkeeping must never break a decode
            log.debug("shared.state.%s failed", name, exc_info=True)
    return None


class DecodePaths:
    """Decide and decode one SD.Next decode call (mixin; the state lives in :class:`extension.sdnext.Runtime`)."""

    store: ProfileStore
    before_plan: Callable[[Plan], None] | None
    active: bool
    _lock: threading.RLock
    _tls: threading.local
    _gen: tuple[Any, str | None] | None
    _remote: Any
    _remote_key: tuple[Any, ...] | None
    _warned: set[str]

    def _set_infotext(self, text: str | None) -> None:
        with self._lock:
            gen = self._gen
        params = getattr(gen[0], "extra_generation_params", None) if gen is not None else None
        if isinstance(params, dict):
            if text is None:
                params.pop(INFOTEXT_KEY, None)
            else:
                params[INFOTEXT_KEY] = text

    # ---- configuration ---------------------------------------------------------------------------
    def config(self) -> tuple[Config, Profiles, str | None]:
        """Settings as SD.Next holds them now, the profiles (the user's YAML if it loads) and the profile error."""
        from modules import shared

        get = opts_getter(shared.opts)
        path = str(get("hybrid_vae_profile_path", "") or "").strip() or None
        profiles, perr = self.store.get(path)
        return read_config(get, families=profiles.families), profiles, str(perr) if perr else None

    def data_dir(self) -> Path:
        """``<SD.Next data folder>/hybrid-vae`` (latents, decision log)."""
        from modules import shared

        base = getattr(shared, "data_path", None)
        if not base:
            try:
                from modules import paths

                base = paths.data_path
            except (ImportError, AttributeError):
                base = "."
        return Path(str(base)) / "hybrid-vae"

    def _remote_client(self, cfg: Config, profiles: Profiles) -> tuple[Any, str | None]:
        try:
            from hybrid_vae.extension.endpoints import pool_for
            from hybrid_vae.extension.remote import RemoteClient
        except ImportError as exc:
            return None, f"remote decode needs {exc.name} (pip install {exc.name})"
        urls = [u for spec in cfg.settings.endpoints.values() for u in split_endpoints(spec)]  # a pool: "a|b"
        urls += [e.url for f in profiles.families.values() for e in f.endpoints]
        trusted = tuple(sorted(set(token_endpoints(urls)))) if cfg.token else ()
        key = (cfg.token, trusted)
        with self._lock:
            if self._remote is None or self._remote_key != key:
                if self._remote is not None:
                    self._remote.close()
                client = RemoteClient(token=cfg.token, trusted_endpoints=trusted)
                self._remote, self._remote_key = pool_for(client), key
            pool_for(self._remote, cfg.settings.endpoints)  # learn this configuration's pools (health-checked)
            return self._remote, None

    # ---- the processing_vae.vae_decode hook ------------------------------------------------------
    def vae_decode(self, original: Callable[..., Any], latents: Any, model: Any, output_type: str = "np",
                   vae_type: str = "Full", width: int | None = None, height: int | None = None,
                   frames: int | None = None) -> Any:
        """Decide and decode one ``processing_vae.vae_decode`` call; SD.Next's own decode for what is not ours."""

        def delegate(why: str) -> Any:
            log.debug("hybrid-vae: SD.Next decodes (%s)", why)
            self._set_infotext(None)
            return original(latents, model, output_type, vae_type, width, height, frames)

        if not self.active or getattr(self._tls, "busy", False):
            return delegate("hook inactive")
        try:
            job = self._prepare_image(latents, model, vae_type, width, height)
        except Exception:
            log.warning("hybrid-vae: could not inspect the model; SD.Next decodes", exc_info=True)
            return delegate("inspection failed")
        if isinstance(job, str):
            return delegate(job)
        try:
            result = self._run_as_state_job(job)
        except DecodeFailedError as exc:
            self._failed(exc, job)
            return []
        except LatentError as exc:
            log.warning("hybrid-vae: %s; SD.Next decodes this latent", exc)
            return delegate("latent rejected")
        except Exception:
            log.error("hybrid-vae: unexpected error; SD.Next decodes instead", exc_info=True)
            return delegate("unexpected error")
        from modules import processing_vae

        return processing_vae.vae_postprocess(result.tensor, job.model, output_type)

    def _run_as_state_job(self, job: _Job) -> DecodeResult:
        """:meth:`_run` as SD.Next's job "VAE Decode" (``shared.state.begin``/``end``), ended however it ends:
        before a failure is reported or SD.Next's own decode runs."""
        from modules import shared

        jobid = _state_call(shared.state, "begin", "VAE Decode")
        try:
            return self._run(job)
        finally:
            _state_call(shared.state, "end", jobid)

    def _prepare_image(self, latents: Any, model: Any, vae_type: str, width: int | None,
                       height: int | None) -> _Job | str:
        import torch
        from modules import shared

        cfg, profiles, perr = self.config()
        if not cfg.enabled:
            return "disabled in settings"
        if vae_type not in ("Full", "Remote"):
            return f"vae_type {vae_type}"
        m: Any = model or getattr(shared, "sd_model", None)
        if not hasattr(m, "vae") and hasattr(m, "pipe"):
            m = m.pipe
        if latents is None or not torch.is_tensor(latents) or latents.shape[0] == 0:
            return "nothing to decode"
        state = getattr(shared, "state", None)
        if getattr(state, "interrupted", False) or getattr(state, "skipped", False):
            return "interrupted or skipped"
        vae = getattr(m, "vae", None)
        if vae is None or not hasattr(vae, "parameters"):
            return "no VAE"
        if hasattr(m, "transformer_spatial_patch_size"):
            return "LTX-style pipeline"
        if latents.shape[-1] <= 4:
            return "not a latent"
        found = self._engine_family(vae, profiles)
        if isinstance(found, str):
            return found
        key, fam = found
        z, h, w = latents, None, None
        if z.ndim == 3:
            if fam.packed and hasattr(m, "_unpack_latents") and width and height:
                h, w = int(height), int(width)
            else:
                z = z.unsqueeze(0)  # SD.Next: "lost a batch dim in hires"
        if fam.video and z.ndim == 4:
            z = z.unsqueeze(2)
        if z.ndim != (5 if fam.video else 3 if h else 4):
            return f"latent shape {tuple(latents.shape)} is not a {key} latent"
        return self._job(m, vae, z, key, fam, cfg, profiles, perr, vae_type, "vae_decode", h, w)

    def _engine_family(self, vae: Any, profiles: Any) -> tuple[str, Any] | str:
        """``(family key, Family)`` when the engine can decode with ``vae`` on this backend, else why not.

        The family comes from the VAE's whole geometry; a VAE of a class the engine decodes whose geometry
        matches no family gets the local-only ``unmatched`` family (memory model scaled from its config).
        """
        why = self._unsupported_backend()
        if why:
            return why
        try:  # a class the engine does not decode, or no readable config: SD.Next decodes (the reason is logged)
            key, profiles, how = resolve_family(vae, profiles)
        except ProfileError as exc:
            return str(exc)
        if key == UNMATCHED:
            log.debug("hybrid-vae: %s", how)
        return key, profiles.family(key)

    def _unsupported_backend(self) -> str | None:
        try:
            from modules import devices
        except ImportError:
            return None
        dev = getattr(devices, "device", None)
        kind = getattr(dev, "type", None) or (str(dev).split(":")[0] if dev is not None else None)
        if kind is not None and kind not in ("cuda", "mps", "cpu"):
            return f"device backend {kind} (hybrid-vae knows cuda, rocm, mps and cpu)"
        return None

    def _job(self, m: Any, vae: Any, z: Any, key: str, fam: Family, cfg: Config, profiles: Profiles,
             perr: str | None, vae_type: str, source: str, h: int | None, w: int | None) -> _Job | str:
        from modules import shared

        for prm in vae.parameters():
            if prm.device.type == "meta":
                return "VAE weights are offloaded per layer (sequential offload)"
            break
        with self._lock:
            mode = self._gen[1] if self._gen is not None else None
        settings, notes = resolve_settings(cfg, override=mode, vae_type=vae_type)
        if perr:
            notes.append(f"profile ignored, built-ins used: {perr}")
        notes.extend(f"setting ignored: {p}" for p in cfg.problems)
        for n in notes:  # each distinct problem is a warning once, then debug (no spam per decode)
            with self._lock:
                first = n not in self._warned
                self._warned.add(n)
            log.log(logging.WARNING if first else logging.DEBUG, "hybrid-vae: %s", n)
        sd_vae_opt = getattr(getattr(shared, "opts", None), "sd_vae", None)
        loaded = None
        with contextlib.suppress(ImportError, AttributeError):
            from modules import sd_vae

            loaded = getattr(sd_vae, "loaded_vae_file", None)
        custom, vae_id, why = detect_custom(vae, m, fam, sd_vae=sd_vae_opt, loaded_vae_file=loaded)
        return _Job(model=m, vae=vae, latents=z, family=key, height=h, width=w, cfg=cfg, profiles=profiles,
                    settings=settings, notes=notes, custom=custom, vae_id=vae_id, custom_why=why, source=source,
                    vae_type=vae_type)

    def _run(self, job: _Job) -> DecodeResult:
        remote = None
        if job.settings.allow_remote:
            remote, why = self._remote_client(job.cfg, job.profiles)
            if why:
                job.notes.append(why)
        learned = LearnedStore(self.data_dir() / "learned.json") if job.cfg.learn else None
        decoder = HybridDecoder(settings=job.settings, profile_path=job.cfg.profile_path, profile_store=self.store,
                                latent_dir=self.data_dir() / "latents", remote=remote, before_plan=self.before_plan,
                                on_decision=self._on_decision, learned=learned,
                                report_log_level=logging.INFO if job.cfg.decision_log else logging.DEBUG)
        self._tls.busy = True
        try:
            with raw_decode(job.vae):
                res = decoder.decode(job.latents, job.vae, family=job.family, height=job.height, width=job.width,
                                     vae_id=job.vae_id, custom_vae=job.custom)
        finally:
            self._tls.busy = False
        if job.settings.mode != "auto" and res.report.chosen.path != job.settings.mode:
            off = remote_off_reason(job.cfg, detail=False) if job.settings.mode == "remote" else ""
            # "tiled requested but no tile fits" (from the reason's code); for remote, the setting that stopped it
            asked = request_text(res.report.decision.reason_params)
            if off or asked:
                job.notes.insert(0, f"remote requested but {off}" if off else str(asked))
        text = self._line(res.report, job.notes)
        self._set_infotext(text)
        self._log(job, {"infotext": text, "report": res.report.to_dict()})
        return res

    def _on_decision(self, decision: Decision) -> None:
        from modules import shared

        state = getattr(shared, "state", None)
        if state is not None:
            with contextlib.suppress(AttributeError):
                state.textinfo = f"Hybrid VAE: {decision.chosen.label}"

    @staticmethod
    def _line(report: DecodeReport, notes: list[str]) -> str:
        text = report.infotext()
        extra = [n if len(n) <= 240 else n[:237] + "..." for n in dict.fromkeys(notes)]
        return text + ("; " + "; ".join(extra) if extra else "")

    def _failed(self, exc: DecodeFailedError, job: _Job) -> None:
        from modules import shared

        path = exc.latent_path
        vae = job.vae_id if job.vae_id and (Path(job.vae_id).exists() or (not job.custom and "/" in job.vae_id)) \
            else "<VAE folder, file or hub id>"
        if path is not None:
            msg = (f"Hybrid VAE: every decode plan failed; the latent is saved in {path} - decode it later with "
                   f"`{decode_command(path, vae)}`")
        else:
            msg = f"Hybrid VAE: every decode plan failed and the latent could NOT be saved to {self.data_dir() / 'latents'}"
        log.error("%s (attempts: %s)", msg, "; ".join(f"{lab}: {err}" for lab, err in exc.attempts) or exc)
        state = getattr(shared, "state", None)
        if state is not None:
            with contextlib.suppress(AttributeError):
                state.textinfo = msg
        self._set_infotext(f"failed, latent saved to {path}" if path else "failed, latent not saved")
        self._log(job, {"failed": True, "latent_path": str(path) if path else None, "error": str(exc),
                        "attempts": [list(a) for a in exc.attempts]})

    def _log(self, job: _Job, extra: dict[str, Any]) -> None:
        if not job.cfg.decision_log:
            return
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": job.source, "family": job.family,
                 "latent_shape": list(job.latents.shape), "vae_type": job.vae_type, "mode": job.settings.mode,
                 "vae_id": job.vae_id, "custom_vae": job.custom, "custom_why": job.custom_why, "notes": job.notes,
                 **extra}
        path = self.data_dir() / "decisions.jsonl"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file() and path.stat().st_size > LOG_MAX_BYTES:
                path.replace(path.with_suffix(".jsonl.1"))
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry, default=str) + "\n")
        except OSError as exc:
            log.warning("hybrid-vae: cannot write the decision log %s: %s", path, exc)

    # ---- the pipeline VAE hook (video) -----------------------------------------------------------
    def pipeline_decode(self, vae: Any, previous: Callable[..., Any], args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> Any:
        """``pipe.vae.decode(z, return_dict=True)`` of a video pipeline, decided by the engine."""
        if not self.active or getattr(self._tls, "busy", False):
            return previous(*args, **kwargs)
        try:
            job = self._prepare_video(vae, args, kwargs)
        except Exception:
            log.warning("hybrid-vae: could not inspect the video VAE call; it runs unchanged", exc_info=True)
            job = "inspection failed"
        if isinstance(job, str):
            log.debug("hybrid-vae: pipeline decode unchanged (%s)", job)
            self._set_infotext(None)
            return previous(*args, **kwargs)
        return_dict = args[1] if len(args) > 1 else kwargs.get("return_dict", True)
        try:
            res = self._run(job)
        except DecodeFailedError as exc:
            self._failed(exc, job)
            if hasattr(vae, "orig_decode"):
                return None  # what SD.Next's sd_hijack_vae returns when a decode fails
            raise
        except Exception:
            log.error("hybrid-vae: unexpected error; the pipeline's own decode runs", exc_info=True)
            return previous(*args, **kwargs)
        if not return_dict:
            return (res.tensor,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=res.tensor)

    def _prepare_video(self, vae: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Job | str:
        import torch
        from modules import shared

        if len(args) > 2 or set(kwargs) - {"z", "return_dict"} or (args and "z" in kwargs):
            return "unexpected arguments"
        z = args[0] if args else kwargs.get("z")
        cfg, profiles, perr = self.config()
        if not cfg.enabled:
            return "disabled in settings"
        if not torch.is_tensor(z) or z.ndim != 5 or z.shape[0] == 0:
            return "not a 5-D latent"
        state = getattr(shared, "state", None)
        if getattr(state, "interrupted", False) or getattr(state, "skipped", False):
            return "interrupted or skipped"
        model = getattr(shared, "sd_model", None)
        if getattr(model, "sdnext_vae_type", None) == "Tiny":
            return "SD.Next VAE type Tiny"
        found = self._engine_family(vae, profiles)
        if isinstance(found, str):
            return found
        key, fam = found
        if not fam.video:
            return f"{key} is not a video family"
        m = model if getattr(model, "vae", None) is vae else None
        return self._job(m, vae, from_vae_space(z.float(), fam), key, fam, cfg, profiles, perr, "Full", "pipeline",
                         None, None)
