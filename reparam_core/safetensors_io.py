"""A small, strict reader and writer of the safetensors format, numpy only.

Format: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the raw
little-endian tensor bytes. The reader checks every offset and size against the file before it
allocates anything, so a hostile header cannot make it read out of bounds or allocate more than
the file holds. The writer sorts keys, so the same state always gives the same bytes.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Mapping

import numpy as np

from .errors import CheckpointError

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "BOOL": "?"}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def dumps(state: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    blobs = []
    offset = 0
    for key in sorted(state):
        a = np.ascontiguousarray(state[key])
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dt not in _NAMES:
            raise CheckpointError(f"cannot write {key}: dtype {a.dtype} is not supported")
        raw = a.astype(dt, copy=False).tobytes()
        header[key] = {"dtype": _NAMES[dt], "shape": list(a.shape),
                       "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hbytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    return struct.pack("<Q", len(hbytes)) + hbytes + b"".join(blobs)


def loads(data: bytes, source: str = "<bytes>") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes -> (state, metadata); CheckpointError on anything malformed."""
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{source}: not a valid safetensors file: {msg}")

    if len(data) < 8:
        raise bad(f"{len(data)} bytes is too short for a header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, _MAX_HEADER):
        raise bad(f"header declares {n} bytes but the file has {len(data) - 8} after the length")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    body = memoryview(data)[8 + n:]
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise bad("__metadata__ is not an object")
    out: dict[str, np.ndarray] = {}
    for key, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {key!r} is malformed")
        dt, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dt not in _DTYPES:
            raise bad(f"tensor {key!r} has unsupported dtype {dt!r}")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and 0 <= s < 2**40 for s in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) for o in offs)):
            raise bad(f"tensor {key!r} has a malformed shape or offsets")
        begin, end = offs
        itemsize = np.dtype(_DTYPES[dt]).itemsize
        if not 0 <= begin <= end <= len(body) or end - begin != math.prod(shape) * itemsize:
            raise bad(f"tensor {key!r} (shape {shape}, {dt}) has offsets {offs} that do not fit "
                      f"its size or the {len(body)}-byte data section")
        out[key] = np.frombuffer(body[begin:end], dtype=_DTYPES[dt]).reshape(shape).copy()
    return out, {str(k): str(v) for k, v in meta.items()}


def save_file(state: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    with open(path, "wb") as f:
        f.write(dumps(state, metadata))


def load_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with open(path, "rb") as f:
        return loads(f.read(), source=str(path))
