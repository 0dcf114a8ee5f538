"""What a pip install puts into site-packages: one top-level package, ``hybrid_vae`` (plus its dist-info), never a
generic top-level module (``server``, ``policy``, ``bench``, ``install``, ...) that could shadow a host's own or be
shadowed; and ``python -m hybrid_vae`` / ``python <folder>`` run the CLI."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="building the wheel offline needs setuptools")
def test_wheel_holds_one_top_level_package(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO),
                          "-w", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"hybrid_vae"}, sorted(top)
    assert len(dist_info) == 1
    meta = next(iter(dist_info))
    if f"{meta}/top_level.txt" in names:
        assert zipfile.ZipFile(wheel).read(f"{meta}/top_level.txt").decode().split() == ["hybrid_vae"]
    for must in ("hybrid_vae/__init__.py", "hybrid_vae/__main__.py", "hybrid_vae/policy/trust.py",
                 "hybrid_vae/policy/geometry.py", "hybrid_vae/server/cli.py", "hybrid_vae/profiles/families.yaml"):
        assert must in names, must
    entry = zipfile.ZipFile(wheel).read(f"{meta}/entry_points.txt").decode()
    assert "hybrid-vae = hybrid_vae.extension.cli:main" in entry


def test_the_folder_runs_the_cli_without_an_install(tmp_path: Path) -> None:
    """``python <extension folder> ...`` (what SD.Next's saved-latent message gives) runs that folder's code (a copy
    named like an SD.Next extension folder here), from any working folder, and puts nothing of it on sys.path."""
    ext = tmp_path / "extensions" / "sdnext-hybrid-vae"
    shutil.copytree(REPO, ext, ignore=shutil.ignore_patterns(".git", "docs", "tests", "__pycache__", "*.egg-info"))
    run = subprocess.run([sys.executable, str(ext), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0 and "usage: hybrid-vae" in run.stdout and "decode" in run.stdout, run.stderr
    probe = tmp_path / "probe.py"
    probe.write_text("import runpy, sys\nsys.argv = ['hybrid-vae', '--help']\n"
                     f"try:\n    runpy.run_path({str(ext)!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
                     "import hybrid_vae.extension.cli as cli\n"
                     f"print(cli.__file__)\nprint(any(p.rstrip('/') == {str(ext)!r} for p in sys.path))\n")
    out = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stdout + out.stderr
    assert lines[-2] == str(ext / "extension" / "cli.py") and lines[-1] == "False", lines[-2:]
    mod = subprocess.run([sys.executable, "-m", "hybrid_vae", "--help"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert mod.returncode == 0 and "usage: hybrid-vae" in mod.stdout


def test_serve_default_port_is_not_a_host_ui_port() -> None:
    from hybrid_vae.extension.cli import build_parser
    from hybrid_vae.server.cli import DEFAULT_PORT

    args = build_parser().parse_args(["serve"])
    assert args.port == DEFAULT_PORT == 8300
    assert DEFAULT_PORT not in (8188, 7860, 7861, 8000, 8080)  # ComfyUI, SD.Next/A1111, common dev servers
