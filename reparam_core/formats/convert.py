"""Checkpoint conversion: read -> key map -> form change (fuse) -> dtype cast -> streamed atomic
write -> verify. The library side of `reparam convert`; numpy only.

Every conversion goes through the neutral state (canonical keys, OIHW, float32): read SRC (format
from its bytes, or `from_format`), map foreign key names (timm, mmpretrain, basecls), convert
layouts, validate against the architecture (keys, shapes, NaN/Inf, BN variance, form), optionally
fuse to the deploy form (float64 algebra), then write DST atomically (`atomic.atomic_write_stream`:
a temp file in the same directory, fsync, rename; an existing DST is kept unless `overwrite`; on
failure nothing is left).

Memory: without verification the conversion streams: deploy weights are fused block by block,
each written as soon as it is ready (safetensors and torch output; MegEngine/Flax output are
encoded at the end) and each source tensor is dropped once used, so the peak stays near the size
of the source checkpoint. Verification keeps the source state for the comparison.

`dtype` float16|bfloat16 fuses in float64 and rounds once to the half type (bfloat16: safetensors
output only, numpy has no bfloat16); the report gives the largest relative rounding error and a
PrecisionWarning names tensors that overflow the type.

Output is deterministic: the same input gives byte-identical files in every format (the torch
zip is written by `formats.torch_zip`, not torch.save, whose archives carry a random
serialization id).

Verification re-reads the written temp file and runs source and destination through `predict`
on one random input (`verify_input`); above `VERIFY_RTOL` relative error (`relative_error`)
nothing is written. The core runs no framework: the default `predict` is the float64 oracle for
every format, and `backends.dispatch.predict_in` runs each side in the framework owning its
format (what the CLI passes).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, cast

import numpy as np

from ..blocks import oracle
from ..blocks.fuse import iter_deploy_state, reparameterize_state
from ..blocks.schema import Form, state_schema
from ..errors import CheckpointError, VerificationError
from ..families.specs import ModelSpec, get_spec
from ..weights import keymaps
from ..weights.precision import HalfDtype, PrecisionWarning, cast_state
from . import safetensors_io
from .atomic import atomic_write_stream
from .detect import FORMATS, format_from_extension
from .read import DirectoryReader, infer_num_classes, load_neutral, read_raw, to_neutral
from .write import Entry, write_stream

State = dict[str, np.ndarray]
Predict = Callable[[str, ModelSpec, State, Form, np.ndarray], np.ndarray]
"""(format, spec, neutral state, form, input NCHW) -> logits of the model run in `format`'s framework."""

DTYPES = ("float32", "float16", "bfloat16")
VERIFY_RTOL = 1e-4  # max |a - b| / max |a| between source and destination outputs
# half-precision output: float16 keeps ~11 bits, bfloat16 ~8 bits; errors compound over depth
VERIFY_RTOL_HALF = {"float16": 1e-2, "bfloat16": 5e-2}


def verify_input(spec: ModelSpec, seed: int = 0) -> np.ndarray:
    """One standard-normal float32 image, `(1, 3, 32, 32)` for RepVGG-mini, else `(1, 3, 64, 64)`."""
    size = 32 if spec.name == "RepVGG-mini" else 64
    return np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)


def oracle_predict(fmt: str, spec: ModelSpec, state: State, form: Form, x: np.ndarray) -> np.ndarray:
    """The float64 oracle's output for any format (the state is neutral whatever the file was)."""
    return np.asarray(oracle.forward(spec, state, x, form))


def relative_error(ref: np.ndarray, out: np.ndarray) -> float:
    """max |ref - out| / max |ref| (denominator at least 1e-12), in float64."""
    ref = np.asarray(ref, np.float64)
    out = np.asarray(out, np.float64)
    if ref.shape != out.shape:
        raise VerificationError(f"verification failed: output shapes differ {ref.shape} vs {out.shape}")
    return float(np.max(np.abs(ref - out)) / max(float(np.max(np.abs(ref))), 1e-12))


def _half(dtype: str | None) -> HalfDtype | None:
    if dtype in (None, "float32"):
        return None
    if dtype in ("float16", "bfloat16"):
        return cast(HalfDtype, dtype)
    raise CheckpointError(f"unknown --dtype {dtype!r}; choose from {', '.join(DTYPES)}")


def _fused_stream(spec: ModelSpec, state: State, compute64: bool) -> Iterator[tuple[str, np.ndarray]]:
    """The deploy-form tensors of a train-form neutral `state`, in schema order, from the core's
    streaming fusion (bit-identical to reparameterize_state). Every source tensor is removed
    from `state` once it is no longer needed, so the caller can stream the output and keep the
    peak memory near one copy of the model."""

    def get(key: str) -> np.ndarray:
        return state[key].astype(np.float64) if compute64 else state[key]

    def drop(key: str) -> None:
        state.pop(key, None)

    return iter_deploy_state(spec, get, drop)


class _Caster:
    """Casts tensors to a half dtype one at a time (precision.cast_state), accumulating the
    largest relative rounding error and the keys that overflow."""

    def __init__(self, dtype: HalfDtype) -> None:
        self.dtype = dtype
        self.max_rel_err = 0.0
        self.overflowed: list[str] = []

    def __call__(self, key: str, a: np.ndarray) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrecisionWarning)
            out, rep = cast_state({key: a}, self.dtype)
        self.max_rel_err = max(self.max_rel_err, rep.max_rel_error)
        self.overflowed += rep.overflowed
        v = out[key]
        return safetensors_io.BFloat16(v) if self.dtype == "bfloat16" else v

    def finish(self) -> dict[str, Any]:
        if self.overflowed:
            warnings.warn(
                f"{len(self.overflowed)} tensor(s) overflow {self.dtype} after fusion "
                f"(stored as inf): {', '.join(self.overflowed[:5])}",
                PrecisionWarning,
                stacklevel=3,
            )
        return {"dtype": self.dtype, "max_rel_err": self.max_rel_err, "overflowed": list(self.overflowed)}


def _validate_request(
    dst: str, from_format: str | None, to_format: str, dtype: str | None, overwrite: bool
) -> HalfDtype | None:
    """Refuse a bad request before any file is read; the half dtype asked for (None: float32)."""
    if from_format is not None and from_format not in FORMATS + ("orbax",):
        raise CheckpointError(f"unknown input format {from_format!r}; choose from {', '.join(FORMATS)}")
    if to_format not in FORMATS:
        raise CheckpointError(f"unknown output format {to_format!r}; choose from {', '.join(FORMATS)}")
    half = _half(dtype)
    if half == "bfloat16" and to_format != "safetensors":
        raise CheckpointError(
            "--dtype bfloat16 is only supported for safetensors output (numpy "
            "has no bfloat16 type); use --dtype float16 or a .safetensors DST"
        )
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it")
    return half


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    model: str,
    *,
    to_deploy: bool = False,
    from_format: str | None = None,
    to_format: str | None = None,
    from_form: Form | None = None,
    num_classes: int | None = None,
    verify: bool = False,
    predict: Predict = oracle_predict,
    overwrite: bool = False,
    stage: Callable[[str], None] | None = None,
    dtype: str | None = None,
    to_scheme: str = "canonical",
    read_orbax: DirectoryReader | None = None,
) -> dict[str, Any]:
    """Convert checkpoint `src` of `model` to `dst`; returns a report dict. Raises ReparamError
    subclasses (nothing is written then; VerificationError when verification failed). `dtype`:
    None/"float32", "float16" or "bfloat16" (fused in float64, rounded once; see the module
    docstring). `to_scheme`: write the keys under another implementation's names (`timm`,
    `mmpretrain`, `basecls`; see keymaps). `verify` runs both sides through `predict`; `stage`
    is called with each stage's name (read, check, fuse, encode, write, verify) as it starts.
    `read_orbax` reads an orbax directory `src` (see `formats.read_raw`)."""
    src, dst = os.fspath(src), os.fspath(dst)
    stage = stage or (lambda name: None)
    # unknown names and num_classes < 1 fail first
    spec = get_spec(model, 1000 if num_classes is None else num_classes)
    to_format = to_format or format_from_extension(dst)
    half = _validate_request(dst, from_format, to_format, dtype, overwrite)
    keymaps.from_canonical({}, spec, to_scheme)  # an unknown scheme fails before any work

    stage("read")
    raw, fmt = read_raw(src, from_format, read_orbax=read_orbax)
    if num_classes is None:
        spec = get_spec(model, infer_num_classes(raw, fmt, spec))
    stage("check")
    state, src_form, scheme = to_neutral(raw, spec, fmt, from_form, source=src)
    del raw  # to_neutral shares the arrays: only `state` holds them now
    fuse = to_deploy and src_form == "train"
    out_form: Form = "deploy" if fuse else src_form
    schema = state_schema(spec, out_form)
    report: dict[str, Any] = {
        "src": src,
        "dst": dst,
        "model": spec.name,
        "num_classes": spec.num_classes,
        "from_format": fmt,
        "to_format": to_format,
        "from_form": src_form,
        "to_form": out_form,
        "scheme": scheme,
        "to_scheme": to_scheme,
        "tensors": len(schema),
        "bytes": None,
        "dtype": half or "float32",
        "precision": None,
        "verify": None,
    }

    tensors: Iterable[tuple[str, Any]]
    if verify:  # keep the source state for the comparison: fuse the whole state at once
        out = state
        if fuse:
            stage("fuse")
            out = reparameterize_state(spec, {k: v.astype(np.float64) for k, v in state.items()} if half else state)
        stage("encode")
        tensors = ((k, out[k]) for k in schema)
    else:
        if fuse:
            stage("fuse")
            tensors = _fused_stream(spec, state, compute64=half is not None)
        else:
            tensors = ((k, state.pop(k)) for k in schema)
        stage("encode")
    caster = _Caster(half) if half else None
    if caster is not None:
        tensors = ((k, caster(k, a)) for k, a in tensors)
    entries: list[Entry] = [(k, half or "float32", tuple(info.shape)) for k, info in schema.items()]

    def check(tmp: str) -> None:
        stage("verify")
        written, wform, _, _ = load_neutral(tmp, spec, to_format, out_form)
        x = verify_input(spec)
        err = relative_error(predict(fmt, spec, state, src_form, x), predict(to_format, spec, written, wform, x))
        tol = VERIFY_RTOL_HALF[half] if half else VERIFY_RTOL
        report["verify"] = {
            "max_rel_err": err,
            "tolerance": tol,
            "input": list(x.shape),
            "source": f"{fmt}/{src_form}",
            "destination": f"{to_format}/{wform}",
        }
        if not err <= tol:
            raise VerificationError(
                f"verification failed: {fmt} ({src_form}) and {to_format} ({wform}) "
                f"outputs differ by {err:.3g} relative (> {tol:g}); "
                f"{dst} was not written"
            )

    def write(f: BinaryIO) -> None:
        stage("write")
        write_stream(f, spec, out_form, to_format, entries, tensors, to_scheme)
        if caster is not None:
            report["precision"] = caster.finish()

    report["bytes"] = atomic_write_stream(dst, write, overwrite=overwrite, check=check if verify else None)
    return report


__all__ = [
    "DTYPES",
    "VERIFY_RTOL",
    "VERIFY_RTOL_HALF",
    "Predict",
    "verify_input",
    "oracle_predict",
    "relative_error",
    "convert",
]
