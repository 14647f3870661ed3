"""Checkpoint files without frameworks: detect, read and write, numpy only.

Readers return a flat `{key: np.ndarray}` in the file's own naming and layout (`read_raw`);
`to_neutral` maps the keys to canonical names (`keymaps`), converts layouts (`layouts`) and
validates against the spec (`check_state`). Writers take a neutral state.

Formats:
- `safetensors`: `safetensors_io`, neutral layout.
- `torch`: a PyTorch zip (`<dir>/data.pkl`, `<dir>/data/<key>` raw storages, `<dir>/byteorder`),
  unpickled by `pickle_safe` with storages rebuilt as numpy arrays; pre-1.6 (non-zip) torch
  pickles are refused. `{"state_dict": ...}` / `{"model": ...}` wrappers and DDP `module.`
  prefixes are removed. `torch_zip_bytes` writes the same format without torch.
- `megengine`: a pickle of a dict of numpy arrays in MegEngine shapes (5-D grouped kernels,
  `(1, C, 1, 1)` conv biases); written without MegEngine, protocol 4, schema order.
- `flax` (msgpack) and orbax directories are handled in `scripts/convert.py` (they need msgpack/
  orbax); their flat keys are Flax keys and `to_neutral(..., fmt="flax")` maps them here.
"""
from __future__ import annotations

import io
import mmap
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any, BinaryIO
from zlib import error as zlib_error

import numpy as np

from . import safetensors_io
from .errors import CheckpointError, UnsafeFileError
from .layouts import flax_key, from_flax, from_megengine, to_megengine
from .pickle_safe import TORCH_DTYPE_STORAGES, TORCH_STORAGE_DTYPES, TorchStorageType, safe_loads
from .schema import FORMS, Form, TensorInfo, state_schema
from .specs import ModelSpec
from .state import check_state, strip_ignored

State = dict[str, np.ndarray]

FORMATS = ("safetensors", "torch", "megengine", "flax")
EXTENSIONS = {".safetensors": "safetensors", ".pth": "torch", ".pt": "torch", ".bin": "torch",
              ".pkl": "megengine", ".mge": "megengine", ".msgpack": "flax", ".flax": "flax"}

# The pickled magic number that starts a legacy (pre-1.6, non-zip) torch.save file.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "net", "params")


# --------------------------------------------------------------------------- detection

def detect_format(path: str | os.PathLike) -> str:
    """The checkpoint format of a file from its content (extension as a last resort):
    `safetensors`, `torch`, `torch-legacy`, `megengine`, `flax` or `orbax` (a directory)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return "orbax"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        if head[2:3] == b"\x8a" and _is_legacy_torch(head):
            return "torch-legacy"
        return "megengine"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return "flax"
    ext = os.path.splitext(path)[1].lower()
    if ext in EXTENSIONS:
        return EXTENSIONS[ext]
    raise CheckpointError(f"cannot tell the format of {path} (not safetensors, a torch zip, a "
                          "pickle or msgpack); pass --from-format")


def _is_legacy_torch(head: bytes) -> bool:
    n = head[3]
    if len(head) < 4 + n:
        return False
    return int.from_bytes(head[4:4 + n], "little", signed=True) == _TORCH_LEGACY_MAGIC


def format_from_extension(path: str | os.PathLike, default: str = "safetensors") -> str:
    return EXTENSIONS.get(os.path.splitext(os.fspath(path))[1].lower(), default)


# --------------------------------------------------------------------------- readers

def _read_bytes(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read {os.fspath(path)}: {e.strerror or e}") from None


_MAX_DEPTH = 32


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


def unwrap(obj: Any, source: str) -> Any:
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
        return {k[len("module."):]: v for k, v in state.items()}
    return state


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
        data = self._mm[self._pos:end]
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
    zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
    RuntimeError, KeyError, IndexError, OverflowError, UnicodeDecodeError, struct.error)


def read_torch(path: str | os.PathLike) -> State:
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
    except _ZIP_ERRORS + (zlib_error,) as e:
        raise CheckpointError(f"{src}: corrupt or truncated torch zip file "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
    finally:
        try:
            mm.close()
        except BufferError:  # pragma: no cover - an exported view still alive
            pass


def _read_torch_archive(fp: _MappedFile, size: int, src: str) -> State:
    zf = zipfile.ZipFile(fp)  # type: ignore[arg-type]
    budget = [4 * size + (1 << 20)]

    def read_entry(name: str) -> bytearray:
        info = zf.getinfo(name)
        if info.file_size > budget[0] or (info.compress_type == zipfile.ZIP_STORED
                                          and info.file_size > size):
            raise CheckpointError(f"{src}: archive entry {name} declares {info.file_size} bytes, "
                                  f"more than a {size}-byte archive can hold")
        budget[0] -= info.file_size
        buf = bytearray(info.file_size)
        view = memoryview(buf)
        pos = 0
        with zf.open(info) as f:
            while pos < len(buf):
                chunk = f.read(min(1 << 20, len(buf) - pos))
                if not chunk:
                    break
                view[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
            if pos != len(buf) or f.read(1):
                raise CheckpointError(f"{src}: archive entry {name} is truncated or longer than "
                                      "declared")
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
                    raise CheckpointError(f"{src}: storage {key} holds {len(raw)} bytes, not "
                                          f"{numel} x {dt.itemsize}")
                arr = np.frombuffer(raw, dtype=dt)
                storages[key] = arr if order == "little" or dt.itemsize == 1 else arr.astype(
                    dt.newbyteorder("="))
            return storages[key]

        data = bytes(read_entry(pkl[0]))
        obj = safe_loads(data, src, persistent, budget=2 * size + (64 << 20))
    return strip_module_prefix(flatten_arrays(unwrap(obj, src), src))


def read_pickle(path: str | os.PathLike) -> State:
    """A plain pickle of a dict of numpy arrays (MegEngine `.pkl`), via the restricted
    unpickler; a legacy torch pickle is refused with a pointer to the zip format."""
    src = os.fspath(path)
    data = _read_bytes(src)
    if data[2:3] == b"\x8a" and _is_legacy_torch(data[:32]):
        raise CheckpointError(f"{src}: legacy (pre-1.6, non-zip) torch serialization is not "
                              "supported; re-save it with torch>=1.6 or as safetensors")
    obj = safe_loads(data, src)
    return strip_module_prefix(flatten_arrays(unwrap(obj, src), src))


def read_raw(path: str | os.PathLike, fmt: str | None = None) -> tuple[State, str]:
    """(flat state in the file's naming/layout, format) for safetensors/torch/megengine files."""
    src = os.fspath(path)
    if not os.path.exists(src):
        raise CheckpointError(f"{src}: no such file")
    fmt = fmt or detect_format(src)
    if fmt == "safetensors":
        state, _ = safetensors_io.load_file(src)
        return strip_module_prefix(state), fmt
    if fmt == "torch":
        if not zipfile.is_zipfile(src):
            return read_pickle(src), fmt  # refuses legacy torch with a clear message
        return read_torch(src), fmt
    if fmt == "torch-legacy":
        raise CheckpointError(f"{src}: legacy (pre-1.6, non-zip) torch serialization is not "
                              "supported; re-save it with torch>=1.6 or as safetensors")
    if fmt == "megengine":
        return read_pickle(src), fmt
    raise CheckpointError(f"{src}: format {fmt!r} needs scripts.convert (flax/orbax) or is unknown; "
                          f"known here: safetensors, torch, megengine")


# --------------------------------------------------------------------------- neutral form

def _all_infos(spec: ModelSpec) -> dict[str, TensorInfo]:
    out: dict[str, TensorInfo] = {}
    for form in FORMS:
        out.update(state_schema(spec, form))
    return out


def flax_to_canonical_keys(state: Mapping[str, np.ndarray], spec: ModelSpec) -> State:
    """Flax keys (`...kernel`, `scale`, `mean`, `var`) -> canonical keys, layouts unchanged."""
    inverse = {flax_key(k, info): k for k, info in _all_infos(spec).items()}
    return {inverse.get(k, k): v for k, v in state.items()}


def to_neutral(raw: Mapping[str, np.ndarray], spec: ModelSpec, fmt: str, form: Form | None = None,
               source: str = "checkpoint") -> tuple[State, Form, str]:
    """A raw state -> (neutral state, form, key scheme). Keys are mapped to canonical names,
    layouts converted by the schema and the result validated (`check_state`): errors name the
    file and the offending keys."""
    from .keymaps import to_canonical  # local: keymaps imports nothing from here, but keep it lazy

    state = strip_ignored(raw)
    if fmt == "flax":
        state = flax_to_canonical_keys(state, spec)
    state, scheme = to_canonical(state, spec, source=source)
    infos = _all_infos(spec)
    out: State = {}
    for k in list(state):
        a = np.asarray(state.pop(k))  # drop references as we go: the caller may free the raw state
        info = infos.get(k)
        if info is not None and fmt in ("megengine", "flax"):
            conv = from_megengine if fmt == "megengine" else from_flax
            try:
                a = conv(a, info)
            except (ValueError, IndexError, TypeError):
                pass  # a wrong-sized tensor: check_state reports it with its shape
        # cast only tensors the schema wants at exactly this shape: a hostile file cannot make
        # us copy tensors that check_state is about to refuse anyway
        if (info is not None and a.shape == info.shape and np.issubdtype(a.dtype, np.floating)
                and a.dtype != np.float32):
            a = a.astype(np.float32)
        out[k] = a
    found = check_state(spec, out, form, source=source)
    schema = state_schema(spec, found)
    return {k: np.ascontiguousarray(out[k], dtype=np.float32) for k in schema}, found, scheme


# --------------------------------------------------------------------------- writers

def safetensors_bytes(state: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    return safetensors_io.dumps(state, metadata)


def megengine_bytes(spec: ModelSpec, state: Mapping[str, np.ndarray], form: Form,
                    rename: Callable[[str], str] = str) -> bytes:
    """A MegEngine-loadable pickle (dict of float32 numpy arrays in MegEngine shapes, schema
    order, protocol 4), written without MegEngine; keys are `rename(canonical key)`."""
    schema = state_schema(spec, form)

    def as_float(a: Any) -> np.ndarray:  # float16 (a --dtype float16 conversion) stays float16
        a = np.asarray(a)
        return a if a.dtype == np.float16 else a.astype(np.float32, copy=False)
    out = {rename(k): np.ascontiguousarray(to_megengine(as_float(state[k]), info))
           for k, info in schema.items()}
    return pickle.dumps(out, protocol=4)


# Hand-written pickle opcodes (protocol 2) for a torch zip's data.pkl: torch's own loader (with
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


def _torch_pickle(entries: list[tuple[str, np.dtype, tuple[int, ...]]]) -> bytes:
    ordered_dict = _p_global("collections", "OrderedDict") + b")R"
    body = [b"\x80\x02", ordered_dict, b"("]
    for i, (key, dt, shape) in enumerate(entries):
        if dt not in TORCH_DTYPE_STORAGES:
            raise CheckpointError(f"cannot write {key}: dtype {dt} has no torch storage")
        stride, acc = [], 1
        for n in reversed(shape):
            stride.insert(0, acc)
            acc *= n
        pid = _p_tuple([_p_str("storage"), _p_global("torch", TORCH_DTYPE_STORAGES[dt]),
                        _p_str(str(i)), _p_str("cpu"), _p_int(int(acc))]) + b"Q"
        args = _p_tuple([pid, _p_int(0), _p_tuple([_p_int(n) for n in shape]),
                         _p_tuple([_p_int(s) for s in stride]), b"\x89", ordered_dict])
        body += [_p_str(key), _p_global("torch._utils", "_rebuild_tensor_v2"), args, b"R"]
    body += [b"u", b"."]
    return b"".join(body)


def _le(dt: np.dtype) -> np.dtype:
    dt = np.dtype(dt)
    return dt.newbyteorder("<") if dt.byteorder == ">" else dt


def write_torch_zip(f: BinaryIO, entries: list[tuple[str, Any, tuple[int, ...]]],
                    arrays: Iterable[np.ndarray], root: str = "archive") -> None:
    """Stream a PyTorch zip checkpoint to a seekable binary file: `entries` are (key, dtype,
    shape) in order, `arrays` yields the matching arrays one at a time (so a caller can produce
    and drop them block by block). Deterministic: fixed timestamps, fixed entry order."""
    entries = [(k, _le(dt), tuple(int(n) for n in shape)) for k, dt, shape in entries]
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        def info(name: str, size: int) -> zipfile.ZipInfo:
            zi = zipfile.ZipInfo(f"{root}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            zi.external_attr = 0o600 << 16
            zi.file_size = size
            return zi

        def put(name: str, data: bytes | memoryview) -> None:
            with zf.open(info(name, len(data)), "w") as out:
                out.write(data)

        put("data.pkl", _torch_pickle(entries))
        put("byteorder", b"little")
        n = 0
        for (key, dt, shape), arr in zip(entries, arrays):
            a = np.ascontiguousarray(arr)
            if a.shape != shape or _le(a.dtype) != dt:
                raise CheckpointError(f"cannot write {key}: got {a.dtype} {a.shape}, planned "
                                      f"{dt} {shape}")
            put(f"data/{n}", memoryview(a.astype(dt, copy=False).reshape(-1)).cast("B"))
            n += 1
        if n != len(entries):
            raise CheckpointError(f"torch zip writer got {n} tensors for {len(entries)} entries")
        put("version", b"3\n")


def torch_zip_bytes(state: Mapping[str, np.ndarray], root: str = "archive") -> bytes:
    """A PyTorch zip checkpoint of an OrderedDict of tensors, without torch (keys in the order
    given, one storage per tensor, little endian)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
    buf = io.BytesIO()
    write_torch_zip(buf, [(k, a.dtype, a.shape) for k, a in arrays.items()], arrays.values(), root)
    return buf.getvalue()


__all__ = ["FORMATS", "EXTENSIONS", "detect_format", "format_from_extension", "read_raw",
           "read_torch", "read_pickle", "flatten_arrays", "unwrap", "strip_module_prefix",
           "flax_to_canonical_keys", "to_neutral", "safetensors_bytes", "megengine_bytes",
           "torch_zip_bytes", "write_torch_zip", "TORCH_STORAGE_DTYPES"]
