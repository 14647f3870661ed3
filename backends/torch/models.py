"""RepVGG, RepVGGplus and RepGhostNet as torch.nn modules: thin named classes over the generic
RepModule, built from the model's description.

Module paths follow the official PyTorch code, so `state_dict()` keys equal
reparam_core.state_schema(spec, form) (plus `num_batches_tracked`) and official checkpoints load
with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import torch

from reparam_core import get_spec

from .blocks import RepModule, build_block


class RepVGG(RepModule):
    """RepVGG (and RepVGG-D2se): `stage0`, stages `stage1..stage4` of blocks
    (`stage1.0.rbr_dense.conv.weight`), global average pool, `linear`."""

    kind = "RepVGG"
    needs = "a RepVGG family spec"


class RepVGGplus(RepVGG):
    """RepVGGplus: post-SE blocks under `stageN.blocks.i`, stage3 split into
    `stage3_first`/`stage3_second`, and in train form the auxiliary heads `stage1_aux`,
    `stage2_aux`, `stage3_first_aux` (`forward_with_aux`) and the custom L2 (`custom_l2`)."""

    kind = "RepVGGplus"
    needs = "a RepVGGplus family spec"


class RepGhostNet(RepModule):
    """RepGhostNet: `conv_stem`/`bn1`, `blocks.i.j` bottlenecks, the last 1x1 conv stage, global
    pool, `conv_head`, dropout (training mode only), `classifier`."""

    kind = "RepGhostNet"
    needs = "a RepGhostNetSpec"


def create_model(name: str, *, num_classes: int = 1000, deploy: bool = False) -> RepModule:
    """A registered model (reparam_core.list_models()) with fresh weights, in train or deploy form."""
    return build_block(get_spec(name, num_classes), deploy=deploy)


def empty_model(name: str, *, num_classes: int = 1000, deploy: bool = False) -> RepModule:
    """A registered model without random initialisation (built on the meta device, then given
    uninitialised CPU storage): fast for big models; every tensor of the state schema must be
    set by `load_state` (BN's `num_batches_tracked`, outside the schema, starts at 0)."""
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, deploy=deploy)
    model = model.to_empty(device="cpu")
    for key, buf in model.named_buffers():
        if key.endswith("num_batches_tracked"):
            buf.zero_()
    return model


__all__ = ["RepVGG", "RepVGGplus", "RepGhostNet", "create_model", "empty_model"]
