"""hybrid-vae inside SD.Next: the decode hooks, per-generation state, infotext and decision log.

What :func:`setup` (called by ``scripts/hybrid_vae.py``) does:

* replaces ``modules.processing_vae.vae_decode`` with a wrapper, once: the wrapper carries
  ``_hybrid_vae_original`` (SD.Next's function) and ``_hybrid_vae_runtime``; a wrapper is never wrapped
  again when the script file runs again on a UI reload; ``on_script_unloaded`` puts the original back;
* wraps ``pipe.vae.decode`` of HunyuanVideo and Wan pipelines (the pipeline decodes inside itself,
  e.g. on the Video tab; SD.Next's ``sd_hijack_vae`` may wrap the same method before or after us);
* registers the settings section and the ``before_process``/``after_process``/``model_loaded``
  callbacks. It never reads ``shared.sd_model`` (a property that loads a model in SD.Next): video
  pipelines are wrapped from ``model_loaded`` and ``before_process``.

How the hook gets ``p`` (the wrapped function does not receive it): ``on_before_process(p)`` (every
generation, also tabs that drop extension scripts) and the accordion's ``process(p, mode)`` record the
current ``p`` and the per-generation mode; ``postprocess``/``on_after_process`` clear it. A decode
sets ``p.extra_generation_params["Hybrid VAE"]`` to the line of the latest decode of that generation
(SD.Next writes each batch's infotext right after that batch's decode, so each image gets its own),
and removes it when SD.Next decoded instead (Tiny, disabled, unsupported model).

The wrapper never raises into SD.Next (see :mod:`extension.sdnext_decode`): unsupported input goes to
SD.Next's own decode; when every plan failed, the latent is saved under ``<data>/hybrid-vae/latents``,
the log, ``shared.state.textinfo`` and the decision log name the file, and ``[]`` is returned, as
SD.Next's own failed decode does. ``modules.*`` are imported inside functions.
"""

from __future__ import annotations

import importlib
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

from hybrid_vae.extension import sdnext_log
from hybrid_vae.extension.sdnext_decode import INFOTEXT_KEY, DecodePaths
from hybrid_vae.extension.sdnext_ui import accordion_ui, detect_custom, detect_family, from_vae_space, register_settings
from hybrid_vae.policy.model import Plan
from hybrid_vae.policy.profiles import ProfileStore

log = logging.getLogger("hybrid_vae.sdnext")

__all__ = ["INFOTEXT_KEY", "AccordionScript", "Runtime", "current_runtime", "detect_custom", "detect_family",
           "from_vae_space", "setup"]

MARK_ORIGINAL = "_hybrid_vae_original"
MARK_RUNTIME = "_hybrid_vae_runtime"
VIDEO_VAE_CLASSES = frozenset({"AutoencoderKLHunyuanVideo", "AutoencoderKLWan"})
#: (import name, pip name): without these the extension stays off.
REQUIRED = (("pydantic", "pydantic"), ("yaml", "PyYAML"), ("safetensors", "safetensors"))
#: (import name, pip name, what is lost without it).
OPTIONAL = (("requests", "requests", "remote decode is off"),
            ("pynvml", "nvidia-ml-py", "free VRAM is read from torch instead of NVML"))


class Runtime(DecodePaths):
    """The hooks and their state (one per installed extension; kept on ``processing_vae._hybrid_vae_runtime``).

    The decode paths themselves are in :class:`extension.sdnext_decode.DecodePaths`.

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
        self._warned: set[str] = set()

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
        self.begin_generation(p)
        from modules import shared

        sdnext_log.attach(shared)  # undo SD.Next's post-startup handler override (see extension/sdnext_log.py)
        self.wrap_pipeline_vae(getattr(shared, "sd_model", None))

    def after_process(self, p: Any) -> None:
        self.end_generation(p)

    def model_loaded(self, sd_model: Any) -> None:
        self.wrap_pipeline_vae(sd_model)


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


def setup(*, before_plan: Callable[[Plan], None] | None = None) -> Runtime | None:
    """Install the hooks (once) and register settings and callbacks; None (SD.Next untouched) when a
    required package is missing.

    Args:
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
    script_callbacks.on_ui_settings(register_settings)
    script_callbacks.on_script_unloaded(rt.uninstall)
    script_callbacks.on_before_process(rt.before_process)
    script_callbacks.on_after_process(rt.after_process)
    script_callbacks.on_model_loaded(rt.model_loaded)
    # ``shared.sd_model`` is not read here: in SD.Next it is a property that loads the model when none is loaded
    # (and logs "Model requested"); the pipeline VAE is wrapped on model_loaded and before every generation
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
