"""SD.Next's ``launch`` helpers for an extension's install.py: ``is_installed(pkg)``, ``run_pip(args, desc)``.

Env ``SDNEXT_STUB_LAUNCH_STATE`` names a JSON file ``{"installed": [...], "calls": [...], "fail": [...]}``:
``is_installed`` answers from ``installed``; ``run_pip`` records its arguments in ``calls`` (and adds
the package to ``installed``), or raises ``RuntimeError`` like SD.Next's ``run`` when the package is in
``fail``. Without the env variable ``is_installed`` asks importlib.metadata and ``run_pip`` refuses.
"""

import json
import os
from importlib import metadata


def _load():
    path = os.environ.get("SDNEXT_STUB_LAUNCH_STATE")
    if not path:
        return None, None
    with open(path, encoding="utf-8") as f:
        return path, json.load(f)


def is_installed(pkg):
    _path, state = _load()
    if state is None:
        try:
            metadata.distribution(pkg)
        except metadata.PackageNotFoundError:
            return False
        return True
    return pkg.lower() in {p.lower() for p in state["installed"]}


def run_pip(pkg, desc=None):
    path, state = _load()
    if state is None:
        raise RuntimeError(f"Couldn't install {desc or pkg}: the launch stub has no state file")
    state["calls"].append([pkg, desc])
    name = pkg.split()[-1].strip("\"'")
    bare = name.split(">")[0].split("=")[0].split("<")[0]
    failed = bare.lower() in {p.lower() for p in state.get("fail", [])}
    if not failed:
        state["installed"].append(bare)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(state, f)
    if failed:
        raise RuntimeError(f"Couldn't install {desc or pkg}: python -m pip {pkg} code: 1")
    return ""
