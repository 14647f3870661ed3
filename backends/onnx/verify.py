"""Run two ONNX graphs in ONNX Runtime on the same random input and compare them."""

from __future__ import annotations

import numpy as np
import onnx

from reparam_core import CheckpointError


def _input(model: onnx.ModelProto, seed: int) -> tuple[str, np.ndarray]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise CheckpointError(
            f"--verify needs a graph with one input, this one has {len(inputs)}: {[i.name for i in inputs]}"
        )
    dims = [d.dim_value if d.HasField("dim_value") else 1 for d in inputs[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    return inputs[0].name, x


def verify(src: onnx.ModelProto, dst: onnx.ModelProto, seed: int = 0) -> float:
    """max|y_dst - y_src| / max|y_src| over the first output, on one standard-normal input
    (dynamic dimensions set to 1)."""
    import onnxruntime as ort

    name, x = _input(src, seed)
    outs = []
    for model in (src, dst):
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outs.append(np.asarray(sess.run(None, {name: x})[0], np.float64))
    ref, got = outs
    if ref.shape != got.shape:
        return float("inf")
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


__all__ = ["verify"]
