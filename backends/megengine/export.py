"""Export the deploy form as a traced MegEngine graph (.mge) and run such an artifact."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .layers import mge

INPUT_NAME = "data"
OUTPUT_NAME = "output"


def export_traced(model, path: str | os.PathLike, input_shape: Sequence[int] = (1, 3, 224, 224)) -> str:
    """Trace the DEPLOY form of `model` (reparameterized first if needed; the input is not
    modified) with jit.trace(symbolic=True, capture_as_const=True) and dump it to `path`.
    Input var `data`, output var `output`. Returns the path."""
    from megengine.jit import trace

    deploy = model if model.deploy else model.reparameterize()
    was_training = deploy.training
    deploy.eval()
    try:
        @trace(symbolic=True, capture_as_const=True)
        def infer(data):
            return deploy(data)

        infer(mge.tensor(np.zeros(tuple(input_shape), np.float32)))
        infer.dump(os.fspath(path), arg_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    finally:
        deploy.train(was_training)
    return os.fspath(path)


def run_traced(path: str | os.PathLike, x: np.ndarray) -> np.ndarray:
    """Run a dumped .mge artifact on an NCHW float32 input with GraphInference."""
    from megengine.utils.comp_graph_tools import GraphInference

    with open(os.fspath(path), "rb") as f:
        graph = GraphInference(f)
    out = graph.run(inp_dict={INPUT_NAME: np.ascontiguousarray(x, np.float32)})
    if OUTPUT_NAME in out:
        return np.asarray(out[OUTPUT_NAME], np.float32)
    return np.asarray(next(iter(out.values())), np.float32)


__all__ = ["export_traced", "run_traced"]
