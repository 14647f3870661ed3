"""int8 static quantization of an ONNX deploy graph with ONNX Runtime (QDQ format), and the
measurements that say where it loses the signal.

`quantize_qdq` calibrates activation ranges on real inputs (min-max, entropy or percentile) and
quantizes weights per output channel (default) or per tensor, activations per tensor, both int8.
`layer_reports` runs the float32 and the int8 graph on the same inputs and gives, for every conv
(and gemm) of the int8 graph, the SQNR of its output against the float32 output of the same
tensor, its float32 weight range and its calibrated activation range. `measure_int8` puts it
together: the int8 graph against the float32 graph on labelled (or unlabelled) images, whole model
and per layer.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reparam_core.errors import ReparamError
from reparam_core.weights.precision import sqnr_db

METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")  # calibration (ONNX Runtime's)
_QUANTIZED_SUFFIX = "_quantized"


def onnx_input_name(path: str | os.PathLike[str]) -> str:
    """The name of the graph's (first) input."""
    import onnx

    return str(onnx.load(os.fspath(path), load_external_data=False).graph.input[0].name)


def _batches(name: str, x: np.ndarray, batch: int) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, len(x), batch):
        yield {name: np.ascontiguousarray(x[i : i + batch], np.float32)}


def quantize_qdq(
    src: str | os.PathLike[str],
    calib: np.ndarray,
    *,
    method: str = "minmax",
    per_channel: bool = True,
    reduce_range: bool = False,
    batch: int = 16,
) -> bytes:
    """The bytes of `src` quantized to int8 in QDQ format (QuantizeLinear/DequantizeLinear
    around every conv and gemm), activation ranges calibrated on `calib` (N, C, H, W).

    Arguments:
        src: a float32 ONNX graph whose batch axis is dynamic (or equal to `batch`).
        calib: calibration inputs, float32 NCHW, already normalised as the model expects.
        method: how activation ranges are taken from the calibration outputs (one of METHODS).
        per_channel: one weight scale per output channel; False: one per tensor.
        reduce_range: 7-bit weights, exact on x86 CPUs without VNNI/AMX (whose int8 kernels sum
            u8 x s8 products in saturating 16 bits); see reparam_core.quant.hardware.has_int8_dot.
    Returns the serialized model; the same inputs give the same bytes."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if method not in METHODS:
        raise ReparamError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    if len(calib) == 0:
        raise ReparamError("no calibration inputs")
    name = onnx_input_name(src)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = _batches(name, calib, batch)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    calibration = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT logs a pre-processing hint on the root logger
    try:
        with tempfile.TemporaryDirectory(prefix="reparam-quant-") as tmp:
            out = Path(tmp) / "int8.onnx"
            quantize_static(
                os.fspath(src),
                os.fspath(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QInt8,
                reduce_range=reduce_range,
                calibrate_method=calibration,
                extra_options={"CalibTensorRangeSymmetric": False},
            )
            return out.read_bytes()
    finally:
        root.setLevel(level)


def ort_session(model: str | os.PathLike[str] | bytes, *, optimize: bool = True, threads: int | None = None) -> object:
    """An ONNX Runtime CPU session for a graph (a path or its bytes); `threads` sets the
    intra-op thread count (default: ONNX Runtime's, one per physical core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(
        model if isinstance(model, bytes) else os.fspath(model), opts, providers=["CPUExecutionProvider"]
    )


def run_onnx(
    model: str | os.PathLike[str] | bytes,
    x: np.ndarray,
    outputs: list[str] | None = None,
    batch: int = 64,
    optimize: bool = True,
) -> list[np.ndarray]:
    """Run an ONNX graph (a path or its bytes) on NCHW `x` in batches; the named `outputs`
    (default: the graph's outputs), each concatenated over the batches.

    `optimize=False` runs the graph as written: a QDQ graph then computes in float32 on
    dequantized values (the quantization's math without the int8 kernels that ONNX Runtime
    fuses the QDQ pairs into, and that differ from it on CPUs without VNNI)."""
    sess = ort_session(model, optimize=optimize)
    name = sess.get_inputs()[0].name  # type: ignore[attr-defined]
    parts = [sess.run(outputs, feed) for feed in _batches(name, x, batch)]  # type: ignore[attr-defined]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


@dataclass(frozen=True)
class LayerReport:
    """One conv or gemm of the int8 graph: `name` is its weight's name without `.weight` (the
    official module name), `output` the tensor compared."""

    name: str
    op: str
    output: str
    sqnr_db: float
    weight_min: float
    weight_max: float
    activation_min: float
    activation_max: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _with_outputs(model_bytes: bytes, names: list[str]) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_from_string(model_bytes)
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in have)
    return bytes(model.SerializeToString())


def _weighted_layers(int8: object) -> list[tuple[str, str, str, str]]:
    """(weight name, op type, output tensor, int8 tensor) of every Conv/Gemm of a QDQ graph. The
    int8 tensor is what the next layer reads: the output after its QuantizeLinear ->
    DequantizeLinear pair when it has one (ONNX Runtime fuses a following ReLU into that pair, the
    conv keeping the ReLU's output name), else the output itself."""
    graph = int8.graph  # type: ignore[attr-defined]
    dq_source = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    q_of = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    dq_of = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    out = []
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 1:
            weight = dq_source.get(node.input[1], node.input[1])
            weight = weight[: -len(_QUANTIZED_SUFFIX)] if weight.endswith(_QUANTIZED_SUFFIX) else weight
            output = node.output[0]
            seen = dq_of.get(q_of.get(output, ""), output)
            out.append((weight, node.op_type, output, seen))
    return out


def layer_reports(
    fp32: str | os.PathLike[str], int8_bytes: bytes, x: np.ndarray, calib: np.ndarray
) -> list[LayerReport]:
    """Per conv/gemm of the int8 graph, in graph order: SQNR (dB) of its output on `x` against
    the float32 graph's same tensor, the float32 weight range, and the activation range the
    float32 graph reaches on `calib`. Both graphs run unoptimized (`run_onnx(optimize=False)`):
    exposing inner tensors would stop ONNX Runtime from fusing their QDQ pairs anyway, so the
    per-layer figures are those of the quantization's math, the same for every layer."""
    import onnx
    from onnx import numpy_helper

    fp32_model = onnx.load(os.fspath(fp32))
    weights = {t.name: numpy_helper.to_array(t) for t in fp32_model.graph.initializer}
    produced = {o for n in fp32_model.graph.node for o in n.output}
    # the float32 tensor: the output's name, or (when the quantizer renamed the output of the
    # last layer to put its Q/DQ pair in front of the graph output) the pair's output name
    layers = [
        (w, op, o if o in produced else q, q)
        for w, op, o, q in _weighted_layers(onnx.load_from_string(int8_bytes))
        if o in produced or q in produced
    ]
    if not layers:
        raise ReparamError(f"{fp32}: no conv or gemm output of the int8 graph is a tensor of the float32 graph")
    names = [o for _, _, o, _ in layers]
    seen = [q for _, _, _, q in layers]
    fp32_bytes = fp32_model.SerializeToString()
    ref = run_onnx(_with_outputs(fp32_bytes, names), x, names, optimize=False)
    got = run_onnx(_with_outputs(int8_bytes, seen), x, seen, optimize=False)
    act = run_onnx(_with_outputs(fp32_bytes, names), calib, names, optimize=False)
    out = []
    for (w, op, o, _), r, g, a in zip(layers, ref, got, act):
        wt = weights.get(w)
        wmin, wmax = (float(wt.min()), float(wt.max())) if wt is not None else (float("nan"),) * 2
        name = w[: -len(".weight")] if w.endswith(".weight") else w
        out.append(LayerReport(name, op, o, sqnr_db(r, g), wmin, wmax, float(a.min()), float(a.max())))
    return out


def compare_logits(ref: np.ndarray, got: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """`got` (N, classes) against `ref` (float32 logits of the same inputs): the fraction of
    inputs whose top-1 class agrees, the SQNR of `got` in dB, and with `labels` the top-1
    accuracy of `got` (None without)."""
    pred = got.argmax(1)
    return {
        "agreement": float((ref.argmax(1) == pred).mean()),
        "logits_sqnr_db": sqnr_db(ref, got),
        "top1": None if labels is None else float((pred == labels).mean()),
    }


def measure_int8(
    fp32: str | os.PathLike[str],
    y32: np.ndarray,
    int8: bytes,
    x: np.ndarray,
    labels: np.ndarray | None,
    calib: np.ndarray,
    int8_logits: np.ndarray | None = None,
) -> dict[str, Any]:
    """The int8 graph against the float32 graph `fp32`, whose logits on the NCHW images `x` are
    `y32` (`run_onnx(fp32, x)`), on the same images (`labels` for top-1):
    `fp32_top1`, `int8_top1` (None without labels), `agreement` and `logits_sqnr_db` of
    `int8_logits` (the int8 graph run by another engine; default ONNX Runtime's fused int8
    kernels), the same two for the QDQ math (`run_onnx(optimize=False)`),
    `bytes` of both graphs, the int8 graph's `ops` (op type -> count) and per conv/gemm `layers`
    (layer_reports on the first 256 images, activation ranges on `calib`)."""
    import onnx

    fused = compare_logits(y32, run_onnx(int8, x)[0] if int8_logits is None else int8_logits, labels)
    qdq = compare_logits(y32, run_onnx(int8, x, optimize=False)[0])
    ops: dict[str, int] = {}
    for node in onnx.load_from_string(int8).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        "fp32_top1": None if labels is None else float((y32.argmax(1) == labels).mean()),
        "int8_top1": fused["top1"],
        "agreement": fused["agreement"],
        "logits_sqnr_db": fused["logits_sqnr_db"],
        "logits_sqnr_db_qdq_math": qdq["logits_sqnr_db"],
        "agreement_qdq_math": qdq["agreement"],
        "bytes": {"fp32": os.path.getsize(fp32), "int8": len(int8)},
        "ops": ops,
        "layers": [lr.as_dict() for lr in layer_reports(fp32, int8, x[:256], calib)],
    }


__all__ = [
    "METHODS",
    "quantize_qdq",
    "ort_session",
    "run_onnx",
    "LayerReport",
    "layer_reports",
    "onnx_input_name",
    "compare_logits",
    "measure_int8",
]
