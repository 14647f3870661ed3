"""Deployment: the deploy form of a model as an ONNX graph (one conv per re-parameterized block)."""

from __future__ import annotations

import os
import warnings

import torch

from .api import reparameterize
from .blocks import RepModule


def export_onnx(
    model: RepModule,
    path: str | os.PathLike[str],
    input_shape: tuple[int, ...] = (1, 3, 224, 224),
    opset: int = 17,
    dynamic_batch: bool = False,
) -> str:
    """Write the deploy form of `model` (reparameterized first when given a train-form model; the
    input is left untouched) to `path` as ONNX with the TorchScript exporter, in inference mode.
    The graph has no BatchNormalization after a re-parameterized block and no Add of branches.
    With `dynamic_batch` the batch axis of the input and output is symbolic (`N`).
    Returns the path."""
    deploy = reparameterize(model).eval()
    ref = next(deploy.parameters())
    dummy = torch.zeros(input_shape, device=ref.device, dtype=ref.dtype)
    with torch.no_grad(), warnings.catch_warnings():
        # dynamo=False: the TorchScript exporter, deprecated upstream but fully offline and
        # folding the remaining conv+BN pairs (RepGhost primary convs) in inference mode.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            deploy,
            (dummy,),
            os.fspath(path),
            input_names=["input"],
            output_names=["output"],
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
            dynamic_axes={"input": {0: "N"}, "output": {0: "N"}} if dynamic_batch else None,
        )
    return os.fspath(path)
