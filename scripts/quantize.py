"""`reparam quantize`: a checkpoint's deploy form as an int8 ONNX graph (ONNX Runtime static
quantization, QDQ), with the measurements that tell whether int8 is good enough: float32 vs
int8 top-1 and their agreement, and per layer the SQNR of int8 against float32, the weight range
and the calibrated activation range. `--engine openvino` writes the same calibrated QDQ graph as
an OpenVINO IR (DST.xml + DST.bin) and measures it in OpenVINO (precision hint f32).

    reparam quantize SRC DST.onnx|DST.xml --model NAME --calib digits|DIR [--samples N]
        [--method minmax|entropy|percentile] [--per-tensor] [--eval digits|DIR]
        [--engine onnxruntime|openvino] [--json FILE] [--plot FILE.png] [--overwrite]

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
from typing import Any

import numpy as np

from reparam_core import ReparamError, get_spec
from reparam_core.errors import ArgumentError
from reparam_core.formats import infer_num_classes, read_raw, to_neutral
from reparam_core.formats.atomic import atomic_write
from reparam_core.quant.report import format_report, plot_layers
from reparam_core.training.imagefolder import IMAGENET_MEAN, IMAGENET_STD, DataError, read_image_folder

ENGINES = ("onnxruntime", "openvino")  # what runs (and what is written): an ONNX file, an OpenVINO IR


@lru_cache(maxsize=1)
def _digits() -> object:
    from reparam_core.training.digits import load_digits_split

    return load_digits_split()


def load_images(
    source: str, split: str, limit: int | None, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
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


def quantize_checkpoint(
    src: str,
    dst: str,
    model: str,
    *,
    calib: str,
    samples: int = 200,
    method: str = "minmax",
    per_channel: bool = True,
    eval_source: str | None = None,
    overwrite: bool = False,
    reduce_range: str = "auto",
    torch_pt2e: bool = False,
    engine: str = "onnxruntime",
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> dict[str, Any]:
    """Quantize checkpoint `src` of `model` to `dst` (int8 ONNX; with `engine` 'openvino' the same
    graph as an OpenVINO IR, DST.xml + DST.bin, measured in OpenVINO); returns the report. Raises
    ReparamError subclasses on bad input, before anything is written. `reduce_range`: 'on'
    (7-bit weights), 'off', or 'auto' (on where this CPU has no VNNI/AMX int8 dot product).
    `torch_pt2e`: also quantize with torchao's PT2E X86 Inductor flow and report its agreement
    (eager: the quantization's math; Inductor's int8 kernels need torch.compile)."""
    import backends.torch as bt
    from backends.onnx.quantize import compare_logits, measure_int8, quantize_qdq, run_onnx
    from reparam_core.quant.hardware import cpu_features, cpu_model, has_int8_dot

    for path in _outputs(dst, engine):
        if os.path.exists(path) and not overwrite:
            raise ReparamError(f"{path} already exists; pass --overwrite to replace it")
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
            raise DataError(
                f"--eval images are {x_eval.shape[1:]} (C, H, W), the calibration "
                f"images {x_cal.shape[1:]}: use one size"
            )
        if int(y_eval.max()) >= spec.num_classes:
            raise DataError(
                f"--eval has {int(y_eval.max()) + 1} classes, the checkpoint's classifier {spec.num_classes}"
            )
    else:
        x_eval, y_eval = x_cal, None
    if x_cal.shape[1] != 3:
        raise DataError(f"{calib}: images have {x_cal.shape[1]} channels, the model takes 3")

    module = bt.load_state(bt.create_model(spec.name, num_classes=spec.num_classes, deploy=form == "deploy"), state)
    with tempfile.TemporaryDirectory(prefix="reparam-quantize-") as tmp:
        fp32 = os.path.join(tmp, "fp32.onnx")
        bt.export_onnx(module, fp32, (1, *x_cal.shape[1:]), dynamic_batch=True)
        int8 = quantize_qdq(
            fp32,
            x_cal,
            method=method,
            per_channel=per_channel,
            reduce_range=seven_bit,
        )
        if engine == "openvino":
            ir, y32, y8 = _openvino_logits(fp32, int8, x_eval)
        else:
            (y32,), y8 = run_onnx(fp32, x_eval), None
        measured = measure_int8(fp32, y32, int8, x_eval, y_eval, x_cal, int8_logits=y8)
    report = {
        "src": src,
        "dst": dst,
        "model": spec.name,
        "form": form,
        "num_classes": spec.num_classes,
        "calibration": {"source": calib, "samples": int(len(x_cal)), "method": method},
        "weights": "per-channel" if per_channel else "per-tensor",
        "activations": "per-tensor",
        "weight_bits": 7 if seven_bit else 8,
        "reduce_range": reduce_range,
        "cpu": {"model": cpu_model(), **cpu_features()},
        **_engine_fields(engine),
        "eval": eval_source or f"{calib} (calibration set)",
        "n_eval": int(len(x_eval)),
        **measured,
    }
    if torch_pt2e:
        from backends.torch.quantize import pt2e_int8, run_batches

        pt2e = compare_logits(y32, run_batches(pt2e_int8(module, x_cal), x_eval), y_eval)
        report["torch_pt2e"] = {
            "quantizer": "torchao X86InductorQuantizer (PT2E), eager",
            "agreement": pt2e["agreement"],
            "logits_sqnr_db": pt2e["logits_sqnr_db"],
            "int8_top1": pt2e["top1"],
        }
    if engine == "openvino":
        from backends.onnx.openvino import write_ir

        report["bytes"] = {
            **report["bytes"],
            "int8_onnx": len(int8),
            "int8": _ir_size(write_ir(ir, dst, overwrite=overwrite)),
        }
    else:
        atomic_write(dst, int8, overwrite=overwrite)
    return report


def _outputs(dst: str, engine: str) -> tuple[str, ...]:
    """The files `engine` writes for `dst`: the ONNX file, or the IR's xml and bin (ArgumentError
    for an unknown engine or an IR path not ending with .xml)."""
    if engine == "onnxruntime":
        return (dst,)
    if engine == "openvino":
        from backends.onnx.openvino import ir_paths

        return ir_paths(dst)
    raise ArgumentError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")


def _openvino_logits(fp32: str, int8: bytes, x: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
    """(the int8 graph as an openvino.Model, OpenVINO's float32 logits of `fp32` on `x`, its int8
    logits), both compiled with precision hint f32."""
    from backends.onnx.openvino import compile_model, model_from_onnx_bytes, run_openvino

    ir = model_from_onnx_bytes(int8)
    return ir, run_openvino(compile_model(fp32), x), run_openvino(compile_model(ir), x)


def _engine_fields(engine: str) -> dict[str, Any]:
    """What the report says about the engine: its name, the file format and the kernels measured."""
    if engine == "openvino":
        from backends.onnx.openvino import import_openvino

        return {
            "engine": "openvino",
            "openvino": import_openvino().get_version(),
            "inference_precision_hint": "f32",
            "format": "OpenVINO IR int8 (the QDQ graph calibrated with ONNX Runtime)",
            "kernels": "OpenVINO int8 kernels",
        }
    return {"engine": "onnxruntime", "format": "QDQ int8 (ONNX Runtime)", "kernels": "ONNX Runtime int8 kernels"}


def _ir_size(paths: tuple[str, ...]) -> int:
    """Bytes of the files written."""
    return sum(os.path.getsize(p) for p in paths)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint (train or deploy form, any format reparam reads)")
    parser.add_argument("dst", help="int8 ONNX file to write (DST.xml with --engine openvino: an OpenVINO IR)")
    parser.add_argument("--model", "-m", required=True, help="architecture name (reparam list)")
    parser.add_argument("--calib", required=True, help="calibration images: digits, or DIR/<class>/<image>")
    parser.add_argument("--samples", type=int, default=200, help="calibration images (default 200)")
    parser.add_argument("--method", choices=("minmax", "entropy", "percentile"), default="minmax")
    parser.add_argument(
        "--per-tensor", action="store_true", help="one weight scale per tensor (many NPUs/DSPs); default per channel"
    )
    parser.add_argument(
        "--reduce-range",
        choices=("auto", "on", "off"),
        default="auto",
        help="7-bit weights: exact on x86 without VNNI/AMX, whose int8 kernels "
        "saturate 16-bit sums (auto: on where this CPU lacks them)",
    )
    parser.add_argument(
        "--torch-pt2e",
        action="store_true",
        help="also quantize in PyTorch (torchao PT2E, X86 Inductor quantizer) and report its agreement",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="onnxruntime",
        help="onnxruntime (default): write and measure the QDQ ONNX graph; openvino: write it as an "
        "OpenVINO IR (DST.xml + DST.bin) and measure it in OpenVINO",
    )
    parser.add_argument(
        "--eval", dest="eval_source", default=None, help="labelled images for top-1: digits (its test split) or a DIR"
    )
    parser.add_argument("--mean", type=_floats, default=IMAGENET_MEAN, help="per-channel mean (DIR)")
    parser.add_argument("--std", type=_floats, default=IMAGENET_STD, help="per-channel std (DIR)")
    parser.add_argument("--json", default=None, help="write the report as JSON to FILE")
    parser.add_argument("--plot", default=None, help="draw SQNR per layer to FILE.png")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")


def run(args: argparse.Namespace) -> int:
    # errors (nothing is written then) become exit codes in scripts.cli
    rep = quantize_checkpoint(
        args.src,
        args.dst,
        args.model,
        calib=args.calib,
        samples=args.samples,
        method=args.method,
        per_channel=not args.per_tensor,
        eval_source=args.eval_source,
        overwrite=args.overwrite,
        mean=args.mean,
        std=args.std,
        reduce_range=args.reduce_range,
        torch_pt2e=args.torch_pt2e,
        engine=args.engine,
    )
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
