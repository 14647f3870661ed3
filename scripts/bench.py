"""`reparam bench`: train form vs deploy form vs a plain conv stack, per backend, side by side.

Each backend runs in a process of its own (`python -m scripts.bench_<backend>`; MegEngine with
.venv-mge's interpreter) through the plan in scripts/bench_runner.py: every form of a model is
timed in interleaved rounds after warm-up, so the ratios, the headline figures, hold on a noisy
machine; absolute times are printed beside them. `--json` keeps every figure, `--plot` draws
throughput per backend and form.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from reparam_core import ReparamError, get_spec
from reparam_core.errors import BackendUnavailableError
from reparam_core.hardware import cpu_info

from .bench_runner import GEMM_N, BenchConfig
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
            raise BackendUnavailableError(f"MegEngine environment not found ({exe}); create it "
                                          "with `bash scripts/setup_envs.sh`")
        return exe
    return Path(sys.executable)


def run_backend(backend: str, config: BenchConfig, bar: Progress) -> dict:
    """Run one backend's plan in its own process; its stage events advance the bar."""
    cmd = [str(backend_python(backend)), "-m", f"scripts.bench_{backend}", json.dumps(asdict(config))]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
        assert proc.stdout is not None
        result = None
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "stage":
                bar.stage(f"{backend}: {event['name']}")
            else:
                result = event["result"]
        proc.wait()
        if proc.returncode != 0 or result is None:
            err.seek(0)
            tail = err.read().strip().splitlines()[-15:]
            raise BackendUnavailableError(f"{backend} benchmark failed (exit {proc.returncode}):\n"
                                          + "\n".join(tail))
    return result


def stages_per_backend(config: BenchConfig) -> int:
    return 1 + len(config.models) * (1 if config.conversion_only else 3 + config.memory)


# --------------------------------------------------------------------------- machine and peak

def add_peak(report: dict) -> None:
    """The machine's float32 peak as the best GEMM rate of any backend in this run
    (`best_gemm_gflops`, `best_gemm_backend`) and, per backend, model and form, the
    conv-equivalent GFLOP/s as a fraction of it (`of_best_gemm`)."""
    rates = {b: r["gemm_gflops"] for b, r in report["backends"].items()}
    if not rates:
        return
    best = max(rates, key=rates.__getitem__)
    report["best_gemm_gflops"], report["best_gemm_backend"] = rates[best], best
    for res in report["backends"].values():
        for r in res["models"].values():
            if "conv_equiv_gflops" in r:
                r["of_best_gemm"] = {k: g / rates[best] for k, g in r["conv_equiv_gflops"].items()}


# --------------------------------------------------------------------------- report

def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i > 1 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows)


def _x(v: float | None) -> str:
    return "-" if v is None else f"x{v:.2f}"


def headline_table(report: dict) -> str:
    """One row per backend and model: the ratios first, absolute figures after."""
    rows = [["backend", "model", "deploy/train", "deploy/plain", "best fast path", "x eager",
             "conv-equiv GFLOP/s", "of best GEMM", "int8/ORT fp32", "convert/copy", "convert s",
             "params M", "peak MiB t/d/p"]]
    for b, res in report["backends"].items():
        for m, r in res["models"].items():
            conv = r["conversion"]
            params = f"{r['params']['train'] / 1e6:.2f}->{r['params']['deploy'] / 1e6:.2f}"
            if "ratios" not in r:  # conversion only
                rows.append([b, m] + ["-"] * 7 + [_x(conv["ratio"]), f"{conv['reparameterize_s']:.2f}",
                                                  params, "-"])
                continue
            ra = r["ratios"]
            best = ra.get("best_fast_path")
            g = r["conv_equiv_gflops"].get(best or "deploy")
            frac = r["of_best_gemm"].get(best or "deploy")
            mem = r.get("memory", {})
            peak = "/".join(f"{mem[f]['delta_mib']:.0f}" if "delta_mib" in mem.get(f, {}) else "-"
                            for f in ("train", "deploy", "plain"))
            rows.append([b, m, _x(ra["deploy_over_train"]), _x(ra.get("deploy_over_plain")),
                         best or "-", _x(ra.get("best_fast_over_deploy")), f"{g:.1f}",
                         f"{frac:.2f}", _x(ra.get("int8_over_ort_fp32")), _x(conv["ratio"]),
                         f"{conv['reparameterize_s']:.2f}",
                         params, peak])
    return _table(rows)


def forms_table(report: dict) -> str:
    """Every timed form: its precision, images/s, ms per batch, conv-equivalent GFLOP/s, its
    fraction of the best GEMM rate of the run, the one-off compile/trace/profiling time of fast
    paths, and for reduced precision the top-1 agreement with the float32 deploy form."""
    rows = [["backend", "model", "form", "precision", "img/s", "ms/batch", "conv-equiv GFLOP/s",
             "of best GEMM", "first-call s", "top-1 agree"]]
    for b, res in report["backends"].items():
        for m, r in res["models"].items():
            for form, f in r.get("forms", {}).items():
                comp = r["compile_s"].get(form)
                low = r.get("low_precision_vs_deploy", {}).get(form)
                rows.append([b, m, form, r.get("precision", {}).get(form, "float32"),
                             f"{f['images_per_s']:.1f}", f"{f['median_s'] * 1e3:.1f}",
                             f"{r['conv_equiv_gflops'][form]:.1f}", f"{r['of_best_gemm'][form]:.2f}",
                             "-" if comp is None else f"{comp:.2f}",
                             "-" if low is None else f"{low['top1_agreement']:.3f}"])
    return _table(rows)


def plot(report: dict, path: str | os.PathLike) -> None:
    """Grouped bars: images/s per backend (groups) and form (bars), one panel per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(m for res in report["backends"].values() for m in res["models"]))
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(5.5 * max(len(models), 1), 4.2),
                             squeeze=False)
    kinds = ("train", "deploy", "plain", "best fast path")
    colors = dict(zip(kinds, ("#9e9e9e", "#1f77b4", "#2ca02c", "#ff7f0e")))
    for ax, model in zip(axes[0], models):
        backends = [b for b, res in report["backends"].items() if "forms" in res["models"].get(model, {})]
        for j, kind in enumerate(kinds):
            xs, ys = [], []
            for i, b in enumerate(backends):
                r = report["backends"][b]["models"][model]
                form = r["ratios"].get("best_fast_path") if kind == "best fast path" else kind
                if form in r["forms"]:
                    xs.append(i + (j - 1.5) * 0.2)
                    ys.append(r["forms"][form]["images_per_s"])
            bars = ax.bar(xs, ys, 0.2, color=colors[kind], label=kind)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(backends)), backends)
        ax.set_title(model)
        ax.set_ylabel("images / s")
    axes[0][0].legend(fontsize=8)
    cfg = report["config"]
    fig.suptitle(f"reparam bench: batch {cfg['batch']}, {cfg['size']}x{cfg['size']}, float32, "
                 f"{report['machine']['cpus']} CPUs, {report['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- command

def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backends", type=lambda s: s.split(","), default=list(BACKENDS),
                        help="comma-separated subset of torch,flax,megengine (default: all)")
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(DEFAULT_MODELS),
                        help=f"comma-separated model names (default: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--batch", type=_positive, default=8)
    parser.add_argument("--size", type=_positive, default=224)
    parser.add_argument("--threads", type=_positive, default=None,
                        help="intra-op threads where the framework lets us set them")
    parser.add_argument("--repeats", type=_positive, default=7,
                        help="timed interleaved rounds per model (median; default 7)")
    parser.add_argument("--convert-repeats", type=_positive, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile fast paths")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--conversion-only", action="store_true",
                        help="only time reparameterize vs deep copy (e.g. for RepVGG-B3)")
    parser.add_argument("--mge-fastrun", action="store_true",
                        help="also time MegEngine's profiled kernels (fastrun), eager and traced; "
                             "the profiling is the first call, reported as 'first-call s'")
    parser.add_argument("--no-onnxruntime", action="store_true",
                        help="skip the torch deploy form in ONNX Runtime (float32 and int8 QDQ)")
    parser.add_argument("--no-bf16", action="store_true", help="skip torch's CPU bf16 autocast path")
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    parser.add_argument("--plot", metavar="FILE.png", help="draw throughput per backend and form")


def run(args: argparse.Namespace) -> int:
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad:
        raise ReparamError(f"unknown backend {bad[0]!r}; choose from {', '.join(BACKENDS)}")
    for m in args.models:
        get_spec(m)  # UnknownModelError with close names
    config = BenchConfig(models=tuple(args.models), batch=args.batch, size=args.size,
                         repeats=args.repeats, convert_repeats=args.convert_repeats,
                         threads=args.threads, compile=not args.no_compile,
                         conversion_only=args.conversion_only, memory=not args.no_memory,
                         mge_fastrun=args.mge_fastrun, onnxruntime=not args.no_onnxruntime,
                         bf16=not args.no_bf16)
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "config": asdict(config),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.machine(), "cpu": cpu_info()},
        "backends": {}, "unavailable": {}}
    stages = [f"{b}:{i}" for b in args.backends for i in range(stages_per_backend(config))]
    with Progress(stages, desc="bench") as bar:
        for b in args.backends:
            try:
                report["backends"][b] = run_backend(b, config, bar)
            except BackendUnavailableError as e:
                report["unavailable"][b] = str(e)
                print(f"{b}: unavailable: {e}", file=sys.stderr)
    add_peak(report)
    if report["backends"]:
        print(headline_table(report))
        if not config.conversion_only:
            print()
            print(forms_table(report))
        mm = ", ".join(f"{b} {r['gemm_gflops']:.0f}" for b, r in report["backends"].items())
        feats = [k for k, v in report["machine"]["cpu"]["features"].items() if v]
        print(f"\nfloat32 {GEMM_N}x{GEMM_N} GEMM GFLOP/s (same run): {mm}; 'of best GEMM' divides "
              f"by the best, {report['best_gemm_gflops']:.0f} ({report['best_gemm_backend']}). "
              "'conv-equiv GFLOP/s' = 2 x direct-convolution MACs / time (Winograd kernels do "
              "fewer operations, so it can pass the GEMM rate). CPU: "
              f"{report['machine']['cpu']['model_name']}, {', '.join(feats) or 'no listed features'}. "
              "Ratios are medians of paired rounds; 'x eager' is the best float32 fast path over the "
              "eager deploy form; 'int8/ORT fp32' is ONNX Runtime's int8 QDQ graph over its float32 "
              "graph (int8 is fast only with VNNI or AMX).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot and not config.conversion_only and report["backends"]:
        plot(report, args.plot)
    return 1 if report["unavailable"] else 0
