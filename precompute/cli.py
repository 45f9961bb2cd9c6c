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
)

# Commands not yet on the options system: (name, module, add-arguments function, run function, help).
LEGACY = (
    ("synth", "precompute.lab.synth", "add_arguments", "run",
     "planted ground truth: known dictionary -> SAE -> geometry, scored"),
    ("steer", "precompute.lab.steer", "add_arguments", "run",
     "steering check: observed vs first-order predicted feature changes"),
    ("finetune", "precompute.lab.finetune", "add_arguments", "run",
     "LoRA fine-tune on a task dataset (and its control, same seed)"),
    ("eval-acts", "precompute.lab.diff", "add_eval_arguments", "run_eval",
     "SAE activations of a (fine-tuned) model on EM questions and neutral prompts"),
    ("diff", "precompute.lab.diff", "add_diff_arguments", "run_diff",
     "per-feature before/after change with bootstrap CIs vs predicted risk"),
    ("patch", "precompute.lab.diff", "add_patch_arguments", "run_patch",
     "project a LoRA adapter's output-space update off harmful directions"),
    ("triage", "precompute.lab.triage", "add_arguments", "run",
     "rank a dataset's samples by how much they drive harmful-neighbour features"),
)  # fmt: skip


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
    for name, module, add_arguments, run, help_text in LEGACY:
        p = sub.add_parser(name, help=help_text)
        getattr(importlib.import_module(module), add_arguments)(p)
        p.set_defaults(_legacy=(module, run))
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if getattr(args, "_legacy", None):
        module, run = args._legacy
        return int(getattr(importlib.import_module(module), run)(args) or 0)
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
