"""install.py and the scripts file, run the way SD.Next runs them (subprocesses, the SD.Next stand-in)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STUB = REPO / "tests" / "sdnext_stub"
REQUIRED = ("nvidia-ml-py", "pydantic", "PyYAML", "requests", "safetensors")


def run_install(tmp_path: Path, state: dict | None, *, with_launch: bool = True) -> tuple[subprocess.CompletedProcess, dict]:
    """``python install.py`` with cwd = the extension folder and PYTHONPATH = "SD.Next's root" (the stub)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SDNEXT_STUB_LAUNCH_STATE")}
    state_file = tmp_path / "launch-state.json"
    if state is not None:
        state_file.write_text(json.dumps(state))
        env["SDNEXT_STUB_LAUNCH_STATE"] = str(state_file)
    if with_launch:
        env["PYTHONPATH"] = str(STUB)
    run = subprocess.run([sys.executable, "install.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return run, (json.loads(state_file.read_text()) if state is not None else {})


def test_install_uses_sdnext_helpers_is_idempotent_and_never_installs_torch(tmp_path):
    run, state = run_install(tmp_path, {"installed": ["torch", "diffusers"], "calls": []})
    assert run.returncode == 0, run.stderr
    specs = [c[0] for c in state["calls"]]
    assert [s.split('"')[1].split(">=")[0] for s in specs] == list(REQUIRED)
    assert all(s.startswith('install "') and s.endswith('"') for s in specs)  # quoted: SD.Next's pip runs in a shell
    assert not any("torch" in s or "diffusers" in s for s in specs)
    again, state2 = run_install(tmp_path, state)
    assert again.returncode == 0, again.stderr
    assert state2["calls"] == state["calls"]  # nothing installed twice


def test_install_reports_a_failure_and_exits_nonzero(tmp_path):
    run, state = run_install(tmp_path, {"installed": ["nvidia-ml-py", "pydantic", "requests", "safetensors"],
                                        "calls": [], "fail": ["PyYAML"]})
    assert run.returncode == 1
    assert "PyYAML>=6.0" in run.stderr and "pip install" in run.stderr
    assert [c[0] for c in state["calls"]] == ['install "PyYAML>=6.0"']


def test_install_outside_sdnext_checks_with_importlib(tmp_path):
    run, _ = run_install(tmp_path, None, with_launch=False)  # every requirement is in this venv: nothing to do
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""


LOADER = textwrap.dedent("""
    import json, logging, sys
    STUB, EXT, BLOCK = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", type(f).__name__)]
    sys.path[:] = [STUB] + [p for p in sys.path if p not in ("", EXT) and "__editable__" not in p]

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if BLOCK and (name == BLOCK or name.startswith(BLOCK + ".")):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append([record.levelname, record.getMessage()])

    logging.getLogger().addHandler(Keep())
    logging.getLogger().setLevel(logging.INFO)
    from modules import processing_vae, scripts_manager
    original = processing_vae.vae_decode
    path_before = list(sys.path)
    data = scripts_manager.load_scripts([EXT])
    on_path_after_load = EXT in sys.path
    from modules import script_callbacks
    script_callbacks.ui_settings_callback()  # what SD.Next does next: build the settings UI
    runner = scripts_manager.ScriptRunner(False)
    out = {"wrapped": processing_vae.vae_decode is not original,
           "scripts": [c.__name__ for c, *_ in data], "alwayson": len(runner.alwayson_scripts),
           "on_path_after_load": on_path_after_load, "on_path_after_ui": EXT in sys.path, "records": records}
    if out["wrapped"]:
        import hybrid_vae.extension.remote  # a later, lazy import resolves from the extension folder
        out["sdnext_file"] = sys.modules["hybrid_vae.extension.sdnext"].__file__
        out["remote_file"] = hybrid_vae.extension.remote.__file__
        out["generic"] = sorted({"server", "policy", "extension", "bench", "profiles"} & set(sys.modules))
    print("RESULT " + json.dumps(out))
""")


def load_in_subprocess(ext_dir: Path, block: str = "") -> dict:
    run = subprocess.run([sys.executable, "-c", LOADER, str(STUB), str(ext_dir), block], cwd=ext_dir.parent,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def extension_copy(tmp_path_factory) -> Path:
    """The extension as SD.Next sees it: a folder under extensions/, not importable until the script adds it."""
    dst = tmp_path_factory.mktemp("sdnext") / "extensions" / "sdnext-hybrid-vae"
    for part in ("scripts", "extension", "policy", "profiles", "install.py", "__init__.py"):
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, dst / part, ignore=shutil.ignore_patterns("__pycache__", "weights", "*.png"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / part)
    return dst


def test_scripts_file_registers_its_folder_as_hybrid_vae_and_installs_the_hook(extension_copy):
    out = load_in_subprocess(extension_copy)
    assert out["wrapped"] and out["scripts"] == ["HybridVAEScript"] and out["alwayson"] == 1
    assert not out["on_path_after_load"]  # SD.Next swapped its sys.path list back after the load ...
    assert not out["on_path_after_ui"]  # ... and the extension needs no sys.path entry: hybrid_vae is in sys.modules
    assert out["generic"] == []  # no top-level server/policy/... module that could shadow another extension's
    assert out["sdnext_file"].startswith(str(extension_copy)) and out["remote_file"].startswith(str(extension_copy))


@pytest.mark.parametrize(("module", "pip"), [("yaml", "PyYAML"), ("pydantic", "pydantic"), ("safetensors", "safetensors")])
def test_missing_dependency_is_reported_and_sdnext_left_alone(extension_copy, module, pip):
    out = load_in_subprocess(extension_copy, block=module)
    assert not out["wrapped"]  # SD.Next's decode untouched
    assert out["scripts"] == ["HybridVAEScript"] and out["alwayson"] == 0  # the accordion is hidden
    errors = [m for lvl, m in out["records"] if lvl == "ERROR"]
    assert len(errors) == 1, out["records"]
    assert pip in errors[0] and f"pip install {pip}" in errors[0] and "SD.Next decodes as before" in errors[0]


def test_missing_optional_dependency_only_warns(extension_copy):
    out = load_in_subprocess(extension_copy, block="pynvml")
    assert out["wrapped"]
    warnings = [m for lvl, m in out["records"] if lvl == "WARNING"]
    assert any("nvidia-ml-py" in m for m in warnings)
