"""The layers, as imports: ``profiles/`` (data and its loader) imports no other part; ``policy/`` (pure decisions)
imports none of ``extension/``, ``server/``, ``bench/``; ``extension/`` (the engine and the host glue) imports
neither ``server/`` nor ``bench/``; ``server/`` may import the engine but not ``bench/``. ``bench/`` may import
everything below it; ``hybrid_vae.demo`` (``hybrid-vae demo``) sits above the engine and the server and runs
them together.
The ``hybrid-vae`` dispatcher (``extension/cli.py``) names its subcommands' modules as strings, imported on use.

Every ``import``/``from ... import`` in a module counts, lazy ones inside functions and ``TYPE_CHECKING`` blocks
included (relative imports are resolved against the module's package)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: layer folder -> top-level parts of ``hybrid_vae`` it must never import
FORBIDDEN = {"profiles": {"policy", "extension", "server", "bench", "demo"},
             "policy": {"extension", "server", "bench", "demo"},
             "extension": {"server", "bench", "demo"},
             "server": {"bench", "demo"}}


def imported_parts(source: str, package: list[str]) -> list[tuple[int, str]]:
    """``(line, part)`` for every import of ``hybrid_vae.<part>`` in ``source`` (absolute or relative, in line
    order); ``package``: the dotted parts of the module's package (``["hybrid_vae", "extension"]``)."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            names = [mod] if mod != "hybrid_vae" else [f"hybrid_vae.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "hybrid_vae" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
            elif parts[0] in {"extension", "server", "bench", "policy", "demo"}:  # a bare top-level import
                out.append((node.lineno, parts[0]))
    return sorted(out)


def module_imports(path: Path) -> list[tuple[int, str]]:
    return imported_parts(path.read_text(encoding="utf-8"), ["hybrid_vae", *path.relative_to(REPO).parts[:-1]])


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_go_one_way(layer: str) -> None:
    files = sorted((REPO / layer).rglob("*.py"))
    assert files, f"no modules under {layer}/"
    wrong = [f"{f.relative_to(REPO)}:{line} imports hybrid_vae.{part}"
             for f in files for line, part in module_imports(f) if part in FORBIDDEN[layer]]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_scan_sees_lazy_relative_and_bare_imports() -> None:
    """The scanner itself can say no: a lazy import inside a function, relative ones and a bare one all count;
    ``extension/`` importing its own modules does not."""
    source = ("def f():\n    from hybrid_vae.server.app import create_app\n"
              "from ..bench import world\nimport server.cli\nfrom .. import demo\nfrom . import remote_wire\n"
              "from hybrid_vae import policy\n")
    assert imported_parts(source, ["hybrid_vae", "extension"]) == [
        (2, "server"), (3, "bench"), (4, "server"), (5, "demo"), (6, "extension"), (7, "policy")]
