"""`reparam bench`: train form vs deploy form vs a plain conv stack, per backend, side by side.

Each backend runs in a process of its own (`python -m backends.<backend>.bench`; MegEngine with
.venv-mge's interpreter) through the plan in reparam_core/bench/plan.py: every form of a model is
timed in interleaved rounds after warm-up, so the ratios, the headline figures, hold on a noisy
machine; absolute times are printed beside them. `--json` keeps every figure, `--plot` draws
throughput per backend and form.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from reparam_core import ReparamError, get_spec
from reparam_core.bench.plan import BenchConfig, run_child, stage_count
from reparam_core.bench.report import add_peak, format_report, new_report, plot
from reparam_core.errors import BackendUnavailableError

from .progress import Progress

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("torch", "flax", "megengine")
DEFAULT_MODELS = ("RepVGG-A0", "RepVGG-B0", "repghostnet_1_0x")


def backend_python(backend: str) -> Path:
    """The interpreter that runs a backend: .venv-mge's for MegEngine, this one otherwise."""
    if backend == "megengine":
        from backends.megengine.remote import mge_python

        exe = mge_python()
        if not exe.exists():
            raise BackendUnavailableError(
                f"MegEngine environment not found ({exe}); create it with `bash scripts/setup_envs.sh`"
            )
        return exe
    return Path(sys.executable)


def run_backend(backend: str, config: BenchConfig, bar: Progress) -> dict[str, Any]:
    """Run one backend's plan in its own process; its stage events advance the bar."""
    cmd = [str(backend_python(backend)), "-m", f"backends.{backend}.bench", json.dumps(asdict(config))]
    return run_child(cmd, ROOT, backend, lambda name: bar.stage(f"{backend}: {name}"))


# --------------------------------------------------------------------------- command


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backends",
        type=lambda s: s.split(","),
        default=list(BACKENDS),
        help="comma-separated subset of torch,flax,megengine (default: all)",
    )
    parser.add_argument(
        "--models",
        type=lambda s: s.split(","),
        default=list(DEFAULT_MODELS),
        help=f"comma-separated model names (default: {','.join(DEFAULT_MODELS)})",
    )
    parser.add_argument("--batch", type=_positive, default=8)
    parser.add_argument("--size", type=_positive, default=224)
    parser.add_argument(
        "--threads", type=_positive, default=None, help="intra-op threads where the framework lets us set them"
    )
    parser.add_argument(
        "--repeats", type=_positive, default=7, help="timed interleaved rounds per model (median; default 7)"
    )
    parser.add_argument("--convert-repeats", type=_positive, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile fast paths")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument(
        "--conversion-only", action="store_true", help="only time reparameterize vs deep copy (e.g. for RepVGG-B3)"
    )
    parser.add_argument(
        "--mge-fastrun",
        action="store_true",
        help="also time MegEngine's profiled kernels (fastrun), eager and traced; "
        "the profiling is the first call, reported as 'first-call s'",
    )
    parser.add_argument(
        "--no-onnxruntime",
        action="store_true",
        help="skip the torch deploy form in ONNX Runtime (float32 and int8 QDQ)",
    )
    parser.add_argument(
        "--no-openvino",
        action="store_true",
        help="skip the torch deploy form in OpenVINO (float32, bf16 where the CPU has it, int8 QDQ)",
    )
    parser.add_argument(
        "--no-bf16", action="store_true", help="skip the bf16 paths (torch's CPU autocast, OpenVINO's bf16)"
    )
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    parser.add_argument("--plot", metavar="FILE.png", help="draw throughput per backend and form")


def run(args: argparse.Namespace) -> int:
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad:
        raise ReparamError(f"unknown backend {bad[0]!r}; choose from {', '.join(BACKENDS)}")
    for m in args.models:
        get_spec(m)  # UnknownModelError with close names
    config = BenchConfig(
        models=tuple(args.models),
        batch=args.batch,
        size=args.size,
        repeats=args.repeats,
        convert_repeats=args.convert_repeats,
        threads=args.threads,
        compile=not args.no_compile,
        conversion_only=args.conversion_only,
        memory=not args.no_memory,
        mge_fastrun=args.mge_fastrun,
        onnxruntime=not args.no_onnxruntime,
        openvino=not args.no_openvino,
        bf16=not args.no_bf16,
    )
    report = new_report(asdict(config))
    stages = [f"{b}:{i}" for b in args.backends for i in range(stage_count(config))]
    with Progress(stages, desc="bench") as bar:
        for b in args.backends:
            try:
                report["backends"][b] = run_backend(b, config, bar)
            except BackendUnavailableError as e:
                report["unavailable"][b] = str(e)
                print(f"{b}: unavailable: {e}", file=sys.stderr)
    add_peak(report)
    if report["backends"]:
        print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot and not config.conversion_only and report["backends"]:
        plot(report, args.plot)
    if report["unavailable"]:  # exit 2 (scripts.cli), after the table and files of what did run
        raise BackendUnavailableError(
            f"not benchmarked in {', '.join(report['unavailable'])} (unavailable here; the reason is above)"
        )
    return 0
