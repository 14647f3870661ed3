"""MegEngine checkpoints without MegEngine: a pickle of a dict of numpy arrays.

MegEngine's `megengine.save(module.state_dict())` pickles numpy arrays in MegEngine shapes: grouped
conv kernels 5-D `(groups, out/groups, in/groups, kh, kw)`, conv biases `(1, C, 1, 1)` (see
`layouts.to_megengine`). Read through the restricted unpickler (`pickle_safe`); written with the
standard pickler (protocol 4, schema order), so the bytes are deterministic.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..blocks.schema import Form, state_schema
from ..families.specs import ModelSpec
from ..weights.layouts import to_megengine
from .pickle_safe import safe_loads
from .torch_zip import is_legacy_torch, legacy_torch_error
from .tree import State, flatten_arrays, read_bytes, strip_module_prefix, unwrap


def read_pickle(path: str | os.PathLike[str]) -> State:
    """A plain pickle of a dict of numpy arrays (MegEngine `.pkl`), via the restricted
    unpickler; a legacy torch pickle is refused with a pointer to the zip format."""
    src = os.fspath(path)
    data = read_bytes(src)
    if is_legacy_torch(data[:32]):
        raise legacy_torch_error(src)
    obj = safe_loads(data, src)
    return strip_module_prefix(flatten_arrays(unwrap(obj, src), src))


def megengine_bytes(
    spec: ModelSpec, state: Mapping[str, np.ndarray], form: Form, rename: Callable[[str], str] = str
) -> bytes:
    """A MegEngine-loadable pickle (dict of float32 numpy arrays in MegEngine shapes, schema
    order, protocol 4), written without MegEngine; keys are `rename(canonical key)`."""
    schema = state_schema(spec, form)

    def as_float(a: Any) -> np.ndarray:  # float16 (a --dtype float16 conversion) stays float16
        arr: np.ndarray = np.asarray(a)
        return arr if arr.dtype == np.float16 else arr.astype(np.float32, copy=False)

    out = {rename(k): np.ascontiguousarray(to_megengine(as_float(state[k]), info)) for k, info in schema.items()}
    return pickle.dumps(out, protocol=4)


__all__ = ["read_pickle", "megengine_bytes"]
