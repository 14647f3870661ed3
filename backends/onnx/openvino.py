"""OpenVINO as a deploy engine for the project's ONNX graphs: the float32 deploy graph and the int8
QDQ graph (`quantize.quantize_qdq`) compiled for CPU, run on NCHW numpy, and written as an
OpenVINO IR (`DST.xml` + `DST.bin`).

Precision is always explicit. OpenVINO's CPU plugin runs float32 graphs in bf16 by default on
CPUs with AVX-512 BF16 or AMX (relative error about 5e-3 instead of 1e-6), so every compile here
sets `INFERENCE_PRECISION_HINT`: f32 for float32 and for int8 graphs (int8 comes from the
graph's quantize/dequantize pairs, everything else stays float32), bf16 only when asked for and
only where the CPU has it. The compiled model's own hint is checked after compiling.

int8 in OpenVINO comes from the same calibrated QDQ graph that ONNX Runtime runs, not from NNCF's
post-training quantization (measured, 2 threads, batch 8, 224: OpenVINO ran the QDQ graph as fast
as NNCF's on RepVGG-A0 and faster on MobileOne-S0, x2.97 vs x2.37 over ONNX Runtime float32, and
repghostnet_1_0x, x1.98 vs x1.07, at the same logits SQNR; on the trained demo RepVGG-mini the
QDQ graph gave 29.5 dB logits SQNR against NNCF's 23.1 dB). One calibration and one file serve
both engines, and the per-layer SQNR of the QDQ math is the same for both; no extra dependency.

openvino is imported when a function is called, never at import time, and with its usage
telemetry off (`import_openvino`).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from functools import lru_cache
from typing import Any

import numpy as np

from reparam_core.errors import ArgumentError, CheckpointError, ReparamError
from reparam_core.formats.atomic import atomic_write
from reparam_core.quant.hardware import cpu_features

PRECISIONS: dict[str, str] = {"float32": "f32", "bfloat16": "bf16"}  # ours -> OpenVINO's hint
DEVICE = "CPU"


def import_openvino() -> Any:
    """The `openvino` module, imported without its usage telemetry. A plain `import openvino`
    sends an event to Google Analytics from a forked process and writes a client id under
    ~/intel unless the user opted out (openvino-telemetry, a dependency of openvino); hidden
    from that first import, openvino binds its own no-op stub instead. The telemetry package is
    importable again afterwards (NNCF needs it). An openvino imported before is returned as is."""
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    hidden = "openvino_telemetry" not in sys.modules
    if hidden:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # makes its import fail
    try:
        import openvino
    finally:
        if hidden:
            del sys.modules["openvino_telemetry"]
    return openvino


@lru_cache(maxsize=1)
def ov_core() -> Any:
    """One `openvino.Core` per process."""
    return import_openvino().Core()


def has_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX-512 BF16 or AMX-BF16) and OpenVINO's CPU plugin
    offers it."""
    f = cpu_features()
    return (f["avx512_bf16"] or f["amx_bf16"]) and "BF16" in ov_core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")


def compile_config(precision: str = "float32", threads: int | None = None) -> dict[str, Any]:
    """The CPU plugin's properties for `precision` (float32 or bfloat16; an int8 graph compiles
    with float32) and `threads` (intra-op threads; None: OpenVINO's choice): an explicit
    INFERENCE_PRECISION_HINT always, one stream (latency), ArgumentError for a precision this
    CPU lacks."""
    if precision not in PRECISIONS:
        raise ArgumentError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bfloat16" and not has_bf16():
        raise ArgumentError("OpenVINO bfloat16 needs a CPU with AVX-512 BF16 or AMX-BF16; this one has neither")
    if threads is not None and threads < 1:
        raise ArgumentError(f"threads must be >= 1, got {threads}")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def read_model(src: str | os.PathLike[str]) -> Any:
    """An `openvino.Model` from an ONNX file or an IR (`.xml`, its `.bin` beside it);
    CheckpointError naming the file when it is missing or OpenVINO cannot read it."""
    path = os.fspath(src)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".xml") and not os.path.isfile(ir_paths(path)[1]):
        raise CheckpointError(f"{path}: its weights {ir_paths(path)[1]} are missing")
    try:
        return ov_core().read_model(path)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: OpenVINO cannot read it: {str(e).splitlines()[0]}") from None


def model_from_onnx_bytes(data: bytes) -> Any:
    """An `openvino.Model` of a serialized ONNX graph (e.g. the int8 QDQ graph `quantize_qdq`
    returns); CheckpointError when OpenVINO cannot read it."""
    import io

    try:
        return ov_core().read_model(io.BytesIO(data))
    except RuntimeError as e:
        raise CheckpointError(f"<ONNX bytes>: OpenVINO cannot read them: {str(e).splitlines()[0]}") from None


def compile_model(model: Any, precision: str = "float32", threads: int | None = None) -> Any:
    """`model` (an openvino.Model or a path read_model takes) compiled for CPU with
    compile_config; ReparamError if the compiled model does not report the precision asked."""
    ov = import_openvino()
    if isinstance(model, (str, os.PathLike)):
        model = read_model(model)
    compiled = ov_core().compile_model(model, DEVICE, compile_config(precision, threads))
    got = compiled.get_property("INFERENCE_PRECISION_HINT")
    want = ov.Type.f32 if precision == "float32" else ov.Type.bf16
    if got != want:
        raise ReparamError(f"OpenVINO compiled {model.get_friendly_name()} in {got}, not {want} as asked")
    return compiled


def runner(compiled: Any) -> Any:
    """`f(x) -> first output` (float32 numpy) over one infer request of `compiled`; the input
    is shared, not copied, and the output is copied out of the request."""
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        out: np.ndarray = request.infer({0: np.ascontiguousarray(x, np.float32)}, share_inputs=True)[0]
        return np.array(out, np.float32)

    return run


def run_openvino(compiled: Any, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """The first output of `compiled` on NCHW `x`, in batches of `batch` (the whole of `x` at
    once when the model's batch axis is static), concatenated."""
    run = runner(compiled)
    if not compiled.input(0).get_partial_shape()[0].is_dynamic:
        return run(x)
    return np.concatenate([run(x[i : i + batch]) for i in range(0, len(x), batch)])


def ir_paths(dst: str | os.PathLike[str]) -> tuple[str, str]:
    """(DST.xml, DST.bin) of an IR path; ArgumentError unless it ends with .xml."""
    xml = os.fspath(dst)
    if not xml.endswith(".xml") or os.path.basename(xml) == ".xml":
        raise ArgumentError(f"{xml}: an OpenVINO IR is written as DST.xml (with DST.bin beside it)")
    return xml, xml[: -len(".xml")] + ".bin"


def stable_names(model: Any) -> Any:
    """`model` with OpenVINO's generated layer names (`<Type>_<process-wide counter>`) replaced
    by `<Type>_<position>`, so that the IR of the same graph is the same bytes in any process.
    Other names (those of the source graph) are kept. Renames in place; returns `model`."""
    for i, op in enumerate(model.get_ordered_ops()):
        kind = op.get_type_name()
        if re.fullmatch(rf"{re.escape(kind)}_\d+", op.get_friendly_name()):
            op.set_friendly_name(f"{kind}_{i}")
    return model


def ir_bytes(model: Any) -> tuple[bytes, bytes]:
    """The IR (xml, bin) of `model` with stable names and float32 weights as they are (no fp16
    compression); the same graph gives the same bytes."""
    ov = import_openvino()
    model = stable_names(model.clone())
    with tempfile.TemporaryDirectory(prefix="reparam-ir-") as tmp:
        xml = os.path.join(tmp, "model.xml")
        ov.save_model(model, xml, compress_to_fp16=False)
        with open(xml, "rb") as f, open(ir_paths(xml)[1], "rb") as g:
            return f.read(), g.read()


def write_ir(model: Any, dst: str | os.PathLike[str], *, overwrite: bool = False) -> tuple[str, str]:
    """Write `model` as DST.xml + DST.bin, each atomically (temp file, fsync, rename), weights
    first; the xml is read back by OpenVINO (with the new weights) before it takes its place.
    Without `overwrite` neither file may exist; on failure a weights file this call created is
    removed. With `overwrite`, a failure of the xml's write (a full disk) leaves the new weights
    beside the old xml. Returns the two paths."""
    xml, weights = ir_paths(dst)
    if not overwrite:
        for path in (xml, weights):
            if os.path.exists(path):
                raise CheckpointError(f"{path} already exists; pass --overwrite to replace it")
    xml_data, bin_data = ir_bytes(model)

    def check(tmp_xml: str) -> None:
        try:
            ov_core().read_model(tmp_xml, weights)
        except RuntimeError as e:
            raise CheckpointError(f"{xml}: the IR written does not read back: {str(e).splitlines()[0]}") from None

    atomic_write(weights, bin_data, overwrite=overwrite)
    try:
        atomic_write(xml, xml_data, overwrite=overwrite, check=check)
    except BaseException:
        if not overwrite:
            os.unlink(weights)
        raise
    return xml, weights


__all__ = [
    "PRECISIONS",
    "import_openvino",
    "ov_core",
    "has_bf16",
    "compile_config",
    "read_model",
    "model_from_onnx_bytes",
    "compile_model",
    "runner",
    "run_openvino",
    "ir_paths",
    "stable_names",
    "ir_bytes",
    "write_ir",
]
