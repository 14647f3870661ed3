"""RepVGG, RepVGGplus and RepGhostNet as Flax NNX modules, built from reparam_core's model specs.

Attribute names follow the official PyTorch module paths and numbered children are nnx.List
items, so the NNX state path of each tensor joined with "." equals
reparam_core.layouts.flax_key(canonical key) (e.g. `stage1.0.rbr_dense.conv.kernel`,
`stage2.blocks.3.post_se.down.kernel`, `blocks.3.0.ghost1.primary_conv.1.scale`).
Inputs are NHWC inside.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from reparam_core import RepGhostNetSpec, ReparamError, RepVGGSpec, get_spec

from .blocks import RepGhostBottleneck, RepModule, RepVGGBlock, block_class
from .state import (fill_abstract_other_variables, fresh_state, load_state, module_schema,
                    seed_from)
from .layers import BatchNorm, ConvBN, Placeholder, _rngs, conv, flatten, global_pool


class RepVGGStage(nnx.Module):
    """A RepVGGplus stage: its blocks under `blocks` (paths `stageN.blocks.i`)."""

    def __init__(self, blocks: list[RepModule]) -> None:
        self.blocks = nnx.List(blocks)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


def _run(seq: nnx.List, x: jax.Array) -> jax.Array:
    for layer in seq:
        x = layer(x)
    return x


Segment = tuple[Callable[[Any, jax.Array], jax.Array], Any]


def _call(module: nnx.Module, x: jax.Array) -> jax.Array:
    return module(x)


def _linear_head(linear: nnx.Linear, x: jax.Array) -> jax.Array:
    return linear(flatten(global_pool(x)))


def run_segments(segments: list[Segment], x: jax.Array) -> jax.Array:
    for fn, mods in segments:
        x = fn(mods, x)
    return x


class RepVGG(RepModule):
    """RepVGG (and RepVGG-D2se): `stage0` block, stages `stage1..stage4` as nnx.List of blocks
    (`stage1.0.rbr_dense.conv.kernel`), global average pool, `linear`."""

    spec: RepVGGSpec
    family = "repvgg"

    def __init__(self, spec: RepVGGSpec, deploy: bool = False, *,
                 rngs: nnx.Rngs | None = None) -> None:
        super().__init__(spec, deploy)
        if not isinstance(spec, RepVGGSpec) or spec.family != self.family:
            raise ReparamError(f"{type(self).__name__} needs a {self.family} spec, got "
                               f"{getattr(spec, 'name', type(spec).__name__)!r}")
        rngs = _rngs(rngs)
        self.stage0 = block_class(spec.stem)(spec.stem, deploy=deploy, rngs=rngs)
        self.stage_names = tuple(st.name for st in spec.stages)
        for st in spec.stages:
            setattr(self, st.name, self._make_stage(
                [block_class(b)(b, deploy=deploy, rngs=rngs) for b in st.blocks]))
        self.linear = nnx.Linear(spec.num_features, spec.num_classes, rngs=rngs)

    @staticmethod
    def _make_stage(blocks: list[RepModule]) -> nnx.Module:
        return nnx.List(blocks)

    def _stage_blocks(self, name: str) -> list[RepModule]:
        stage = getattr(self, name)
        return list(stage.blocks if isinstance(stage, RepVGGStage) else stage)

    def _stage(self, name: str, x: jax.Array) -> jax.Array:
        for block in self._stage_blocks(name):
            x = block(x)
        return x

    def _head(self, x: jax.Array) -> jax.Array:
        return _linear_head(self.linear, x)

    def segments(self) -> list[Segment]:
        """The forward pass as a chain of (fn, modules): x = fn(modules, x) in turn. predict
        jits each segment separately, so identical blocks share one compilation."""
        segs: list[Segment] = [(_call, self.stage0)]
        for name in self.stage_names:
            segs += [(_call, b) for b in self._stage_blocks(name)]
        return segs + [(_linear_head, self.linear)]

    def __call__(self, x: jax.Array) -> jax.Array:
        return run_segments(self.segments(), x)

    def rep_blocks(self) -> list[tuple[str, RepVGGBlock]]:
        """Every block with its canonical module path, in forward order."""
        out = []
        for prefix, _ in self.spec.blocks():
            node = self
            for part in prefix.split("."):
                node = node[int(part)] if part.isdigit() else getattr(node, part)
            out.append((prefix, node))
        return out


class RepVGGplus(RepVGG):
    """RepVGGplus: blocks with post-SE under `stageN.blocks.i`, stage3 split into
    `stage3_first`/`stage3_second`, and in train form the auxiliary heads `stage1_aux`,
    `stage2_aux`, `stage3_first_aux` (nnx.List: conv3x3 s2 + BN + ReLU as `0` with `.conv`/`.bn`,
    pool, flatten, Linear `3`)."""

    family = "repvggplus"

    def __init__(self, spec: RepVGGSpec, deploy: bool = False, *,
                 rngs: nnx.Rngs | None = None) -> None:
        rngs = _rngs(rngs)
        super().__init__(spec, deploy, rngs=rngs)
        if not deploy:
            for stage in spec.aux_heads:
                setattr(self, f"{stage}_aux", self._aux_head(spec.aux_channels(stage), rngs))

    @staticmethod
    def _make_stage(blocks: list[RepModule]) -> nnx.Module:
        return RepVGGStage(blocks)

    def _aux_head(self, channels: int, rngs: nnx.Rngs) -> nnx.List:
        down = ConvBN(conv(channels, channels, 3, stride=2, padding=1, rngs=rngs),
                      BatchNorm(channels, eps=self.spec.stem.eps))
        return nnx.List([down, Placeholder(global_pool), Placeholder(flatten),
                         nnx.Linear(channels, self.spec.num_classes, rngs=rngs)])

    @staticmethod
    def _aux(head: nnx.List, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(head[0](x))
        for layer in list(head)[1:]:
            x = layer(x)
        return x

    def forward_with_aux(self, x: jax.Array) -> dict[str, jax.Array]:
        """Main logits and every auxiliary head's logits (train form only; NHWC input)."""
        if self.deploy:
            raise ReparamError("forward_with_aux: the auxiliary heads exist in train form only; "
                               "this RepVGGplus is in deploy form")
        out: dict[str, jax.Array] = {}
        x = self.stage0(x)
        for name in self.stage_names:
            x = self._stage(name, x)
            if name in self.spec.aux_heads:
                out[f"{name}_aux"] = self._aux(getattr(self, f"{name}_aux"), x)
        return {"main": self._head(x), **out}

    def custom_l2(self) -> jax.Array:
        """The RepVGGplus custom L2 penalty summed over every block, identity branch included
        (train form only; see RepVGGBlock.custom_l2)."""
        if self.deploy:
            raise ReparamError("custom_l2 is defined in train form only; this RepVGGplus is in "
                               "deploy form")
        return sum((block.custom_l2() for _, block in self.rep_blocks()), jnp.float32(0.0))


class ConvBnAct(nnx.Module):
    """RepGhostNet's last stage: 1x1 `conv`, BN `bn1`, ReLU."""

    def __init__(self, cin: int, cout: int, eps: float, rngs: nnx.Rngs) -> None:
        self.conv = conv(cin, cout, 1, rngs=rngs)
        self.bn1 = BatchNorm(cout, eps=eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn1(self.conv(x)))


class RepGhostNet(RepModule):
    """RepGhostNet: `conv_stem`/`bn1`/ReLU, `blocks.i.j` bottlenecks, the last ConvBnAct stage
    `blocks.N.0`, global pool, `conv_head` + ReLU, dropout (training mode only), `classifier`."""

    spec: RepGhostNetSpec

    def __init__(self, spec: RepGhostNetSpec, deploy: bool = False, *,
                 rngs: nnx.Rngs | None = None) -> None:
        super().__init__(spec, deploy)
        if not isinstance(spec, RepGhostNetSpec):
            raise ReparamError(f"RepGhostNet needs a RepGhostNetSpec, got {type(spec).__name__}")
        rngs = _rngs(rngs)
        self.conv_stem = conv(3, spec.stem_channels, 3, stride=2, padding=1, rngs=rngs)
        self.bn1 = BatchNorm(spec.stem_channels, eps=spec.eps)
        stages = [nnx.List([RepGhostBottleneck(b, deploy, rngs=rngs) for b in stage])
                  for stage in spec.stages]
        stages.append(nnx.List([ConvBnAct(spec.last_in_channels, spec.last_channels, spec.eps,
                                          rngs)]))
        self.blocks = nnx.List(stages)
        self.conv_head = conv(spec.last_channels, spec.head_channels, 1, bias=True, rngs=rngs)
        self.dropout = nnx.Dropout(spec.dropout, rngs=rngs)
        self.classifier = nnx.Linear(spec.head_channels, spec.num_classes, rngs=rngs)

    def segments(self) -> list[Segment]:
        """The forward pass as a chain of (fn, modules) (see RepVGG.segments)."""
        segs: list[Segment] = [(_ghost_stem, (self.conv_stem, self.bn1))]
        for stage in self.blocks:
            segs += [(_call, b) for b in stage]
        return segs + [(_ghost_head, (self.conv_head, self.dropout, self.classifier))]

    def __call__(self, x: jax.Array) -> jax.Array:
        return run_segments(self.segments(), x)


def _ghost_stem(mods: tuple[nnx.Conv, BatchNorm], x: jax.Array) -> jax.Array:
    conv_stem, bn1 = mods
    return jax.nn.relu(bn1(conv_stem(x)))


def _ghost_head(mods: tuple[nnx.Conv, nnx.Dropout, nnx.Linear], x: jax.Array) -> jax.Array:
    conv_head, dropout, classifier = mods
    x = jax.nn.relu(conv_head(global_pool(x)))
    return classifier(dropout(flatten(x)))


def model_class(spec: RepVGGSpec | RepGhostNetSpec) -> type[RepModule]:
    """The module class of a model spec."""
    if isinstance(spec, RepGhostNetSpec):
        return RepGhostNet
    return RepVGGplus if spec.family == "repvggplus" else RepVGG


def create_model(name: str, *, num_classes: int = 1000, deploy: bool = False,
                 rngs: nnx.Rngs | None = None) -> RepModule:
    """A registered model (reparam_core.list_models()) with fresh weights, in train or deploy
    form. Built abstractly and filled from numpy (state.fresh_state, seeded from `rngs`'
    `params` stream; default nnx.Rngs(0)): eager Flax init compiles one XLA random op per
    distinct shape and takes tens of seconds on CPU. The dropout RNG stream comes from `rngs`
    too. Modules start in training mode (BN batch statistics, dropout on), like torch; `predict`
    always runs in inference mode. (The classes' own constructors do the usual Flax init.)"""
    spec = get_spec(name, num_classes)
    cls = model_class(spec)
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    model = nnx.eval_shape(lambda: cls(spec, deploy=deploy, rngs=nnx.Rngs(0)))
    fill_abstract_other_variables(model, seed_from(rngs))
    return load_state(model, fresh_state(module_schema(model), seed_from(rngs)), validate=False)


def empty_model(name: str, *, num_classes: int = 1000, deploy: bool = False) -> RepModule:
    """A registered model built abstractly (nnx.eval_shape: no initialisation, fast): every
    Param/BatchStat is a shape placeholder until `load_state` fills it. RNG streams (dropout) are
    concrete. Use it to load checkpoints into big models without paying for random init."""
    spec = get_spec(name, num_classes)
    cls = model_class(spec)
    model = nnx.eval_shape(lambda: cls(spec, deploy=deploy, rngs=nnx.Rngs(0)))
    fill_abstract_other_variables(model)
    return model


__all__ = ["empty_model", "RepVGG", "RepVGGplus", "RepVGGStage", "RepGhostNet", "ConvBnAct", "model_class", "run_segments", "Segment",
           "create_model"]
