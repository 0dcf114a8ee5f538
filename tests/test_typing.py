"""``policy`` type-checks under ``mypy --strict`` (pyproject's override), checked as the package ``hybrid_vae.policy``.

The repository root is the package ``hybrid_vae`` (pyproject's ``package-dir``); mypy does not follow pip's editable
finder, so it is pointed at a folder holding a ``hybrid_vae`` link to the root.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("mypy") is None and sys.modules.get("mypy") is None, reason="mypy not installed")
def test_policy_is_strictly_typed(tmp_path: Path) -> None:
    (tmp_path / "hybrid_vae").symlink_to(REPO, target_is_directory=True)
    run = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "-p", "hybrid_vae.policy"],
                         cwd=REPO, env={"MYPYPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Success" in run.stdout
