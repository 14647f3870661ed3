"""A restricted unpickler for checkpoints: numpy arrays in dicts, and nothing else.

A pickle is a small program: its GLOBAL/STACK_GLOBAL opcodes import any attribute of any module
and REDUCE calls it. `SafeUnpickler.find_class` admits only the handful of names that a state dict
of numpy arrays (or a PyTorch zip checkpoint, read without torch) needs, and maps each to a
function defined or vetted here; anything else raises `UnsafeFileError` naming `module.name` and
the file *before* it is resolved, so nothing from the file is ever imported or executed.

PyTorch tensors are rebuilt without torch: the storage classes become `TorchStorageType` markers
carrying a numpy dtype, `persistent_load` (supplied by the zip reader) turns a storage record into
a flat numpy array, and `torch._utils._rebuild_tensor_v2` becomes `rebuild_tensor`, a bounds-checked
`as_strided` copy (or a view, when the tensor is the contiguous run of its storage).

Resource limits (a hostile file must fail fast, not exhaust memory):
- `prescan` walks the opcodes (`pickletools.genops`) before anything is built: a length that
  claims more bytes than the file holds (a BINBYTES8/FRAME/BINUNICODE8 of terabytes) is refused
  before the C unpickler could pre-allocate it.
- `numpy.ndarray` cannot be called (only passed to `_reconstruct`, which must get numpy's own
  empty `(0,)` shape); dtypes are plain numeric ones (no object, structured or subarray dtypes).
- every array the unpickler builds by copying (`_frombuffer`, strided tensor records, `bytes`)
  is charged to a byte budget (by default 4x the pickle plus 64 MiB), so memo references that
  repeat one buffer many times cannot multiply memory.
"""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import pickle
import pickletools
import re
from collections.abc import Callable
from struct import error as struct_error
from typing import Any

import numpy as np

from ..errors import CheckpointError, UnsafeFileError


class TorchStorageType:
    """Stand-in for `torch.<X>Storage`: only its element dtype matters."""

    def __init__(self, name: str, dtype: str) -> None:
        self.name = name
        self.dtype = np.dtype(dtype)

    def __repr__(self) -> str:
        return f"TorchStorageType({self.name})"


# Legacy storage class name -> little-endian numpy dtype (bfloat16 has no numpy dtype: refused).
TORCH_STORAGE_DTYPES = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}
TORCH_DTYPE_STORAGES = {np.dtype(v): k for k, v in TORCH_STORAGE_DTYPES.items()}


class _Budget:
    """Bytes the unpickler may still allocate by copying."""

    def __init__(self, limit: int, source: str) -> None:
        self.left = int(limit)
        self.source = source

    def charge(self, nbytes: int) -> None:
        self.left -= int(nbytes)
        if self.left < 0:
            raise CheckpointError(
                f"{self.source}: the pickle builds more array data than the file "
                "could hold (repeated references to one buffer?); refused"
            )


def default_budget(nbytes: int) -> int:
    return 4 * int(nbytes) + 64 * 1024 * 1024


def rebuild_tensor(
    storage: Any,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
    *,
    budget: _Budget | None = None,
) -> np.ndarray:
    """`torch._utils._rebuild_tensor_v2` for numpy: the strided view of the storage, copied
    unless it is a C-contiguous run of it (then a read-only view, no copy)."""
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
        raise CheckpointError(f"malformed tensor record: size {str(size)[:40]!r}, stride {str(stride)[:40]!r}")
    if len(size) > 32:
        raise CheckpointError(f"malformed tensor record: {len(size)} dimensions")
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise CheckpointError(f"tensor record refers to {type(storage).__name__}, not a storage")
    size = tuple(size)
    stride = tuple(stride)
    if (
        len(size) != len(stride)
        or not all(isinstance(v, int) and v >= 0 for v in size + stride)
        or not isinstance(storage_offset, int)
        or storage_offset < 0
    ):
        raise CheckpointError(f"malformed tensor record: offset {storage_offset!r}, size {size!r}, stride {stride!r}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise CheckpointError(
            f"tensor of size {size} (offset {storage_offset}, stride {stride}) "
            f"reads past the end of its {storage.size}-element storage"
        )
    n = 1
    for v in size:
        n *= v
    contiguous, acc = True, 1
    for v, s in zip(reversed(size), reversed(stride)):
        if v != 1 and s != acc:
            contiguous = False
        acc *= v
    if contiguous:
        return storage[storage_offset : storage_offset + n].reshape(size)
    if budget is not None:
        budget.charge(n * storage.itemsize)
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view, copy=True)


def rebuild_parameter(data: Any, requires_grad: bool = False, backward_hooks: Any = None, *_: Any) -> Any:
    """`torch._utils._rebuild_parameter`: a Parameter is just its data here."""
    return data


def _codecs_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes (latin-1 only, strings only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise CheckpointError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode(encoding, errors="strict")


def _bytes(*args: Any, budget: _Budget | None = None) -> bytes:
    """`builtins.bytes` for protocol-2 pickles of bytes; never `bytes(n)` (a huge allocation)."""
    if not args:
        return b""
    if not isinstance(args[0], (bytes, bytearray, str, list)) or len(args) > 3:
        raise CheckpointError(f"refusing builtins.bytes of a {type(args[0]).__name__}")
    if budget is not None:
        budget.charge(len(args[0]))
    try:
        return bytes(*args)
    except (TypeError, ValueError, LookupError) as e:
        raise CheckpointError(f"refusing builtins.bytes: {e}") from None


_PLAIN_KINDS = "biuf"


def _plain_dtype(dt: np.dtype, what: str) -> np.dtype:
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None or dt.kind not in _PLAIN_KINDS:
        raise CheckpointError(f"refusing {what} of dtype {dt} (only plain numeric dtypes)")
    return dt


def _dtype(obj: Any = None, align: Any = False, copy: Any = True) -> np.dtype:
    """`numpy.dtype(...)` as numpy pickles it (`dtype('f4', False, True)`): a type code only."""
    if not isinstance(obj, str) or not re.fullmatch(r"[<>|=]?[a-zA-Z]\d{0,2}", obj):
        raise CheckpointError(f"refusing numpy.dtype({str(obj)[:40]!r})")
    try:
        dt = np.dtype(obj, bool(align), True)  # always a fresh copy: BUILD mutates it
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"refusing numpy.dtype({obj!r}): {e}") from None
    return _plain_dtype(dt, "numpy.dtype")


class _NdarrayMarker:
    """`numpy.ndarray` as a pickle names it: only ever the first argument of `_reconstruct`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeFileError("refusing to call numpy.ndarray directly (it allocates uninitialised memory of any size)")


_NDARRAY = _NdarrayMarker()


def _reconstruct(subtype: Any, shape: Any = (0,), dtype: Any = b"b") -> np.ndarray:
    """numpy's `_reconstruct(ndarray, (0,), b'b')`: the empty array `__setstate__` then fills."""
    if (
        subtype is not _NDARRAY
        or not isinstance(shape, tuple)
        or len(shape) > 1
        or any(not isinstance(v, int) or not 0 <= v <= 1 for v in shape)
        or dtype not in (b"b", "b")
    ):
        raise CheckpointError(
            f"refusing numpy _reconstruct with shape {str(shape)[:40]} and "
            f"dtype {str(dtype)[:20]} (numpy writes (0,) and b'b')"
        )
    empty: np.ndarray = _numpy_reconstruct()(np.ndarray, shape, dtype)
    return empty


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: str = "C", *, budget: _Budget | None = None) -> np.ndarray:
    """numpy's `_frombuffer` (protocol-5 pickles of arrays), for plain dtypes only."""
    if not isinstance(dtype, np.dtype):
        raise CheckpointError(f"refusing _frombuffer with dtype {str(dtype)[:40]!r}")
    dt = _plain_dtype(dtype, "an array")
    if order not in ("C", "F") or not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)):
        raise CheckpointError(f"refusing an array of dtype {dt} / order {str(order)[:10]!r}")
    if not isinstance(shape, tuple) or len(shape) > 32 or not all(isinstance(v, int) and v >= 0 for v in shape):
        raise CheckpointError(f"refusing an array of shape {str(shape)[:60]}")
    raw = memoryview(buf).cast("B")
    if budget is not None:
        budget.charge(len(raw))
    try:
        array: np.ndarray = np.frombuffer(bytes(raw), dtype=dt).reshape(shape, order="F" if order == "F" else "C")
        return array
    except ValueError as e:
        raise CheckpointError(f"malformed array record: {e}") from None


def _scalar(dtype: Any, data: Any = None) -> Any:
    """numpy's `scalar(dtype, bytes)` (numpy scalars such as a pickled float32)."""
    if not isinstance(dtype, np.dtype) or not isinstance(data, bytes):
        raise CheckpointError("refusing a malformed numpy scalar record")
    _plain_dtype(dtype, "a scalar")
    if len(data) != dtype.itemsize:
        raise CheckpointError(f"numpy scalar of dtype {dtype} has {len(data)} bytes")
    return _numpy_scalar()(dtype, data)


def _numpy_attr(path: str) -> Callable[..., Any]:
    """A numpy internal by dotted path, trying numpy 2 (`numpy._core`) and 1.x (`numpy.core`)."""
    mod: Any = np
    for part in path.split("."):
        mod = getattr(mod, part)
    fn: Callable[..., Any] = mod
    return fn


def _numpy_reconstruct() -> Callable[..., Any]:
    try:
        return _numpy_attr("_core.multiarray._reconstruct")
    except AttributeError:  # pragma: no cover - numpy 1.x without the _core alias
        return _numpy_attr("core.multiarray._reconstruct")


def _numpy_scalar() -> Callable[..., Any]:
    try:
        return _numpy_attr("_core.multiarray.scalar")
    except AttributeError:  # pragma: no cover
        return _numpy_attr("core.multiarray.scalar")


def _allowed() -> dict[tuple[str, str], Any]:
    rec = _reconstruct
    scalar = _scalar
    allowed: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): rec,
        ("numpy._core.multiarray", "_reconstruct"): rec,
        ("numpy.core.multiarray", "scalar"): scalar,
        ("numpy._core.multiarray", "scalar"): scalar,
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "dtype"): _dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("_codecs", "encode"): _codecs_encode,
        ("builtins", "bytes"): _bytes,
        ("builtins", "frozenset"): frozenset,
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    }
    # numpy dtype classes used by numpy 2 pickles of dtypes (numpy.dtypes.Float32DType, ...)
    for name in (
        "Float64DType",
        "Float32DType",
        "Float16DType",
        "Int64DType",
        "Int32DType",
        "Int16DType",
        "Int8DType",
        "UInt8DType",
        "BoolDType",
    ):
        cls = getattr(getattr(np, "dtypes", None), name, None)
        if cls is not None:
            allowed[("numpy.dtypes", name)] = _dtype_class(cls)
    for name, dt in TORCH_STORAGE_DTYPES.items():
        allowed[("torch", name)] = TorchStorageType(name, dt)
    return allowed


def _dtype_class(cls: Any) -> Callable[..., np.dtype]:
    def make(*args: Any) -> np.dtype:
        if args:
            raise CheckpointError(f"refusing numpy.dtypes.{cls.__name__} with arguments")
        dtype: np.dtype = cls()
        return dtype

    return make


_ALLOWED = _allowed()
_BUDGETED = {rebuild_tensor, _frombuffer, _bytes}
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def prescan(data: bytes, source: str = "<bytes>") -> None:
    """Walk the opcodes without building anything: truncated data, unknown opcodes, lengths
    larger than the file (which the C unpickler would allocate up front) and memo indexes larger
    than the file (the C unpickler grows its memo table to the index: a 4-byte LONG_BINPUT index
    asks for gigabytes; a real pickle numbers its memo entries from 0, each costing bytes of
    the file) raise CheckpointError."""
    bad: tuple[int, int] | None = None  # (memo index, byte offset)
    try:
        for op, arg, pos in pickletools.genops(io.BytesIO(data)):
            if op.name in _MEMO_PUTS and isinstance(arg, int) and arg > len(data):
                bad = (arg, pos or 0)
                break
    except (ValueError, EOFError, OverflowError, struct_error, UnicodeDecodeError, MemoryError) as e:
        raise CheckpointError(f"{source}: corrupt or truncated pickle ({type(e).__name__}: {str(e)[:200]})") from None
    if bad is not None:
        raise CheckpointError(
            f"{source}: corrupt pickle: memo index {bad[0]} at byte {bad[1]} is larger than the file "
            f"({len(data)} bytes)"
        )


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed names; see the module docstring.

    `persistent_load(pid)` is delegated to the `persistent` callable when given (the torch zip
    reader); a plain pickle that uses persistent ids is refused."""

    def __init__(
        self,
        file: io.BufferedIOBase,
        source: str = "<bytes>",
        persistent: Callable[[Any], Any] | None = None,
        budget: int | None = None,
    ) -> None:
        super().__init__(file)
        self.source = source
        self._persistent = persistent
        self.budget = _Budget(budget if budget is not None else 1 << 62, source)

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names that protocol <= 2 pickles use (`__builtin__`, `commands`, ...): map
        # them as pickle's fix_imports would, so the message names the Python 3 object
        written = f"{module}.{name}"
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        obj = _ALLOWED.get((module, name))
        if obj is None:
            alias = f" (written as {written})" if written != f"{module}.{name}" else ""
            raise UnsafeFileError(
                f"refusing to load {module}.{name}{alias} from {self.source}: a checkpoint may "
                "only hold tensors and dicts (this file asks to import code, which is never run)"
            )
        if obj in _BUDGETED:
            budget = self.budget
            return functools.partial(obj, budget=budget)
        return obj

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise UnsafeFileError(
                f"refusing to load {self.source}: it references external objects (persistent id {str(pid)[:60]!r})"
            )
        return self._persistent(pid)


def safe_loads(
    data: bytes, source: str = "<bytes>", persistent: Callable[[Any], Any] | None = None, budget: int | None = None
) -> Any:
    """Unpickle bytes with `SafeUnpickler` (after `prescan`); malformed data raises
    CheckpointError. `budget`: bytes the load may allocate by copying (default 4x the data
    plus 64 MiB)."""
    prescan(data, source)
    try:
        return SafeUnpickler(
            io.BytesIO(data), source, persistent, default_budget(len(data)) if budget is None else budget
        ).load()
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{source}: pickle nests objects too deeply") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        OverflowError,
        MemoryError,
        UnicodeDecodeError,
        struct_error,
    ) as e:
        raise CheckpointError(f"{source}: corrupt or truncated pickle ({type(e).__name__}: {str(e)[:200]})") from None


__all__ = [
    "SafeUnpickler",
    "safe_loads",
    "prescan",
    "default_budget",
    "rebuild_tensor",
    "TorchStorageType",
    "TORCH_STORAGE_DTYPES",
    "TORCH_DTYPE_STORAGES",
]
