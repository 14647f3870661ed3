"""A restricted unpickler for checkpoints: numpy arrays in dicts, and nothing else.

A pickle is a small program: its GLOBAL/STACK_GLOBAL opcodes import any attribute of any module
and REDUCE calls it. `SafeUnpickler.find_class` admits only the handful of names that a state dict
of numpy arrays (or a PyTorch zip checkpoint, read without torch) needs, and maps each to a
function defined or vetted here; anything else raises `UnsafeFileError` naming `module.name` and
the file *before* it is resolved, so nothing from the file is ever imported or executed.

PyTorch tensors are rebuilt without torch: the storage classes become `TorchStorageType` markers
carrying a numpy dtype, `persistent_load` (supplied by the zip reader) turns a storage record into
a flat numpy array, and `torch._utils._rebuild_tensor_v2` becomes `rebuild_tensor`, a bounds-checked
`as_strided` copy.
"""
from __future__ import annotations

import collections
import io
import pickle
from typing import Any, Callable

import numpy as np

from .errors import CheckpointError, UnsafeFileError


class TorchStorageType:
    """Stand-in for `torch.<X>Storage`: only its element dtype matters."""

    def __init__(self, name: str, dtype: str) -> None:
        self.name = name
        self.dtype = np.dtype(dtype)

    def __repr__(self) -> str:
        return f"TorchStorageType({self.name})"


# Legacy storage class name -> little-endian numpy dtype (bfloat16 has no numpy dtype: refused).
TORCH_STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "LongStorage": "<i8",
    "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?",
}
TORCH_DTYPE_STORAGES = {np.dtype(v): k for k, v in TORCH_STORAGE_DTYPES.items()}


def rebuild_tensor(storage: Any, storage_offset: int, size: tuple, stride: tuple,
                   requires_grad: bool = False, backward_hooks: Any = None,
                   metadata: Any = None) -> np.ndarray:
    """`torch._utils._rebuild_tensor_v2` for numpy: a copy of the strided view of the storage."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise CheckpointError(f"tensor record refers to {type(storage).__name__}, not a storage")
    size = tuple(size)
    stride = tuple(stride)
    if (len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in size + stride)
            or not isinstance(storage_offset, int) or storage_offset < 0):
        raise CheckpointError(f"malformed tensor record: offset {storage_offset!r}, size {size!r}, "
                              f"stride {stride!r}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise CheckpointError(f"tensor of size {size} (offset {storage_offset}, stride {stride}) "
                              f"reads past the end of its {storage.size}-element storage")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                           strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view, copy=True)


def rebuild_parameter(data: Any, requires_grad: bool = False, backward_hooks: Any = None,
                      *_: Any) -> Any:
    """`torch._utils._rebuild_parameter`: a Parameter is just its data here."""
    return data


def _codecs_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes (latin-1 only, strings only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise CheckpointError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode(encoding, errors="strict")


def _bytes(*args: Any) -> bytes:
    """`builtins.bytes` for protocol-2 pickles of bytes; never `bytes(n)` (a huge allocation)."""
    if args and isinstance(args[0], int):
        raise CheckpointError("refusing builtins.bytes with an integer size")
    return bytes(*args)


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: str = "C") -> np.ndarray:
    """numpy's `_frombuffer` (protocol-5 pickles of arrays), for plain dtypes only."""
    dt = np.dtype(dtype)
    if dt.hasobject or order not in ("C", "F"):
        raise CheckpointError(f"refusing an array of dtype {dt} / order {order!r}")
    return np.frombuffer(bytes(buf), dtype=dt).reshape(shape, order=order)


def _numpy_attr(path: str) -> Callable:
    """A numpy internal by dotted path, trying numpy 2 (`numpy._core`) and 1.x (`numpy.core`)."""
    mod: Any = np
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def _numpy_reconstruct() -> Callable:
    try:
        return _numpy_attr("_core.multiarray._reconstruct")
    except AttributeError:  # pragma: no cover - numpy 1.x without the _core alias
        return _numpy_attr("core.multiarray._reconstruct")


def _numpy_scalar() -> Callable:
    try:
        return _numpy_attr("_core.multiarray.scalar")
    except AttributeError:  # pragma: no cover
        return _numpy_attr("core.multiarray.scalar")


def _allowed() -> dict[tuple[str, str], Any]:
    rec = _numpy_reconstruct()
    scalar = _numpy_scalar()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): rec,
        ("numpy._core.multiarray", "_reconstruct"): rec,
        ("numpy.core.multiarray", "scalar"): scalar,
        ("numpy._core.multiarray", "scalar"): scalar,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("_codecs", "encode"): _codecs_encode,
        ("builtins", "bytes"): _bytes,
        ("builtins", "frozenset"): frozenset,
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    }
    # numpy dtype classes used by numpy 2 pickles of dtypes (numpy.dtypes.Float32DType, ...)
    for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType",
                 "Int16DType", "Int8DType", "UInt8DType", "BoolDType"):
        cls = getattr(getattr(np, "dtypes", None), name, None)
        if cls is not None:
            allowed[("numpy.dtypes", name)] = cls
    for name, dt in TORCH_STORAGE_DTYPES.items():
        allowed[("torch", name)] = TorchStorageType(name, dt)
    return allowed


_ALLOWED = _allowed()


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed names; see the module docstring.

    `persistent_load(pid)` is delegated to the `persistent` callable when given (the torch zip
    reader); a plain pickle that uses persistent ids is refused."""

    def __init__(self, file: io.BufferedIOBase, source: str = "<bytes>",
                 persistent: Callable[[Any], Any] | None = None) -> None:
        super().__init__(file)
        self.source = source
        self._persistent = persistent

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # Python 2 name in protocol <= 2 pickles
            module = "builtins"
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise UnsafeFileError(
                f"refusing to load {module}.{name} from {self.source}: a checkpoint may only hold "
                "tensors and dicts (this file asks to import code, which is never run)")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise UnsafeFileError(f"refusing to load {self.source}: it references external "
                                  f"objects (persistent id {str(pid)[:60]!r})")
        return self._persistent(pid)


def safe_loads(data: bytes, source: str = "<bytes>",
               persistent: Callable[[Any], Any] | None = None) -> Any:
    """Unpickle bytes with `SafeUnpickler`; malformed data raises CheckpointError."""
    try:
        return SafeUnpickler(io.BytesIO(data), source, persistent).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, OverflowError, MemoryError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{source}: corrupt or truncated pickle ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None


__all__ = ["SafeUnpickler", "safe_loads", "rebuild_tensor", "TorchStorageType",
           "TORCH_STORAGE_DTYPES", "TORCH_DTYPE_STORAGES"]
