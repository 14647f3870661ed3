"""Graph-level passes on ONNX files (onnx + numpy; ONNX Runtime to run them): int8 static
quantization with a per-layer report (`quantize`)."""
from .quantize import (METHODS, LayerReport, layer_reports, onnx_input_name, quantize_qdq,
                       run_onnx)

__all__ = ["METHODS", "LayerReport", "layer_reports", "onnx_input_name", "quantize_qdq",
           "run_onnx"]
