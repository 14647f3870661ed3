"""Export the deploy form as a traced MegEngine graph (.mge) and run such an artifact."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .blocks import RepModule
from .layers import Tensor, mge
from .profiling import fastrun as _fastrun
from .profiling import profile_graph

INPUT_NAME = "data"
OUTPUT_NAME = "output"


def export_traced(model: RepModule, path: str | os.PathLike[str], input_shape: Sequence[int] = (1, 3, 224, 224)) -> str:
    """Trace the DEPLOY form of `model` (reparameterized first if needed; the input is not
    modified) with jit.trace(symbolic=True, capture_as_const=True) and dump it to `path`.
    Input var `data`, output var `output`. Returns the path."""
    from megengine.jit import trace

    deploy = model if model.deploy else model.reparameterize()
    was_training = deploy.training
    deploy.eval()
    try:

        @trace(symbolic=True, capture_as_const=True)
        def infer(data: Tensor) -> Tensor:
            return deploy(data)

        infer(mge.tensor(np.zeros(tuple(input_shape), np.float32)))
        infer.dump(os.fspath(path), arg_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    finally:
        deploy.train(was_training)
    return os.fspath(path)


class TracedGraph:
    """A dumped .mge artifact loaded and compiled once (MegEngine's GraphInference steps), with
    every operator's algorithm strategy set to PROFILE first when `fastrun` (the profiling then
    happens on the first `run` of each input shape; the choices persist across processes, see
    backends.megengine.profiling)."""

    def __init__(self, path: str | os.PathLike[str], *, fastrun: bool = False) -> None:
        from megengine.core.tensor import megbrain_graph as G
        from megengine.utils.comp_graph_tools import convert_inputs, convert_outputs

        with open(os.fspath(path), "rb") as f:
            loaded = G.load_graph(f)
        outputs = loaded.output_vars_list
        if fastrun:
            profile_graph(outputs)
        outputs, self._inputs = convert_inputs(outputs)
        outputs, self._outputs = convert_outputs(outputs)
        self._func = loaded.graph.compile(outputs)
        self.fastrun = fastrun

    def run(self, x: np.ndarray) -> np.ndarray:
        """The artifact's output on an NCHW float32 input."""
        node = self._inputs[INPUT_NAME]
        node.set_value(mge.Tensor(np.ascontiguousarray(x, np.float32), device=node.device)._dev_tensor())
        with _fastrun(self.fastrun):  # flushes the profiled choices to the persistent cache
            self._func.execute()
            self._func.wait()
        out = {k: v.get_value().numpy() for k, v in self._outputs.items()}
        return np.asarray(out.get(OUTPUT_NAME, next(iter(out.values()))), np.float32)


def run_traced(path: str | os.PathLike[str], x: np.ndarray, *, fastrun: bool = False) -> np.ndarray:
    """Run a dumped .mge artifact on an NCHW float32 input (`fastrun`: see TracedGraph)."""
    return TracedGraph(path, fastrun=fastrun).run(x)


__all__ = ["export_traced", "run_traced", "TracedGraph"]
