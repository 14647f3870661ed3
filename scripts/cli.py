"""The `reparam` command: thin dispatch over the scripts' Python APIs.

Library errors (ReparamError) are printed as one line on stderr, without a traceback; the
command exits with status 2 for bad input and 1 for a check that ran and failed
(VerificationError).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from reparam_core import ReparamError, list_models
from reparam_core.errors import VerificationError

# subcommand -> (module under scripts/, help)
COMMANDS = {
    "info": ("info", "print a model's spec, parameters and MACs in train and deploy form"),
    "convert": ("convert", "convert a checkpoint between frameworks / to deploy form"),
    "verify": ("verify", "run the parity matrix and print a table of relative errors"),
    "bench": ("bench", "benchmark train form vs deploy form vs a plain conv stack per backend"),
    "quantize": ("quantize", "int8 ONNX of a checkpoint's deploy form, with accuracy and per-layer SQNR"),
    "demo": ("demo", "train on sklearn digits, re-parameterize and port to every framework"),
    "fuse": ("fuse_cmd", "merge the parallel conv/BN branches of an ONNX graph into one conv"),
    "train": ("train", "train the multi-branch form (torch DDP / Flax sharding), resumable"),
}


def _list(_: argparse.Namespace) -> int:
    print("\n".join(list_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reparam", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list model names").set_defaults(func=_list)
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(f"scripts.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"scripts.{module}":
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VerificationError as e:
        print(f"reparam {args.command}: error: {e}", file=sys.stderr)
        return 1
    except ReparamError as e:
        print(f"reparam {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reparam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
