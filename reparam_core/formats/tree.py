"""Nested checkpoint objects -> flat states: what every reader does after decoding its file.

A checkpoint decodes to nested dicts of arrays, often wrapped (`{"state_dict": ...}`) and, from
DataParallel/DDP, with every key prefixed `module.`. `unwrap` removes the wrappers,
`flatten_arrays` joins the nesting into dotted keys (and refuses anything that is not a numeric
array), `strip_module_prefix` drops the prefix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import CheckpointError

State = dict[str, np.ndarray]

_MAX_DEPTH = 32
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "net", "params")


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The whole file; CheckpointError naming the file when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read {os.fspath(path)}: {e.strerror or e}") from None


def flatten_arrays(obj: Any, source: str, prefix: str = "", _depth: int = 0) -> State:
    """A nested dict of arrays -> flat dotted keys; CheckpointError on any non-array leaf
    (other than the metadata that training scripts store next to weights, which is dropped),
    on arrays of non-numeric dtypes (object, structured) and on nesting deeper than 32."""
    if _depth > _MAX_DEPTH:
        raise CheckpointError(f"{source}: dicts nested more than {_MAX_DEPTH} deep at {prefix[:80]}")
    out: State = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, (Mapping, np.ndarray)):
                out.update(flatten_arrays(v, source, key, _depth + 1))
            elif isinstance(v, (np.generic, float, int)) and key.endswith("num_batches_tracked"):
                continue
            elif v is None:
                continue
            else:
                raise CheckpointError(f"{source}: {key[:200]} is a {type(v).__name__}, not a tensor")
        return out
    if isinstance(obj, np.ndarray):
        dt = obj.dtype
        if dt.hasobject or dt.fields is not None or dt.kind not in "biufc":
            raise CheckpointError(f"{source}: {prefix[:200]} has dtype {dt}, not a numeric tensor")
        return {prefix: obj}
    raise CheckpointError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")


def unwrap(obj: Any, source: str) -> Mapping[str, Any]:
    """Remove `{"state_dict": ...}`-style wrappers (training checkpoints keep optimizer state,
    epochs, ... next to the weights: those are dropped)."""
    for _ in range(3):
        if isinstance(obj, Mapping):
            inner = next((obj[w] for w in _WRAPPERS if isinstance(obj.get(w), Mapping)), None)
            if inner is not None and not any(isinstance(v, np.ndarray) for v in obj.values()):
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def strip_module_prefix(state: State) -> State:
    """Drop the `module.` prefix DataParallel/DDP adds to every key (only when all keys have it)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


__all__ = ["State", "read_bytes", "flatten_arrays", "unwrap", "strip_module_prefix"]
