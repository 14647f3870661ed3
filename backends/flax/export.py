"""Deployment: the jitted deploy-form forward serialized with jax.export (StableHLO).

The artifact takes an NCHW float32 input of the exported shape (NHWC inside) and embeds the
fused weights as constants, so `load_stablehlo(path)` alone gives a working callable.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .api import inference_view, is_block, reparameterize
from .blocks import RepModule


def export_stablehlo(
    model: RepModule, path: str | os.PathLike[str], input_shape: tuple[int, ...] = (1, 3, 224, 224)
) -> str:
    """Write the deploy form of `model` (reparameterized first when given a train-form model;
    the input is left untouched) in inference mode to `path` as a serialized jax.export artifact
    with an NCHW float32 input signature. Returns the path."""
    deploy = inference_view(reparameterize(model))
    graphdef, state = nnx.split(deploy)
    block = is_block(deploy)

    def forward(x: jax.Array) -> jax.Array:
        m = nnx.merge(graphdef, state)
        y = m(jnp.transpose(x, (0, 2, 3, 1)))
        return jnp.transpose(y, (0, 3, 1, 2)) if block else y

    exported = jax.export.export(jax.jit(forward))(jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    with open(path, "wb") as f:
        f.write(exported.serialize())
    return os.fspath(path)


def load_stablehlo(path: str | os.PathLike[str]) -> Callable[[np.ndarray], np.ndarray]:
    """A callable NCHW float32 numpy -> numpy from an artifact written by export_stablehlo."""
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))

    def call(x: np.ndarray) -> np.ndarray:
        return np.asarray(exported.call(jnp.asarray(np.asarray(x, np.float32))))

    call.exported = exported  # type: ignore[attr-defined]
    return call


__all__ = ["export_stablehlo", "load_stablehlo"]
