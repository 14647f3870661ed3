"""The backend surface shared by every framework: reparameterize, neutral state in/out, predict."""
from __future__ import annotations

import copy
from typing import Mapping

import numpy as np
import torch
from torch import nn

from reparam_core import (CheckpointError, RepBlockSpec, RepGhostBottleneckSpec,
                          RepGhostModuleSpec, RepGhostNetSpec, ReparamError, RepVGGSpec,
                          ShapeMismatchError, check_state)
from reparam_core.schema import Schema, bottleneck_schema, ghost_module_schema, repblock_schema

from .blocks import RepModule, numpy_state


def _rep_module(module: nn.Module) -> RepModule:
    if not isinstance(module, RepModule):
        raise ReparamError(f"expected a reparam torch block or model, got {type(module).__name__}")
    return module


def reparameterize(module: RepModule, *, inplace: bool = False) -> RepModule:
    """The deploy form of a block or model (the same module if already deploy form).

    The input is never modified: `inplace=False` (the default) works on a deep copy, which
    guarantees that even later edits to the result cannot reach the input's tensors;
    `inplace=True` skips that copy. The result is always a new module (module forms are fixed at
    construction), so with `inplace=True` drop the reference to the train-form input to free it.
    """
    module = _rep_module(module)
    if not inplace and not module.deploy:
        module = copy.deepcopy(module)
    return module.reparameterize()


def _block_schema(spec: object, form: str) -> Schema:
    if isinstance(spec, RepBlockSpec):
        return repblock_schema(spec, "", form)
    if isinstance(spec, RepGhostModuleSpec):
        return ghost_module_schema(spec, "", form)
    if isinstance(spec, RepGhostBottleneckSpec):
        return bottleneck_schema(spec, "", form)
    raise ReparamError(f"no schema for {type(spec).__name__}")


def _check_block_state(module: RepModule, state: Mapping[str, np.ndarray]) -> None:
    form = "deploy" if module.deploy else "train"
    schema = _block_schema(module.spec, form)
    name = type(module).__name__
    missing = [k for k in schema if k not in state]
    unexpected = [k for k in state if k not in schema]
    if missing or unexpected:
        raise CheckpointError(f"state does not match this {name} ({form} form): missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
    for k, info in schema.items():
        if tuple(np.shape(state[k])) != info.shape:
            raise ShapeMismatchError(f"{k}: shape {tuple(np.shape(state[k]))} != {info.shape} "
                                     f"expected by this {name} ({form} form)")


def load_state(module: RepModule, state: Mapping[str, np.ndarray]) -> RepModule:
    """Load a neutral state (canonical keys, OIHW, float) into `module` in place and return it.

    `*num_batches_tracked` entries are ignored. The state is validated first (reparam_core's
    check_state for models, the block schema for blocks): CheckpointError / ShapeMismatchError
    name the offending key."""
    module = _rep_module(module)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if isinstance(module.spec, (RepVGGSpec, RepGhostNetSpec)):
        check_state(module.spec, state, "deploy" if module.deploy else "train")
    else:
        _check_block_state(module, state)
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
    ref = next(module.parameters())
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            y = module(torch.as_tensor(np.asarray(x, np.float32), device=ref.device,
                                       dtype=ref.dtype))
    finally:
        module.train(was_training)
    return y.detach().cpu().float().numpy()
