"""The ``ligerfx`` command line. Each subcommand lives in its own module and registers itself here."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help). The module defines ``add_arguments(parser)`` and ``run(args) -> int``.
SUBCOMMANDS = {
    "transform": ("ligerfx.commands.transform", "linearize a model and save it (weights unchanged + config.ligerfx)"),
    "train": ("ligerfx.training.cli", "linearize + LoRA fine-tune on instruction data"),
    "eval": ("ligerfx.evaluation.cli", "score a teacher / linearized model with lm-eval-harness on local data"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ligerfx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (modname, help_) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name and modname.startswith(e.name):
                continue  # subcommand not installed in this build
            raise
        p = sub.add_parser(name, help=help_)
        mod.add_arguments(p)
        modules[name] = mod
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
