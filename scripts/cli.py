"""The `reparam` command: thin dispatch over the scripts' Python APIs.

The exit status is decided here, once, for every subcommand: errors are printed as one line on
stderr, without a traceback; 2 for bad input (a ReparamError, a file that cannot be read or
written, a bad argument), 1 for a check that ran and failed (VerificationError), 130 when
interrupted, 141 when stdout is closed early (as SIGPIPE would). A script run on its own
(`python -m scripts.convert ...`) goes through here too (run_command).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from reparam_core import ReparamError, list_models
from reparam_core.errors import VerificationError

# subcommand -> (module under scripts/, help)
COMMANDS = {
    "info": ("info", "print a model's spec, parameters and MACs in train and deploy form"),
    "convert": ("convert", "convert a checkpoint between frameworks / to deploy form"),
    "verify": ("verify", "run the parity matrix and print a table of relative errors"),
    "bench": ("bench", "benchmark train form vs deploy form vs a plain conv stack per backend"),
    "quantize": ("quantize", "int8 ONNX or OpenVINO IR of a deploy form, with accuracy and per-layer SQNR"),
    "demo": ("demo", "train on sklearn digits, re-parameterize and port to every framework"),
    "fuse": ("fuse_cmd", "merge the parallel conv/BN branches of an ONNX graph into one conv"),
    "train": ("train", "train the multi-branch form (torch DDP / Flax sharding), resumable"),
}


def _list(_: argparse.Namespace) -> int:
    print("\n".join(list_models()))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as one line (exit 2) instead of usage + error;
    subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reparam", description=__doc__.splitlines()[0])
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at interpreter exit
        return status
    except VerificationError as e:
        print(f"reparam {args.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # stdout closed early (`reparam list | head -1`): exit as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no 2nd error at exit
        return 141
    except (ReparamError, OSError) as e:  # OSError: a file that cannot be read or written
        print(f"reparam {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reparam {args.command}: interrupted", file=sys.stderr)
        return 130


def run_command(command: str, argv: Sequence[str] | None = None) -> int:
    """`reparam COMMAND ARGV...`: what a script's own main() runs (`python -m scripts.convert
    SRC DST ...`; argv defaults to sys.argv[1:]), so that it exits as the command does."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
