"""The backend surface shared by every framework: reparameterize, neutral state in/out, predict."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reparam_core import ReparamError, ShapeMismatchError
from reparam_core.blocks.nodes import Model

from .blocks import RepModule, SegmentFn
from .state import export_state, load_native_state, load_state, native_state


def _rep_module(module: object) -> RepModule:
    if not isinstance(module, RepModule):
        raise ReparamError(f"expected a reparam flax block or model, got {type(module).__name__}")
    return module


def reparameterize(module: RepModule) -> RepModule:
    """The deploy form of a block or model (the same module if already deploy form).

    The deploy form is always a NEW module built abstractly and filled with fresh arrays, so the
    input is never modified (NNX arrays are immutable; nothing is shared that a later update of
    one module could change in the other); drop the train-form reference yourself to free its
    memory."""
    return _rep_module(module).reparameterize()


def inference_view(module: RepModule) -> RepModule:
    """A view of `module` in inference mode (BN running statistics, dropout off) sharing its
    variables; the module's own mode is untouched."""
    return nnx.view(module, use_running_average=True, deterministic=True, raise_if_not_found=False)


def is_block(module: RepModule) -> bool:
    """Whether the module is a block (NCHW out of predict) rather than a model (logits)."""
    return not isinstance(module.desc, Model)


@nnx.jit(static_argnums=0)
def _apply(fn: SegmentFn, mods: Any, x: jax.Array) -> jax.Array:
    return fn(mods, x)


def _forward_nhwc(module: RepModule, x: jnp.ndarray) -> jnp.ndarray:
    """The module's forward with every segment (top-level block or run of plain layers) jitted
    on its own: identical blocks share a compilation, which keeps XLA compile time small for
    deep models."""
    for fn, mods in module.segments():
        x = _apply(fn, mods, x)
    return x


def predict(module: RepModule, x: np.ndarray) -> np.ndarray:
    """Inference (BN running statistics, no dropout, no grad) on an NCHW float32 numpy input;
    returns numpy (NCHW for blocks, (N, classes) logits for models). NHWC inside; the forward
    runs under nnx.jit one segment (top-level block or run of plain layers) at a time: one
    compile per distinct segment and input shape, far faster on CPU than op-by-op eager dispatch (which compiles
    every distinct primitive shape) or one whole-model compile."""
    module = _rep_module(module)
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise ShapeMismatchError(f"predict expects an NCHW input, got shape {x.shape}")
    y = _forward_nhwc(inference_view(module), jnp.transpose(jnp.asarray(x), (0, 2, 3, 1)))
    if is_block(module):
        y = jnp.transpose(y, (0, 3, 1, 2))
    return np.asarray(y, dtype=np.float32)


__all__ = [
    "reparameterize",
    "load_state",
    "export_state",
    "predict",
    "native_state",
    "load_native_state",
    "inference_view",
    "is_block",
]
