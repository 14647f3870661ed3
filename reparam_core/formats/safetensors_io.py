"""A small, strict reader and writer of the safetensors format, numpy only.

Format: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the raw
little-endian tensor bytes. The reader validates the whole header before it allocates anything:
every offset and size is checked against the file, the tensors must tile the data section exactly
(no overlap, no gap: the format's own rule, which also stops one byte range from being read many
times), keys must be unique, and shapes have at most 32 dimensions. `load_file` then reads tensor
by tensor straight into its array (no second copy of the file in memory).

The writer sorts keys, so the same state always gives the same bytes; `plan` computes the header
and the offsets from (key, dtype, shape) alone, so a caller can write tensors one at a time
(`write_tensor_at`) without holding them all (see reparam_core.formats.write).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO

import numpy as np

from ..errors import CheckpointError

_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_MAX_NDIM = 32
# bfloat16 has no numpy dtype: it is stored as "BF16" (the top 16 bits of a float32) and read
# back as float32.
BF16 = "BF16"


class BFloat16:
    """A float32 array (already rounded to bfloat16, see precision.round_bfloat16) to be written
    as BF16."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = np.ascontiguousarray(values, dtype=np.float32)
        self.shape = self.values.shape

    def tobytes(self) -> bytes:
        return (self.values.view(np.uint32) >> 16).astype("<u2").tobytes()


Tensor = np.ndarray | BFloat16  # what a writer takes per key
Entry = tuple[str, tuple[int, ...], int, int]  # a header entry: dtype name, shape, begin, end


def _entry_dtype(a: Tensor) -> tuple[str, int]:
    if isinstance(a, BFloat16):
        return BF16, 2
    dt = np.dtype(a.dtype)
    dt = dt.newbyteorder("<") if dt.byteorder == ">" else dt
    if dt not in _NAMES:
        raise CheckpointError(f"dtype {dt} is not supported by safetensors")
    return _NAMES[dt], dt.itemsize


def plan(
    entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(the file's first 8 + N bytes, {key: (absolute begin, end)}) for tensors given as
    (key, safetensors dtype name, shape); keys are laid out in sorted order (as `dumps`)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    sizes: dict[str, tuple[str, list[int], int]] = {}
    for key, dt, shape in entries:
        item = 2 if dt == BF16 else np.dtype(_DTYPES[dt]).itemsize
        sizes[key] = (dt, list(shape), math.prod(shape) * item)
    offset = 0
    rel = {}
    for key in sorted(sizes):
        dt, dims, n = sizes[key]
        header[key] = {"dtype": dt, "shape": dims, "data_offsets": [offset, offset + n]}
        rel[key] = (offset, offset + n)
        offset += n
    hbytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    head = struct.pack("<Q", len(hbytes)) + hbytes
    return head, {k: (len(head) + b, len(head) + e) for k, (b, e) in rel.items()}


def _raw(key: str, a: Tensor) -> bytes:
    if isinstance(a, BFloat16):
        return a.tobytes()
    arr = np.ascontiguousarray(a)
    dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    if dt not in _NAMES:
        raise CheckpointError(f"cannot write {key}: dtype {arr.dtype} is not supported")
    return arr.astype(dt, copy=False).tobytes()


def write_tensor_at(f: BinaryIO, position: int, key: str, a: Tensor) -> None:
    """Write one tensor's bytes at its planned absolute position."""
    f.seek(position)
    f.write(_raw(key, a))


def _head(state: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> bytes:
    """The file's first 8 + N bytes for `state` (see `plan`)."""
    entries = []
    for key in state:
        try:
            dt, _ = _entry_dtype(state[key])
        except CheckpointError:
            raise CheckpointError(f"cannot write {key}: dtype {state[key].dtype} is not supported") from None
        entries.append((key, dt, tuple(np.shape(state[key]))))
    return plan(entries, metadata)[0]


def dumps(state: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    return _head(state, metadata) + b"".join(_raw(k, state[k]) for k in sorted(state))


def _parse_header(head: bytes, body_len: int, source: str) -> tuple[dict[str, Entry], dict[str, str]]:
    """Validate a header: {key: (numpy dtype or BF16, shape, begin, end)} sorted by offset."""

    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{source}: not a valid safetensors file: {msg}")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for k, v in pairs:
            if k in seen:
                raise bad(f"key {k!r} appears twice in the header")
            seen[k] = v
        return seen

    try:
        header = json.loads(head.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad(f"header is not JSON ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ is not an object of strings")
    out: dict[str, Entry] = {}
    for key, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {key!r} is malformed")
        dt, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dt, str) or (dt not in _DTYPES and dt != BF16):
            raise bad(f"tensor {key!r} has unsupported dtype {str(dt)[:20]!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_NDIM
            or not all(type(s) is int and 0 <= s < 2**40 for s in shape)
            or not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
        ):
            raise bad(f"tensor {key!r} has a malformed shape or offsets")
        begin, end = offs
        itemsize = 2 if dt == BF16 else np.dtype(_DTYPES[dt]).itemsize
        if not 0 <= begin <= end <= body_len or end - begin != math.prod(shape) * itemsize:
            raise bad(
                f"tensor {key!r} (shape {shape}, {dt}) has offsets {offs} that do not fit "
                f"its size or the {body_len}-byte data section"
            )
        out[key] = (dt, tuple(shape), begin, end)
    pos = 0
    for key, (_, _, begin, end) in sorted(out.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != pos:
            raise bad(
                f"tensor {key!r} starts at {begin}, expected {pos}: tensors overlap or leave a gap in the data section"
            )
        pos = end
    if pos != body_len:
        raise bad(f"tensors end at {pos} but the data section has {body_len} bytes (offsets do not fit the file)")
    return out, {str(k): str(v) for k, v in meta.items()}


def _header_length(first8: bytes, total: int, source: str) -> int:
    if total < 8 or len(first8) < 8:
        raise CheckpointError(f"{source}: not a valid safetensors file: {total} bytes is too short for a header")
    n: int = struct.unpack("<Q", first8[:8])[0]
    if n > min(total - 8, _MAX_HEADER):
        raise CheckpointError(
            f"{source}: not a valid safetensors file: header declares {n} bytes "
            f"but the file has {total - 8} after the length"
        )
    return n


def _decode(dt: str, shape: tuple[int, ...], raw: bytes | memoryview) -> np.ndarray:
    if dt == BF16:
        widened: np.ndarray = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        return widened.reshape(shape)
    array: np.ndarray = np.frombuffer(raw, dtype=_DTYPES[dt]).reshape(shape).copy()
    return array


def loads(data: bytes, source: str = "<bytes>") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes -> (state, metadata); CheckpointError on anything malformed."""
    n = _header_length(data[:8], len(data), source)
    entries, meta = _parse_header(data[8 : 8 + n], len(data) - 8 - n, source)
    body = memoryview(data)[8 + n :]
    out = {key: _decode(dt, shape, body[b:e]) for key, (dt, shape, b, e) in entries.items()}
    return out, meta


def save_file(
    state: Mapping[str, np.ndarray], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> None:
    """Write `state` as `dumps` would, tensor by tensor (peak memory: one tensor's bytes, not the
    whole file's)."""
    head = _head(state, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for key in sorted(state):
            f.write(_raw(key, state[key]))


def load_file(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a file tensor by tensor (peak memory: the tensors themselves plus the header)."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            n = _header_length(f.read(8), total, source)
            entries, meta = _parse_header(f.read(n), total - 8 - n, source)
            out: dict[str, np.ndarray] = {}
            for key, (dt, shape, b, e) in entries.items():
                f.seek(8 + n + b)
                if dt == BF16:
                    out[key] = _decode(dt, shape, f.read(e - b))
                    got = out[key].size * 2
                else:
                    arr = np.empty(shape, dtype=_DTYPES[dt])
                    got = f.readinto(arr.reshape(-1).view(np.uint8).data) if arr.size else 0
                    out[key] = arr
                if got != e - b:
                    raise CheckpointError(
                        f"{source}: not a valid safetensors file: tensor {key!r} is truncated ({got} of {e - b} bytes)"
                    )
            return out, meta
    except OSError as e:
        raise CheckpointError(f"cannot read {source}: {e.strerror or e}") from None
