"""int8 in PyTorch itself: torchao's PT2E flow with the X86 Inductor quantizer (the successor of
the deprecated torch.ao.quantization) on a deploy-form module.

`pt2e_int8` exports the module with a dynamic batch, inserts observers, calibrates on real
inputs and converts to a graph of quantize/dequantize ops around each conv and linear (int8
weights per output channel, activations per tensor). The result runs eagerly (the quantization's
math in float32) or through `torch.compile`, where Inductor lowers the pairs to int8 kernels;
that compile takes minutes on a small CPU, so nothing here calls it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from reparam_core.errors import BackendUnavailableError

from .api import reparameterize
from .blocks import RepModule


def pt2e_int8(module: RepModule, calib: np.ndarray, batch: int = 16) -> nn.Module:
    """The deploy form of `module` quantized with torchao's PT2E X86 Inductor quantizer,
    calibrated on `calib` (N, C, H, W float32). BackendUnavailableError without torchao."""
    logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA-only extensions, absent here
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as e:
        raise BackendUnavailableError(f"torchao is not installed ({e}); pip install torchao") from None
    deploy = reparameterize(module).eval()
    example = torch.from_numpy(np.ascontiguousarray(calib[:2], np.float32))
    program = torch.export.export(deploy, (example,), dynamic_shapes=({0: torch.export.Dim("N", min=1)},))
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(program.module(), quantizer)
    with torch.no_grad():
        for i in range(0, len(calib), batch):
            prepared(torch.from_numpy(np.ascontiguousarray(calib[i : i + batch], np.float32)))
    quantized: nn.Module = convert_pt2e(prepared)  # torchao is untyped here
    return quantized


def run_batches(module: nn.Module, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """`module` on NCHW `x` in batches, without grad, as numpy."""
    with torch.no_grad():
        return np.concatenate(
            [module(torch.from_numpy(np.ascontiguousarray(x[i : i + batch]))).numpy() for i in range(0, len(x), batch)]
        )


__all__ = ["pt2e_int8", "run_batches"]
