"""The backend surface shared by every framework: reparameterize, neutral state in/out, predict."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from reparam_core import ReparamError, ShapeMismatchError, check_state

from .blocks import RepModule, numpy_state


def _rep_module(module: nn.Module) -> RepModule:
    if not isinstance(module, RepModule):
        raise ReparamError(f"expected a reparam torch block or model, got {type(module).__name__}")
    return module


def reparameterize(module: RepModule) -> RepModule:
    """The deploy form of a block or model (the same module if already deploy form).

    Conversion always builds a NEW module (a module's form is fixed at construction) whose
    tensors are copies, and never modifies the input (drop the train-form reference yourself to
    free its memory)."""
    return _rep_module(module).reparameterize()


def load_state(module: RepModule, state: Mapping[str, np.ndarray]) -> RepModule:
    """Load a neutral state (canonical keys, OIHW, float) into `module` in place and return it.

    `*num_batches_tracked` entries are ignored. The state is validated first (reparam_core's
    check_state for models, the block schema for blocks): CheckpointError / ShapeMismatchError
    name the offending key."""
    module = _rep_module(module)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    check_state(module.spec, state, "deploy" if module.deploy else "train")
    target = module.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            target[k].copy_(torch.from_numpy(np.asarray(v, dtype=np.float32)))
    return module


def export_state(module: RepModule) -> dict[str, np.ndarray]:
    """The module's neutral state: canonical keys, OIHW layout, float32 numpy, no
    `num_batches_tracked`."""
    return numpy_state(_rep_module(module))


def predict(module: RepModule, x: np.ndarray) -> np.ndarray:
    """Inference (BN running statistics, no dropout, no grad) on an NCHW float32 numpy input;
    returns numpy (NCHW for blocks, (N, classes) logits for models). The module's train/eval
    mode is restored afterwards."""
    module = _rep_module(module)
    if np.ndim(x) != 4:
        raise ShapeMismatchError(f"predict expects an NCHW input, got shape {np.shape(x)}")
    ref = next(module.parameters())
    was_training = module.training
    module.eval()
    y: torch.Tensor
    try:
        with torch.inference_mode():
            y = module(torch.as_tensor(np.asarray(x, np.float32), device=ref.device, dtype=ref.dtype))
    finally:
        module.train(was_training)
    return y.detach().cpu().float().numpy()
