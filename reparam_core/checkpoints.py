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
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping

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


def flatten_arrays(obj: Any, source: str, prefix: str = "") -> State:
    """A nested dict of arrays -> flat dotted keys; CheckpointError on any non-array leaf
    (other than the metadata that training scripts store next to weights, which is dropped)."""
    out: State = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, (Mapping, np.ndarray)):
                out.update(flatten_arrays(v, source, key))
            elif isinstance(v, (np.generic, float, int)) and key.endswith("num_batches_tracked"):
                continue
            elif v is None:
                continue
            else:
                raise CheckpointError(f"{source}: {key} is a {type(v).__name__}, not a tensor")
        return out
    if isinstance(obj, np.ndarray):
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


def read_torch(path: str | os.PathLike) -> State:
    """A PyTorch zip checkpoint -> flat state of numpy arrays, without torch."""
    src = os.fspath(path)
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{src}: corrupt or truncated torch zip file ({e})") from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointError(f"{src}: not a torch checkpoint (no single data.pkl in the zip)")
        root = pkl[0][: -len("data.pkl")]
        order = "little"
        if f"{root}byteorder" in names:
            order = zf.read(f"{root}byteorder").decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise CheckpointError(f"{src}: unknown byteorder {order!r}")
        storages: dict[str, np.ndarray] = {}

        def persistent(pid: Any) -> np.ndarray:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                raise UnsafeFileError(f"{src}: unexpected persistent id {str(pid)[:80]!r}")
            _, stype, key, _location, numel = pid
            if not isinstance(stype, TorchStorageType):
                raise CheckpointError(f"{src}: storage of unsupported type {stype!r}")
            key = str(key)
            if key not in storages:
                entry = f"{root}data/{key}"
                if entry not in names:
                    raise CheckpointError(f"{src}: storage {key} is missing from the archive")
                try:
                    raw = zf.read(entry)
                except (zipfile.BadZipFile, OSError, EOFError, zlib_error) as e:
                    raise CheckpointError(f"{src}: storage {key} is corrupt ({e})") from None
                dt = stype.dtype.newbyteorder("<" if order == "little" else ">")
                if len(raw) % dt.itemsize or (isinstance(numel, int) and numel * dt.itemsize > len(raw)):
                    raise CheckpointError(f"{src}: storage {key} holds {len(raw)} bytes, not "
                                          f"{numel} x {dt.itemsize}")
                storages[key] = np.frombuffer(raw, dtype=dt).astype(dt.newbyteorder("="))
            return storages[key]

        try:
            data = zf.read(pkl[0])
        except (zipfile.BadZipFile, OSError, EOFError, zlib_error) as e:
            raise CheckpointError(f"{src}: corrupt torch zip ({e})") from None
        obj = safe_loads(data, src, persistent)
    return strip_module_prefix(flatten_arrays(unwrap(obj, src), src))


try:
    from zlib import error as zlib_error
except ImportError:  # pragma: no cover
    zlib_error = OSError  # type: ignore[misc,assignment]


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
    for k, v in state.items():
        a = np.asarray(v)
        info = infos.get(k)
        if info is not None and fmt in ("megengine", "flax"):
            conv = from_megengine if fmt == "megengine" else from_flax
            try:
                a = conv(a, info)
            except ValueError:
                pass  # a wrong-sized tensor: check_state reports it with its shape
        if np.issubdtype(a.dtype, np.floating) and a.dtype != np.float32:
            a = a.astype(np.float32)
        out[k] = a
    found = check_state(spec, out, form, source=source)
    schema = state_schema(spec, found)
    return {k: np.ascontiguousarray(out[k], dtype=np.float32) for k in schema}, found, scheme


# --------------------------------------------------------------------------- writers

def safetensors_bytes(state: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    return safetensors_io.dumps(state, metadata)


def megengine_bytes(spec: ModelSpec, state: Mapping[str, np.ndarray], form: Form) -> bytes:
    """A MegEngine-loadable pickle (dict of float32 numpy arrays in MegEngine shapes, schema
    order, protocol 4), written without MegEngine."""
    schema = state_schema(spec, form)
    out = {k: np.ascontiguousarray(to_megengine(np.asarray(state[k], np.float32), info))
           for k, info in schema.items()}
    return pickle.dumps(out, protocol=4)


def megengine_native(spec: ModelSpec, state: Mapping[str, np.ndarray], form: Form) -> State:
    schema = state_schema(spec, form)
    return {k: np.ascontiguousarray(to_megengine(np.asarray(state[k], np.float32), info))
            for k, info in schema.items()}


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


def torch_zip_bytes(state: Mapping[str, np.ndarray], root: str = "archive") -> bytes:
    """A PyTorch zip checkpoint of an OrderedDict of tensors, without torch (keys in the order
    given, one storage per tensor, little endian)."""
    ordered_dict = _p_global("collections", "OrderedDict") + b")R"
    body = [b"\x80\x02", ordered_dict, b"("]
    blobs: list[tuple[str, bytes]] = []
    for i, (key, arr) in enumerate(state.items()):
        a = np.ascontiguousarray(arr)
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dt not in TORCH_DTYPE_STORAGES:
            raise CheckpointError(f"cannot write {key}: dtype {a.dtype} has no torch storage")
        stride, acc = [], 1
        for n in reversed(a.shape):
            stride.insert(0, acc)
            acc *= n
        pid = _p_tuple([_p_str("storage"), _p_global("torch", TORCH_DTYPE_STORAGES[dt]),
                        _p_str(str(i)), _p_str("cpu"), _p_int(int(a.size))]) + b"Q"
        args = _p_tuple([pid, _p_int(0), _p_tuple([_p_int(n) for n in a.shape]),
                         _p_tuple([_p_int(s) for s in stride]), b"\x89", ordered_dict])
        body += [_p_str(key), _p_global("torch._utils", "_rebuild_tensor_v2"), args, b"R"]
        blobs.append((str(i), a.astype(dt.newbyteorder("<"), copy=False).tobytes()))
    body += [b"u", b"."]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        def put(name: str, data: bytes) -> None:
            info = zipfile.ZipInfo(f"{root}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, data)
        put("data.pkl", b"".join(body))
        put("byteorder", b"little")
        for key, raw in blobs:
            put(f"data/{key}", raw)
        put("version", b"3\n")
    return buf.getvalue()


__all__ = ["FORMATS", "EXTENSIONS", "detect_format", "format_from_extension", "read_raw",
           "read_torch", "read_pickle", "flatten_arrays", "unwrap", "strip_module_prefix",
           "flax_to_canonical_keys", "to_neutral", "safetensors_bytes", "megengine_bytes",
           "megengine_native", "torch_zip_bytes", "TORCH_STORAGE_DTYPES"]
