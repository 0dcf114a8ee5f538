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
