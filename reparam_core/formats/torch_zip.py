"""PyTorch checkpoints without torch: the zip format of `torch.save` (torch >= 1.6), read and written.

Layout of the archive: `<root>/data.pkl` (a pickle of the object, tensors as persistent ids
`("storage", <storage type>, <key>, <device>, <numel>)` rebuilt by `torch._utils._rebuild_tensor_v2`),
`<root>/data/<key>` (the raw bytes of each storage), `<root>/byteorder` (`little` or `big`) and
`<root>/version`. The reader unpickles `data.pkl` with the restricted unpickler (`pickle_safe`)
and rebuilds storages as numpy arrays; the writer emits the same layout from hand-written pickle
opcodes that torch's own loader (with weights_only=True) accepts. Pre-1.6 (non-zip) torch pickles
are recognised (`is_legacy_torch`) and refused.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO
from zlib import error as zlib_error

import numpy as np

from ..errors import CheckpointError, UnsafeFileError
from .pickle_safe import TORCH_DTYPE_STORAGES, TorchStorageType, safe_loads
from .tree import State, flatten_arrays, strip_module_prefix, unwrap

# The pickled magic number that starts a legacy (pre-1.6, non-zip) torch.save file.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def is_legacy_torch(head: bytes) -> bool:
    """Whether `head` (the first bytes of a file, at least 16) is the start of a legacy torch
    pickle: PROTO, then LONG1 holding the torch magic number."""
    if len(head) < 4 or head[2:3] != b"\x8a":
        return False
    n = head[3]
    if len(head) < 4 + n:
        return False
    return int.from_bytes(head[4 : 4 + n], "little", signed=True) == _TORCH_LEGACY_MAGIC


def legacy_torch_error(src: str) -> CheckpointError:
    return CheckpointError(
        f"{src}: legacy (pre-1.6, non-zip) torch serialization is not "
        "supported; re-save it with torch>=1.6 or as safetensors"
    )


# --------------------------------------------------------------------------- reader


class _MappedFile:
    """A read-only, seekable file over an mmap for `zipfile`: a read never allocates more than
    the file holds (a plain file object pre-allocates whatever size a corrupt header asks for)."""

    def __init__(self, mm: mmap.mmap | bytes) -> None:
        self._mm = mm
        self._pos = 0

    def read(self, n: int | None = -1) -> bytes:
        size = len(self._mm)
        end = size if n is None or n < 0 else min(size, self._pos + n)
        if end <= self._pos:
            return b""
        data = self._mm[self._pos : end]
        self._pos = end
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._mm)}.get(whence)
        if base is None or base + pos < 0:
            raise OSError(22, f"invalid seek to {pos} (whence {whence})")
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        pass


_ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    EOFError,
    ValueError,
    NotImplementedError,
    RuntimeError,
    KeyError,
    IndexError,
    OverflowError,
    UnicodeDecodeError,
    struct.error,
    zlib_error,
)


def read_torch(path: str | os.PathLike[str]) -> State:
    """A PyTorch zip checkpoint -> flat state of numpy arrays, without torch.

    The archive is memory-mapped; each entry's declared size is checked against what the archive
    can hold (at most 4x its size in total, allowing mild compression) before it is read, entries
    are read in bounded chunks and their CRC is verified."""
    src = os.fspath(path)
    try:
        with open(src, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise CheckpointError(f"{src}: corrupt or truncated torch zip file (empty file)")
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CheckpointError(f"cannot read {src}: {e.strerror or e}") from None
    try:
        return _read_torch_archive(_MappedFile(mm), size, src)
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{src}: corrupt torch zip (objects nested too deeply)") from None
    except _ZIP_ERRORS as e:
        raise CheckpointError(
            f"{src}: corrupt or truncated torch zip file ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    finally:
        try:
            mm.close()
        except BufferError:  # pragma: no cover - an exported view still alive
            pass


def _read_torch_archive(fp: _MappedFile, size: int, src: str) -> State:
    zf = zipfile.ZipFile(fp)
    budget = [4 * size + (1 << 20)]

    def read_entry(name: str) -> bytearray:
        info = zf.getinfo(name)
        if info.file_size > budget[0] or (info.compress_type == zipfile.ZIP_STORED and info.file_size > size):
            raise CheckpointError(
                f"{src}: archive entry {name} declares {info.file_size} bytes, more than a {size}-byte archive can hold"
            )
        budget[0] -= info.file_size
        buf = bytearray(info.file_size)
        view = memoryview(buf)
        pos = 0
        with zf.open(info) as f:
            while pos < len(buf):
                chunk = f.read(min(1 << 20, len(buf) - pos))
                if not chunk:
                    break
                view[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
            if pos != len(buf) or f.read(1):
                raise CheckpointError(f"{src}: archive entry {name} is truncated or longer than declared")
        return buf

    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointError(f"{src}: not a torch checkpoint (no single data.pkl in the zip)")
        root = pkl[0][: -len("data.pkl")]
        order = "little"
        if f"{root}byteorder" in names:
            order = bytes(read_entry(f"{root}byteorder")[:16]).decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise CheckpointError(f"{src}: unknown byteorder {order[:16]!r}")
        storages: dict[str, np.ndarray] = {}

        def persistent(pid: Any) -> np.ndarray:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                raise UnsafeFileError(f"{src}: unexpected persistent id {str(pid)[:80]!r}")
            _, stype, key, _location, numel = pid
            if not isinstance(stype, TorchStorageType):
                raise CheckpointError(f"{src}: storage of unsupported type {str(stype)[:60]!r}")
            if not isinstance(key, (str, int)) or not isinstance(numel, int):
                raise CheckpointError(f"{src}: malformed storage record {str(pid)[:80]!r}")
            key = str(key)
            if key not in storages:
                entry = f"{root}data/{key}"
                if entry not in names:
                    raise CheckpointError(f"{src}: storage {key[:40]} is missing from the archive")
                raw = read_entry(entry)
                dt = stype.dtype.newbyteorder("<" if order == "little" else ">")
                if len(raw) % dt.itemsize or numel < 0 or numel * dt.itemsize > len(raw):
                    raise CheckpointError(f"{src}: storage {key} holds {len(raw)} bytes, not {numel} x {dt.itemsize}")
                arr = np.frombuffer(raw, dtype=dt)
                storages[key] = arr if order == "little" or dt.itemsize == 1 else arr.astype(dt.newbyteorder("="))
            return storages[key]

        data = bytes(read_entry(pkl[0]))
        obj = safe_loads(data, src, persistent, budget=2 * size + (64 << 20))
    return strip_module_prefix(flatten_arrays(unwrap(obj, src), src))


# --------------------------------------------------------------------------- writer


# Hand-written pickle opcodes (protocol 2) for data.pkl: torch's own loader (with
# weights_only=True) and `read_torch` both accept it, and writing it needs no torch.
def _p_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def _p_int(n: int) -> bytes:
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _p_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _p_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def torch_pickle(entries: list[tuple[str, np.dtype[Any], tuple[int, ...]]]) -> bytes:
    """The `data.pkl` of a torch zip: an OrderedDict mapping each key to a contiguous tensor
    (stride of a C-ordered `shape`) over storage `str(i)` of the i-th entry's dtype."""
    ordered_dict = _p_global("collections", "OrderedDict") + b")R"
    body = [b"\x80\x02", ordered_dict, b"("]
    for i, (key, dt, shape) in enumerate(entries):
        if dt not in TORCH_DTYPE_STORAGES:
            raise CheckpointError(f"cannot write {key}: dtype {dt} has no torch storage")
        stride: list[int] = []
        acc = 1
        for n in reversed(shape):
            stride.insert(0, acc)
            acc *= n
        pid = (
            _p_tuple(
                [
                    _p_str("storage"),
                    _p_global("torch", TORCH_DTYPE_STORAGES[dt]),
                    _p_str(str(i)),
                    _p_str("cpu"),
                    _p_int(int(acc)),
                ]
            )
            + b"Q"
        )
        args = _p_tuple(
            [
                pid,
                _p_int(0),
                _p_tuple([_p_int(n) for n in shape]),
                _p_tuple([_p_int(s) for s in stride]),
                b"\x89",
                ordered_dict,
            ]
        )
        body += [_p_str(key), _p_global("torch._utils", "_rebuild_tensor_v2"), args, b"R"]
    body += [b"u", b"."]
    return b"".join(body)


def _le(dtype: Any) -> np.dtype[Any]:
    dt: np.dtype[Any] = np.dtype(dtype)
    return dt.newbyteorder("<") if dt.byteorder == ">" else dt


def write_torch_zip(
    f: BinaryIO, entries: list[tuple[str, Any, tuple[int, ...]]], arrays: Iterable[np.ndarray], root: str = "archive"
) -> None:
    """Stream a PyTorch zip checkpoint to a seekable binary file: `entries` are (key, dtype,
    shape) in order, `arrays` yields the matching arrays one at a time (so a caller can produce
    and drop them block by block). Deterministic: fixed timestamps, fixed entry order."""
    planned = [(k, _le(dt), tuple(int(n) for n in shape)) for k, dt, shape in entries]
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:

        def info(name: str, size: int) -> zipfile.ZipInfo:
            zi = zipfile.ZipInfo(f"{root}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            zi.external_attr = 0o600 << 16
            zi.file_size = size
            return zi

        def put(name: str, data: bytes | memoryview) -> None:
            with zf.open(info(name, len(data)), "w") as out:
                out.write(data)

        put("data.pkl", torch_pickle(planned))
        put("byteorder", b"little")
        n = 0
        for (key, dt, shape), arr in zip(planned, arrays):
            a = np.ascontiguousarray(arr)
            if a.shape != shape or _le(a.dtype) != dt:
                raise CheckpointError(f"cannot write {key}: got {a.dtype} {a.shape}, planned {dt} {shape}")
            put(f"data/{n}", a.astype(dt, copy=False).reshape(-1).data.cast("B"))
            n += 1
        if n != len(planned):
            raise CheckpointError(f"torch zip writer got {n} tensors for {len(planned)} entries")
        put("version", b"3\n")


def torch_zip_bytes(state: Mapping[str, np.ndarray], root: str = "archive") -> bytes:
    """A PyTorch zip checkpoint of an OrderedDict of tensors, without torch (keys in the order
    given, one storage per tensor, little endian)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
    buf = io.BytesIO()
    write_torch_zip(buf, [(k, a.dtype, a.shape) for k, a in arrays.items()], arrays.values(), root)
    return buf.getvalue()


__all__ = ["is_legacy_torch", "legacy_torch_error", "read_torch", "torch_pickle", "write_torch_zip", "torch_zip_bytes"]
