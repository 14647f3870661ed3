"""The generic re-parameterizable module: a Flax NNX module built from a block description, the
thin named classes, the kind registry and the block builders.

`RepModule(spec, deploy)` builds every parameterised leaf of its description at its dotted
module path (nnx.Dict containers, so the NNX state path of every tensor joined with "." is
reparam_core.weights.layouts.flax_key(canonical key): `rbr_dense.conv.kernel`, `rbr_dense.0.kernel`
(RepConv), `cheap_operation.1.scale`, ...), the parameter of every Scale and Bias node as a
bare nnx.Param at its key (`layer_scale`, `gamma`: on the block itself), nested Blocks as child
modules of class `block_class(kind)`, and interprets the description in `__call__` (NHWC inside; the api's
`predict` takes NCHW). Its form is fixed at construction; `reparameterize()` returns a NEW
deploy-form module of the same class, built abstractly (nnx.eval_shape, cached per spec) and
filled with reparam_core's fused state (float64 inside).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Hashable
from dataclasses import replace
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reparam_core import ReparamError, SpecError, block_kind
from reparam_core.blocks.fusion import identity_kernel
from reparam_core.blocks.l2 import L2Terms, custom_l2_penalty, l2_terms
from reparam_core.blocks.nodes import Block, Dropout, Model, Rep, SpecLike, describe, in_form, rep_blocks
from reparam_core.blocks.schema import TensorInfo
from reparam_core.weights.layouts import to_flax

from .interpret import DROPOUT, Chain, apply, module_at, module_paths, run, scope_body, scope_nodes, set_module
from .layers import CHANNEL_PARAM_TYPES, LEAF_TYPES, BatchNorm, DropoutStream, _rngs, channel_param, leaf_module
from .state import (
    fill_abstract_other_variables,
    fresh_state,
    graph_parts,
    load_fused_state,
    load_state,
    module_schema,
    seed_from,
)

_MODE_ATTRS = ("use_running_average", "deterministic")
SegmentFn = Callable[[Any, jax.Array], jax.Array]  # (modules, x) -> y
Segment = tuple[SegmentFn, Any]


Parts = tuple[dict[str, nnx.Variable[Any]], dict[str, nnx.Module]]


def _call(module: nnx.Module, x: jax.Array) -> jax.Array:
    return module(x)


def _carry_modes_and_rngs(old: Parts, new: Parts) -> None:
    """Carry train/eval attributes and RNG streams (copied) from the train-form module's
    variables and modules by path (`graph_parts`) over to the deploy-form one's."""
    (old_vars, old_mods), (new_vars, new_mods) = old, new
    for key, var in new_vars.items():
        if isinstance(var, (nnx.Param, nnx.BatchStat)):
            continue
        if key not in old_vars:
            raise ReparamError(f"reparameterize: no value for {key} in the train-form module")
        var.set_value(jax.tree.map(jnp.copy, old_vars[key].get_value()))
    for path, module in new_mods.items():
        if path in old_mods:
            for attr, value in vars(old_mods[path]).items():
                if attr in _MODE_ATTRS:
                    setattr(module, attr, value)


def _kernel(block: nnx.Module, path: str) -> jax.Array:
    """The kernel of the conv at `path` in `block`."""
    conv = module_at(block, path)
    if not isinstance(conv, nnx.Conv):
        raise SpecError(f"custom L2: {path} is a {type(conv).__name__}, not a conv")
    return conv.kernel[...]


def _bn_t(block: nnx.Module, path: str) -> jax.Array:
    """gamma / sqrt(var + eps) of the BN at `path` in `block`, detached."""
    bn = module_at(block, path)
    if not isinstance(bn, BatchNorm):
        raise SpecError(f"custom L2: {path} is a {type(bn).__name__}, not a BN")
    return jax.lax.stop_gradient(bn.scale[...] / jnp.sqrt(bn.var[...] + bn.eps))


def _block_l2(block: nnx.Module, t: L2Terms) -> jax.Array:
    """The custom L2 of one block from its own arrays (HWIO: t broadcasts over the last axis)."""
    k3, k1 = _kernel(block, t.dense_conv), _kernel(block, t.one_conv)
    h, w = t.centre
    centre = k3[h : h + 1, w : w + 1]
    t3, t1 = _bn_t(block, t.dense_bn), _bn_t(block, t.one_bn)
    if t.identity_bn is None:
        return custom_l2_penalty(k3, centre, k1, t3, t1)
    ident_oihw = identity_kernel(t.out_channels, t.groups, 1, dtype=np.float32)
    info = TensorInfo(ident_oihw.shape, "conv.weight", t.groups)
    ident = jnp.asarray(to_flax(ident_oihw, info), dtype=k3.dtype)
    return custom_l2_penalty(k3, centre, k1, t3, t1, ident, _bn_t(block, t.identity_bn))


class RepModule(nnx.Module):
    """A block or model interpreting its description: `spec`, `deploy` and `desc =
    in_form(spec, form)`; `kind` (the official class name) is checked against the spec's in
    every named subclass."""

    kind: ClassVar[str | None] = None

    def __init__(self, spec: SpecLike, deploy: bool = False, *, rngs: nnx.Rngs | None = None) -> None:
        desc = in_form(spec, "deploy" if deploy else "train")
        if self.kind is not None and desc.kind != self.kind:
            raise ReparamError(
                f"{type(self).__name__} builds {self.kind!r}, but this spec "
                f"describes {desc.kind!r} (use build_block / create_model)"
            )
        self.spec = spec
        self.deploy = bool(deploy)
        self.desc = desc
        rngs = _rngs(rngs)
        train_blocks = {n.name: n for n in scope_nodes(scope_body(describe(spec))) if isinstance(n, Block)}
        for node in scope_nodes(scope_body(desc)):
            if isinstance(node, Block):
                child = replace(train_blocks[node.name], name="")  # equal blocks: one compile
                set_module(self, node.name, block_class(node.kind)(child, deploy, rngs=rngs))
            elif isinstance(node, LEAF_TYPES):
                set_module(self, node.name, leaf_module(node, rngs))
            elif isinstance(node, CHANNEL_PARAM_TYPES):
                set_module(self, node.key, channel_param(node))
            elif isinstance(node, Dropout) and DROPOUT not in vars(self):
                setattr(self, DROPOUT, DropoutStream(rngs))

    def _get(self, path: str) -> nnx.Module:
        return module_at(self, path)

    def __call__(self, x: jax.Array) -> jax.Array:
        return run(self.desc.body, x, self._get)

    def segments(self) -> list[Segment]:
        """The forward pass as a chain of (fn, modules): x = fn(modules, x) in turn, one per
        top-level block and run of plain layers. predict jits each segment separately, so
        identical blocks share one compilation."""
        if not isinstance(self.desc, Model):
            return [(_call, self)]
        segs: list[Segment] = []
        for is_block, group in itertools.groupby(self.desc.body, lambda n: isinstance(n, Block)):
            nodes = tuple(group)
            if is_block:
                segs += [(_call, self._get(b.name)) for b in nodes if isinstance(b, Block)]
            else:
                segs.append((Chain(nodes), {p: self._get(p) for p in module_paths(nodes)}))
        return segs

    def forward_with_aux(self, x: jax.Array) -> dict[str, jax.Array]:
        """Main logits ("main") and every auxiliary head's logits (train form only; NHWC)."""
        if self.deploy:
            raise ReparamError(
                f"forward_with_aux: the auxiliary heads exist in train form only; "
                f"this {type(self).__name__} is in deploy form"
            )
        taps = {a.tap: a for a in self.desc.aux} if isinstance(self.desc, Model) else {}
        out: dict[str, jax.Array] = {}
        for node in self.desc.body:
            x = apply(node, x, self._get)
            if isinstance(node, Block) and node.name in taps:
                out[taps[node.name].name] = run(taps[node.name].body, x, self._get)
        return {"main": x, **out}

    def _rep_units(self) -> list[tuple[str, Block]]:
        """The re-parameterizable blocks (path, description): this block itself when it holds
        a Rep, then every inner one, in forward order."""
        own = (
            [("", self.desc)]
            if isinstance(self.desc, Block) and any(isinstance(n, Rep) for n in self.desc.body)
            else []
        )
        return own + rep_blocks(self.desc)

    def rep_blocks(self) -> list[tuple[str, nnx.Module]]:
        """Every re-parameterizable block module with its module path, in forward order."""
        return [(path, self._get(path)) for path, _ in self._rep_units()]

    def custom_l2(self) -> jax.Array:
        """RepVGGplus' custom L2 summed over every re-parameterizable block, identity branch
        included: the dense kernel's squares off the centre tap plus sum(eq^2 / (t3^2 + t1^2
        [+ tid^2 on identity taps])), eq = K3_centre t3 + K1 t1 (+ I tid), every t = gamma /
        sqrt(var + eps) detached (reparam_core.blocks.l2). Train form only."""
        if self.deploy:
            raise ReparamError(f"custom_l2 is defined in train form only; this {type(self).__name__} is in deploy form")
        return sum((_block_l2(self._get(path), l2_terms(block)) for path, block in self._rep_units()), jnp.float32(0.0))

    def reparameterize(self) -> RepModule:
        """A new deploy-form module of the same class computing the same function (this module
        itself when already in deploy form). Its weights are fresh arrays (the input is not
        touched); train/eval attributes and RNG streams (dropout) are carried over."""
        if self.deploy:
            return self
        new = abstract_module(type(self), self.spec, True)
        old_parts, new_parts = graph_parts(self), graph_parts(new)
        load_fused_state(self.spec, old_parts[0], new_parts[0])
        _carry_modes_and_rngs(old_parts, new_parts)
        return new


_CLASSES: dict[str, type[RepModule]] = {}


def named(cls: type[RepModule]) -> type[RepModule]:
    """Register a named class as the class of its `kind`."""
    if cls.kind is None:
        raise ReparamError(f"{cls.__name__} names no kind")
    _CLASSES[cls.kind] = cls
    return cls


def block_class(kind: str) -> type[RepModule]:
    """The module class of a kind (block or model); a kind no class was written for gets a
    RepModule subclass of that name, created once."""
    if kind not in _CLASSES:
        _CLASSES[kind] = type(
            kind,
            (RepModule,),
            {"kind": kind, "__module__": __name__, "__doc__": f"{kind}, built from its description."},
        )
    return _CLASSES[kind]


@functools.lru_cache(maxsize=64)
def _abstract(
    cls: type[RepModule], spec: SpecLike, deploy: bool
) -> tuple[nnx.GraphDef[RepModule], nnx.State[Any, Any]]:
    return nnx.split(nnx.eval_shape(lambda: cls(spec, deploy=deploy, rngs=nnx.Rngs(0))))


def abstract_module(cls: type[RepModule], spec: SpecLike, deploy: bool) -> RepModule:
    """`cls(spec, deploy)` built abstractly (nnx.eval_shape: every variable a shape placeholder),
    from a per-spec cache: fresh Variables each call."""
    if not isinstance(spec, Hashable):
        raise SpecError(f"the build cache needs a hashable spec, got {type(spec).__name__}")
    graphdef, state = _abstract(cls, spec, bool(deploy))
    return nnx.merge(graphdef, state, copy=True)


@named
class RepVGGBlock(RepModule):
    """RepVGG block: act(SE_pre(dense + 1x1 + identity)) in train form, act(SE_pre(conv)) in
    deploy form (`rbr_reparam`, one kxk conv)."""

    kind = "RepVGGBlock"


@named
class RepConv(RepVGGBlock):
    """YOLOv7's RepConv: the same block with conv/BN pairs named `0`/`1` (`rbr_dense.0`)."""

    kind = "RepConv"


@named
class RepVGGplusBlock(RepVGGBlock):
    """RepVGGplus block: SE after the activation (module `post_se`)."""

    kind = "RepVGGplusBlock"


@named
class RepGhostModule(RepModule):
    """RepGhost module: `primary_conv` (1x1 conv `0`, BN `1`, ReLU?), then the depthwise
    `cheap_operation` (conv `0` + BN `1`) plus the BN shortcut `fusion_bn.0`. Deploy form:
    `cheap_operation` is one depthwise conv with bias."""

    kind = "RepGhostModule"


@named
class RepGhostBottleneck(RepModule):
    """RepGhost bottleneck: ghost1, depthwise stride conv (`conv_dw`/`bn_dw`) when strided,
    optional SE (`se.conv_reduce`/`conv_expand`), ghost2, plus the shortcut (identity, or
    `shortcut.0..3`)."""

    kind = "RepGhostBottleneck"


def empty_block(spec: SpecLike, *, deploy: bool = False) -> RepModule:
    """A block built abstractly (nnx.eval_shape: nothing initialised) for `load_state` to fill."""
    block = abstract_module(block_class(block_kind(spec)), spec, deploy)
    fill_abstract_other_variables(block)
    return block


def build_block(spec: SpecLike, *, deploy: bool = False, rngs: nnx.Rngs | None = None) -> RepModule:
    """A block module from its spec, in train (default) or deploy form, with fresh weights
    (built abstractly and filled by state.fresh_state seeded from `rngs`, like create_model)."""
    block = empty_block(spec, deploy=deploy)
    return load_state(block, fresh_state(module_schema(block), seed_from(rngs)), validate=False)


__all__ = [
    "RepModule",
    "RepVGGBlock",
    "RepConv",
    "RepVGGplusBlock",
    "RepGhostModule",
    "RepGhostBottleneck",
    "Segment",
    "SegmentFn",
    "named",
    "block_class",
    "abstract_module",
    "build_block",
    "empty_block",
]
