"""`reparam bench`'s report: the machine it ran on, the peak it is measured against, the tables
and the chart.

The report is the dict the command writes with `--json`: `config`, `machine`, and per backend the
result of its plan (reparam_core.bench.plan). Standard library only; `plot` imports matplotlib
when called.
"""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

from reparam_core.bench.plan import GEMM_N
from reparam_core.quant.hardware import cpu_info


def new_report(config: dict[str, Any]) -> dict[str, Any]:
    """An empty report for `config` (a BenchConfig as a dict): today's date and this machine."""
    return {
        "date": datetime.date.today().isoformat(),
        "config": config,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpu": cpu_info(),
        },
        "backends": {},
        "unavailable": {},
    }


def add_peak(report: dict[str, Any]) -> None:
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


# --------------------------------------------------------------------------- tables


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows
    )


def _x(v: float | None) -> str:
    return "-" if v is None else f"x{v:.2f}"


def headline_table(report: dict[str, Any]) -> str:
    """One row per backend and model: the ratios first, absolute figures after."""
    rows = [
        [
            "backend",
            "model",
            "deploy/train",
            "deploy/plain",
            "best fast path",
            "x eager",
            "conv-equiv GFLOP/s",
            "of best GEMM",
            "best int8",
            "int8/ORT fp32",
            "int8/OV fp32",
            "convert/copy",
            "convert s",
            "params M",
            "peak MiB t/d/p",
        ]
    ]
    for b, res in report["backends"].items():
        for m, r in res["models"].items():
            conv = r["conversion"]
            params = f"{r['params']['train'] / 1e6:.2f}->{r['params']['deploy'] / 1e6:.2f}"
            if "ratios" not in r:  # conversion only
                rows.append([b, m] + ["-"] * 9 + [_x(conv["ratio"]), f"{conv['reparameterize_s']:.2f}", params, "-"])
                continue
            ra = r["ratios"]
            best = ra.get("best_fast_path")
            g = r["conv_equiv_gflops"].get(best or "deploy")
            frac = r["of_best_gemm"].get(best or "deploy")
            mem = r.get("memory", {})
            peak = "/".join(
                f"{mem[f]['delta_mib']:.0f}" if "delta_mib" in mem.get(f, {}) else "-"
                for f in ("train", "deploy", "plain")
            )
            rows.append(
                [
                    b,
                    m,
                    _x(ra["deploy_over_train"]),
                    _x(ra.get("deploy_over_plain")),
                    best or "-",
                    _x(ra.get("best_fast_over_deploy")),
                    f"{g:.1f}",
                    f"{frac:.2f}",
                    ra.get("best_int8_path", "-"),
                    _x(ra.get("best_int8_over_ort_fp32")),
                    _x(ra.get("best_int8_over_openvino_fp32")),
                    _x(conv["ratio"]),
                    f"{conv['reparameterize_s']:.2f}",
                    params,
                    peak,
                ]
            )
    return _table(rows)


def forms_table(report: dict[str, Any]) -> str:
    """Every timed form: its precision, images/s, ms per batch, conv-equivalent GFLOP/s, its
    fraction of the best GEMM rate of the run, the one-off compile/trace/profiling time of fast
    paths, and for reduced precision the top-1 agreement with the float32 deploy form."""
    rows = [
        [
            "backend",
            "model",
            "form",
            "precision",
            "engine",
            "img/s",
            "ms/batch",
            "conv-equiv GFLOP/s",
            "of best GEMM",
            "first-call s",
            "top-1 agree",
        ]
    ]
    for b, res in report["backends"].items():
        for m, r in res["models"].items():
            for form, f in r.get("forms", {}).items():
                comp = r["compile_s"].get(form)
                low = r.get("low_precision_vs_deploy", {}).get(form)
                rows.append(
                    [
                        b,
                        m,
                        form,
                        r.get("precision", {}).get(form, "float32"),
                        r.get("engine", {}).get(form, b),
                        f"{f['images_per_s']:.1f}",
                        f"{f['median_s'] * 1e3:.1f}",
                        f"{r['conv_equiv_gflops'][form]:.1f}",
                        f"{r['of_best_gemm'][form]:.2f}",
                        "-" if comp is None else f"{comp:.2f}",
                        "-" if low is None else f"{low['top1_agreement']:.3f}",
                    ]
                )
    return _table(rows)


def footnote(report: dict[str, Any]) -> str:
    """What the figures mean, with this run's GEMM rates and CPU (a report with a peak)."""
    mm = ", ".join(f"{b} {r['gemm_gflops']:.0f}" for b, r in report["backends"].items())
    feats = [k for k, v in report["machine"]["cpu"]["features"].items() if v]
    return (
        f"float32 {GEMM_N}x{GEMM_N} GEMM GFLOP/s (same run): {mm}; 'of best GEMM' divides "
        f"by the best, {report['best_gemm_gflops']:.0f} ({report['best_gemm_backend']}). "
        "'conv-equiv GFLOP/s' = 2 x direct-convolution MACs / time (Winograd kernels do "
        "fewer operations, so it can pass the GEMM rate). CPU: "
        f"{report['machine']['cpu']['model_name']}, {', '.join(feats) or 'no listed features'}. "
        "Ratios are medians of paired rounds; 'x eager' is the best float32 fast path over the "
        "eager deploy form; 'best int8' is the fastest int8 path (the same QDQ graph in ONNX Runtime "
        "or OpenVINO), 'int8/ORT fp32' and 'int8/OV fp32' its speed over the float32 graph in ONNX "
        "Runtime and in OpenVINO (int8 is fast only with VNNI or AMX)."
    )


def format_report(report: dict[str, Any]) -> str:
    """The headline table, every timed form (unless conversion only) and the footnote."""
    parts = [headline_table(report)]
    if not report["config"]["conversion_only"]:
        parts.append(forms_table(report))
    return "\n\n".join(parts + [footnote(report)])


# --------------------------------------------------------------------------- chart


def plot(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Grouped bars: images/s per backend (groups) and form (bars), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(m for res in report["backends"].values() for m in res["models"]))
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(5.5 * max(len(models), 1), 4.2), squeeze=False)
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
    fig.suptitle(
        f"reparam bench: batch {cfg['batch']}, {cfg['size']}x{cfg['size']}, float32, "
        f"{report['machine']['cpus']} CPUs, {report['date']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
