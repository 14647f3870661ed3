"""Flax checkpoints without Flax: msgpack files, read and written.

A msgpack file is in `flax.serialization` encoding: a nested dict of the NNX state keyed by Flax
keys (HWIO conv kernels, `(in, out)` linear kernels, BN `scale`/`bias`/`mean`/`var`; see
`layouts`), each array an ext type 1 record `(shape, dtype name, C-order bytes)`. The reader
returns flat Flax keys; `read.to_neutral(..., fmt="flax")` maps them to canonical ones. (Orbax
directories need orbax, and so JAX: `backends.flax.orbax_io.read_orbax` reads them.)

msgpack (pure Python) is imported on first use; a missing one raises BackendUnavailableError.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..blocks.schema import Form, state_schema
from ..errors import BackendUnavailableError, CheckpointError
from ..families.specs import ModelSpec
from ..weights.layouts import flax_key, to_flax
from .tree import State, flatten_arrays, read_bytes, unwrap

_MSGPACK_NDARRAY = 1  # flax.serialization's ext type code for numpy arrays
_FLAX_DTYPES = {"float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"}


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError:
        raise BackendUnavailableError(
            "the flax (msgpack) format needs the msgpack package; use the .venv environment or `pip install msgpack`"
        ) from None
    return msgpack


def flax_msgpack_bytes(spec: ModelSpec, state: Mapping[str, np.ndarray], form: Form) -> bytes:
    """The neutral state as a Flax msgpack file (nested NNX-state dict, Flax layouts; float16
    tensors stay float16, others are written as float32)."""
    msgpack = _msgpack()
    tree: dict[str, Any] = {}
    for key, info in state_schema(spec, form).items():
        a = np.asarray(state[key])
        arr = np.ascontiguousarray(to_flax(a if a.dtype == np.float16 else a.astype(np.float32, copy=False), info))
        node = tree
        *parents, leaf = flax_key(key, info).split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = arr

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            payload = msgpack.packb((list(obj.shape), obj.dtype.name, obj.tobytes("C")), use_bin_type=True)
            return msgpack.ExtType(_MSGPACK_NDARRAY, payload)
        raise CheckpointError(f"cannot write a {type(obj).__name__} into a Flax msgpack file")

    data: bytes = msgpack.packb(tree, default=default, use_bin_type=True)
    return data


def read_flax_msgpack(path: str) -> State:
    """A Flax msgpack file -> flat state in Flax keys and layouts. Array records are checked
    (dtype in a fixed list, at most 32 dims, byte count = prod(shape) * itemsize) before use."""
    msgpack = _msgpack()
    data = read_bytes(path)

    def ext_hook(code: int, payload: bytes) -> Any:
        if code != _MSGPACK_NDARRAY:
            raise CheckpointError(f"{path}: unsupported msgpack extension type {code}")
        rec = msgpack.unpackb(payload, raw=False)
        if not (
            isinstance(rec, (list, tuple))
            and len(rec) == 3
            and isinstance(rec[0], (list, tuple))
            and isinstance(rec[1], str)
            and isinstance(rec[2], bytes)
        ):
            raise CheckpointError(f"{path}: malformed array record")
        shape, dtype, raw = rec
        if dtype not in _FLAX_DTYPES:
            raise CheckpointError(f"{path}: unsupported array dtype {dtype[:20]!r}")
        if len(shape) > 32 or not all(type(n) is int and 0 <= n < 2**40 for n in shape):
            raise CheckpointError(f"{path}: malformed array shape {str(shape)[:80]}")
        dt = np.dtype(dtype)
        if len(raw) != math.prod(shape) * dt.itemsize:
            raise CheckpointError(f"{path}: array of shape {list(shape)} ({dtype}) has {len(raw)} bytes")
        return np.frombuffer(raw, dt).reshape(shape).copy()

    try:
        tree = msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except CheckpointError:
        raise
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        if isinstance(e, MemoryError):
            raise CheckpointError(f"{path}: msgpack file declares more data than memory allows") from None
        raise CheckpointError(
            f"{path}: corrupt or truncated msgpack file ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    return strip_value_leaves(flatten_arrays(unwrap(tree, path), path))


def strip_value_leaves(state: State) -> State:
    """NNX states saved as pure dicts may end every path in `.value`; drop it."""
    if state and all(k.endswith(".value") for k in state):
        return {k[: -len(".value")]: v for k, v in state.items()}
    return state


__all__ = ["flax_msgpack_bytes", "read_flax_msgpack", "strip_value_leaves"]
