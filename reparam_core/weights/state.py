"""The neutral state: a flat dict of float32 numpy arrays in canonical naming and OIHW layout.

Here: checking a state against a spec (keys, shapes, finiteness, BN variance) with errors that
name what is wrong, and making random states with non-trivial BN statistics for tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from ..blocks.schema import FORMS, Form, TensorInfo, detect_form, schema_for, spec_name
from ..errors import CheckpointError, ShapeMismatchError, SpecError

State = dict[str, np.ndarray]


def strip_ignored(state: Mapping[str, np.ndarray]) -> State:
    """Drop `num_batches_tracked` entries (present in torch checkpoints, meaningless here)."""
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _first(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_state(
    spec: object,
    state: Mapping[str, np.ndarray],
    form: Form | None = None,
    source: str = "state",
    names: Callable[[str], str] | None = None,
) -> Form:
    """Validate a neutral state for a model (or, with a block spec, block-relative keys);
    returns its form. Raises CheckpointError (or ShapeMismatchError) naming the source, the
    form and the first offending keys, each spelled by `names` (canonical key -> the name the
    source uses, e.g. reparam_core.weights.keymaps.KeyNames for a file in another naming scheme;
    default: the canonical name)."""
    spell = names or str
    state = strip_ignored(state)
    name = spec_name(spec)
    found = detect_form(spec, state, spell, source)
    if form is None:
        form = found
    elif form != found and set(state) == set(schema_for(spec, found)) != set(schema_for(spec, form)):
        raise CheckpointError(
            f"{source}: this is a {found}-form checkpoint of {name}, "
            f"but a {form}-form one was expected (its keys are all {found}-form keys)"
        )
    schema = schema_for(spec, form)
    missing = [spell(k) for k in schema if k not in state]
    unexpected = [spell(k) for k in state if k not in schema]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
        raise CheckpointError(f"{source} does not match {name} ({form} form): " + "; ".join(parts))
    wrong = [
        f"{spell(k)} {tuple(np.shape(state[k]))} != {info.shape}"
        for k, info in schema.items()
        if tuple(np.shape(state[k])) != info.shape
    ]
    if wrong:
        raise ShapeMismatchError(
            f"{source}: {len(wrong)} tensor(s) have the wrong shape for {name} ({form} form): {_first(wrong, 3)}"
        )
    for k, info in schema.items():
        a = np.asarray(state[k])
        if not np.issubdtype(a.dtype, np.floating):
            raise CheckpointError(f"{source}: {spell(k)} has dtype {a.dtype}, expected a float tensor")
        if not np.all(np.isfinite(a)):
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise CheckpointError(f"{source}: {spell(k)} holds {bad} NaN or Inf value(s)")
        if info.kind == "bn.running_var" and np.any(a < 0):
            i = int(np.flatnonzero(a < 0)[0])
            raise CheckpointError(
                f"{source}: {spell(k)} is negative at channel {i} ({float(a[i])!r}); a variance cannot be negative"
            )
    return form


def random_state(spec: object, form: Form = "train", seed: int = 0, dtype: type = np.float32) -> State:
    """Random weights with non-trivial BN statistics (gamma, beta, mean, var all far from their
    defaults), scaled so that activations stay O(1) through deep models. A block spec gives the
    block's relative keys."""
    if form not in FORMS:
        raise SpecError(f"form must be 'train' or 'deploy', got {form!r}")
    return random_tensors(schema_for(spec, form), seed, dtype)


def random_tensors(schema: Mapping[str, TensorInfo], seed: int = 0, dtype: type = np.float32) -> State:
    """Random tensors for any schema (see random_state), in schema order."""
    rng = np.random.default_rng(seed)
    return {key: _random_tensor(rng, info).astype(dtype) for key, info in schema.items()}


def _random_tensor(rng: np.random.Generator, info: TensorInfo) -> np.ndarray:
    shape = info.shape
    if info.kind in ("conv.weight", "linear.weight"):
        fan_in = math.prod(shape[1:])
        return rng.normal(0.0, math.sqrt(1.0 / fan_in), shape)
    if info.kind in ("bn.weight", "scale.weight", "layernorm.weight"):
        return rng.uniform(0.4, 1.2, shape)
    if info.kind == "bn.running_var":
        return rng.uniform(0.5, 2.0, shape)
    if info.kind == "bn.running_mean":
        return rng.normal(0.0, 0.2, shape)
    return rng.normal(0.0, 0.1, shape)  # biases
