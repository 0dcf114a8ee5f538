"""``policy`` type-checks under ``mypy --strict`` (pyproject's override), checked as the package ``hybrid_vae.policy``.

The repository root is the package ``hybrid_vae`` (pyproject's ``package-dir``); mypy does not follow pip's editable
finder, so it is pointed at a folder holding a ``hybrid_vae`` link to the root.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("mypy") is None and sys.modules.get("mypy") is None, reason="mypy not installed")
def test_policy_is_strictly_typed() -> None:
    # a stable link and cache per checkout in the temp folder (not in the repository: a link to the root inside
    # it would make a loop): a rerun checks only what changed
    root = Path(tempfile.gettempdir()) / f"hybrid-vae-mypy-{hashlib.sha1(str(REPO).encode()).hexdigest()[:12]}"
    root.mkdir(parents=True, exist_ok=True)
    link = root / "hybrid_vae"
    if not link.is_symlink():
        link.symlink_to(REPO, target_is_directory=True)
    run = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(root / "cache"), "-p", "hybrid_vae.policy"],
                         cwd=REPO, env={"MYPYPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Success" in run.stdout
