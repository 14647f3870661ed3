"""Orbax checkpoint directories as input: restored with orbax (and so JAX), then handed to the
core as a flat state in Flax keys, like a Flax msgpack file. `reparam convert` passes
`read_orbax` to `reparam_core.formats.read_raw` (the core itself imports no framework)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from reparam_core.errors import BackendUnavailableError, CheckpointError
from reparam_core.formats.flax_msgpack import strip_value_leaves
from reparam_core.formats.tree import State, flatten_arrays, unwrap


def _as_numpy_tree(obj: Any) -> Any:
    """Nested dicts of numpy arrays; list/tuple nodes keyed by their index."""
    if isinstance(obj, Mapping):
        return {str(k): _as_numpy_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return {str(i): _as_numpy_tree(v) for i, v in enumerate(obj)}
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return np.asarray(obj)
    return obj


def read_orbax(path: str) -> State:
    """An orbax checkpoint directory holding a plain pytree of arrays -> flat state in Flax keys.

    Raises BackendUnavailableError without orbax-checkpoint, CheckpointError when the directory
    does not restore."""
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise BackendUnavailableError(
            "reading an orbax checkpoint directory needs orbax-checkpoint (the .venv environment)"
        ) from None
    try:
        tree = ocp.PyTreeCheckpointer().restore(os.path.abspath(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable orbax checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    return strip_value_leaves(flatten_arrays(unwrap(_as_numpy_tree(tree), path), path))


__all__ = ["read_orbax"]
