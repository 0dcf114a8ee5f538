"""Write one benchmark's section of docs/benchmarks.md, leaving the other sections as they are.

Each benchmark owns the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = ("# Benchmarks\n\nEvery section is written by the script it names; rerun the script to refresh it.\n"
          "Absolute times are only meaningful on the machine named in each section.\n")


def machine() -> str:
    """A one-line description of this machine (CPU model, cores, GPU if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # torch absent or broken: the benchmark still names the CPU
        gpu = "no GPU (torch unavailable)"
    return f"{cpu}, {os.cpu_count()} logical cores, {gpu}, Python {platform.python_version()}"


def write_section(name: str, body: str, *, doc: Path = DOC) -> Path:
    """Replace (or append) section ``name`` of ``doc`` with ``body``, stamped with date and machine."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text(encoding="utf-8") if doc.exists() else HEADER
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"<!-- BEGIN {name} -->\n{body.rstrip()}\n\n_Written by `{name}` on {stamp}; machine: {machine()}._\n"
             f"<!-- END {name} -->")
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text, encoding="utf-8")
    return doc


def write_measured(rows: list[dict[str, Any]], out: str | None, stem: str) -> Path:
    """Write measurement ``rows`` as JSON lines to ``out``, default ``profiles/measured/<stem>-<date>.jsonl``
    (package data), and say where on stderr."""
    path = Path(out) if out else (Path(__file__).resolve().parent.parent / "profiles" / "measured"
                                  / f"{stem}-{_dt.date.today().isoformat()}.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {path}", file=sys.stderr)
    return path


def _int_arg(text: str, ok: Callable[[int], bool], why: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or not ok(v):
        raise argparse.ArgumentTypeError(f"{text!r} {why}")
    return v


def px_arg(text: str) -> int:
    """argparse type: output pixels, a positive multiple of 8 (the VAEs' spatial compression)."""
    return _int_arg(text, lambda v: v >= 8 and v % 8 == 0, "is not a positive multiple of 8 (output pixels; e.g. 256)")


def count_arg(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    return _int_arg(text, lambda v: v >= 1, "must be a whole number of at least 1")
