"""`featuregeom` (also `python -m precompute`): the one command line of the engine.

    featuregeom precompute --config configs/demo.toml          # the whole job
    featuregeom geometry --sae PATH --out DIR                   # one step on a cache
    featuregeom train-sae --config configs/train-sae.toml       # train a TopK SAE

Every command is a `Command` (an options dataclass and a run function) declared in the module
that implements it; this file only lists those modules. One environment setup, one error handler,
one exit-code convention (`precompute.errors`: 2 for the user's mistakes)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from precompute import __version__
from precompute.errors import EXIT_USER, run_command
from precompute.options import Command, add_options, options_from_args

# Modules that declare `COMMANDS`, in the order `featuregeom --help` lists them.
COMMAND_MODULES = (
    "precompute.pipeline.commands",
    "precompute.demo",
    "precompute.training.command",
    "precompute.lab.synth",
    "precompute.lab.steer",
    "precompute.lab.finetune",
    "precompute.lab.coverage",
    "precompute.lab.eval_acts",
    "precompute.lab.logprob",
    "precompute.lab.diff",
    "precompute.lab.patch",
    "precompute.lab.triage",
    "precompute.export.command",
    "precompute.explain.command",
)


def commands() -> list[Command]:
    return [c for name in COMMAND_MODULES for c in importlib.import_module(name).COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featuregeom",
        description="Feature Geometry Explorer: cache SAE feature geometry, harm/task scores and examples for "
        "the explorer (python -m explorer.serve --cache DIR).",
    )
    parser.add_argument("--version", action="version", version=f"featuregeom {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in commands():
        p = sub.add_parser(command.name, help=command.help, description=command.description or command.help)
        add_options(p, command.options, command.flags)
        p.set_defaults(_command=command)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    command: Command = args._command
    if getattr(args, "config", None) is None and command.default_config:
        args.config = command.default_config
    return int(command.run(options_from_args(command.options, args)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    # tokenizers forks worker threads; a fork later (DataLoader, subprocess) would warn or deadlock
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USER
    return run_command(_dispatch, args)


if __name__ == "__main__":
    sys.exit(main())
