"""Run a model in the framework that owns a checkpoint format, chosen by name at call time.

The core (`reparam_core.formats.convert`) runs no framework; it takes a `Predict` function. `predict_in`
is that function for every format: torch and flax through `backends.<name>`, megengine through
the MegEngine worker process (`backends.megengine.remote.MgeWorker`, its own Python), safetensors
(no framework of its own) through the float64 oracle. Backends are imported on first use, so this
module imports in any environment; a missing one raises BackendUnavailableError.
"""

from __future__ import annotations

import importlib

import numpy as np

from reparam_core.blocks.schema import Form
from reparam_core.errors import BackendUnavailableError, CheckpointError
from reparam_core.families.specs import ModelSpec
from reparam_core.formats.convert import State, oracle_predict


def predict_in(fmt: str, spec: ModelSpec, state: State, form: Form, x: np.ndarray) -> np.ndarray:
    """Logits of `spec` in `form` with the neutral `state` on input `x` (NCHW float32), run in the
    framework that owns `fmt` (safetensors: the float64 oracle)."""
    if fmt == "safetensors":
        return oracle_predict(fmt, spec, state, form, x)
    if fmt in ("torch", "flax"):
        try:
            backend = importlib.import_module(f"backends.{fmt}")
        except ImportError as e:
            raise BackendUnavailableError(
                f"--verify for {fmt} needs backends.{fmt} and its framework ({e}); use the .venv environment"
            ) from None
        model = backend.create_model(spec.name, num_classes=spec.num_classes, deploy=form == "deploy")
        backend.load_state(model, state)
        return np.asarray(backend.predict(model, x))
    if fmt == "megengine":
        try:
            remote = importlib.import_module("backends.megengine.remote")
        except ImportError as e:
            raise BackendUnavailableError(
                f"--verify for megengine needs the MegEngine worker client backends.megengine.remote ({e})"
            ) from None
        with remote.MgeWorker() as w:
            return np.asarray(w.predict(model=spec.name, form=form, state=state, x=x, num_classes=spec.num_classes))
    raise CheckpointError(f"cannot run format {fmt!r}")


def read_orbax(path: str) -> State:
    """`backends.flax.orbax_io.read_orbax`, imported on first use (it needs orbax and JAX)."""
    try:
        orbax_io = importlib.import_module("backends.flax.orbax_io")
    except ImportError as e:
        raise BackendUnavailableError(
            f"reading an orbax directory needs backends.flax ({e}); use the .venv environment"
        ) from None
    state: State = orbax_io.read_orbax(path)
    return state


__all__ = ["predict_in", "read_orbax"]
