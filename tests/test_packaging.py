"""What a pip install puts into site-packages: one top-level package, ``hybrid_vae`` (plus its dist-info), never a
generic top-level module (``server``, ``policy``, ``bench``, ``install``, ...) that could shadow a host's own or be
shadowed; and ``python -m hybrid_vae`` / ``python <folder>`` run the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip wheel .`` builds from this checkout (offline: no build isolation)."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the wheel offline needs setuptools")
    out = tmp_path_factory.mktemp("wheel")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO),
                          "-w", str(out)], capture_output=True, text=True, timeout=600, cwd=out)
    assert run.returncode == 0, run.stderr[-2000:]
    (built,) = out.glob("*.whl")
    return built


@pytest.mark.slow
def test_wheel_holds_one_top_level_package(wheel: Path) -> None:
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


#: what ``bench --simulate`` and ``calibrate`` run from a wheel, with the checkout's tests/ and sources out of reach
FROM_THE_WHEEL = """
import json, os, sys
sys.argv = ['hybrid-vae']
import hybrid_vae, hybrid_vae.bench.cli, hybrid_vae.bench.world, hybrid_vae.extension.calibrate
from hybrid_vae.extension.cli import main
from hybrid_vae.profiles.measurements import DATA_DIR, measured_rows
learned = os.path.join(os.getcwd(), 'learned.json')
open(learned, 'w').write('{}')
codes = [main(['bench', '--simulate', '--reduced', '--no-what-if', '--no-write', '--jobs', '1', '--seed', '0']),
         main(['calibrate', '--reset-learned', '--learned', learned]),
         main(['calibrate', '--sizes', '512', '--dtypes', 'float16', '--repeats', '1', '--out', 'p.yaml'])]
print('RESULT ' + json.dumps({'file': hybrid_vae.__file__, 'data': str(DATA_DIR), 'rows': len(measured_rows(device=None)),
      'codes': codes, 'learned_left': os.path.exists(learned),
      'tests_imported': sorted(m for m in sys.modules if m == 'tests' or m.startswith(('tests.', 'conftest'))),
      'path': sys.path}))
"""


def test_bench_and_calibrate_run_from_the_wheel(wheel: Path, tmp_path: Path) -> None:
    """The measured rows ship in the wheel (one copy: ``profiles/measured``, the same files as the checkout's), and
    ``hybrid-vae bench --simulate`` (the reduced set) and ``hybrid-vae calibrate`` run from the unpacked wheel alone:
    no ``tests/`` on the path, no import of it, the working folder outside the checkout."""
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(f.name for f in (REPO / "profiles" / "measured").glob("*.jsonl"))
    assert shipped, "no measured rows in profiles/measured"
    for name in shipped:
        assert f"hybrid_vae/profiles/measured/{name}" in names, name
    for mod in ("extension/calibrate.py", "extension/remote/__init__.py", "extension/remote/deadline.py",
                "bench/cli.py", "bench/world.py", "demo.py"):
        assert f"hybrid_vae/{mod}" in names, mod
    assert not [n for n in names if n.endswith(".jsonl") and "/profiles/measured/" not in n]  # one copy of the data
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "HYBRID_VAE_"))}
    env.update(PYTHONPATH=str(site), HYBRID_VAE_LEARNED=str(work / "unused.json"))
    run = subprocess.run([sys.executable, "-c", FROM_THE_WHEEL], capture_output=True, text=True, timeout=600,
                         cwd=work, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = json.loads(next(ln for ln in run.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert out["file"] == str(site / "hybrid_vae" / "__init__.py")
    assert out["data"] == str(site / "hybrid_vae" / "profiles" / "measured") and out["rows"] > 100
    assert out["codes"] == [0, 0, 0] and out["learned_left"] is False
    assert out["tests_imported"] == []
    assert not [p for p in out["path"] if p and Path(p).resolve().is_relative_to(REPO)], out["path"]
    assert "| hybrid-vae (this engine) |" in run.stdout  # the simulated matrix's headline table
    assert "learned timings reset" in run.stdout
    assert ("no CUDA GPU found" in run.stdout and not (work / "p.yaml").exists()) or (work / "p.yaml").exists()


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
