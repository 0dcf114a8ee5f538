"""hybrid-vae for ComfyUI: the "Hybrid VAE Decode" node.

Install (ComfyUI loads every folder in ``ComfyUI/custom_nodes/`` that has an ``__init__.py`` exporting
``NODE_CLASS_MAPPINGS``)::

    # symlink (recommended: updates with the repository; the repository root is found through the link)
    ln -s /path/to/hybrid-vae/extension/comfyui /path/to/ComfyUI/custom_nodes/hybrid_vae
    # or copy the folder, and make the engine importable in ComfyUI's Python:
    pip install -e /path/to/hybrid-vae        # or: export HYBRID_VAE_ROOT=/path/to/hybrid-vae

The engine (``policy``, ``extension``) lives at the repository root, two levels above this folder. When it
is not importable already, that root (or ``$HYBRID_VAE_ROOT``) is *appended* to ``sys.path``: appended, so
it never shadows ComfyUI's own modules (ComfyUI has a top-level ``server`` module, and so does this
repository; the node never imports ours).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ENV_ROOT = "HYBRID_VAE_ROOT"


def repo_root() -> Path | None:
    """The hybrid-vae repository root: ``$HYBRID_VAE_ROOT``, else two levels above this folder (symlinks
    resolved), when it holds ``policy/`` and ``extension/``; None otherwise."""
    env = os.environ.get(ENV_ROOT, "").strip()
    candidates = [Path(env).expanduser()] if env else []
    candidates.append(Path(__file__).resolve().parent.parent.parent)
    for root in candidates:
        if (root / "policy" / "__init__.py").is_file() and (root / "extension" / "orchestrator.py").is_file():
            return root.resolve()
    return None


def _ensure_engine_importable() -> None:
    if importlib.util.find_spec("policy") is not None and importlib.util.find_spec("extension") is not None:
        return
    root = repo_root()
    if root is None:
        raise ImportError(
            "hybrid-vae ComfyUI node: cannot import the engine (policy, extension). Symlink "
            "extension/comfyui into custom_nodes instead of copying it, or `pip install -e <hybrid-vae repo>`, "
            f"or set {ENV_ROOT}=<hybrid-vae repo>")
    if str(root) not in sys.path:
        sys.path.append(str(root))


_ensure_engine_importable()

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
