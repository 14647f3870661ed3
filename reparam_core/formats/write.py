"""Writing a neutral state as a checkpoint of any format, streamed where the format allows.

safetensors and torch zips are written incrementally: the header (or `data.pkl`) is planned from
(key, dtype, shape) entries, then each tensor is written and can be dropped, so a caller can
produce the tensors one block at a time. MegEngine pickles and Flax msgpack are encoded from the
collected state. float16 tensors stay float16; `safetensors_io.BFloat16` values are written as
BF16 (safetensors only: numpy has no bfloat16 type); everything else is written as float32.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO

import numpy as np

from ..blocks.schema import Form, state_schema
from ..errors import CheckpointError
from ..families.specs import ModelSpec
from ..weights import keymaps
from . import safetensors_io
from .detect import FORMATS
from .flax_msgpack import flax_msgpack_bytes
from .megengine_pickle import megengine_bytes
from .torch_zip import write_torch_zip
from .tree import State

Entry = tuple[str, str, tuple[int, ...]]  # (key, dtype name: float32/float16/bfloat16, shape)


def _out_dtype(a: Any) -> str:
    if isinstance(a, safetensors_io.BFloat16):
        return "bfloat16"
    return "float16" if np.asarray(a).dtype == np.float16 else "float32"


def _as_array(a: Any, dtype: str) -> np.ndarray:
    if isinstance(a, safetensors_io.BFloat16):
        raise CheckpointError(
            "bfloat16 output is only supported for safetensors (numpy has no "
            "bfloat16 type); use --dtype float16 or a .safetensors DST"
        )
    return np.ascontiguousarray(a, np.float16 if dtype == "float16" else np.float32)


def encode(spec: ModelSpec, state: State, form: Form, fmt: str) -> bytes:
    """A neutral state as the bytes of a `fmt` checkpoint (float16 tensors stay float16;
    safetensors_io.BFloat16 values are written as BF16 to safetensors)."""
    buf = io.BytesIO()
    entries = [(k, _out_dtype(state[k]), tuple(info.shape)) for k, info in state_schema(spec, form).items()]
    write_stream(buf, spec, form, fmt, entries, ((k, state[k]) for k, _, _ in entries))
    return buf.getvalue()


def write_stream(
    f: BinaryIO,
    spec: ModelSpec,
    form: Form,
    fmt: str,
    entries: list[Entry],
    tensors: Iterable[tuple[str, Any]],
    scheme: str = "canonical",
) -> None:
    """Write a checkpoint of `fmt` to the seekable file `f` from `tensors`, an iterable of
    (key, array) in schema order, consumed one at a time. `entries` are (key, dtype name, shape)
    planned in advance. safetensors and torch are written incrementally (each tensor can be
    dropped as soon as it is written); megengine and flax are encoded from the collected state.
    Keys are written under the naming `scheme` of the model's family (keymaps.from_canonical)."""
    meta = {"model": spec.name, "form": form, "format": "pt", "producer": "reparam"}
    if scheme != "canonical":
        if fmt == "flax":
            raise CheckpointError(
                f"--to-scheme {scheme} needs a torch, safetensors or megengine "
                "output (a Flax tree follows the module structure)"
            )
        keymaps.from_canonical({}, spec, scheme)  # an unknown scheme raises, naming the known ones
        rules = keymaps.schemes_for(spec)[scheme]

        def rename(key: str) -> str:
            return keymaps.map_key(key, rules, reverse=True)

        if fmt == "megengine":
            planned = {k: d for k, d, _ in entries}
            state = OrderedDict((k, _as_array(a, planned[k])) for k, a in tensors)
            f.write(megengine_bytes(spec, state, form, rename=rename))
            return
        entries = [(rename(k), d, s) for k, d, s in entries]
        tensors = ((rename(k), a) for k, a in tensors)
    if fmt == "safetensors":
        _write_safetensors(f, entries, tensors, meta)
        return
    if any(d == "bfloat16" for _, d, _ in entries):
        _as_array(safetensors_io.BFloat16(np.zeros(0, np.float32)), "bfloat16")  # raises
    if fmt == "torch":
        dts = {"float32": np.float32, "float16": np.float16}
        write_torch_zip(
            f,
            [(k, np.dtype(dts[d]), s) for k, d, s in entries],
            (_as_array(a, d) for (_, a), (_, d, _) in zip(tensors, entries)),
        )
        return
    if fmt in ("megengine", "flax"):
        planned = {k: d for k, d, _ in entries}
        state = OrderedDict((k, _as_array(a, planned[k])) for k, a in tensors)
        f.write(megengine_bytes(spec, state, form) if fmt == "megengine" else flax_msgpack_bytes(spec, state, form))
        return
    raise CheckpointError(f"unknown output format {fmt!r}; choose from {', '.join(FORMATS)}")


def _write_safetensors(
    f: BinaryIO, entries: list[Entry], tensors: Iterable[tuple[str, Any]], meta: Mapping[str, str]
) -> None:
    names = {"float32": "F32", "float16": "F16", "bfloat16": safetensors_io.BF16}
    head, pos = safetensors_io.plan([(k, names[d], s) for k, d, s in entries], meta)
    f.write(head)
    planned = {k: d for k, d, _ in entries}
    for key, a in tensors:
        if planned[key] == "bfloat16":
            a = a if isinstance(a, safetensors_io.BFloat16) else safetensors_io.BFloat16(a)
        else:
            a = _as_array(a, planned[key])
        safetensors_io.write_tensor_at(f, pos[key][0], key, a)
    f.truncate(max((e for _, e in pos.values()), default=len(head)))


__all__ = ["Entry", "encode", "write_stream"]
