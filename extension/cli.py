"""The ``hybrid-vae`` command. Each subcommand lives in its own module with ``add_parser(sub)``;
this file only dispatches, so ``hybrid-vae --help`` stays fast (no torch import)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# (command, module providing add_parser): a module that is not installed/importable is left out
COMMANDS: tuple[tuple[str, str], ...] = (
    ("probe", "hybrid_vae.extension.cli_engine"),
    ("explain", "hybrid_vae.extension.cli_engine"),
    ("decode", "hybrid_vae.extension.cli_local"),
    ("demo", "hybrid_vae.extension.cli_local"),
    ("serve", "hybrid_vae.server.cli"),
    ("calibrate", "hybrid_vae.bench.calibrate"),
    ("bench", "hybrid_vae.bench.cli"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrid-vae",
        description="Decide, for every VAE decode, between full local, tiled local and remote decode, and run it.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    done: set[str] = set()
    for _cmd, mod in COMMANDS:
        if mod in done:
            continue
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == mod or mod.startswith(exc.name + ".")):
                continue  # that part of hybrid-vae is not present in this install
            raise
        module.add_parser(sub)
        done.add(mod)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
