"""hybrid-vae inside SD.Next: the decode hooks, per-generation state, infotext and decision log.

What :func:`setup` (called by ``scripts/hybrid_vae.py``) does:

* replaces ``modules.processing_vae.vae_decode`` with a wrapper, once: the wrapper carries
  ``_hybrid_vae_original`` (SD.Next's function) and ``_hybrid_vae_runtime``; a wrapper is never wrapped
  again when the script file runs again on a UI reload; ``on_script_unloaded`` puts the original back;
* wraps ``pipe.vae.decode`` of HunyuanVideo and Wan pipelines (the pipeline decodes inside itself,
  e.g. on the Video tab; SD.Next's ``sd_hijack_vae`` may wrap the same method before or after us);
* registers the settings section and the ``before_process``/``after_process``/``model_loaded``
  callbacks.

How the hook gets ``p`` (the wrapped function does not receive it): ``on_before_process(p)`` (every
generation, also tabs that drop extension scripts) and the accordion's ``process(p, mode)`` record the
current ``p`` and the per-generation mode; ``postprocess``/``on_after_process`` clear it. A decode
sets ``p.extra_generation_params["Hybrid VAE"]`` to the line of the latest decode of that generation
(SD.Next writes each batch's infotext right after that batch's decode, so each image gets its own),
and removes it when SD.Next decoded instead (Tiny, disabled, unsupported model).

The wrapper never raises into SD.Next: unsupported input goes to SD.Next's own decode; when every
plan failed, the latent is saved under ``<data>/hybrid-vae/latents``, the log, ``shared.state.textinfo``
and the decision log name the file, and ``[]`` is returned, as SD.Next's own failed decode does.
``modules.*`` are imported inside functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from extension.orchestrator import DecodeReport, DecodeResult, HybridDecoder
from extension.sdnext_ui import (
    Config,
    accordion_ui,
    detect_custom,
    detect_family,
    from_vae_space,
    opts_getter,
    raw_decode,
    read_config,
    register_settings,
    resolve_settings,
    token_endpoints,
)
from policy.errors import DecodeFailedError, LatentError
from policy.model import Decision, DecodeSettings, Plan
from policy.profiles import Family, Profiles, ProfileStore

log = logging.getLogger("hybrid_vae.sdnext")

__all__ = ["INFOTEXT_KEY", "AccordionScript", "Runtime", "current_runtime", "detect_custom", "detect_family",
           "from_vae_space", "setup"]

INFOTEXT_KEY = "Hybrid VAE"
MARK_ORIGINAL = "_hybrid_vae_original"
MARK_RUNTIME = "_hybrid_vae_runtime"
VIDEO_VAE_CLASSES = frozenset({"AutoencoderKLHunyuanVideo", "AutoencoderKLWan"})
#: (import name, pip name): without these the extension stays off.
REQUIRED = (("pydantic", "pydantic"), ("yaml", "PyYAML"), ("safetensors", "safetensors"))
#: (import name, pip name, what is lost without it).
OPTIONAL = (("requests", "requests", "remote decode is off"),
            ("pynvml", "nvidia-ml-py", "free VRAM is read from torch instead of NVML"))
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


def _state_call(state: Any, name: str, *args: Any) -> Any:
    fn = getattr(state, name, None)
    if callable(fn):
        try:
            return fn(*args)
        except Exception:  # SD.Next's progress bookkeeping must never break a decode
            log.debug("shared.state.%s failed", name, exc_info=True)
    return None


class Runtime:
    """The hooks and their state (one per installed extension; kept on ``processing_vae._hybrid_vae_runtime``).

    Args:
        before_plan (`Callable[[Plan], None] | None`): passed to every :class:`HybridDecoder` (fault
            injection in tests; may raise like a decode would).
    """

    def __init__(self, *, before_plan: Callable[[Plan], None] | None = None) -> None:
        self.store = ProfileStore()
        self.before_plan = before_plan
        self.active = False
        self._lock = threading.RLock()
        self._tls = threading.local()
        self._gen: tuple[Any, str | None] | None = None
        self._wrapped: list[tuple[weakref.ref[Any], Callable[..., Any]]] = []
        self._remote: Any = None
        self._remote_key: tuple[Any, ...] | None = None
        self.ext_dir: str | None = None

    def ensure_path(self, *_: Any) -> None:
        """Put the extension folder on ``sys.path`` for good. SD.Next gives each script a new ``sys.path`` list
        while it loads and restores the old list afterwards, so this is done again from later callbacks."""
        if self.ext_dir and self.ext_dir not in sys.path:
            sys.path.append(self.ext_dir)

    # ---- hooks -----------------------------------------------------------------------------------
    def install(self) -> bool:
        """Wrap ``processing_vae.vae_decode`` unless a hybrid-vae wrapper is already there."""
        from modules import processing_vae

        cur = processing_vae.vae_decode
        self.active = True
        setattr(processing_vae, MARK_RUNTIME, self)
        if getattr(cur, MARK_ORIGINAL, None) is not None:
            if getattr(getattr(cur, MARK_RUNTIME, None), "active", False):
                return False  # never wrap a live wrapper
            cur = getattr(cur, MARK_ORIGINAL)  # a stale wrapper of an unloaded runtime: replace it
        rt = self

        def vae_decode(latents, model, output_type="np", vae_type="Full", width=None, height=None, frames=None):  # type: ignore[no-untyped-def]
            return rt.vae_decode(cur, latents, model, output_type, vae_type, width, height, frames)

        vae_decode.__doc__ = f"hybrid-vae wrapper of {getattr(cur, '__qualname__', cur)}"
        setattr(vae_decode, MARK_ORIGINAL, cur)
        setattr(vae_decode, MARK_RUNTIME, self)
        processing_vae.vae_decode = vae_decode
        log.info("hybrid-vae: decode hook installed")
        return True

    def uninstall(self) -> None:
        """Undo every hook (``on_script_unloaded``). A wrapper buried under someone else's passes through."""
        from modules import processing_vae

        self.active = False
        cur = processing_vae.vae_decode
        if getattr(cur, MARK_RUNTIME, None) is self:
            processing_vae.vae_decode = getattr(cur, MARK_ORIGINAL)
        # else someone wrapped on top of ours: ours stays inside, inactive (it passes every call through)
        if getattr(processing_vae, MARK_RUNTIME, None) is self:
            delattr(processing_vae, MARK_RUNTIME)
        with self._lock:
            wrapped, self._wrapped = self._wrapped, []
            self._gen = None
            remote, self._remote = self._remote, None
        for ref, wrapper in wrapped:
            vae = ref()
            if vae is None:
                continue
            prev = getattr(wrapper, MARK_ORIGINAL)
            if vae.__dict__.get("decode") is wrapper:
                if getattr(prev, "__self__", None) is vae:
                    vae.__dict__.pop("decode", None)  # it was the class's method
                else:
                    vae.__dict__["decode"] = prev
            elif vae.__dict__.get("orig_decode") is wrapper:  # SD.Next's sd_hijack_vae wrapped ours
                vae.__dict__["orig_decode"] = prev
        if remote is not None:
            remote.close()
        log.info("hybrid-vae: decode hooks removed")

    def wrap_pipeline_vae(self, pipe: Any) -> bool:
        """Route ``pipe.vae.decode`` (HunyuanVideo, Wan) through the engine. True when a wrapper was added."""
        if pipe is not None and not hasattr(pipe, "vae") and hasattr(pipe, "pipe"):
            pipe = pipe.pipe
        vae = getattr(pipe, "vae", None)
        if not self.active or vae is None or type(vae).__name__ not in VIDEO_VAE_CLASSES:
            return False
        for attr in ("decode", "orig_decode"):
            rt = getattr(vae.__dict__.get(attr), MARK_RUNTIME, None)
            if rt is not None and rt.active:
                return False
        previous = vae.decode
        ref = weakref.ref(vae)
        rt = self

        def decode(*args: Any, **kwargs: Any) -> Any:
            v = ref()
            return previous(*args, **kwargs) if v is None else rt.pipeline_decode(v, previous, args, kwargs)

        setattr(decode, MARK_ORIGINAL, previous)
        setattr(decode, MARK_RUNTIME, self)
        vae.__dict__["decode"] = decode
        with self._lock:
            self._wrapped.append((ref, decode))
        log.info("hybrid-vae: %s.decode routed through the engine", type(vae).__name__)
        return True

    # ---- generation bookkeeping ------------------------------------------------------------------
    def begin_generation(self, p: Any, mode: str | None = None) -> None:
        with self._lock:
            if self._gen is not None and self._gen[0] is p:
                self._gen = (p, mode if mode is not None else self._gen[1])
            else:
                self._gen = (p, mode)

    def end_generation(self, p: Any) -> None:
        with self._lock:
            if self._gen is not None and self._gen[0] is p:
                self._gen = None

    def before_process(self, p: Any) -> None:
        self.ensure_path()
        self.begin_generation(p)
        from modules import shared

        self.wrap_pipeline_vae(getattr(shared, "sd_model", None))

    def after_process(self, p: Any) -> None:
        self.end_generation(p)

    def model_loaded(self, sd_model: Any) -> None:
        self.ensure_path()
        self.wrap_pipeline_vae(sd_model)

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
            from extension.remote import RemoteClient
        except ImportError as exc:
            return None, f"remote decode needs {exc.name} (pip install {exc.name})"
        urls = list(cfg.endpoints.values()) + [e.url for f in profiles.families.values() for e in f.endpoints]
        trusted = tuple(sorted(set(token_endpoints(urls)))) if cfg.token else ()
        key = (cfg.token, trusted)
        with self._lock:
            if self._remote is None or self._remote_key != key:
                if self._remote is not None:
                    self._remote.close()
                self._remote, self._remote_key = RemoteClient(token=cfg.token, trusted_endpoints=trusted), key
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
        from modules import processing_vae, shared

        jobid = _state_call(shared.state, "begin", "VAE Decode")
        try:
            result = self._run(job)
        except DecodeFailedError as exc:
            _state_call(shared.state, "end", jobid)
            self._failed(exc, job)
            return []
        except LatentError as exc:
            _state_call(shared.state, "end", jobid)
            log.warning("hybrid-vae: %s; SD.Next decodes this latent", exc)
            return delegate("latent rejected")
        except Exception:
            _state_call(shared.state, "end", jobid)
            log.error("hybrid-vae: unexpected error; SD.Next decodes instead", exc_info=True)
            return delegate("unexpected error")
        _state_call(shared.state, "end", jobid)
        return processing_vae.vae_postprocess(result.tensor, job.model, output_type)

    def _prepare_image(self, latents: Any, model: Any, vae_type: str, width: int | None,
                       height: int | None) -> _Job | str:
        import torch
        from modules import shared

        cfg, profiles, perr = self.config()
        if not cfg.enabled:
            return "disabled in settings"
        if vae_type not in ("Full", "Remote"):
            return f"vae_type {vae_type}"
        m = model or getattr(shared, "sd_model", None)
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
        why = self._unsupported_backend()
        if why:
            return why
        key, why = detect_family(vae, profiles)
        if key is None:
            return why
        fam = profiles.family(key)
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
        for n in notes:
            log.warning("hybrid-vae: %s", n)
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
        decoder = HybridDecoder(settings=job.settings, profile_path=job.cfg.profile_path, profile_store=self.store,
                                latent_dir=self.data_dir() / "latents", remote=remote, before_plan=self.before_plan,
                                on_decision=self._on_decision)
        self._tls.busy = True
        try:
            with raw_decode(job.vae):
                res = decoder.decode(job.latents, job.vae, family=job.family, height=job.height, width=job.width,
                                     vae_id=job.vae_id, custom_vae=job.custom)
        finally:
            self._tls.busy = False
        if job.settings.mode != "auto" and res.report.chosen.path != job.settings.mode:
            job.notes.insert(0, res.report.reason.split("; ")[0])  # "tiled requested but no tile fits"
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
        if path is not None:
            msg = (f"Hybrid VAE: every decode plan failed; the latent is saved in {path} - decode it later with "
                   f"`hybrid-vae decode {path} --vae <VAE>`")
        else:
            msg = f"Hybrid VAE: every decode plan failed and the latent could NOT be saved to {self.data_dir() / 'latents'}"
        log.error("%s (%s)", msg, exc)
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
        why = self._unsupported_backend()
        if why:
            return why
        key, why = detect_family(vae, profiles)
        if key is None:
            return why
        fam = profiles.family(key)
        if not fam.video:
            return f"{key} is not a video family"
        m = model if getattr(model, "vae", None) is vae else None
        return self._job(m, vae, from_vae_space(z.float(), fam), key, fam, cfg, profiles, perr, "Full", "pipeline",
                         None, None)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def current_runtime() -> Runtime | None:
    """The active runtime, if the hooks are installed."""
    from modules import processing_vae

    rt = getattr(processing_vae, MARK_RUNTIME, None)
    return rt if isinstance(rt, Runtime) and rt.active else None


def setup(*, ext_dir: str | None = None, before_plan: Callable[[Plan], None] | None = None) -> Runtime | None:
    """Install the hooks (once) and register settings and callbacks; None (SD.Next untouched) when a
    required package is missing.

    Args:
        ext_dir (`str | None`): the extension folder, kept on ``sys.path`` (see :meth:`Runtime.ensure_path`).
        before_plan: fault injection for tests (see :class:`Runtime`).
    """
    from modules import processing_vae, script_callbacks

    missing = [pip for mod, pip in REQUIRED if not _importable(mod)]
    if missing:
        log.error("hybrid-vae: disabled, missing package(s) %s; install with `python -m pip install %s` in SD.Next's "
                  "Python environment (or restart SD.Next without --quick so install.py runs); SD.Next decodes as before",
                  ", ".join(missing), " ".join(missing))
        return None
    for mod, pip, effect in OPTIONAL:
        if not _importable(mod):
            log.warning("hybrid-vae: %s is not installed: %s (python -m pip install %s)", mod, effect, pip)
    rt = getattr(processing_vae, MARK_RUNTIME, None)
    if not isinstance(rt, Runtime) or not rt.active:
        rt = Runtime(before_plan=before_plan)
        rt.install()
    elif before_plan is not None:
        rt.before_plan = before_plan
    rt.ext_dir = ext_dir or rt.ext_dir
    script_callbacks.on_ui_settings(register_settings)
    script_callbacks.on_ui_settings(rt.ensure_path)
    script_callbacks.on_script_unloaded(rt.uninstall)
    script_callbacks.on_before_process(rt.before_process)
    script_callbacks.on_after_process(rt.after_process)
    script_callbacks.on_model_loaded(rt.model_loaded)
    from modules import shared

    rt.wrap_pipeline_vae(getattr(shared, "sd_model", None))
    return rt


class AccordionScript:
    """What ``scripts/hybrid_vae.py``'s ``scripts.Script`` subclass delegates to."""

    def title(self) -> str:
        return "Hybrid VAE"

    def available(self) -> bool:
        """False when setup left SD.Next untouched (a missing package): the accordion is hidden."""
        return current_runtime() is not None

    def ui(self, is_img2img: bool) -> list[Any]:
        return accordion_ui(is_img2img)

    def process(self, p: Any, mode: str | None = None, *_: Any) -> None:
        rt = current_runtime()
        if rt is not None:
            rt.begin_generation(p, mode)

    def postprocess(self, p: Any, *_: Any) -> None:
        rt = current_runtime()
        if rt is not None:
            rt.end_generation(p)
