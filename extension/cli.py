"""The ``hybrid-vae`` command. Each subcommand lives in its own module with ``add_parser(sub)``;
this file only dispatches, so ``hybrid-vae --help`` stays fast (no torch import)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

# (command, module providing add_parser): a module that is not installed/importable is left out
COMMANDS: tuple[tuple[str, str], ...] = (
    ("probe", "hybrid_vae.extension.cli_engine"),
    ("explain", "hybrid_vae.extension.cli_engine"),
    ("decode", "hybrid_vae.extension.cli_local"),
    ("demo", "hybrid_vae.demo"),
    ("serve", "hybrid_vae.server.cli"),
    ("calibrate", "hybrid_vae.extension.calibrate"),
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


def quiet_third_party(verbose: bool) -> None:
    """Keep other libraries' notices out of our commands' output unless ``--verbose``: diffusers' 5-line
    "accelerate was not found" warning on every VAE load (accelerate only speeds up loading large
    models), and the hub's download chatter. Errors still show. Nothing is imported here (importing
    diffusers costs seconds): the libraries read these variables when they first configure their loggers,
    and a value the user set wins."""
    if verbose:
        return
    for env in ("DIFFUSERS_VERBOSITY", "HF_HUB_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(env, "error")
    for name in ("diffusers", "huggingface_hub", "transformers"):
        if name in sys.modules:  # already configured (a caller imported it): set the level directly
            logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command in ("decode", "demo", "serve", "calibrate", "bench"):  # the commands that load a VAE
        quiet_third_party(args.verbose)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
    except BrokenPipeError:
        # `hybrid-vae explain ... | head`: the reader left; stop quietly, as other command-line tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the broken pipe
    except KeyboardInterrupt:
        print("hybrid-vae: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
