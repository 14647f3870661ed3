"""`reparam quantize`: a checkpoint's deploy form as an int8 ONNX graph (ONNX Runtime static
quantization, QDQ), with the measurements that tell whether int8 is good enough: float32 vs
int8 top-1 and their agreement, and per layer the SQNR of int8 against float32, the weight range
and the calibrated activation range.

    reparam quantize SRC DST.onnx --model NAME --calib digits|DIR [--samples N]
        [--method minmax|entropy|percentile] [--per-tensor] [--eval digits|DIR]
        [--json FILE] [--plot FILE.png] [--overwrite]

Images: `digits` is scikit-learn's bundled digits preprocessed as `reparam demo` does (calibration
from its training split, evaluation on its test split); a DIR is `DIR/<class>/<image>` of one
image size, normalised with ImageNet's mean and std (`--mean`/`--std` to change).
Exit codes: 0 written, 2 bad input (nothing written).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from reparam_core import ReparamError, get_spec
from reparam_core.atomic import atomic_write
from reparam_core.formats import infer_num_classes, read_raw, to_neutral
from reparam_core.imagefolder import IMAGENET_MEAN, IMAGENET_STD, DataError, read_image_folder


@lru_cache(maxsize=1)
def _digits() -> object:
    from .demo import Digits

    return Digits()


def load_images(source: str, split: str, limit: int | None, mean: tuple[float, ...],
                std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(x NCHW float32, labels) from `digits` (its `split`: train or test) or an image folder."""
    if source == "digits":
        d = _digits()
        x, y = (d.x_train, d.y_train) if split == "train" else (d.x_test, d.y_test)  # type: ignore[attr-defined]
        if limit is not None:
            if limit < 1:
                raise DataError(f"--samples must be >= 1, got {limit}")
            x, y = x[:limit], y[:limit]
        return x, y
    x, y, _ = read_image_folder(source, limit=limit, mean=mean, std=std)
    return x, y


def quantize_checkpoint(src: str, dst: str, model: str, *, calib: str, samples: int = 200,
                        method: str = "minmax", per_channel: bool = True,
                        eval_source: str | None = None, overwrite: bool = False,
                        reduce_range: str = "auto", torch_pt2e: bool = False,
                        mean: tuple[float, ...] = IMAGENET_MEAN,
                        std: tuple[float, ...] = IMAGENET_STD) -> dict:
    """Quantize checkpoint `src` of `model` to `dst` (int8 ONNX); returns the report. Raises
    ReparamError subclasses on bad input, before anything is written. `reduce_range`: 'on'
    (7-bit weights), 'off', or 'auto' (on where this CPU has no VNNI/AMX int8 dot product).
    `torch_pt2e`: also quantize with torchao's PT2E X86 Inductor flow and report its agreement
    (eager: the quantization's math; Inductor's int8 kernels need torch.compile)."""
    import backends.torch as bt
    from backends.onnx import layer_reports, quantize_qdq, run_onnx
    from reparam_core.hardware import cpu_features, cpu_model, has_int8_dot

    if os.path.exists(dst) and not overwrite:
        raise ReparamError(f"{dst} already exists; pass --overwrite to replace it")
    if reduce_range not in ("auto", "on", "off"):
        raise ReparamError(f"--reduce-range must be auto, on or off, got {reduce_range!r}")
    seven_bit = reduce_range == "on" or (reduce_range == "auto" and not has_int8_dot())
    spec = get_spec(model)
    raw, fmt = read_raw(src)
    spec = get_spec(model, infer_num_classes(raw, fmt, spec))
    state, form, _ = to_neutral(raw, spec, fmt, None, source=src)
    x_cal, _ = load_images(calib, "train", samples, mean, std)
    if eval_source is not None:
        x_eval, y_eval = load_images(eval_source, "test", None, mean, std)
        if x_eval.shape[1:] != x_cal.shape[1:]:
            raise DataError(f"--eval images are {x_eval.shape[1:]} (C, H, W), the calibration "
                            f"images {x_cal.shape[1:]}: use one size")
        if int(y_eval.max()) >= spec.num_classes:
            raise DataError(f"--eval has {int(y_eval.max()) + 1} classes, the checkpoint's "
                            f"classifier {spec.num_classes}")
    else:
        x_eval, y_eval = x_cal, None
    if x_cal.shape[1] != 3:
        raise DataError(f"{calib}: images have {x_cal.shape[1]} channels, the model takes 3")

    module = bt.load_state(bt.create_model(spec.name, num_classes=spec.num_classes,
                                           deploy=form == "deploy"), state)
    with tempfile.TemporaryDirectory(prefix="reparam-quantize-") as tmp:
        fp32 = os.path.join(tmp, "fp32.onnx")
        bt.export_onnx(module, fp32, (1, *x_cal.shape[1:]), dynamic_batch=True)
        int8 = quantize_qdq(fp32, x_cal, method=method, per_channel=per_channel,  # type: ignore[arg-type]
                            reduce_range=seven_bit)
        y32, = run_onnx(fp32, x_eval)
        y8, = run_onnx(int8, x_eval)
        y8_math, = run_onnx(int8, x_eval, optimize=False)
        layers = layer_reports(fp32, int8, x_eval[:256], x_cal)
        fp32_bytes = os.path.getsize(fp32)
    import onnx

    ops: dict[str, int] = {}
    for node in onnx.load_from_string(int8).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    p32, p8 = y32.argmax(1), y8.argmax(1)
    report = {
        "src": src, "dst": dst, "model": spec.name, "form": form, "num_classes": spec.num_classes,
        "calibration": {"source": calib, "samples": int(len(x_cal)), "method": method},
        "weights": "per-channel" if per_channel else "per-tensor", "activations": "per-tensor",
        "weight_bits": 7 if seven_bit else 8, "reduce_range": reduce_range,
        "cpu": {"model": cpu_model(), **cpu_features()},
        "format": "QDQ int8 (ONNX Runtime)", "eval": eval_source or f"{calib} (calibration set)",
        "n_eval": int(len(x_eval)),
        "fp32_top1": float((p32 == y_eval).mean()) if y_eval is not None else None,
        "int8_top1": float((p8 == y_eval).mean()) if y_eval is not None else None,
        "agreement": float((p32 == p8).mean()),
        "logits_sqnr_db": _sqnr(y32, y8),
        "logits_sqnr_db_qdq_math": _sqnr(y32, y8_math),
        "agreement_qdq_math": float((p32 == y8_math.argmax(1)).mean()),
        "bytes": {"fp32": fp32_bytes, "int8": len(int8)}, "ops": ops,
        "layers": [lr.as_dict() for lr in layers],
    }
    if torch_pt2e:
        from backends.torch.quantize import pt2e_int8, run_batches

        yq = run_batches(pt2e_int8(module, x_cal), x_eval)
        report["torch_pt2e"] = {
            "quantizer": "torchao X86InductorQuantizer (PT2E), eager", "agreement":
            float((p32 == yq.argmax(1)).mean()), "logits_sqnr_db": _sqnr(y32, yq),
            "int8_top1": float((yq.argmax(1) == y_eval).mean()) if y_eval is not None else None}
    atomic_write(dst, int8, overwrite=overwrite)
    return report


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    from reparam_core.precision import sqnr_db

    return sqnr_db(ref, got)


def plot_layers(reports: dict[str, dict], path: str) -> None:
    """SQNR per layer, one bar series per report (e.g. per-channel and per-tensor, or two
    models), to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(reports.values()))
    names = [lr["name"] for lr in first["layers"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) * len(reports)), 4.0))
    width = 0.8 / len(reports)
    for i, (label, rep) in enumerate(reports.items()):
        values = [min(lr["sqnr_db"], 99.0) for lr in rep["layers"]]
        ax.bar(np.arange(len(values)) + i * width, values, width, label=label)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=60, ha="right",
                  fontsize=7)
    ax.set_ylabel("SQNR of int8 vs float32 (dB)")
    ax.set_title(f"{first['model']}: per-layer SQNR ({first['calibration']['method']} "
                 f"calibration, {first['calibration']['samples']} images)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.{os.getpid()}.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def format_report(rep: dict) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"
    lines = [f"{rep['model']} int8 ({rep['weights']} {rep['weight_bits']}-bit weights, "
             f"{rep['calibration']['method']} "
             f"calibration on {rep['calibration']['samples']} images) -> {rep['dst']}",
             f"top-1 fp32 {pct(rep['fp32_top1'])}  int8 {pct(rep['int8_top1'])}  agreement "
             f"{pct(rep['agreement'])} on {rep['n_eval']} images; logits SQNR "
             f"{rep['logits_sqnr_db']:.1f} dB; size {rep['bytes']['fp32'] / 1e6:.2f} MB -> "
             f"{rep['bytes']['int8'] / 1e6:.2f} MB (ONNX Runtime int8 kernels on this CPU)",
             f"QDQ math (unfused): agreement {pct(rep['agreement_qdq_math'])}, logits SQNR "
             f"{rep['logits_sqnr_db_qdq_math']:.1f} dB; per layer (QDQ math):",
             f"{'layer':<28}{'SQNR dB':>9}{'w min':>9}{'w max':>9}{'act min':>9}{'act max':>9}"]
    lines += [f"{lr['name'][:27]:<28}{lr['sqnr_db']:>9.1f}{lr['weight_min']:>9.3f}"
              f"{lr['weight_max']:>9.3f}{lr['activation_min']:>9.2f}{lr['activation_max']:>9.2f}"
              for lr in rep["layers"]]
    if rep.get("torch_pt2e"):
        t = rep["torch_pt2e"]
        lines.insert(3, f"torch PT2E (torchao X86 Inductor quantizer, eager): top-1 "
                        f"{pct(t['int8_top1'])}, agreement {pct(t['agreement'])}, logits SQNR "
                        f"{t['logits_sqnr_db']:.1f} dB")
    return "\n".join(lines)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint (train or deploy form, any format reparam reads)")
    parser.add_argument("dst", help="int8 ONNX file to write")
    parser.add_argument("--model", "-m", required=True, help="architecture name (reparam list)")
    parser.add_argument("--calib", required=True, help="calibration images: digits, or DIR/<class>/<image>")
    parser.add_argument("--samples", type=int, default=200, help="calibration images (default 200)")
    parser.add_argument("--method", choices=("minmax", "entropy", "percentile"), default="minmax")
    parser.add_argument("--per-tensor", action="store_true",
                        help="one weight scale per tensor (many NPUs/DSPs); default per channel")
    parser.add_argument("--reduce-range", choices=("auto", "on", "off"), default="auto",
                        help="7-bit weights: exact on x86 without VNNI/AMX, whose int8 kernels "
                             "saturate 16-bit sums (auto: on where this CPU lacks them)")
    parser.add_argument("--torch-pt2e", action="store_true",
                        help="also quantize in PyTorch (torchao PT2E, X86 Inductor quantizer) "
                             "and report its agreement")
    parser.add_argument("--eval", dest="eval_source", default=None,
                        help="labelled images for top-1: digits (its test split) or a DIR")
    parser.add_argument("--mean", type=_floats, default=IMAGENET_MEAN, help="per-channel mean (DIR)")
    parser.add_argument("--std", type=_floats, default=IMAGENET_STD, help="per-channel std (DIR)")
    parser.add_argument("--json", default=None, help="write the report as JSON to FILE")
    parser.add_argument("--plot", default=None, help="draw SQNR per layer to FILE.png")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")


def run(args: argparse.Namespace) -> int:
    # errors (nothing is written then) become exit codes in scripts.cli
    rep = quantize_checkpoint(args.src, args.dst, args.model, calib=args.calib,
                              samples=args.samples, method=args.method,
                              per_channel=not args.per_tensor, eval_source=args.eval_source,
                              overwrite=args.overwrite, mean=args.mean, std=args.std,
                              reduce_range=args.reduce_range, torch_pt2e=args.torch_pt2e)
    print(format_report(rep))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
    if args.plot:
        plot_layers({rep["weights"]: rep}, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`reparam quantize ARGV...`, exit status included (scripts.cli)."""
    from scripts.cli import run_command

    return run_command("quantize", argv)


if __name__ == "__main__":
    sys.exit(main())
