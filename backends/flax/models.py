"""The model classes (thin named RepModule subclasses) and the model builders.

Module paths follow the official PyTorch ones (containers are nnx.Dict), so the NNX state path
of each tensor joined with "." equals reparam_core.weights.layouts.flax_key(canonical key), e.g.
`stage1.0.rbr_dense.conv.kernel`, `stage2.blocks.3.post_se.down.kernel`,
`blocks.3.0.ghost1.primary_conv.1.scale`. Inputs are NHWC inside.
"""

from __future__ import annotations

from flax import nnx

from reparam_core import block_kind, get_spec

from .blocks import RepModule, abstract_module, block_class, named
from .state import fill_abstract_other_variables, fresh_state, load_state, module_schema, seed_from

__all__ = ["RepVGG", "RepVGGplus", "RepGhostNet", "create_model", "empty_model"]


@named
class RepVGG(RepModule):
    """RepVGG (and RepVGG-D2se): `stage0` block, stages `stage1..stage4` of blocks
    (`stage1.0.rbr_dense.conv.kernel`), global average pool, `linear`."""

    kind = "RepVGG"


@named
class RepVGGplus(RepVGG):
    """RepVGGplus: blocks with post-SE under `stageN.blocks.i`, stage3 split into
    `stage3_first`/`stage3_second`, and in train form the auxiliary heads `stage1_aux`,
    `stage2_aux`, `stage3_first_aux` (conv3x3 s2 + BN `0.conv`/`0.bn`, ReLU, pool, Linear `3`)."""

    kind = "RepVGGplus"


@named
class RepGhostNet(RepModule):
    """RepGhostNet: `conv_stem`/`bn1`/ReLU, `blocks.i.j` bottlenecks, the last 1x1 conv stage
    `blocks.N.0`, global pool, `conv_head` + ReLU, dropout (training mode only), `classifier`."""

    kind = "RepGhostNet"


def _abstract_model(name: str, num_classes: int, deploy: bool, rng_seed: int) -> RepModule:
    spec = get_spec(name, num_classes)
    model = abstract_module(block_class(block_kind(spec)), spec, deploy)
    fill_abstract_other_variables(model, rng_seed)
    return model


def empty_model(name: str, *, num_classes: int = 1000, deploy: bool = False) -> RepModule:
    """A registered model built abstractly (nnx.eval_shape: no initialisation, fast; the build
    is cached per spec): every Param/BatchStat is a shape placeholder until `load_state` fills
    it. RNG streams (dropout) are concrete. Use it to load checkpoints into big models without
    paying for random init."""
    return _abstract_model(name, num_classes, deploy, 0)


def create_model(
    name: str, *, num_classes: int = 1000, deploy: bool = False, rngs: nnx.Rngs | None = None
) -> RepModule:
    """A registered model (reparam_core.list_models()) with fresh weights, in train or deploy
    form. Built abstractly and filled from numpy (state.fresh_state, seeded from `rngs`'
    `params` stream; default nnx.Rngs(0)): eager Flax init compiles one XLA random op per
    distinct shape and takes tens of seconds on CPU. The dropout RNG stream comes from `rngs`
    too. Modules start in training mode (BN batch statistics, dropout on), like torch; `predict`
    always runs in inference mode. (The classes' own constructors do the usual Flax init.)"""
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    model = _abstract_model(name, num_classes, deploy, seed_from(rngs))
    return load_state(model, fresh_state(module_schema(model), seed_from(rngs)), validate=False)
