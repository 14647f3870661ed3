"""Deployment: the jitted deploy-form forward serialized with jax.export (StableHLO).

The artifact is one safetensors file: the serialized jax.export module (tensor `module`, bytes),
whose arguments are the fused weights and an NCHW float32 input of the exported shape (NHWC
inside), and the weights themselves (one tensor each, named by their path in the deploy model;
metadata `weights`: their order as arguments; random-number state, such as an unused dropout key,
stays in the module). `load_stablehlo(path)` alone gives a working callable. The weights are
arguments rather than constants of the module: constants would exist at once as MLIR attributes,
serialized bytes and the compiled program's copy (issue 28).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reparam_core.errors import CheckpointError
from reparam_core.formats.safetensors_io import load_file, save_file

from .api import inference_view, is_block, reparameterize
from .blocks import RepModule

FORMAT = "reparam-stablehlo"
MODULE = "module"  # the tensor holding the serialized module; weights are named by path


def _weights(state: nnx.State) -> tuple[list[str], list[jax.Array], jax.tree_util.PyTreeDef]:
    """The state's leaves in argument order, named by their path (`linear.kernel.value`)."""
    with_path, tree = jax.tree_util.tree_flatten_with_path(state)
    names = [jax.tree_util.keystr(path, simple=True, separator=".") for path, _ in with_path]
    if MODULE in names or len(set(names)) != len(names):
        raise CheckpointError(f"cannot name the deploy model's weights uniquely: {names}")
    return names, [leaf for _, leaf in with_path], tree


def export_stablehlo(
    model: RepModule, path: str | os.PathLike[str], input_shape: tuple[int, ...] = (1, 3, 224, 224)
) -> str:
    """Write the deploy form of `model` (reparameterized first when given a train-form model;
    the input is left untouched) in inference mode to `path`: a jax.export artifact with an NCHW
    float32 input signature and its weights (see the module docstring). Returns the path."""
    deploy = inference_view(reparameterize(model))
    graphdef, rngs, *rest = nnx.split(deploy, nnx.RngState, ...)  # dropout keys (unused): constants
    names, leaves, tree = _weights(rest[0])
    block = is_block(deploy)

    def forward(weights: list[jax.Array], x: jax.Array) -> jax.Array:
        m = nnx.merge(graphdef, rngs, jax.tree_util.tree_unflatten(tree, weights))
        y = m(jnp.transpose(x, (0, 2, 3, 1)))
        return jnp.transpose(y, (0, 3, 1, 2)) if block else y

    specs = [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in leaves]
    exported = jax.export.export(jax.jit(forward))(specs, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    tensors = {MODULE: np.frombuffer(exported.serialize(), np.uint8)}
    tensors.update((name, np.asarray(w)) for name, w in zip(names, leaves, strict=True))
    save_file(tensors, path, {"format": FORMAT, "weights": json.dumps(names)})
    return os.fspath(path)


def load_stablehlo(path: str | os.PathLike[str]) -> Callable[[np.ndarray], np.ndarray]:
    """A callable NCHW float32 numpy -> numpy from an artifact written by export_stablehlo (its
    `exported` attribute: the jax.export.Exported, e.g. for `exported.mlir_module()`)."""
    tensors, meta = load_file(path)
    if meta.get("format") != FORMAT or MODULE not in tensors:
        raise CheckpointError(f"{os.fspath(path)}: not a StableHLO artifact of export_stablehlo")
    exported = jax.export.deserialize(bytearray(tensors.pop(MODULE).tobytes()))
    weights = [jnp.asarray(tensors.pop(name)) for name in json.loads(meta["weights"])]

    def call(x: np.ndarray) -> np.ndarray:
        return np.asarray(exported.call(weights, jnp.asarray(np.asarray(x, np.float32))))

    call.exported = exported  # type: ignore[attr-defined]
    return call


__all__ = ["export_stablehlo", "load_stablehlo"]
