"""hybrid-vae for ComfyUI: the "Hybrid VAE Decode" node.

Install (ComfyUI loads every folder in ``ComfyUI/custom_nodes/`` that has an ``__init__.py`` exporting
``NODE_CLASS_MAPPINGS``)::

    # symlink (recommended: updates with the repository; the repository root is found through the link)
    ln -s /path/to/hybrid-vae/extension/comfyui /path/to/ComfyUI/custom_nodes/hybrid_vae_node
    # or copy the folder, and make the engine importable in ComfyUI's Python:
    pip install -e /path/to/hybrid-vae        # or: export HYBRID_VAE_ROOT=/path/to/hybrid-vae

The engine is the package ``hybrid_vae`` (the repository root, two levels above this folder). When it is
not importable already, that root (or ``$HYBRID_VAE_ROOT``) is registered as ``hybrid_vae`` in
``sys.modules``; nothing is put on ``sys.path``, so none of our folders (``server``, ``policy``, ...) can
shadow ComfyUI's own modules (ComfyUI has a top-level ``server``) or be shadowed by them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ENV_ROOT = "HYBRID_VAE_ROOT"
PACKAGE = "hybrid_vae"


def repo_root() -> Path | None:
    """The hybrid-vae repository root: ``$HYBRID_VAE_ROOT``, else two levels above this folder (symlinks
    resolved), when it holds ``__init__.py``, ``policy/`` and ``extension/``; None otherwise."""
    env = os.environ.get(ENV_ROOT, "").strip()
    candidates = [Path(env).expanduser()] if env else []
    candidates.append(Path(__file__).resolve().parent.parent.parent)
    for root in candidates:
        if ((root / "__init__.py").is_file() and (root / "policy" / "__init__.py").is_file()
                and (root / "extension" / "orchestrator.py").is_file()):
            return root.resolve()
    return None


def _ensure_engine_importable() -> None:
    mod = sys.modules.get(PACKAGE)
    if mod is not None:
        if getattr(mod, "__path__", None) is None or getattr(mod, "__file__", None) == __file__:
            raise ImportError(
                f"hybrid-vae ComfyUI node: the module name {PACKAGE!r} is taken by {mod!r}; name the custom_nodes "
                "folder something else, e.g. custom_nodes/hybrid_vae_node")
        return
    if importlib.util.find_spec(PACKAGE) is not None:  # pip install (editable or wheel)
        return
    root = repo_root()
    if root is None:
        raise ImportError(
            "hybrid-vae ComfyUI node: cannot import the engine (package hybrid_vae). Symlink extension/comfyui "
            "into custom_nodes instead of copying it, or `pip install -e <hybrid-vae repo>`, "
            f"or set {ENV_ROOT}=<hybrid-vae repo>")
    spec = importlib.util.spec_from_file_location(PACKAGE, root / "__init__.py", submodule_search_locations=[str(root)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)


_ensure_engine_importable()

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
