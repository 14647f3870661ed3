"""RepVGG, RepVGGplus and RepGhostNet: the generic RepModule under their official names.

Module paths follow the canonical names exactly: `stage0`, `stage1.0` (numeric children of a
scope, indexable as `model.stage1[0]`), RepVGGplus `stage1.blocks.0` and the train-form aux
heads `stage1_aux.0.conv/.bn` + `stage1_aux.3`, RepGhostNet `blocks.i.j`, `conv_head`,
`classifier`.
"""

from __future__ import annotations

from .blocks import RepModule


class RepVGG(RepModule):
    """RepVGG: stem block `stage0`, stages `stage1..4` of RepVGG blocks, global pool, `linear`."""

    kind = "RepVGG"


class RepVGGplus(RepVGG):
    """RepVGGplus: post-SE blocks under `stageN.blocks.i`, stage3 split in `stage3_first` /
    `stage3_second`, aux heads (train form only) read by `forward_with_aux`."""

    kind = "RepVGGplus"


class RepGhostNet(RepModule):
    """RepGhostNet: conv_stem + bn1 + ReLU, `blocks.i.j` bottlenecks, the last 1x1 ConvBnAct
    (`blocks.N.0.conv/.bn1`), global pool, `conv_head` + ReLU, dropout (training only),
    `classifier`."""

    kind = "RepGhostNet"


__all__ = ["RepVGG", "RepVGGplus", "RepGhostNet"]
