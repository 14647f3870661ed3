"""The backend surface: build_block, create_model, reparameterize, load_state, export_state,
predict. States are NEUTRAL (canonical keys, OIHW, float32); MegEngine shapes only inside."""
from __future__ import annotations

from typing import Mapping, Union

import numpy as np

from .blocks import (Reparameterizable, RepConv, RepGhostBottleneck, RepGhostModule,
                     RepVGGBlock, RepVGGplusBlock, M, mge, native_to_neutral)
from .models import RepGhostNet, RepVGG, RepVGGplus
from reparam_core import (block_kind, BlockSpec, check_state, get_spec, RepGhostNetSpec, RepVGGSpec,
                          strip_ignored)
from reparam_core.checkpoints import to_neutral
from reparam_core.layouts import to_megengine

Model = Union[RepVGG, RepVGGplus, RepGhostNet]


def build_block(spec: BlockSpec, *, deploy: bool = False) -> Reparameterizable:
    """A block module from a block spec: RepVGGBlock / RepConv / RepVGGplusBlock (by naming and
    SE mode), RepGhostModule or RepGhostBottleneck."""
    cls = {"RepVGGBlock": RepVGGBlock, "RepConv": RepConv, "RepVGGplusBlock": RepVGGplusBlock,
           "RepGhostModule": RepGhostModule, "RepGhostBottleneck": RepGhostBottleneck}[block_kind(spec)]
    return cls(spec, deploy)


def model_from_spec(spec, *, deploy: bool = False) -> Model:
    if isinstance(spec, RepVGGSpec):
        return (RepVGGplus if spec.family == "repvggplus" else RepVGG)(spec, deploy)
    if isinstance(spec, RepGhostNetSpec):
        return RepGhostNet(spec, deploy)
    raise TypeError(f"not a model spec: {type(spec).__name__}")


def create_model(name: str, *, num_classes: int = 1000, deploy: bool = False) -> Model:
    """Any reparam_core.list_models() name, in train (default) or deploy form."""
    return model_from_spec(get_spec(name, num_classes), deploy=deploy)


def reparameterize(module: Reparameterizable, *, inplace: bool = False) -> Reparameterizable:
    """The deploy form of a model or block (the object itself if already deploy).

    MegEngine conversion always builds a NEW deploy module (fused convs written with
    `param[...] = value`) and never mutates the input, so `inplace=True` behaves exactly like
    `inplace=False`; it is accepted for API parity with the other backends."""
    del inplace
    return module.reparameterize()


def _is_model(module) -> bool:
    return isinstance(module, (RepVGG, RepGhostNet))


def load_state(module: Reparameterizable, state: Mapping[str, np.ndarray]) -> Reparameterizable:
    """Load a neutral state (or a basecls-named MegEngine checkpoint) into the module, in place.

    `*num_batches_tracked` keys are ignored; the state is validated against reparam_core's schema
    (CheckpointError / ShapeMismatchError name the key). Returns the module."""
    state = strip_ignored(dict(state))
    schema = module.schema()
    if _is_model(module):  # key maps (basecls, ...) and MegEngine shapes handled by the core
        state, _, _ = to_neutral(state, module.spec, "megengine",
                                 form="deploy" if module.deploy else "train", source="state")
    else:
        check_state(module.spec, state, "deploy" if module.deploy else "train")
    native = {k: np.ascontiguousarray(to_megengine(np.asarray(state[k], np.float32), info),
                                      dtype=np.float32)
              for k, info in schema.items()}
    module.load_state_dict(native, strict=True)
    return module


def export_state(module: Reparameterizable) -> dict[str, np.ndarray]:
    """The module's state in neutral form: canonical keys in schema order, OIHW, float32."""
    return native_to_neutral(module, module.schema())


def predict(module: M.Module, x: np.ndarray) -> np.ndarray:
    """Inference (BN running stats, no dropout, no grad) on an NCHW float32 array -> numpy.
    The module's training flag is restored afterwards."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"predict expects an NCHW array, got shape {x.shape}")
    was_training = module.training
    module.eval()
    try:
        y = module(mge.tensor(x))
        return np.asarray(y.numpy(), dtype=np.float32)
    finally:
        module.train(was_training)


__all__ = ["build_block", "create_model", "model_from_spec", "reparameterize", "load_state",
           "export_state", "predict"]
