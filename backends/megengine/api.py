"""The backend surface: build_block, create_model, reparameterize, load_state, export_state,
predict. States are NEUTRAL (canonical keys, OIHW, float32); MegEngine shapes only inside."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from reparam_core import ShapeMismatchError, SpecError, check_state, describe, get_spec, strip_ignored
from reparam_core.blocks.nodes import Model, SpecLike
from reparam_core.families.specs import ModelSpec
from reparam_core.formats import to_neutral

from .blocks import M, RepModule, block_class, mge, neutral_state, write_state
from .profiling import fastrun as _fastrun


def build_block(spec: SpecLike, *, deploy: bool = False) -> RepModule:
    """A block module of the class of its kind (RepVGGBlock, RepConv, RepVGGplusBlock,
    RepGhostModule, RepGhostBottleneck, or one made for a new kind)."""
    return block_class(describe(spec).kind)(spec, deploy)


def model_from_spec(spec: SpecLike, *, deploy: bool = False) -> RepModule:
    """A model module (RepVGG, RepVGGplus, RepGhostNet, ...) from a model spec."""
    desc = describe(spec)
    if not isinstance(desc, Model):
        raise SpecError(f"not a model spec: {type(spec).__name__} describes a {desc.kind} block (use build_block)")
    return block_class(desc.kind)(spec, deploy)


def create_model(name: str, *, num_classes: int = 1000, deploy: bool = False) -> RepModule:
    """Any reparam_core.list_models() name, in train (default) or deploy form."""
    return model_from_spec(get_spec(name, num_classes), deploy=deploy)


def reparameterize(module: RepModule) -> RepModule:
    """The deploy form of a model or block (the object itself if already deploy).

    MegEngine conversion always builds a NEW deploy module (the fused state loaded with one
    `load_state_dict`, which copies) and never mutates the input."""
    return module.reparameterize()


def load_state(module: RepModule, state: Mapping[str, np.ndarray]) -> RepModule:
    """Load a neutral state (or a basecls-named MegEngine checkpoint) into the module, in place.

    `*num_batches_tracked` keys are ignored; the state is validated against reparam_core's schema
    (CheckpointError / ShapeMismatchError name the key). Returns the module."""
    state = strip_ignored(dict(state))
    spec = module.spec
    if isinstance(spec, ModelSpec):  # a model: key maps
        # (basecls, ...) and MegEngine shapes, through the core
        state, _, _ = to_neutral(state, spec, "megengine", form=module.form, source="state")
    else:
        check_state(module.spec, state, module.form)
    write_state(module, state)
    return module


def export_state(module: RepModule) -> dict[str, np.ndarray]:
    """The module's state in neutral form: canonical keys in schema order, OIHW, float32."""
    return neutral_state(module)


def predict(module: M.Module, x: np.ndarray, *, fastrun: bool = False) -> np.ndarray:
    """Inference (BN running stats, no dropout, no grad) on an NCHW float32 array -> numpy.
    The module's training flag is restored afterwards. `fastrun=True`: algorithms chosen by
    profiling on this machine (backends.megengine.profiling; the first call of a new shape pays
    the profiling, the choices persist across processes); outputs equal the default's within
    float rounding."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ShapeMismatchError(f"predict expects an NCHW input, got shape {x.shape}")
    was_training = module.training
    module.eval()
    try:
        with _fastrun(fastrun):
            y = module(mge.tensor(x))
            return np.asarray(y.numpy(), dtype=np.float32)
    finally:
        module.train(was_training)


__all__ = ["build_block", "create_model", "model_from_spec", "reparameterize", "load_state", "export_state", "predict"]
