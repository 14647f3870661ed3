"""ONNX backend of reparam: graph-level passes on exported models (onnx + numpy; ONNX Runtime
only to verify a result)."""
from .graph_fuse import fuse_model, load, op_histogram
from .verify import verify

__all__ = ["fuse_model", "load", "op_histogram", "verify"]
