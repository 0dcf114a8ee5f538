"""Installs what hybrid-vae needs inside SD.Next's Python environment (SD.Next runs ``python install.py``).

SD.Next runs this file with the extension folder as the working directory and SD.Next's root on
``PYTHONPATH``, on full launches only (``--quick`` and friends skip it; the extension then says what is
missing when it loads). It uses SD.Next's ``launch.is_installed`` / ``launch.run_pip`` and falls back to
``python -m pip install`` when ``launch`` cannot be imported (run by hand, outside SD.Next).

Never installs torch or diffusers: SD.Next owns them. Idempotent: a package that is present in a
sufficient version is left alone. Exits 1 with a message naming the package and the command when an
install fails.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib import metadata

#: (distribution, import name, minimum version). nvidia-ml-py provides ``import pynvml``; SD.Next removes
#: the deprecated ``pynvml`` distribution, so that one must not be asked for.
REQUIREMENTS: tuple[tuple[str, str, str], ...] = (
    ("nvidia-ml-py", "pynvml", "12.535"),
    ("pydantic", "pydantic", "2.5"),
    ("PyYAML", "yaml", "6.0"),
    ("requests", "requests", "2.28"),
    ("safetensors", "safetensors", "0.4"),
)
NEVER = frozenset({"torch", "diffusers"})


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
        if len(digits) != len(part):
            break
    return tuple(out)


def _present(dist: str, module: str, minimum: str, launch: object | None) -> bool:
    """Installed in at least ``minimum`` (SD.Next's check when available, then the version from metadata)."""
    if launch is not None:
        if not launch.is_installed(dist):  # type: ignore[attr-defined]
            return False
    elif importlib.util.find_spec(module) is None:
        return False
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return launch is not None  # SD.Next says it is there; trust it
    return _version_tuple(version) >= _version_tuple(minimum)


def _install(spec: str, launch: object | None) -> None:
    if spec.split(">")[0].split("=")[0].strip().lower() in NEVER:
        raise RuntimeError(f"refusing to install {spec}: SD.Next manages it")
    if launch is not None:
        # SD.Next runs pip through a shell: quote the spec so ">=" is not a redirection
        launch.run_pip(f'install "{spec}"', f"hybrid-vae requirement: {spec}")  # type: ignore[attr-defined]
        return
    run = subprocess.run([sys.executable, "-m", "pip", "install", spec], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"pip exited with {run.returncode}: {(run.stderr or run.stdout).strip()[-800:]}")


def main() -> int:
    try:
        import launch  # SD.Next's helpers (PYTHONPATH = SD.Next's root)
    except ImportError:
        launch = None
    except Exception as exc:  # SD.Next present but its launcher failed to import: plain pip still works
        print(f"hybrid-vae install: SD.Next's launch helpers unavailable ({exc}); using pip directly", file=sys.stderr)
        launch = None
    failed = []
    for dist, module, minimum in REQUIREMENTS:
        if _present(dist, module, minimum, launch):
            continue
        spec = f"{dist}>={minimum}"
        try:
            _install(spec, launch)
        except Exception as exc:  # report every failure, then exit non-zero
            failed.append(spec)
            print(f"hybrid-vae install: could not install {spec}: {exc}", file=sys.stderr)
    if failed:
        print(f"hybrid-vae install: FAILED for {', '.join(failed)}. Install by hand in SD.Next's Python environment: "
              f"{sys.executable} -m pip install {' '.join(repr(s) for s in failed)}. Until then the extension stays "
              "off (when pydantic, PyYAML or safetensors is missing) or runs without NVML/remote decode.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
