"""`reparam demo --quantize`: RepVGG against QARepVGG in int8, measured.

Trains each model (default RepVGG-mini and QARepVGG-mini, the same size) with the demo's recipe
(`reparam train`'s trainer, scripts/demo_train.py) and seed on the digits, then quantizes each
deploy form with ONNX Runtime (200 calibration digits from the training split) with per-channel
and per-tensor weights, and compares float32 and int8 on the 359 test digits: top-1, agreement
and SQNR, per model and per layer, in ONNX Runtime and (the same calibrated QDQ graph as an
OpenVINO IR) in OpenVINO. Writes DIR/train/<model>/ (the trainer's files),
DIR/checkpoints/<model>-digits.safetensors, DIR/int8/<model>-<granularity>.onnx and .xml/.bin,
DIR/quantize.json (the ONNX Runtime report, OpenVINO's figures under "openvino") and
DIR/summary.png (per-layer SQNR side by side).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reparam_core.formats.safetensors_io import save_file
from reparam_core.training.digits import load_digits_split

from .demo_train import train_model
from .quantize import quantize_checkpoint

GRANULARITIES = ("per-channel", "per-tensor")
ENGINES = {"onnxruntime": ".onnx", "openvino": ".xml"}  # engine -> the int8 file it writes
Results = dict[str, dict[str, dict[str, Any]]]  # model -> granularity -> quantize report


def compare(
    out: str, models: tuple[str, ...], *, epochs: int, seed: int, samples: int = 200, quiet: bool = False
) -> Results:
    """Train, quantize and measure every model; returns {model: {granularity: report}}."""
    from backends.torch import export_state

    root = Path(out)
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    (root / "int8").mkdir(parents=True, exist_ok=True)
    data = load_digits_split()
    results: Results = {}
    for model in models:
        module, _, _ = train_model(model, data, root / "train" / model, epochs=epochs, seed=seed, quiet=quiet)
        ckpt = root / "checkpoints" / f"{model}-digits.safetensors"
        save_file(export_state(module), str(ckpt), metadata={"model": model, "form": "train"})
        results[model] = {}
        for g in GRANULARITIES:
            reports = {
                engine: quantize_checkpoint(
                    str(ckpt),
                    str(root / "int8" / f"{model}-{g}{ext}"),
                    model,
                    calib="digits",
                    samples=samples,
                    per_channel=g == "per-channel",
                    eval_source="digits",
                    overwrite=True,
                    engine=engine,
                )
                for engine, ext in ENGINES.items()
            }
            results[model][g] = {**reports["onnxruntime"], "openvino": _engine_figures(reports["openvino"])}
    (root / "quantize.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _engine_figures(rep: dict[str, Any]) -> dict[str, Any]:
    """What an engine's report adds to ONNX Runtime's for the same graph: its int8 top-1,
    agreement, logits SQNR and the size of what it wrote."""
    keys = ("engine", "format", "int8_top1", "agreement", "logits_sqnr_db", "bytes")
    return {k: rep[k] for k in keys if k in rep}


def format_comparison(results: Results) -> str:
    """One row per model and weight granularity: float32 and int8 top-1, then agreement and
    logits SQNR of int8 in ONNX Runtime (ORT) and in OpenVINO (OV), and the worst layer's SQNR
    (the QDQ math, the same graph in both)."""
    head = (
        f"{'model':<16}{'weights':<13}{'bits':>5}{'fp32 top-1':>11}{'int8 top-1':>11}"
        f"{'ORT agree':>10}{'ORT SQNR':>10}{'OV agree':>10}{'OV SQNR':>9}{'min layer SQNR':>16}"
    )
    lines = [head, "-" * len(head)]
    for model, by_g in results.items():
        for g, r in by_g.items():
            worst = min(lr["sqnr_db"] for lr in r["layers"])
            ov = r["openvino"]
            lines.append(
                f"{model:<16}{g:<13}{r['weight_bits']:>5}{100 * r['fp32_top1']:>10.2f}%"
                f"{100 * r['int8_top1']:>10.2f}%{100 * r['agreement']:>9.2f}%"
                f"{r['logits_sqnr_db']:>8.1f}dB{100 * ov['agreement']:>9.2f}%"
                f"{ov['logits_sqnr_db']:>7.1f}dB{worst:>14.1f}dB"
            )
    return "\n".join(lines)


def plot_comparison(results: Results, path: str) -> None:
    """Per-layer SQNR, one panel per weight granularity, one bar series per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(GRANULARITIES), figsize=(12, 4), sharey=True)
    width = 0.8 / len(results)
    for ax, g in zip(axes, GRANULARITIES):
        for i, (model, by_g) in enumerate(results.items()):
            layers = by_g[g]["layers"]
            ax.bar(
                np.arange(len(layers)) + i * width,
                [lr["sqnr_db"] for lr in layers],
                width,
                label=f"{model} (agree {100 * by_g[g]['agreement']:.1f}%)",
            )
        names = [lr["name"].split(".rbr")[0] for lr in next(iter(results.values()))[g]["layers"]]
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"int8, {g} weights")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("SQNR of int8 vs float32 (dB)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["compare", "format_comparison", "plot_comparison", "GRANULARITIES"]
