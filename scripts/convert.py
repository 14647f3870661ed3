"""`reparam convert`: checkpoints between PyTorch, MegEngine, Flax and safetensors.

    python -m scripts.convert SRC DST --model RepVGG-A0 [--to-deploy] [--verify] [--overwrite]

Every conversion goes through the neutral state (canonical keys, OIHW, float32): read SRC (format
from its bytes, or --from-format), map foreign key names (timm, mmpretrain, basecls), convert
layouts, validate against the architecture (keys, shapes, NaN/Inf, BN variance, form), optionally
fuse to the deploy form (float64 algebra), then write DST atomically (temp file
`.DST.<pid>-<random>.tmp` in the same directory, fsync, rename; an existing DST is kept unless
--overwrite; on failure nothing is left; the temp file of a process that was killed is removed by
the next convert to the same DST).

Memory: without --verify the conversion streams: deploy weights are fused block by block, each
written as soon as it is ready (safetensors and torch output; MegEngine/Flax output are encoded
at the end) and each source tensor is dropped once used, so the peak stays near the size of the
source checkpoint. --verify keeps the source state for the comparison.

--dtype float16|bfloat16 fuses in float64 and rounds once to the half type (bfloat16: safetensors
output only, numpy has no bfloat16); the report gives the largest relative rounding error and a
PrecisionWarning names tensors that overflow the type.

Output is deterministic: the same input gives byte-identical files in every format (the torch
.pth is written by reparam_core's own zip writer, not torch.save, whose archives carry a random
serialization id).

--verify re-reads the written temp file and runs source and destination in their own frameworks
(torch: backends.torch, flax: backends.flax, megengine: the worker in backends.megengine.remote,
safetensors: the float64 oracle) on one random input; above 1e-4 relative error nothing is written.

Flax files are msgpack in `flax.serialization` encoding (ndarrays as ext type 1): a nested dict of
the NNX state keyed by Flax keys (HWIO kernels, `(in, out)` linear kernels, BN scale/bias/mean/var).
An orbax checkpoint directory that restores to a plain pytree of arrays is accepted as input.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, BinaryIO

import numpy as np

from reparam_core import checkpoints as ckpt
from reparam_core import keymaps, oracle, safetensors_io
from reparam_core.atomic import atomic_write_stream
from reparam_core.errors import BackendUnavailableError, CheckpointError, ReparamError, VerificationError
from reparam_core.fuse import iter_deploy_state, reparameterize_state
from reparam_core.layouts import flax_key, to_flax
from reparam_core.precision import PrecisionWarning, cast_state
from reparam_core.schema import FORMS, Form, state_schema
from reparam_core.specs import ModelSpec, get_spec

FORMATS = ("torch", "megengine", "flax", "safetensors")
VERIFY_RTOL = 1e-4  # max |a - b| / max |a| between source and destination outputs
# half-precision output: float16 keeps ~11 bits, bfloat16 ~8 bits; errors compound over depth
VERIFY_RTOL_HALF = {"float16": 1e-2, "bfloat16": 5e-2}
DTYPES = ("float32", "float16", "bfloat16")

State = dict[str, np.ndarray]


# --------------------------------------------------------------------------- flax msgpack

_MSGPACK_NDARRAY = 1  # flax.serialization's ext type code for numpy arrays


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError:
        raise BackendUnavailableError("the flax (msgpack) format needs the msgpack package; "
                                      "use the .venv environment or `pip install msgpack`") from None
    return msgpack


def flax_msgpack_bytes(spec: ModelSpec, state: Mapping[str, np.ndarray], form: Form) -> bytes:
    """The neutral state as a Flax msgpack file (nested NNX-state dict, Flax layouts)."""
    msgpack = _msgpack()
    tree: dict = {}
    for key, info in state_schema(spec, form).items():
        a = np.asarray(state[key])
        arr = np.ascontiguousarray(to_flax(a if a.dtype == np.float16 else a.astype(np.float32,
                                                                                     copy=False), info))
        node = tree
        *parents, leaf = flax_key(key, info).split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = arr

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            payload = msgpack.packb((list(obj.shape), obj.dtype.name, obj.tobytes("C")),
                                    use_bin_type=True)
            return msgpack.ExtType(_MSGPACK_NDARRAY, payload)
        raise TypeError(f"cannot serialize {type(obj).__name__}")

    return msgpack.packb(tree, default=default, use_bin_type=True)


_FLAX_DTYPES = {"float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"}


def read_flax_msgpack(path: str) -> State:
    msgpack = _msgpack()
    data = ckpt._read_bytes(path)

    def ext_hook(code: int, payload: bytes) -> Any:
        if code != _MSGPACK_NDARRAY:
            raise CheckpointError(f"{path}: unsupported msgpack extension type {code}")
        rec = msgpack.unpackb(payload, raw=False)
        if not (isinstance(rec, (list, tuple)) and len(rec) == 3 and isinstance(rec[0], (list, tuple))
                and isinstance(rec[1], str) and isinstance(rec[2], bytes)):
            raise CheckpointError(f"{path}: malformed array record")
        shape, dtype, raw = rec
        if dtype not in _FLAX_DTYPES:
            raise CheckpointError(f"{path}: unsupported array dtype {dtype[:20]!r}")
        if len(shape) > 32 or not all(type(n) is int and 0 <= n < 2**40 for n in shape):
            raise CheckpointError(f"{path}: malformed array shape {str(shape)[:80]}")
        dt = np.dtype(dtype)
        if len(raw) != math.prod(shape) * dt.itemsize:
            raise CheckpointError(f"{path}: array of shape {list(shape)} ({dtype}) has "
                                  f"{len(raw)} bytes")
        return np.frombuffer(raw, dt).reshape(shape).copy()

    try:
        tree = msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except CheckpointError:
        raise
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        if isinstance(e, MemoryError):
            raise CheckpointError(f"{path}: msgpack file declares more data than memory allows") from None
        raise CheckpointError(f"{path}: corrupt or truncated msgpack file "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
    return _strip_value_leaves(ckpt.flatten_arrays(ckpt.unwrap(tree, path), path))


def _strip_value_leaves(state: State) -> State:
    """NNX states saved as pure dicts may end every path in `.value`; drop it."""
    if state and all(k.endswith(".value") for k in state):
        return {k[: -len(".value")]: v for k, v in state.items()}
    return state


def read_orbax(path: str) -> State:
    """An orbax checkpoint directory holding a plain pytree of arrays."""
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise BackendUnavailableError("reading an orbax checkpoint directory needs "
                                      "orbax-checkpoint (the .venv environment)") from None
    try:
        tree = ocp.PyTreeCheckpointer().restore(os.path.abspath(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable orbax checkpoint "
                              f"({type(e).__name__}: {str(e)[:200]})") from None

    def to_np(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return {str(k): to_np(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return {str(i): to_np(v) for i, v in enumerate(obj)}
        if hasattr(obj, "shape") and hasattr(obj, "dtype"):
            return np.asarray(obj)
        return obj

    return _strip_value_leaves(ckpt.flatten_arrays(ckpt.unwrap(to_np(tree), path), path))


# --------------------------------------------------------------------------- read / write

def read_any(path: str, fmt: str | None = None) -> tuple[State, str]:
    """(raw flat state, format) for any supported input."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    fmt = fmt or ckpt.detect_format(path)
    if fmt == "orbax" or (fmt == "flax" and os.path.isdir(path)):
        return read_orbax(path), "flax"
    if fmt == "flax":
        return read_flax_msgpack(path), "flax"
    return ckpt.read_raw(path, fmt)


def load_neutral(path: str, spec: ModelSpec, fmt: str | None = None,
                 form: Form | None = None) -> tuple[State, Form, str, str]:
    """(neutral state, form, format, key scheme) of a checkpoint file for `spec`."""
    raw, fmt = read_any(path, fmt)
    state, form, scheme = ckpt.to_neutral(raw, spec, fmt, form, source=path)
    return state, form, fmt, scheme


def _half(dtype: str | None) -> str | None:
    if dtype in (None, "float32"):
        return None
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown --dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return dtype


def encode(spec: ModelSpec, state: State, form: Form, fmt: str) -> bytes:
    """A neutral state as the bytes of a `fmt` checkpoint (float16 tensors stay float16;
    safetensors_io.BFloat16 values are written as BF16 to safetensors)."""
    import io

    schema = state_schema(spec, form)
    buf = io.BytesIO()
    write_stream(buf, spec, form, fmt, _entries(schema, state),
                 ((k, state[k]) for k in schema))
    return buf.getvalue()


def _out_dtype(a: Any) -> str:
    if isinstance(a, safetensors_io.BFloat16):
        return "bfloat16"
    return "float16" if np.asarray(a).dtype == np.float16 else "float32"


def _entries(schema: Mapping[str, Any], state: Mapping[str, Any]) -> list[tuple[str, str, tuple]]:
    return [(k, _out_dtype(state[k]), tuple(info.shape)) for k, info in schema.items()]


def _as_array(a: Any, dtype: str) -> np.ndarray:
    if isinstance(a, safetensors_io.BFloat16):
        raise CheckpointError("bfloat16 output is only supported for safetensors (numpy has no "
                              "bfloat16 type); use --dtype float16 or a .safetensors DST")
    return np.ascontiguousarray(a, np.float16 if dtype == "float16" else np.float32)


def write_stream(f: BinaryIO, spec: ModelSpec, form: Form, fmt: str,
                 entries: list[tuple[str, str, tuple]], tensors: Iterable[tuple[str, Any]],
                 scheme: str = "canonical") -> None:
    """Write a checkpoint of `fmt` to the seekable file `f` from `tensors`, an iterable of
    (key, array) in schema order, consumed one at a time. `entries` are (key, dtype name, shape)
    planned in advance. safetensors and torch are written incrementally (each tensor can be
    dropped as soon as it is written); megengine and flax are encoded from the collected state.
    Keys are written under the naming `scheme` of the model's family (keymaps.from_canonical)."""
    meta = {"model": spec.name, "form": form, "format": "pt", "producer": "reparam"}
    if scheme != "canonical":
        if fmt == "flax":
            raise CheckpointError(f"--to-scheme {scheme} needs a torch, safetensors or megengine "
                                  "output (a Flax tree follows the module structure)")
        rules = keymaps.schemes_for(spec).get(scheme)
        if rules is None:
            keymaps.from_canonical({}, spec, scheme)  # raises, naming the known schemes

        def rename(key: str) -> str:
            return keymaps.map_key(key, rules, reverse=True)
        if fmt == "megengine":
            planned = {k: d for k, d, _ in entries}
            state = OrderedDict((k, _as_array(a, planned[k])) for k, a in tensors)
            f.write(ckpt.megengine_bytes(spec, state, form, rename=rename))
            return
        entries = [(rename(k), d, s) for k, d, s in entries]
        tensors = ((rename(k), a) for k, a in tensors)
    if fmt == "safetensors":
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
        return
    if any(d == "bfloat16" for _, d, _ in entries):
        _as_array(safetensors_io.BFloat16(np.zeros(0, np.float32)), "bfloat16")
    if fmt == "torch":
        dts = {"float32": np.float32, "float16": np.float16}
        ckpt.write_torch_zip(f, [(k, np.dtype(dts[d]), s) for k, d, s in entries],
                             (_as_array(a, d) for (_, a), (_, d, _) in zip(tensors, entries)))
        return
    if fmt in ("megengine", "flax"):
        planned = {k: d for k, d, _ in entries}
        state = OrderedDict((k, _as_array(a, planned[k])) for k, a in tensors)
        data = (ckpt.megengine_bytes(spec, state, form) if fmt == "megengine"
                else flax_msgpack_bytes(spec, state, form))
        f.write(data)
        return
    raise CheckpointError(f"unknown output format {fmt!r}; choose from {', '.join(FORMATS)}")


# --------------------------------------------------------------------------- verification

def verify_input(spec: ModelSpec, seed: int = 0) -> np.ndarray:
    size = 32 if spec.name == "RepVGG-mini" else 64
    return np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)


def predict_in(fmt: str, spec: ModelSpec, state: State, form: Form, x: np.ndarray) -> np.ndarray:
    """Run the model in the framework that owns `fmt` (safetensors: the float64 oracle)."""
    if fmt == "safetensors":
        return np.asarray(oracle.forward(spec, state, x, form))
    if fmt in ("torch", "flax"):
        try:
            import importlib
            backend = importlib.import_module(f"backends.{fmt}")
        except ImportError as e:
            raise BackendUnavailableError(f"--verify for {fmt} needs backends.{fmt} and its "
                                          f"framework ({e}); use the .venv environment") from None
        model = backend.create_model(spec.name, num_classes=spec.num_classes,
                                     deploy=form == "deploy")
        backend.load_state(model, state)
        return np.asarray(backend.predict(model, x))
    if fmt == "megengine":
        try:
            from backends.megengine.remote import MgeWorker
        except ImportError as e:
            raise BackendUnavailableError(f"--verify for megengine needs the MegEngine worker "
                                          f"client backends.megengine.remote ({e})") from None
        with MgeWorker() as w:
            return np.asarray(w.predict(model=spec.name, form=form, state=state, x=x,
                                        num_classes=spec.num_classes))
    raise CheckpointError(f"cannot run format {fmt!r}")


def relative_error(ref: np.ndarray, out: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    out = np.asarray(out, np.float64)
    if ref.shape != out.shape:
        raise VerificationError(f"verification failed: output shapes differ {ref.shape} vs {out.shape}")
    return float(np.max(np.abs(ref - out)) / max(float(np.max(np.abs(ref))), 1e-12))


# --------------------------------------------------------------------------- API

def _fused_stream(spec: ModelSpec, state: State, compute64: bool) -> Iterator[tuple[str, np.ndarray]]:
    """The deploy-form tensors of a train-form neutral `state`, in schema order, from the core's
    streaming fusion (bit-identical to reparameterize_state). Every source tensor is removed
    from `state` once it is no longer needed, so the caller can stream the output and keep the
    peak memory near one copy of the model."""
    def get(key: str) -> np.ndarray:
        return state[key].astype(np.float64) if compute64 else state[key]

    return iter_deploy_state(spec, get, lambda key: state.pop(key, None))


class _Caster:
    """Casts tensors to a half dtype one at a time (precision.cast_state), accumulating the
    largest relative rounding error and the keys that overflow."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.max_rel_err = 0.0
        self.overflowed: list[str] = []

    def __call__(self, key: str, a: np.ndarray) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrecisionWarning)
            out, rep = cast_state({key: a}, self.dtype)  # type: ignore[arg-type]
        self.max_rel_err = max(self.max_rel_err, rep.max_rel_error)
        self.overflowed += rep.overflowed
        v = out[key]
        return safetensors_io.BFloat16(v) if self.dtype == "bfloat16" else v

    def finish(self) -> dict:
        if self.overflowed:
            warnings.warn(f"{len(self.overflowed)} tensor(s) overflow {self.dtype} after fusion "
                          f"(stored as inf): {', '.join(self.overflowed[:5])}", PrecisionWarning,
                          stacklevel=3)
        return {"dtype": self.dtype, "max_rel_err": self.max_rel_err,
                "overflowed": list(self.overflowed)}


def convert(src: str, dst: str, model: str, *, to_deploy: bool = False,
            from_format: str | None = None, to_format: str | None = None,
            from_form: Form | None = None, num_classes: int | None = None,
            verify: bool = False, overwrite: bool = False, progress: Any = None,
            dtype: str | None = None, to_scheme: str = "canonical") -> dict:
    """Convert checkpoint `src` of `model` to `dst`; returns a report dict. Raises ReparamError
    subclasses (nothing is written then). `dtype`: None/"float32", "float16" or "bfloat16"
    (fused in float64, rounded once; see the module docstring). `to_scheme`: write the keys under
    another implementation's names (`timm`, `mmpretrain`, `basecls`; see keymaps)."""
    src, dst = os.fspath(src), os.fspath(dst)
    stage = progress.stage if progress is not None else (lambda name: None)
    spec = get_spec(model, 1000 if num_classes is None else num_classes)  # unknown names and
    # --num-classes < 1 fail first
    if from_format is not None and from_format not in FORMATS + ("orbax",):
        raise CheckpointError(f"unknown input format {from_format!r}; choose from {', '.join(FORMATS)}")
    to_format = to_format or ckpt.format_from_extension(dst)
    if to_format not in FORMATS:
        raise CheckpointError(f"unknown output format {to_format!r}; choose from {', '.join(FORMATS)}")
    half = _half(dtype)
    if half == "bfloat16" and to_format != "safetensors":
        raise CheckpointError("--dtype bfloat16 is only supported for safetensors output (numpy "
                              "has no bfloat16 type); use --dtype float16 or a .safetensors DST")
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it")
    keymaps.from_canonical({}, spec, to_scheme)  # an unknown scheme fails before any work

    stage("read")
    raw, fmt = read_any(src, from_format)
    if num_classes is None:
        spec = get_spec(model, _infer_num_classes(raw, fmt, spec))
    stage("check")
    state, form, scheme = ckpt.to_neutral(raw, spec, fmt, from_form, source=src)
    del raw  # to_neutral shares the arrays: only `state` holds them now
    src_form = form
    fuse = to_deploy and form == "train"
    out_form: Form = "deploy" if fuse else form
    schema = state_schema(spec, out_form)
    caster = _Caster(half) if half else None
    report: dict = {"src": src, "dst": dst, "model": spec.name, "num_classes": spec.num_classes,
                    "from_format": fmt, "to_format": to_format, "from_form": src_form,
                    "to_form": out_form, "scheme": scheme, "to_scheme": to_scheme,
                    "tensors": len(schema), "bytes": None,
                    "dtype": half or "float32", "precision": None, "verify": None}

    if verify:
        # keep the source state for the comparison: fuse the whole state at once
        src_state = state
        out = state
        if fuse:
            stage("fuse")
            out = reparameterize_state(spec, {k: v.astype(np.float64) for k, v in state.items()}
                                       if half else state)
        stage("encode")
        tensors: Iterable[tuple[str, Any]] = ((k, out[k]) for k in schema)
    else:
        src_state = None
        if fuse:
            stage("fuse")
            tensors = _fused_stream(spec, state, compute64=bool(half))
        else:
            tensors = ((k, state.pop(k)) for k in schema)
        stage("encode")
    if caster is not None:
        tensors = ((k, caster(k, a)) for k, a in tensors)
    entries = [(k, half or "float32", tuple(info.shape)) for k, info in schema.items()]

    def check(tmp: str) -> None:
        stage("verify")
        written, wform, _, _ = load_neutral(tmp, spec, to_format, out_form)
        x = verify_input(spec)
        ref = predict_in(fmt, spec, src_state, src_form, x)
        got = predict_in(to_format, spec, written, wform, x)
        err = relative_error(ref, got)
        tol = VERIFY_RTOL_HALF[half] if half else VERIFY_RTOL
        report["verify"] = {"max_rel_err": err, "tolerance": tol, "input": list(x.shape),
                            "source": f"{fmt}/{src_form}", "destination": f"{to_format}/{wform}"}
        if not err <= tol:
            raise VerificationError(f"verification failed: {fmt} ({src_form}) and {to_format} ({wform}) "
                               f"outputs differ by {err:.3g} relative (> {tol:g}); "
                               f"{dst} was not written")

    def write(f: BinaryIO) -> None:
        stage("write")
        write_stream(f, spec, out_form, to_format, entries, tensors, to_scheme)
        if caster is not None:
            report["precision"] = caster.finish()

    report["bytes"] = atomic_write_stream(dst, write, overwrite=overwrite,
                                          check=check if verify else None)
    return report


def _infer_num_classes(raw: Mapping[str, np.ndarray], fmt: str, spec: ModelSpec) -> int:
    """The classifier width stored in the checkpoint (default spec's when it cannot tell)."""
    from reparam_core.keymaps import to_canonical

    state = ckpt.flax_to_canonical_keys(raw, spec) if fmt == "flax" else dict(raw)
    try:
        state, _ = to_canonical(state, spec)
    except ReparamError:
        return spec.num_classes
    for key in ("linear.weight", "classifier.weight"):
        a = state.get(key)
        if a is not None and np.ndim(a) == 2:
            n = int(np.shape(a)[1] if fmt == "flax" else np.shape(a)[0])
            return n if n >= 1 else spec.num_classes
    return spec.num_classes


# --------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="input checkpoint (file, or orbax directory)")
    parser.add_argument("dst", help="output checkpoint file")
    parser.add_argument("--model", "-m", required=True, help="architecture name (reparam list)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier width (default: read from the checkpoint)")
    parser.add_argument("--from-format", choices=FORMATS + ("orbax",), default=None,
                        help="input format (default: detected from the file)")
    parser.add_argument("--to-format", choices=FORMATS, default=None,
                        help="output format (default: from DST's extension, else safetensors)")
    parser.add_argument("--from-form", choices=FORMS, default=None,
                        help="require the input to be in this form (default: detect)")
    parser.add_argument("--to-deploy", action="store_true", help="fuse to the deploy form")
    parser.add_argument("--verify", action="store_true",
                        help=f"run source and destination on one input; fail above {VERIFY_RTOL:g}")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="output precision: fuse in float64, round once (bfloat16: "
                             "safetensors only); reports the rounding error, warns on overflow")
    parser.add_argument("--to-scheme", default="canonical", metavar="SCHEME",
                        help="write the keys under another implementation's names: timm, "
                             "mmpretrain, basecls (those the model's family has; default: the "
                             "official names)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")


def run(args: argparse.Namespace) -> int:
    from scripts.progress import Progress

    stages = ["read", "check"] + (["fuse"] if args.to_deploy else []) + ["encode", "write"] + (
        ["verify"] if args.verify else [])
    try:
        with Progress(stages, enabled=None if not args.quiet else False) as progress:
            report = convert(args.src, args.dst, args.model, to_deploy=args.to_deploy,
                             from_format=args.from_format, to_format=args.to_format,
                             from_form=args.from_form, num_classes=args.num_classes,
                             verify=args.verify, overwrite=args.overwrite, progress=progress,
                             dtype=getattr(args, "dtype", None), to_scheme=args.to_scheme)
    except VerificationError as e:
        print(f"reparam convert: error: {e}", file=sys.stderr)
        return 1
    except (ReparamError, OSError) as e:  # bad input: nothing was written
        print(f"reparam convert: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    elif not args.quiet:
        line = (f"wrote {report['dst']} ({report['to_format']}, {report['to_form']} form, "
                f"{report['tensors']} tensors, {report['bytes']} bytes) from {report['src']} "
                f"({report['from_format']}, {report['from_form']} form, {report['scheme']} names)")
        if report["to_scheme"] != "canonical":
            line += f"; written with {report['to_scheme']} names"
        if report.get("precision"):
            line += (f"; {report['precision']['dtype']}: max relative rounding error "
                     f"{report['precision']['max_rel_err']:.3g}")
        if report["verify"]:
            line += f"; verified: max relative error {report['verify']['max_rel_err']:.3g}"
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reparam convert", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
