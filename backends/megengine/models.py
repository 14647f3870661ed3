"""RepVGG, RepVGGplus and RepGhostNet as native megengine.module models, built from specs.

Module paths follow reparam_core.schema's canonical names exactly: `stage0`, `stage1.0` (a
MegEngine Sequential names its children "0", "1", ...), RepVGGplus `stage1.blocks.0`, `linear`,
the aux heads `stage1_aux.0.conv/.bn` + `stage1_aux.3`, RepGhostNet `blocks.i.j`, `conv_head`,
`classifier`. BN momentum is 0.9 in MegEngine's convention (== torch 0.1), see blocks.py.
"""
from __future__ import annotations

from collections import OrderedDict

from .blocks import (F, M, RepGhostBottleneck, Reparameterizable, RepVGGBlock, RepVGGplusBlock,
                     _RepBlock, batch_norm, global_pool)
from reparam_core import ReparamError, RepGhostNetSpec, RepVGGSpec, TensorInfo, state_schema


class Flatten(M.Module):
    def forward(self, x):
        return F.flatten(x, 1)


class _Stage(M.Module):
    """RepVGGplus stage: its blocks live under `blocks` (`stage1.blocks.0`)."""

    def __init__(self, blocks: list) -> None:
        super().__init__()
        self.blocks = M.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


class _ConvBnRelu(M.Module):
    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, padding: int,
                 eps: float = 1e-5, bn_name: str = "bn") -> None:
        super().__init__()
        self._bn_name = bn_name
        self.conv = M.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        setattr(self, bn_name, batch_norm(cout, eps))
        self.relu = M.ReLU()

    def forward(self, x):
        return self.relu(getattr(self, self._bn_name)(self.conv(x)))


def _block_class(spec):
    return RepVGGplusBlock if spec.se == "post" else RepVGGBlock


class RepVGG(Reparameterizable):
    """RepVGG: stem block `stage0`, stages `stage1..4` of RepVGG blocks, global pool, `linear`."""

    def __init__(self, spec: RepVGGSpec, deploy: bool = False) -> None:
        super().__init__()
        if not isinstance(spec, RepVGGSpec):
            raise ReparamError(f"{type(self).__name__} needs a RepVGGSpec, got {type(spec).__name__}")
        self.spec = spec
        self.deploy = bool(deploy)
        self.stage0 = _block_class(spec.stem)(spec.stem, deploy)
        self.stage_names = tuple(st.name for st in spec.stages)
        for st in spec.stages:
            blocks = [_block_class(b)(b, deploy) for b in st.blocks]
            setattr(self, st.name, _Stage(blocks) if spec.stage_container else M.Sequential(*blocks))
        self.linear = M.Linear(spec.num_features, spec.num_classes)

    def schema(self) -> dict[str, TensorInfo]:
        return state_schema(self.spec, "deploy" if self.deploy else "train")

    def _head(self, x):
        return self.linear(F.flatten(global_pool(x), 1))

    def forward(self, x):
        x = self.stage0(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self._head(x)

    def rep_blocks(self) -> list:
        return [m for _, m in self.named_modules() if isinstance(m, _RepBlock)]

    def custom_l2(self):
        """Sum of every block's RepVGGplus custom L2 term (identity branch included)."""
        if self.deploy:
            raise ReparamError("custom_l2: defined on the train form only; this model is in "
                               "deploy form")
        terms = [b.custom_l2_term() for b in self.rep_blocks()]
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total


class RepVGGplus(RepVGG):
    """RepVGGplus: RepVGG with post-activation SE blocks under `stageN.blocks.i`, stage3 split in
    `stage3_first`/`stage3_second`, and (train form only) aux heads `stage1_aux`, `stage2_aux`,
    `stage3_first_aux` = Sequential(conv3x3 s2 + BN + ReLU as `0`, pool, flatten, linear as `3`)."""

    def __init__(self, spec: RepVGGSpec, deploy: bool = False) -> None:
        super().__init__(spec, deploy)
        if not self.deploy:
            for stage in spec.aux_heads:
                c = spec.aux_channels(stage)
                setattr(self, f"{stage}_aux", M.Sequential(OrderedDict([
                    ("0", _ConvBnRelu(c, c, 3, 2, 1, spec.stem.eps)),
                    ("1", M.AdaptiveAvgPool2d(1)),
                    ("2", Flatten()),
                    ("3", M.Linear(c, spec.num_classes))])))

    def forward_with_aux(self, x) -> dict:
        """Main logits and every auxiliary head's logits (train form only)."""
        if self.deploy:
            raise ReparamError("forward_with_aux: the auxiliary heads exist in train form only; "
                               "this RepVGGplus is in deploy form")
        out = {}
        x = self.stage0(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.spec.aux_heads:
                out[f"{name}_aux"] = getattr(self, f"{name}_aux")(x)
        return {"main": self._head(x), **out}


class RepGhostNet(Reparameterizable):
    """RepGhostNet: conv_stem + bn1 + ReLU, `blocks.i.j` bottlenecks, the last 1x1 ConvBnAct
    (`blocks.N.0.conv/.bn1`), global pool, `conv_head` + ReLU, dropout (train mode only),
    `classifier`."""

    def __init__(self, spec: RepGhostNetSpec, deploy: bool = False) -> None:
        super().__init__()
        if not isinstance(spec, RepGhostNetSpec):
            raise ReparamError(f"RepGhostNet needs a RepGhostNetSpec, got {type(spec).__name__}")
        self.spec = spec
        self.deploy = bool(deploy)
        self.conv_stem = M.Conv2d(3, spec.stem_channels, 3, stride=2, padding=1, bias=False)
        self.bn1 = batch_norm(spec.stem_channels, spec.eps)
        stages = [M.Sequential(*[RepGhostBottleneck(b, deploy) for b in stage])
                  for stage in spec.stages]
        stages.append(M.Sequential(_ConvBnRelu(spec.last_in_channels, spec.last_channels, 1, 1, 0,
                                               spec.eps, bn_name="bn1")))
        self.blocks = M.Sequential(*stages)
        self.conv_head = M.Conv2d(spec.last_channels, spec.head_channels, 1, bias=True)
        self.dropout = M.Dropout(spec.dropout)
        self.classifier = M.Linear(spec.head_channels, spec.num_classes)

    def schema(self) -> dict[str, TensorInfo]:
        return state_schema(self.spec, "deploy" if self.deploy else "train")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        x = F.relu(self.conv_head(global_pool(x)))
        x = F.flatten(x, 1)
        if self.training:
            x = self.dropout(x)
        return self.classifier(x)


__all__ = ["RepVGG", "RepVGGplus", "RepGhostNet"]
