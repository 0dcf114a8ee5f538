"""``python -m hybrid_vae ...`` (installed) or ``python <this folder> ...`` (e.g. SD.Next's extension folder):
the ``hybrid-vae`` command line, with no install step.

Run as a folder, Python puts the folder itself first on ``sys.path``; that entry is removed again (so the
folders ``server``, ``policy``, ... never shadow anything), and the folder is registered as the package
``hybrid_vae`` (the way ``scripts/hybrid_vae.py`` does inside SD.Next), so the code that runs is this copy's.
"""

import importlib.util
import os
import sys


def _register_self() -> None:
    root = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    if __package__:  # ``python -m hybrid_vae``: the package is imported already
        return
    spec = importlib.util.spec_from_file_location("hybrid_vae", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["hybrid_vae"] = module
    spec.loader.exec_module(module)


_register_self()
from hybrid_vae.extension.cli import main  # noqa: E402 (after the package is registered)

if __name__ == "__main__":
    sys.exit(main())
