"""The README's test command is the one .ci/run runs (CI must run exactly what a newcomer runs)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = ROOT / "README.md"
    lines = readme.read_text(encoding="utf-8").splitlines()
    marker = next(i for i, line in enumerate(lines) if line.startswith("<!-- the line above is the test command"))
    command = lines[marker - 2]
    assert command.startswith("pip install") and "pytest" in command
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert ci[-1] == command


def test_sdnext_docs_say_when_install_py_runs():
    """SD.Next (058a7f0, launch.py/installer.py) runs extensions' install.py only on a full launch; the docs must say
    so and name what makes a launch quick or skips the installers."""
    text = (ROOT / "docs" / "sdnext.md").read_text(encoding="utf-8")
    section = text[text.index("**When `install.py` runs.**"):text.index("If install.py did not run")]
    for needle in ("full* launch", "Startup: launch=full", "installer.json", "--quick", "--skip-all", "--skip-git",
                   "without `.git`", "offline_mode", "--skip-extensions"):
        assert needle in section, needle
