"""SD.Next entry point of hybrid-vae (thin: the work is in ``extension/sdnext.py``).

SD.Next executes this file with the extension folder on ``sys.path`` only while it runs (a new list,
swapped back afterwards) and does not keep it in ``sys.modules``. The extension folder is registered as the
package ``hybrid_vae`` (its root ``__init__.py``) in ``sys.modules``, so every later import of
``hybrid_vae.*`` resolves here, and nothing of ours (``server``, ``policy``, ...) is put on ``sys.path``
where it could shadow another extension's modules or be shadowed by them.
The ``hybrid_vae`` logger is forwarded to SD.Next's own logger before anything is logged
(:mod:`extension.sdnext_log`: SD.Next sends the root logger to a NullHandler at ERROR). A missing dependency
(install.py is skipped by quick launches) logs one error naming the package and leaves SD.Next's decode untouched.
"""

import importlib.util
import logging
import os
import sys

import modules.scripts as scripts

_EXT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _register_package(root: str) -> None:
    """Make ``import hybrid_vae`` mean this extension folder (unless a ``hybrid_vae`` is imported already)."""
    if "hybrid_vae" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("hybrid_vae", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules["hybrid_vae"] = module
    spec.loader.exec_module(module)


_register_package(_EXT_DIR)
from hybrid_vae.extension import sdnext_log  # noqa: E402 (standard library only; needs the package registered)

sdnext_log.attach()
_PIP_NAMES = {"yaml": "PyYAML", "pynvml": "nvidia-ml-py"}

try:
    from hybrid_vae.extension import sdnext
except ImportError as _exc:  # a dependency of the engine is missing
    sdnext = None
    _name = (getattr(_exc, "name", None) or str(_exc)).split(".")[0]
    _pip = _PIP_NAMES.get(_name, _name)
    logging.getLogger("hybrid_vae").error(
        "hybrid-vae: disabled, Python package %r is missing (%s); install it with `python -m pip install %s` in "
        "SD.Next's environment, or restart SD.Next without --quick so the extension's install.py runs. "
        "SD.Next decodes as before.", _pip, _exc, _pip)
else:
    try:
        sdnext.setup()
    except Exception:  # SD.Next must keep working whatever happens here
        logging.getLogger("hybrid_vae").exception("hybrid-vae: setup failed; SD.Next decodes as before")


class HybridVAEScript(scripts.Script):
    """The "Hybrid VAE" accordion in txt2img/img2img: the decode mode for one generation."""

    def __init__(self) -> None:
        super().__init__()
        self._impl = sdnext.AccordionScript() if sdnext is not None else None

    def title(self):
        return "Hybrid VAE"

    def show(self, is_img2img):
        return scripts.AlwaysVisible if self._impl is not None and self._impl.available() else False

    def ui(self, is_img2img):
        return self._impl.ui(is_img2img) if self._impl is not None else []

    def process(self, p, *args):
        if self._impl is not None:
            self._impl.process(p, *args)

    def postprocess(self, p, processed, *args):
        if self._impl is not None:
            self._impl.postprocess(p, processed, *args)
