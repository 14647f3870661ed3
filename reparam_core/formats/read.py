"""Reading any checkpoint: the format's reader (`read_raw`), then the neutral state (`to_neutral`).

`read_raw` returns a flat `{key: np.ndarray}` in the file's own naming and layout; `to_neutral`
maps the keys to canonical names (`keymaps`), converts layouts (`layouts`: MegEngine 5-D grouped
kernels and `(1, C, 1, 1)` biases, Flax HWIO and `(in, out)` kernels) and validates the result
against the spec (`check_state`): canonical keys, OIHW, float32.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import replace

import numpy as np

from ..blocks.schema import FORMS, Form, TensorInfo, state_schema
from ..errors import BackendUnavailableError, CheckpointError, ReparamError
from ..families.specs import ModelSpec
from ..weights.keymaps import key_names, to_canonical
from ..weights.layouts import flax_key, from_flax, from_megengine
from ..weights.state import check_state, strip_ignored
from . import safetensors_io
from .detect import FORMATS, detect_format
from .flax_msgpack import read_flax_msgpack
from .megengine_pickle import read_pickle
from .torch_zip import legacy_torch_error, read_torch
from .tree import State, strip_module_prefix

DirectoryReader = Callable[[str], State]


def read_raw(
    path: str | os.PathLike[str], fmt: str | None = None, *, read_orbax: DirectoryReader | None = None
) -> tuple[State, str]:
    """(flat state in the file's naming/layout, format) of any supported input: a safetensors,
    torch zip, MegEngine pickle or Flax msgpack file, or an orbax directory (reported as `flax`).
    `fmt` overrides detection (`detect_format`). Orbax needs JAX, which the core does not import:
    pass `backends.flax.orbax_io.read_orbax` as `read_orbax` to accept orbax directories."""
    src = os.fspath(path)
    if not os.path.exists(src):
        raise CheckpointError(f"{src}: no such file or directory")
    fmt = fmt or detect_format(src)
    if fmt == "orbax" or (fmt == "flax" and os.path.isdir(src)):
        if read_orbax is None:
            raise BackendUnavailableError(
                f"{src}: an orbax checkpoint directory is read with orbax "
                "(backends.flax.orbax_io.read_orbax, the .venv environment)"
            )
        return read_orbax(src), "flax"
    if fmt == "flax":
        return read_flax_msgpack(src), fmt
    if fmt == "safetensors":
        state, _ = safetensors_io.load_file(src)
        return strip_module_prefix(state), fmt
    if fmt == "torch":
        if not zipfile.is_zipfile(src):
            return read_pickle(src), fmt  # refuses legacy torch with a clear message
        return read_torch(src), fmt
    if fmt == "torch-legacy":
        raise legacy_torch_error(src)
    if fmt == "megengine":
        return read_pickle(src), fmt
    raise CheckpointError(f"{src}: unknown format {fmt!r}; known: {', '.join(FORMATS)}, orbax")


def _all_infos(spec: ModelSpec) -> dict[str, TensorInfo]:
    out: dict[str, TensorInfo] = {}
    for form in FORMS:
        out.update(state_schema(spec, form))
    return out


def flax_to_canonical_keys(state: Mapping[str, np.ndarray], spec: ModelSpec) -> State:
    """Flax keys (`...kernel`, `scale`, `mean`, `var`) -> canonical keys, layouts unchanged."""
    inverse = {flax_key(k, info): k for k, info in _all_infos(spec).items()}
    return {inverse.get(k, k): v for k, v in state.items()}


def to_neutral(
    raw: Mapping[str, np.ndarray], spec: ModelSpec, fmt: str, form: Form | None = None, source: str = "checkpoint"
) -> tuple[State, Form, str]:
    """A raw state -> (neutral state, form, key scheme). Keys are mapped to canonical names,
    layouts converted by the schema and the result validated (`check_state`): errors name the
    file and the offending keys."""
    state = strip_ignored(raw)
    if fmt == "flax":
        state = flax_to_canonical_keys(state, spec)
    keys = tuple(state)  # as the file names them: errors below quote these (keymaps.KeyNames)
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
        if info is not None and a.shape == info.shape and np.issubdtype(a.dtype, np.floating) and a.dtype != np.float32:
            a = a.astype(np.float32)
        out[k] = a
    found = check_state(spec, out, form, source=source, names=key_names(keys, spec, scheme))
    schema = state_schema(spec, found)
    return {k: np.ascontiguousarray(out[k], dtype=np.float32) for k in schema}, found, scheme


def load_neutral(
    path: str | os.PathLike[str], spec: ModelSpec, fmt: str | None = None, form: Form | None = None
) -> tuple[State, Form, str, str]:
    """(neutral state, form, format, key scheme) of a checkpoint file for `spec`."""
    src = os.fspath(path)
    raw, fmt = read_raw(src, fmt)
    state, form, scheme = to_neutral(raw, spec, fmt, form, source=src)
    return state, form, fmt, scheme


def classifier_axes(spec: ModelSpec) -> dict[str, int]:
    """Every canonical key (either form) whose shape depends on the number of classes, with the
    axis that holds it in the torch layout: found by comparing the schemas of the spec at two
    class counts, so every family's head (a Linear, averaged heads, a fused classifier) is found
    without naming it."""
    other = replace(spec, num_classes=spec.num_classes + 1)
    out: dict[str, int] = {}
    for form in FORMS:
        mine, theirs = state_schema(spec, form), state_schema(other, form)
        for key, info in mine.items():
            if key in theirs and info.shape != theirs[key].shape:
                out[key] = next(i for i, (a, b) in enumerate(zip(info.shape, theirs[key].shape)) if a != b)
    return out


def infer_num_classes(raw: Mapping[str, np.ndarray], fmt: str, spec: ModelSpec) -> int:
    """The classifier width stored in a raw checkpoint: the class axis of the first tensor that
    `classifier_axes` names (rows of the torch/MegEngine `(classes, features)` linear weight,
    columns of the Flax `(features, classes)` kernel); `spec.num_classes` when the keys do not
    map or no classifier is found."""
    state = flax_to_canonical_keys(raw, spec) if fmt == "flax" else dict(raw)
    try:
        state, _ = to_canonical(state, spec)
    except ReparamError:
        return spec.num_classes
    for key, axis in classifier_axes(spec).items():
        a = state.get(key)
        if a is None:
            continue
        shape = np.shape(a)
        if fmt == "flax" and len(shape) == 2:  # Flax kernels are (in, out)
            axis = 1 - axis
        if axis < len(shape) and shape[axis] >= 1:
            return int(shape[axis])
    return spec.num_classes


__all__ = ["read_raw", "flax_to_canonical_keys", "to_neutral", "load_neutral", "classifier_axes", "infer_num_classes"]
