"""The ONNX backend of reparam: passes on exported graphs (onnx + numpy; ONNX Runtime to run or
verify them): merging parallel branches into one conv in any model (`graph_fuse`), and int8
static quantization with a per-layer report (`quantize`)."""

from .graph_fuse import fuse_model, load, op_histogram
from .quantize import METHODS, LayerReport, layer_reports, onnx_input_name, ort_session, quantize_qdq, run_onnx
from .verify import verify

__all__ = [
    "fuse_model",
    "load",
    "op_histogram",
    "verify",
    "METHODS",
    "LayerReport",
    "layer_reports",
    "onnx_input_name",
    "ort_session",
    "quantize_qdq",
    "run_onnx",
]
