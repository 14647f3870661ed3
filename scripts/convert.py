"""`reparam convert`: checkpoints between PyTorch, MegEngine, Flax and safetensors.

    python -m scripts.convert SRC DST --model RepVGG-A0 [--to-deploy] [--verify] [--overwrite]

The command parses its arguments and calls `reparam_core.formats.convert.convert` (read, key map, fuse,
cast, streamed atomic write; see there), with `backends.dispatch.predict_in` for --verify: source
and destination run in their own frameworks (torch: backends.torch, flax: backends.flax,
megengine: the MegEngine worker, safetensors: the float64 oracle) on one random input; above
1e-4 relative error nothing is written. Exit codes: 0 written, 1 verification failed, 2 bad input
(nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys

from backends.dispatch import predict_in, read_orbax
from reparam_core.blocks.schema import FORMS
from reparam_core.formats import FORMATS
from reparam_core.formats.convert import DTYPES, VERIFY_RTOL, convert
from reparam_core.weights.keymaps import SCHEMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="input checkpoint (file, or orbax directory)")
    parser.add_argument("dst", help="output checkpoint file")
    parser.add_argument("--model", "-m", required=True, help="architecture name (reparam list)")
    parser.add_argument(
        "--num-classes", type=int, default=None, help="classifier width (default: read from the checkpoint)"
    )
    parser.add_argument(
        "--from-format",
        choices=FORMATS + ("orbax",),
        default=None,
        help="input format (default: detected from the file)",
    )
    parser.add_argument(
        "--to-format",
        choices=FORMATS,
        default=None,
        help="output format (default: from DST's extension, else safetensors)",
    )
    parser.add_argument(
        "--from-form", choices=FORMS, default=None, help="require the input to be in this form (default: detect)"
    )
    parser.add_argument("--to-deploy", action="store_true", help="fuse to the deploy form")
    parser.add_argument(
        "--verify", action="store_true", help=f"run source and destination on one input; fail above {VERIFY_RTOL:g}"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="output precision: fuse in float64, round once (bfloat16: "
        "safetensors only); reports the rounding error, warns on overflow",
    )
    parser.add_argument(
        "--to-scheme",
        default="canonical",
        metavar="SCHEME",
        help=f"write the keys under another implementation's names: {', '.join(SCHEMES[1:])} (those "
        "that implement the model's family; default: the official names)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")


def run(args: argparse.Namespace) -> int:
    from scripts.progress import Progress

    stages = (
        ["read", "check"]
        + (["fuse"] if args.to_deploy else [])
        + ["encode", "write"]
        + (["verify"] if args.verify else [])
    )
    # errors (nothing is written then) become exit codes in scripts.cli
    with Progress(stages, enabled=None if not args.quiet else False) as progress:
        report = convert(
            args.src,
            args.dst,
            args.model,
            to_deploy=args.to_deploy,
            from_format=args.from_format,
            to_format=args.to_format,
            from_form=args.from_form,
            num_classes=args.num_classes,
            verify=args.verify,
            predict=predict_in,
            overwrite=args.overwrite,
            stage=progress.stage,
            dtype=getattr(args, "dtype", None),
            to_scheme=args.to_scheme,
            read_orbax=read_orbax,
        )
    if args.json:
        print(json.dumps(report, indent=2))
    elif not args.quiet:
        line = (
            f"wrote {report['dst']} ({report['to_format']}, {report['to_form']} form, "
            f"{report['tensors']} tensors, {report['bytes']} bytes) from {report['src']} "
            f"({report['from_format']}, {report['from_form']} form, {report['scheme']} names)"
        )
        if report["to_scheme"] != "canonical":
            line += f"; written with {report['to_scheme']} names"
        if report.get("precision"):
            line += (
                f"; {report['precision']['dtype']}: max relative rounding error "
                f"{report['precision']['max_rel_err']:.3g}"
            )
        if report["verify"]:
            line += f"; verified: max relative error {report['verify']['max_rel_err']:.3g}"
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`reparam convert ARGV...`, exit status included (scripts.cli)."""
    from scripts.cli import run_command

    return run_command("convert", argv)


if __name__ == "__main__":
    sys.exit(main())
