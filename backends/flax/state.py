"""Native NNX state <-> neutral state, driven by reparam_core.blocks.schema and reparam_core.weights.layouts,
and the load of the core's fused state into a deploy-form module.

A module's native tensors are its nnx.Param and nnx.BatchStat variables; the NNX state path of
each, joined with ".", equals reparam_core.weights.layouts.flax_key(canonical_key, info) (containers are
nnx.Dict, whose keys appear as path entries). Reads go through reparam_core.weights.layouts.from_flax;
writes copy a canonical tensor into the canonical-layout view of a fresh Flax-layout buffer
(`_canonical_view`, the view form of layouts.to_flax), one blockwise pass per tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.typing import PathParts

from reparam_core import CheckpointError, ReparamError, ShapeMismatchError, check_state
from reparam_core.blocks.fuse import iter_deploy_state
from reparam_core.blocks.nodes import Block, Description, Model, SpecLike
from reparam_core.blocks.schema import Schema, TensorInfo, schema_for, schema_of
from reparam_core.weights.layouts import flax_key, from_flax

if TYPE_CHECKING:  # blocks imports this module
    from .blocks import RepModule


def _path_key(path: PathParts) -> str:
    return ".".join(str(p) for p in path)


def graph_parts(module: nnx.Module) -> tuple[dict[str, nnx.Variable[Any]], dict[str, nnx.Module]]:
    """Every variable and every module below `module` by joined path, in one traversal."""
    vs: dict[str, nnx.Variable[Any]] = {}
    mods: dict[str, nnx.Module] = {}
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Variable):
            vs[_path_key(path)] = node
        elif isinstance(node, nnx.Module):
            mods[_path_key(path)] = node
    return vs, mods


def variables(module: nnx.Module, types: tuple[type, ...] = (nnx.Param, nnx.BatchStat)) -> dict[str, nnx.Variable[Any]]:
    """The live variables of `module` of the given types by joined path (Flax keys)."""
    return {k: v for k, v in graph_parts(module)[0].items() if isinstance(v, types)}


def other_variables(module: nnx.Module) -> dict[str, nnx.Variable[Any]]:
    """Every variable that is neither a Param nor a BatchStat (e.g. dropout RNG streams)."""
    return {k: v for k, v in graph_parts(module)[0].items() if not isinstance(v, (nnx.Param, nnx.BatchStat))}


def fill_abstract_other_variables(module: nnx.Module, seed: int = 0) -> None:
    """Give concrete values to abstract (nnx.eval_shape) variables that are neither Params nor
    BatchStats: RNG stream keys get jax.random.key(seed + i), counters and the rest zeros."""
    for i, var in enumerate(other_variables(module).values()):
        val = var.get_value()
        if not isinstance(val, jax.ShapeDtypeStruct):
            continue
        if jnp.issubdtype(val.dtype, jax.dtypes.prng_key):
            var.set_value(jax.random.key(seed + i))
        else:
            var.set_value(jnp.zeros(val.shape, val.dtype))


def description(module: nnx.Module) -> Description:
    """The description a reparam block or model interprets (its `desc`)."""
    desc = vars(module).get("desc")
    if not isinstance(desc, (Model, Block)):
        raise ReparamError(f"expected a reparam flax block or model, got {type(module).__name__}")
    return desc


def module_schema(module: nnx.Module) -> Schema:
    """The canonical schema of a reparam block or model in its own form (block: relative keys)."""
    return schema_of(description(module))


def native_state(module: nnx.Module) -> dict[str, np.ndarray]:
    """Every Param and BatchStat as float32 numpy under its Flax key (native layout, HWIO), in
    the schema's forward order. This is what gets saved (safetensors) natively."""
    vs = variables(module)
    out: dict[str, np.ndarray] = {}
    for key, info in module_schema(module).items():
        fk = flax_key(key, info)
        out[fk] = np.asarray(vs[fk][...], dtype=np.float32)
    return out


def export_state(module: nnx.Module) -> dict[str, np.ndarray]:
    """The neutral state: canonical keys (schema order), OIHW, float32 numpy."""
    vs = variables(module)
    out: dict[str, np.ndarray] = {}
    for key, info in module_schema(module).items():
        a = np.asarray(vs[flax_key(key, info)][...], dtype=np.float32)
        out[key] = from_flax(a, info)
    return out


def _canonical_view(a: np.ndarray, info: TensorInfo) -> np.ndarray:
    """A native tensor as a canonical-layout VIEW (no copy): HWIO kernels as transposed OIHW
    views, linear kernels transposed; the inverse of layouts.to_flax."""
    if info.kind == "conv.weight":
        return np.transpose(a, (3, 2, 0, 1))
    return np.transpose(a) if info.kind == "linear.weight" else a


def load_state(module: RepModule, state: Mapping[str, np.ndarray], *, validate: bool = True) -> RepModule:
    """Load a neutral state (canonical keys, OIHW) into `module` in place and return it.
    `*num_batches_tracked` entries are ignored; the state is validated first (check_state
    against the module's spec) and errors name the offending key. `validate=False` is for
    states this backend produced itself."""
    schema = module_schema(module)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if validate:
        check_state(module.spec, state, "deploy" if module.deploy else "train")
    vs = variables(module)
    for key, info in schema.items():
        var = vs[flax_key(key, info)]
        var.set_value(_native_copy(key, np.asarray(state[key]), info, var.get_value()))
    return module


ALIGN = 64  # bytes: XLA's CPU client adopts host buffers aligned like this without a copy
TILE = (64, 64)  # a layout-changing copy goes block by block over the first two axes


def _host_buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised numpy array whose data is ALIGN-byte aligned."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _copy_tiled(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src for equal shapes in different memory layouts (a transpose), in blocks
    that stay in cache."""
    if src.ndim < 2:
        dst[...] = src
        return
    (bi, bj), (n, m) = TILE, src.shape[:2]
    for i in range(0, n, bi):
        for j in range(0, m, bj):
            dst[i : i + bi, j : j + bj] = src[i : i + bi, j : j + bj]


def _native_copy(
    key: str, canonical: np.ndarray, info: TensorInfo, like: jax.ShapeDtypeStruct | jax.Array
) -> jax.Array:
    """A fresh jax array of `like`'s (Flax layout) shape and dtype holding the canonical tensor
    `key`: written once, through its canonical view, into an aligned host buffer of its own,
    which jax adopts without a copy on CPU (and copies to an accelerator). Nothing is shared
    with `canonical`."""
    native = _host_buffer(tuple(like.shape), np.dtype(like.dtype))
    view = _canonical_view(native, info)
    if canonical.shape != view.shape:
        raise ShapeMismatchError(f"{key} has shape {canonical.shape}; this module needs {view.shape}")
    _copy_tiled(view, canonical)
    return jax.device_put(native, may_alias=True)


def load_fused_state(
    spec: SpecLike, train: Mapping[str, nnx.Variable[Any]], deploy: Mapping[str, nnx.Variable[Any]]
) -> None:
    """Fill the deploy-form variables `deploy` (by Flax key, abstract) with the core's deploy
    state (reparam_core.blocks.fuse.iter_deploy_state, streamed) of the train-form variables `train`
    of `spec`, with no layout transpose on the fused path: the core reads every tensor as a
    canonical-layout VIEW of its Flax array (HWIO kernels as transposed OIHW views) and writes
    each fused kernel straight into an aligned HWIO buffer of its own (handed to it as an OIHW
    view), which jax adopts without a copy; passed-through tensors and the weight of a fused
    Linear (which the core computes in its own (O, I) array) are copied once into buffers of
    their own. No storage is shared with `train`."""
    train_schema, deploy_schema = schema_for(spec, "train"), schema_for(spec, "deploy")
    allocated: list[tuple[np.ndarray, np.ndarray]] = []  # (OIHW view, its HWIO buffer)

    def get(key: str) -> np.ndarray:
        info = train_schema[key]
        return _canonical_view(np.asarray(train[flax_key(key, info)].get_value()), info)

    def empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        native = _host_buffer((shape[2], shape[3], shape[1], shape[0]), np.dtype(dtype))
        view = np.transpose(native, (3, 2, 0, 1))
        allocated.append((view, native))
        return view

    for key, a in iter_deploy_state(spec, get, empty=empty):
        info = deploy_schema[key]
        var = deploy[flax_key(key, info)]
        own = next((i for i, (view, _) in enumerate(allocated) if view is a), None)
        native = allocated.pop(own)[1] if own is not None else None
        if native is not None and native.dtype == var.get_value().dtype:
            var.set_value(jax.device_put(native, may_alias=True))
        else:
            var.set_value(_native_copy(key, a, info, var.get_value()))


def fresh_state(schema: Schema, seed: int) -> dict[str, np.ndarray]:
    """A freshly initialised neutral state: conv/linear weights normal with variance 1 / fan_in
    (Flax's lecun_normal without truncation), biases 0, BN scale 1, shift 0, mean 0, var 1,
    per-channel and layer-norm scales 1, GRN gamma and beta 0 (the official init)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for key, info in schema.items():
        if info.kind in ("conv.weight", "linear.weight"):
            fan_in = int(np.prod(info.shape[1:]))
            a = rng.standard_normal(info.shape, dtype=np.float32) * np.float32(fan_in**-0.5)
        elif info.kind in ("bn.weight", "bn.running_var", "scale.weight", "layernorm.weight"):
            a = np.ones(info.shape, np.float32)
        else:
            a = np.zeros(info.shape, np.float32)
        out[key] = a
    return out


def seed_from(rngs: nnx.Rngs | None) -> int:
    """A numpy seed drawn from the `params` stream of `rngs` (0 when None)."""
    if rngs is None:
        return 0
    key = rngs.params()
    return int(np.asarray(jax.random.key_data(key)).ravel()[-1])


def load_native_state(module: RepModule, native: Mapping[str, np.ndarray]) -> RepModule:
    """Load a state saved by `native_state` (Flax keys, HWIO) into `module` in place."""
    schema = module_schema(module)
    expected = {flax_key(k, info): info for k, info in schema.items()}
    missing = [k for k in expected if k not in native]
    unexpected = [k for k in native if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"native state does not match this {type(module).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    canonical = {k: from_flax(np.asarray(native[flax_key(k, info)]), info) for k, info in schema.items()}
    return load_state(module, canonical)


__all__ = [
    "graph_parts",
    "variables",
    "other_variables",
    "fill_abstract_other_variables",
    "description",
    "module_schema",
    "native_state",
    "export_state",
    "load_state",
    "load_fused_state",
    "fresh_state",
    "seed_from",
    "load_native_state",
]
