"""Native NNX state <-> neutral state, driven by reparam_core.schema and reparam_core.layouts.

A module's native tensors are its nnx.Param and nnx.BatchStat variables; the NNX state path of
each, joined with ".", equals reparam_core.layouts.flax_key(canonical_key, info) (numbered
children live in nnx.List, whose items appear as integer path entries). Every layout conversion
goes through reparam_core.layouts.to_flax / from_flax.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reparam_core import (CheckpointError, RepBlockSpec, RepGhostBottleneckSpec,
                          RepGhostModuleSpec, RepGhostNetSpec, ReparamError, RepVGGSpec,
                          check_state)
from reparam_core.layouts import flax_key, from_flax, to_flax
from reparam_core.schema import (Schema, bottleneck_schema, ghost_module_schema, repblock_schema,
                                 state_schema)


def _path_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def variables(module: nnx.Module, types: tuple[type, ...] = (nnx.Param, nnx.BatchStat)
              ) -> dict[str, nnx.Variable]:
    """The live variables of `module` of the given types by joined path (Flax keys)."""
    out: dict[str, nnx.Variable] = {}
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Variable) and isinstance(node, types):
            out[_path_key(path)] = node
    return out


def other_variables(module: nnx.Module) -> dict[str, nnx.Variable]:
    """Every variable that is neither a Param nor a BatchStat (e.g. dropout RNG streams)."""
    return {k: v for k, v in variables(module, (nnx.Variable,)).items()
            if not isinstance(v, (nnx.Param, nnx.BatchStat))}


def fill_abstract_other_variables(module: nnx.Module, seed: int = 0) -> None:
    """Give concrete values to abstract (nnx.eval_shape) variables that are neither Params nor
    BatchStats: RNG stream keys get jax.random.key(seed + i), counters and the rest zeros."""
    for i, var in enumerate(other_variables(module).values()):
        val = var.get_value()
        if not isinstance(val, jax.ShapeDtypeStruct):
            continue
        if jax.dtypes.issubdtype(val.dtype, jax.dtypes.prng_key):
            var.set_value(jax.random.key(seed + i))
        else:
            var.set_value(jnp.zeros(val.shape, val.dtype))


def module_schema(module: nnx.Module) -> Schema:
    """The canonical schema of a reparam block or model in its own form (block: relative keys)."""
    spec = getattr(module, "spec", None)
    form = "deploy" if module.deploy else "train"
    if isinstance(spec, (RepVGGSpec, RepGhostNetSpec)):
        return state_schema(spec, form)
    if isinstance(spec, RepBlockSpec):
        return repblock_schema(spec, "", form)
    if isinstance(spec, RepGhostModuleSpec):
        return ghost_module_schema(spec, "", form)
    if isinstance(spec, RepGhostBottleneckSpec):
        return bottleneck_schema(spec, "", form)
    raise ReparamError(f"expected a reparam flax block or model, got {type(module).__name__}")


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


def load_state(module: nnx.Module, state: Mapping[str, np.ndarray], *,
               validate: bool = True) -> nnx.Module:
    """Load a neutral state (canonical keys, OIHW) into `module` in place and return it.
    `*num_batches_tracked` entries are ignored; the state is validated first (check_state for
    models, the block schema for blocks) and errors name the offending key. `validate=False`
    is for states this backend produced itself (reparameterize)."""
    schema = module_schema(module)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if validate:
        check_state(module.spec, state, "deploy" if module.deploy else "train")
    vs = variables(module)
    for key, info in schema.items():
        vs[flax_key(key, info)].set_value(
            jnp.asarray(to_flax(np.asarray(state[key], dtype=np.float32), info)))
    return module


def fresh_state(schema: Schema, seed: int) -> dict[str, np.ndarray]:
    """A freshly initialised neutral state: conv/linear weights normal with variance 1 / fan_in
    (Flax's lecun_normal without truncation), biases 0, BN scale 1, shift 0, mean 0, var 1."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for key, info in schema.items():
        if info.kind in ("conv.weight", "linear.weight"):
            fan_in = int(np.prod(info.shape[1:]))
            a = rng.standard_normal(info.shape, dtype=np.float32) * np.float32(fan_in ** -0.5)
        elif info.kind in ("bn.weight", "bn.running_var"):
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


def load_native_state(module: nnx.Module, native: Mapping[str, np.ndarray]) -> nnx.Module:
    """Load a state saved by `native_state` (Flax keys, HWIO) into `module` in place."""
    schema = module_schema(module)
    expected = {flax_key(k, info): info for k, info in schema.items()}
    missing = [k for k in expected if k not in native]
    unexpected = [k for k in native if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"native state does not match this {type(module).__name__}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    canonical = {k: from_flax(np.asarray(native[flax_key(k, info)]), info)
                 for k, info in schema.items()}
    return load_state(module, canonical)


__all__ = ["variables", "other_variables", "fill_abstract_other_variables", "module_schema", "native_state", "export_state",
           "load_state", "load_native_state", "fresh_state", "seed_from"]
