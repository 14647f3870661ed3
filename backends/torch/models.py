"""RepVGG, RepVGGplus and RepGhostNet as torch.nn modules, built from reparam_core's model specs.

Module paths follow the official PyTorch code, so `state_dict()` keys equal
reparam_core.state_schema(spec, form) (plus `num_batches_tracked`) and official checkpoints load
with `load_state_dict(strict=True)`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from reparam_core import RepGhostNetSpec, ReparamError, RepVGGSpec, get_spec

from .blocks import (RepGhostBottleneck, RepModule, RepVGGBlock, build_block, conv_bn,
                     fused_state_dict)


class _CompositeModel(RepModule):
    """A model whose deploy form is built by reparameterizing every block inside it."""

    def _deploy_state_dict(self, new: RepModule) -> dict[str, torch.Tensor]:
        return fused_state_dict(self, new)


class RepVGGStage(nn.Module):
    """A RepVGGplus stage: its blocks under `blocks` (module paths `stageN.blocks.i`)."""

    def __init__(self, blocks: list[RepModule]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class RepVGG(_CompositeModel):
    """RepVGG (and RepVGG-D2se): `stage0` block, stages `stage1..stage4` as nn.Sequential of
    blocks (`stage1.0.rbr_dense.conv.weight`), global average pool, `linear`."""

    spec: RepVGGSpec
    family = "repvgg"

    def __init__(self, spec: RepVGGSpec, deploy: bool = False) -> None:
        super().__init__(spec, deploy)
        if not isinstance(spec, RepVGGSpec) or spec.family != self.family:
            raise ReparamError(f"{type(self).__name__} needs a {self.family} spec, got "
                               f"{getattr(spec, 'name', type(spec).__name__)!r}")
        self.stage0 = build_block(spec.stem, deploy=deploy)
        self.stage_names = [st.name for st in spec.stages]
        for st in spec.stages:
            self.add_module(st.name, self._make_stage([build_block(b, deploy=deploy)
                                                       for b in st.blocks]))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(spec.num_features, spec.num_classes)

    @staticmethod
    def _make_stage(blocks: list[RepModule]) -> nn.Module:
        return nn.Sequential(*blocks)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.gap(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage0(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self._head(x)

    def rep_blocks(self) -> list[tuple[str, RepVGGBlock]]:
        """Every block with its module path (the spec's canonical prefix), in forward order."""
        return [(prefix, self.get_submodule(prefix)) for prefix, _ in self.spec.blocks()]


class RepVGGplus(RepVGG):
    """RepVGGplus: blocks with post-SE under `stageN.blocks.i`, stage3 split into
    `stage3_first`/`stage3_second`, and in train form the auxiliary heads `stage1_aux`,
    `stage2_aux`, `stage3_first_aux` (conv3x3 s2 + BN + ReLU as `0`, pool, flatten, Linear `3`)."""

    family = "repvggplus"

    def __init__(self, spec: RepVGGSpec, deploy: bool = False) -> None:
        super().__init__(spec, deploy)
        if not deploy:
            for stage in spec.aux_heads:
                self.add_module(f"{stage}_aux", self._aux_head(spec.aux_channels(stage)))

    @staticmethod
    def _make_stage(blocks: list[RepModule]) -> nn.Module:
        return RepVGGStage(blocks)

    def _aux_head(self, channels: int) -> nn.Sequential:
        down = conv_bn(channels, channels, 3, stride=2, padding=1, eps=self.spec.stem.eps)
        down.add_module("relu", nn.ReLU())
        return nn.Sequential(down, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(channels, self.spec.num_classes))

    def forward_with_aux(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Main logits and every auxiliary head's logits (train form only)."""
        if self.deploy:
            raise ReparamError("forward_with_aux: the auxiliary heads exist in train form only; "
                               "this RepVGGplus is in deploy form")
        out: dict[str, torch.Tensor] = {}
        x = self.stage0(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.spec.aux_heads:
                out[f"{name}_aux"] = getattr(self, f"{name}_aux")(x)
        return {"main": self._head(x), **out}

    def custom_l2(self) -> torch.Tensor:
        """The RepVGGplus custom L2 penalty summed over every block, identity branch included
        (train form only; see RepVGGBlock.custom_l2)."""
        if self.deploy:
            raise ReparamError("custom_l2 is defined in train form only; this RepVGGplus is in "
                               "deploy form")
        return torch.stack([block.custom_l2() for _, block in self.rep_blocks()]).sum()


class ConvBnAct(nn.Sequential):
    """RepGhostNet's last stage: 1x1 conv, BN (`bn1`), ReLU."""

    def __init__(self, cin: int, cout: int, eps: float) -> None:
        super().__init__(OrderedDict([("conv", nn.Conv2d(cin, cout, 1, bias=False)),
                                      ("bn1", nn.BatchNorm2d(cout, eps=eps)),
                                      ("act1", nn.ReLU())]))


class RepGhostNet(_CompositeModel):
    """RepGhostNet: `conv_stem`/`bn1`/ReLU, `blocks.i.j` bottlenecks, the last ConvBnAct stage,
    global pool, `conv_head` + ReLU, dropout (training mode only), `classifier`."""

    spec: RepGhostNetSpec

    def __init__(self, spec: RepGhostNetSpec, deploy: bool = False) -> None:
        super().__init__(spec, deploy)
        if not isinstance(spec, RepGhostNetSpec):
            raise ReparamError(f"RepGhostNet needs a RepGhostNetSpec, got {type(spec).__name__}")
        self.conv_stem = nn.Conv2d(3, spec.stem_channels, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.stem_channels, eps=spec.eps)
        self.act1 = nn.ReLU()
        stages: list[nn.Module] = [nn.Sequential(*(RepGhostBottleneck(b, deploy) for b in stage))
                                   for stage in spec.stages]
        stages.append(nn.Sequential(ConvBnAct(spec.last_in_channels, spec.last_channels, spec.eps)))
        self.blocks = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(spec.last_channels, spec.head_channels, 1, bias=True)
        self.act2 = nn.ReLU()
        self.dropout = nn.Dropout(spec.dropout)
        self.classifier = nn.Linear(spec.head_channels, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act1(self.bn1(self.conv_stem(x))))
        x = self.act2(self.conv_head(self.global_pool(x)))
        return self.classifier(self.dropout(torch.flatten(x, 1)))


def model_class(spec: RepVGGSpec | RepGhostNetSpec) -> type[RepModule]:
    """The module class of a model spec."""
    if isinstance(spec, RepGhostNetSpec):
        return RepGhostNet
    return RepVGGplus if spec.family == "repvggplus" else RepVGG


def create_model(name: str, *, num_classes: int = 1000, deploy: bool = False) -> RepModule:
    """A registered model (reparam_core.list_models()) with fresh weights, in train or deploy form."""
    spec = get_spec(name, num_classes)
    return model_class(spec)(spec, deploy=deploy)


__all__ = ["RepVGG", "RepVGGplus", "RepVGGStage", "RepGhostNet", "ConvBnAct", "model_class",
           "create_model"]
