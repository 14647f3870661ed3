"""`reparam convert`: checkpoints between PyTorch, MegEngine, Flax and safetensors.

    python -m scripts.convert SRC DST --model RepVGG-A0 [--to-deploy] [--verify] [--overwrite]

Every conversion goes through the neutral state (canonical keys, OIHW, float32): read SRC (format
from its bytes, or --from-format), map foreign key names (timm, mmpretrain, basecls), convert
layouts, validate against the architecture (keys, shapes, NaN/Inf, BN variance, form), optionally
fuse to the deploy form (float64 algebra), then write DST atomically (temp file in the same
directory, fsync, rename; an existing DST is kept unless --overwrite; on failure nothing is left).

--verify re-reads the written temp file and runs source and destination in their own frameworks
(torch: backends.torch, flax: backends.flax, megengine: the worker in scripts.mge_client,
safetensors: the float64 oracle) on one random input; above 1e-4 relative error nothing is written.

Flax files are msgpack in `flax.serialization` encoding (ndarrays as ext type 1): a nested dict of
the NNX state keyed by Flax keys (HWIO kernels, `(in, out)` linear kernels, BN scale/bias/mean/var).
An orbax checkpoint directory that restores to a plain pytree of arrays is accepted as input.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from collections import OrderedDict
from typing import Any, Callable, Mapping

import numpy as np

from reparam_core import checkpoints as ckpt
from reparam_core import oracle
from reparam_core.equivalent import reparameterize_state
from reparam_core.errors import BackendUnavailableError, CheckpointError, ReparamError
from reparam_core.layouts import flax_key, to_flax
from reparam_core.schema import FORMS, Form, state_schema
from reparam_core.specs import ModelSpec, get_spec

FORMATS = ("torch", "megengine", "flax", "safetensors")
VERIFY_RTOL = 1e-4  # max |a - b| / max |a| between source and destination outputs

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
        arr = np.ascontiguousarray(to_flax(np.asarray(state[key], np.float32), info))
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
        shape, dtype, raw = msgpack.unpackb(payload, raw=False)
        if dtype not in _FLAX_DTYPES:
            raise CheckpointError(f"{path}: unsupported array dtype {dtype!r}")
        dt = np.dtype(dtype)
        if len(raw) != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise CheckpointError(f"{path}: array of shape {shape} ({dtype}) has {len(raw)} bytes")
        return np.frombuffer(raw, dt).reshape(shape).copy()

    try:
        tree = msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except CheckpointError:
        raise
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
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


def encode(spec: ModelSpec, state: State, form: Form, fmt: str) -> bytes:
    """A neutral state as the bytes of a `fmt` checkpoint."""
    schema = state_schema(spec, form)
    ordered = OrderedDict((k, np.ascontiguousarray(state[k], np.float32)) for k in schema)
    if fmt == "safetensors":
        return ckpt.safetensors_bytes(ordered, {"model": spec.name, "form": form,
                                                "format": "pt", "producer": "reparam"})
    if fmt == "megengine":
        return ckpt.megengine_bytes(spec, ordered, form)
    if fmt == "flax":
        return flax_msgpack_bytes(spec, ordered, form)
    if fmt == "torch":
        try:
            import torch
        except ImportError:
            return ckpt.torch_zip_bytes(ordered)
        buf = io.BytesIO()
        torch.save(OrderedDict((k, torch.from_numpy(v.copy())) for k, v in ordered.items()), buf)
        return buf.getvalue()
    raise CheckpointError(f"unknown output format {fmt!r}; choose from {', '.join(FORMATS)}")


def atomic_write(dst: str, data: bytes, *, overwrite: bool = False,
                 check: Callable[[str], None] | None = None) -> None:
    """Write `data` to `dst` via a temp file in the same directory (fsync, then rename). `check`
    runs on the temp file before it becomes `dst`. Without `overwrite` an existing `dst` is never
    touched; on any failure the temp file is removed and `dst` is as it was."""
    directory = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(directory):
        raise CheckpointError(f"cannot write {dst}: directory {directory} does not exist")
    if os.path.isdir(dst):
        raise CheckpointError(f"cannot write {dst}: it is a directory")
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(dst)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        if overwrite:
            os.replace(tmp, dst)
        else:
            try:
                os.link(tmp, dst)  # fails if dst appeared meanwhile: never clobber it
            except FileExistsError:
                raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it") from None
            except OSError:  # filesystems without hard links
                if os.path.exists(dst):
                    raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it") from None
                os.replace(tmp, dst)
        _fsync_dir(directory)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
            from scripts.mge_client import MgeWorker
        except ImportError as e:
            raise BackendUnavailableError(f"--verify for megengine needs the MegEngine worker "
                                          f"client scripts.mge_client ({e})") from None
        with MgeWorker() as w:
            return np.asarray(w.predict(model=spec.name, form=form, state=state, x=x,
                                        num_classes=spec.num_classes))
    raise CheckpointError(f"cannot run format {fmt!r}")


def relative_error(ref: np.ndarray, out: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    out = np.asarray(out, np.float64)
    if ref.shape != out.shape:
        raise ReparamError(f"verification failed: output shapes differ {ref.shape} vs {out.shape}")
    return float(np.max(np.abs(ref - out)) / max(float(np.max(np.abs(ref))), 1e-12))


# --------------------------------------------------------------------------- API

def convert(src: str, dst: str, model: str, *, to_deploy: bool = False,
            from_format: str | None = None, to_format: str | None = None,
            from_form: Form | None = None, num_classes: int | None = None,
            verify: bool = False, overwrite: bool = False, progress: Any = None) -> dict:
    """Convert checkpoint `src` of `model` to `dst`; returns a report dict. Raises ReparamError
    subclasses (nothing is written then)."""
    src, dst = os.fspath(src), os.fspath(dst)
    stage = progress.stage if progress is not None else (lambda name: None)
    spec = get_spec(model, num_classes or 1000)  # unknown names fail first, with suggestions
    if from_format is not None and from_format not in FORMATS + ("orbax",):
        raise CheckpointError(f"unknown input format {from_format!r}; choose from {', '.join(FORMATS)}")
    to_format = to_format or ckpt.format_from_extension(dst)
    if to_format not in FORMATS:
        raise CheckpointError(f"unknown output format {to_format!r}; choose from {', '.join(FORMATS)}")
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it")

    stage("read")
    raw, fmt = read_any(src, from_format)
    if num_classes is None:
        spec = get_spec(model, _infer_num_classes(raw, fmt, spec))
    stage("check")
    state, form, scheme = ckpt.to_neutral(raw, spec, fmt, from_form, source=src)
    src_state, src_form = state, form
    if to_deploy and form == "train":
        stage("fuse")
        state, form = reparameterize_state(spec, state), "deploy"
    stage("encode")
    data = encode(spec, state, form, to_format)
    report: dict = {"src": src, "dst": dst, "model": spec.name, "num_classes": spec.num_classes,
                    "from_format": fmt, "to_format": to_format, "from_form": src_form,
                    "to_form": form, "scheme": scheme, "tensors": len(state), "bytes": len(data),
                    "verify": None}

    def check(tmp: str) -> None:
        stage("verify")
        written, wform, _, _ = load_neutral(tmp, spec, to_format, form)
        x = verify_input(spec)
        ref = predict_in(fmt, spec, src_state, src_form, x)
        out = predict_in(to_format, spec, written, wform, x)
        err = relative_error(ref, out)
        report["verify"] = {"max_rel_err": err, "tolerance": VERIFY_RTOL, "input": list(x.shape),
                            "source": f"{fmt}/{src_form}", "destination": f"{to_format}/{wform}"}
        if not err <= VERIFY_RTOL:
            raise ReparamError(f"verification failed: {fmt} ({src_form}) and {to_format} ({wform}) "
                               f"outputs differ by {err:.3g} relative (> {VERIFY_RTOL:g}); "
                               f"{dst} was not written")

    stage("write")
    atomic_write(dst, data, overwrite=overwrite, check=check if verify else None)
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
                             verify=args.verify, overwrite=args.overwrite, progress=progress)
    except ReparamError as e:
        print(f"reparam convert: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"reparam convert: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    elif not args.quiet:
        line = (f"wrote {report['dst']} ({report['to_format']}, {report['to_form']} form, "
                f"{report['tensors']} tensors, {report['bytes']} bytes) from {report['src']} "
                f"({report['from_format']}, {report['from_form']} form, {report['scheme']} names)")
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
