"""`reparam fuse SRC.onnx DST.onnx [--verify]`: re-parameterize an exported ONNX graph (merge
parallel conv/BN branches into one conv; backends/onnx), print the op histogram before and
after and the report, write DST atomically."""

from __future__ import annotations

import argparse

from reparam_core import CheckpointError
from reparam_core.errors import VerificationError

VERIFY_RTOL = 1e-5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="input ONNX file (train form: every branch in the graph)")
    parser.add_argument("dst", help="output ONNX file")
    parser.add_argument(
        "--verify",
        action="store_true",
        help=f"run both graphs in ONNX Runtime on one random input; exit 1 above {VERIFY_RTOL:g} relative error",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")


def _histogram(h: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in h.items())


def run(args: argparse.Namespace) -> int:
    import backends.onnx as bo
    from reparam_core.formats.atomic import atomic_write

    src = bo.load(args.src)
    fused, report = bo.fuse_model(src)
    data = fused.SerializeToString()
    if len(data) >= 2**31:
        raise CheckpointError(f"{args.dst}: the fused graph is over 2 GiB (protobuf limit)")
    err = bo.verify(src, fused) if args.verify else None
    if err is None or err <= VERIFY_RTOL:
        atomic_write(args.dst, data, overwrite=args.overwrite)
    print(f"before: {sum(bo.op_histogram(src).values())} nodes: {_histogram(bo.op_histogram(src))}")
    print(f"after:  {sum(bo.op_histogram(fused).values())} nodes: {_histogram(bo.op_histogram(fused))}")
    print(report)
    if err is not None:
        print(f"verify: max relative error {err:.3g} (tolerance {VERIFY_RTOL:g})")
        if err > VERIFY_RTOL:  # exit 1 (scripts.cli)
            raise VerificationError(
                f"{args.dst} not written: the fused graph's max relative error {err:.3g} is above {VERIFY_RTOL:g}"
            )
    print(f"wrote {args.dst}")
    return 0
