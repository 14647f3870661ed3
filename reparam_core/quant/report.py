"""`reparam quantize`'s report as text and as a chart of SQNR per layer.

The report is the dict `reparam quantize --json` writes (model, calibration, weight granularity
and bits, top-1 and agreement of float32 vs int8, logits SQNR, sizes and, per conv/gemm, the SQNR
and the weight and activation ranges). Standard library only; `plot_layers` imports numpy and
matplotlib when called.
"""

from __future__ import annotations

import os
from typing import Any


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def format_report(rep: dict[str, Any]) -> str:
    """The summary lines, then one row per layer: SQNR, weight range, activation range."""
    lines = [
        f"{rep['model']} int8 ({rep['weights']} {rep['weight_bits']}-bit weights, "
        f"{rep['calibration']['method']} "
        f"calibration on {rep['calibration']['samples']} images) -> {rep['dst']}",
        f"top-1 fp32 {_pct(rep['fp32_top1'])}  int8 {_pct(rep['int8_top1'])}  agreement "
        f"{_pct(rep['agreement'])} on {rep['n_eval']} images; logits SQNR "
        f"{rep['logits_sqnr_db']:.1f} dB; size {rep['bytes']['fp32'] / 1e6:.2f} MB -> "
        f"{rep['bytes']['int8'] / 1e6:.2f} MB ({rep.get('kernels', 'ONNX Runtime int8 kernels')} on this CPU)",
        f"QDQ math (unfused): agreement {_pct(rep['agreement_qdq_math'])}, logits SQNR "
        f"{rep['logits_sqnr_db_qdq_math']:.1f} dB; per layer (QDQ math):",
        f"{'layer':<28}{'SQNR dB':>9}{'w min':>9}{'w max':>9}{'act min':>9}{'act max':>9}",
    ]
    lines += [
        f"{lr['name'][:27]:<28}{lr['sqnr_db']:>9.1f}{lr['weight_min']:>9.3f}"
        f"{lr['weight_max']:>9.3f}{lr['activation_min']:>9.2f}{lr['activation_max']:>9.2f}"
        for lr in rep["layers"]
    ]
    if rep.get("torch_pt2e"):
        t = rep["torch_pt2e"]
        lines.insert(
            3,
            f"torch PT2E (torchao X86 Inductor quantizer, eager): top-1 "
            f"{_pct(t['int8_top1'])}, agreement {_pct(t['agreement'])}, logits SQNR "
            f"{t['logits_sqnr_db']:.1f} dB",
        )
    return "\n".join(lines)


def plot_layers(reports: dict[str, dict[str, Any]], path: str) -> None:
    """SQNR per layer, one bar series per report (e.g. per-channel and per-tensor, or two
    models), to a PNG (written beside `path`, then renamed into place)."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(reports.values()))
    names = [lr["name"] for lr in first["layers"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) * len(reports)), 4.0))
    width = 0.8 / len(reports)
    for i, (label, rep) in enumerate(reports.items()):
        values = [min(lr["sqnr_db"], 99.0) for lr in rep["layers"]]
        ax.bar(np.arange(len(values)) + i * width, values, width, label=label)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("SQNR of int8 vs float32 (dB)")
    ax.set_title(
        f"{first['model']}: per-layer SQNR ({first['calibration']['method']} "
        f"calibration, {first['calibration']['samples']} images)"
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.{os.getpid()}.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
