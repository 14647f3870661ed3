"""Re-parameterizable blocks and models as native torch.nn modules, built from the block
description (reparam_core.blocks.nodes) by ONE generic class, `RepModule`.

A module's form (`deploy`) is fixed at construction; `desc` is the spec's description in that
form. Every parameterised leaf is a native module at its (official, dotted) name, intermediate
containers are `nn.Sequential`s, every nested `Block` is a child module of `block_class(kind)`,
so `state_dict()` keys are the canonical keys (plus `num_batches_tracked`). `forward` runs the
description compiled at construction (backends/torch/layers.py). `reparameterize()` builds the
deploy form on the meta device and assigns reparam_core's fused state (float64 inside).

The named classes (RepVGGBlock, RepConv, ...) are thin subclasses that only fix `kind`;
`block_class` makes one on the fly for a kind no class was written for.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from reparam_core import (
    Add,
    Aux,
    Block,
    Dropout,
    Model,
    Rep,
    ReparamError,
    SpecError,
    block_kind,
    in_form,
    reparameterize_state,
)
from reparam_core.blocks.fusion import identity_kernel
from reparam_core.blocks.l2 import L2Terms, custom_l2_penalty, l2_terms
from reparam_core.blocks.nodes import Description, Node, SpecLike, rep_blocks

from .layers import LEAF_FUNCTIONS, LEAF_MODULES, ModuleLeaf, Plan, Step, add, call, dropout, rep, run, submodule

Tensor = torch.Tensor


def numpy_view(module: nn.Module) -> dict[str, np.ndarray]:
    """The module's CPU state as read-only numpy views (no copy; canonical keys,
    `num_batches_tracked` dropped), for the fusion algebra."""
    out = {}
    for k, v in module.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            a = v.detach().cpu().numpy()
            a.flags.writeable = False
            out[k] = a
    return out


def numpy_state(module: nn.Module) -> dict[str, np.ndarray]:
    """The module's state as float32 numpy copies (canonical keys), `num_batches_tracked` dropped."""
    return {k: v.astype(np.float32) for k, v in numpy_view(module).items()}


_CLASSES: dict[str, type[RepModule]] = {}


def _bn_scale(block: nn.Module, path: str) -> Tensor:
    """gamma / sqrt(var + eps) of the BN at `path`, detached, shaped to broadcast over a kernel's
    output axis."""
    bn = block.get_submodule(path)
    if not isinstance(bn, _BatchNorm) or bn.running_var is None:
        raise SpecError(
            f"{path}: the custom L2 needs a BatchNorm with running statistics there, got {type(bn).__name__}"
        )
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().reshape(-1, 1, 1, 1)


def _conv_weight(block: nn.Module, path: str) -> Tensor:
    """The weight of the conv at `path`."""
    conv = block.get_submodule(path)
    if not isinstance(conv, nn.Conv2d):
        raise SpecError(f"{path}: the custom L2 needs a Conv2d there, got {type(conv).__name__}")
    return conv.weight


def _block_l2(block: nn.Module, t: L2Terms) -> Tensor:
    """The custom L2 of one re-parameterizable block module (see reparam_core.blocks.l2)."""
    k3, k1 = _conv_weight(block, t.dense_conv), _conv_weight(block, t.one_conv)
    ch, cw = t.centre
    centre = k3[:, :, ch : ch + 1, cw : cw + 1]
    t3, t1 = _bn_scale(block, t.dense_bn), _bn_scale(block, t.one_bn)
    penalty: Tensor
    if t.identity_bn is None:
        penalty = custom_l2_penalty(k3, centre, k1, t3, t1)
    else:
        ident = torch.from_numpy(identity_kernel(t.out_channels, t.groups, 1)).to(k3)
        penalty = custom_l2_penalty(k3, centre, k1, t3, t1, ident, _bn_scale(block, t.identity_bn))
    return penalty


class RepModule(nn.Module):
    """A block or model built from its description: `spec`, `deploy`, `desc` (the description in
    that form), the leaves at their official module paths, and a forward that runs the compiled
    description. Subclasses fix `kind` (the official class name the description must carry),
    `needs` (what a fitting spec looks like, for the error message) and `absent_as_none` (official
    optional children set to None when the description has no such module)."""

    kind: ClassVar[str] = ""
    needs: ClassVar[str] = ""
    absent_as_none: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in vars(cls):
            _CLASSES.setdefault(cls.kind, cls)

    def __init__(self, spec: SpecLike, deploy: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.deploy = bool(deploy)
        self.desc: Description = in_form(spec, "deploy" if deploy else "train")
        if self.desc.kind != type(self).kind:
            needs = f" ({self.needs})" if self.needs else ""
            raise ReparamError(
                f"{type(self).__name__} needs a {self.kind!r} spec{needs}, got a "
                f"{self.desc.kind!r} one (use build_block or create_model, which "
                "pick the class)"
            )
        self._plan = self._chain(self.desc.body)
        self._aux = self._aux_heads(self.desc.aux) if isinstance(self.desc, Model) else {}
        for name in self.absent_as_none:
            if name not in self._modules:
                setattr(self, name, None)

    # ---------------------------------------------------------------- construction

    def _place(self, path: str, module: nn.Module) -> None:
        """Register `module` at the dotted `path`, creating `nn.Sequential` containers on the
        way."""
        *parents, leaf = path.split(".")
        owner: nn.Module = self
        for part in parents:
            inner = owner._modules.get(part)
            if inner is None:
                inner = nn.Sequential()
                owner.add_module(part, inner)
            owner = inner
        if not leaf or leaf in owner._modules:
            raise SpecError(f"{self.desc.kind}: module path {path!r} is empty or used twice")
        owner.add_module(leaf, module)

    def _chain(self, nodes: tuple[Node, ...]) -> Plan:
        return tuple(self._step(n) for n in nodes)

    def _step(self, node: Node) -> Step:
        """Build what `node` needs and return the step that applies it."""
        if isinstance(node, Block):
            self._place(node.name, block_class(node.kind)(node, self.deploy))
            return submodule, node.name
        if isinstance(node, Rep):
            branches = tuple(self._chain(b) for b in node.branches)  # built first: forward order
            bn = None if node.bn is None else self._leaf(node.bn)
            return rep, (branches, node.combine == "concat", bn)
        if isinstance(node, Add):
            return add, tuple(self._chain(b) for b in node.branches)
        if isinstance(node, Dropout):
            return dropout, node.p
        if isinstance(node, ModuleLeaf) and type(node) in LEAF_MODULES:
            return submodule, self._leaf(node)
        if type(node) in LEAF_FUNCTIONS:
            return call, LEAF_FUNCTIONS[type(node)](node)
        raise SpecError(f"{self.desc.kind}: the torch backend has no rule for a {type(node).__name__} node ({node!r})")

    def _leaf(self, node: ModuleLeaf) -> str:
        """Register the native module of a parameterised leaf at its name; returns the name."""
        self._place(node.name, LEAF_MODULES[type(node)](node))
        return node.name

    def _aux_heads(self, heads: tuple[Aux, ...]) -> dict[int, tuple[tuple[str, Plan], ...]]:
        """The auxiliary heads by the index of the top-level block step they read."""
        taps = {n.name: i for i, n in enumerate(self.desc.body) if isinstance(n, Block)}
        out: dict[int, tuple[tuple[str, Plan], ...]] = {}
        for head in heads:
            if head.tap not in taps:
                raise SpecError(
                    f"{self.desc.kind}: auxiliary head {head.name!r} reads {head.tap!r}, which is not a top-level block"
                )
            at = taps[head.tap]
            out[at] = (*out.get(at, ()), (head.name, self._chain(head.body)))
        return out

    # ---------------------------------------------------------------- running

    def forward(self, x: Tensor) -> Tensor:
        return run(self, self._plan, x)

    def forward_with_aux(self, x: Tensor) -> dict[str, Tensor]:
        """The main output ("main") and every auxiliary head's (train form only)."""
        self._train_form_only("forward_with_aux: the auxiliary heads exist")
        out: dict[str, Tensor] = {}
        for i, (rule, arg) in enumerate(self._plan):
            x = rule(self, x, arg)
            for name, head in self._aux.get(i, ()):
                out[name] = run(self, head, x)
        return {"main": x, **out}

    # ---------------------------------------------------------------- re-parameterization

    def reparameterize(self) -> RepModule:
        """A new deploy-form module of the same class computing the same function (this module
        itself when already in deploy form), sharing no storage with it. Device, dtype and
        train/eval mode are kept."""
        if self.deploy:
            return self
        with torch.device("meta"):  # no initialisation: every tensor is assigned below
            new = type(self)(self.spec, deploy=True)
        view = numpy_view(self)
        fused = reparameterize_state(self.spec, view)
        own = self.state_dict()
        ref = next(self.parameters())
        state = {}
        for k in new.state_dict():
            if k in fused and fused[k] is not view.get(k):  # a fused tensor: new, from the core
                fused_k = torch.from_numpy(np.ascontiguousarray(fused[k]))
                state[k] = fused_k.to(ref.device, ref.dtype)
            else:  # passed through (num_batches_tracked too): copied
                state[k] = own[k].clone()
        new.load_state_dict(state, strict=True, assign=True)
        return new.train(self.training)

    # ---------------------------------------------------------------- training helpers

    def _train_form_only(self, what: str) -> None:
        if self.deploy:
            raise ReparamError(f"{what} in train form only; this {type(self).__name__} is in deploy form")

    def rep_blocks(self) -> list[tuple[str, RepModule]]:
        """Every re-parameterizable unit (innermost block holding a Rep) with its module path
        ("" for this module itself), in forward order, read from the spec's train form (so a
        model lists the same units in either form)."""
        desc = in_form(self.spec, "train")
        units: list[tuple[str, RepModule]] = (
            [("", self)] if isinstance(desc, Block) and any(isinstance(n, Rep) for n in desc.body) else []
        )
        for path, _ in rep_blocks(desc):
            unit = self.get_submodule(path)
            if not isinstance(unit, RepModule):
                raise ReparamError(
                    f"{type(self).__name__}: the block at {path!r} was replaced by a "
                    f"{type(unit).__name__}, not a reparam block module"
                )
            units.append((path, unit))
        return units

    def custom_l2(self) -> Tensor:
        """RepVGGplus' custom L2 summed over every re-parameterizable unit, identity branch
        included (train form only; reparam_core.blocks.l2.custom_l2_penalty)."""
        self._train_form_only("custom_l2 is defined")
        terms = []
        for path, block in self.rep_blocks():
            if not isinstance(block.desc, Block):  # a unit is a Block by construction (rep_blocks)
                raise SpecError(
                    f"{path!r}: a re-parameterizable unit must be a block, got a {type(block.desc).__name__}"
                )
            terms.append(_block_l2(block, l2_terms(block.desc)))
        return torch.stack(terms).sum()


def block_class(kind: str) -> type[RepModule]:
    """The module class of a kind (a description's official class name); a plain subclass of
    RepModule is made and kept for a kind no class was written for."""
    if kind not in _CLASSES:
        type(
            kind,
            (RepModule,),
            {"kind": kind, "__module__": __name__, "__doc__": f"{kind}, built from its description."},
        )
    return _CLASSES[kind]


class RepVGGBlock(RepModule):
    """RepVGG block: act(SE_pre(dense + 1x1 + identity)) in train form, act(SE_pre(conv)) in
    deploy form (`rbr_reparam`); `rbr_identity` is None when the block has no identity branch."""

    kind = "RepVGGBlock"
    needs = "naming='repvgg' and se 'none'/'pre'"
    absent_as_none = ("rbr_identity",)


class RepConv(RepVGGBlock):
    """YOLOv7's RepConv: the same block with conv/BN pairs named `0`/`1` (`rbr_dense.0`)."""

    kind = "RepConv"
    needs = "naming='repconv', see repconv_spec"


class RepVGGplusBlock(RepVGGBlock):
    """RepVGGplus block: SE after the activation (module `post_se`)."""

    kind = "RepVGGplusBlock"
    needs = "naming='repvgg' and se='post'"


class RepGhostModule(RepModule):
    """RepGhost module: `primary_conv`, then the depthwise `cheap_operation` plus the BN shortcut
    `fusion_bn` (None without reparam_bn); deploy form: `cheap_operation` is one conv."""

    kind = "RepGhostModule"
    absent_as_none = ("fusion_bn",)


class RepGhostBottleneck(RepModule):
    """RepGhost bottleneck: ghost1, the strided depthwise `conv_dw`/`bn_dw`, SE (`se`, None when
    absent), ghost2, plus the shortcut."""

    kind = "RepGhostBottleneck"
    absent_as_none = ("se",)


def build_block(spec: SpecLike, *, deploy: bool = False) -> RepModule:
    """A block module from its spec (or description), in train (default) or deploy form."""
    return block_class(block_kind(spec))(spec, deploy=deploy)


__all__ = [
    "numpy_view",
    "numpy_state",
    "RepModule",
    "block_class",
    "RepVGGBlock",
    "RepConv",
    "RepVGGplusBlock",
    "RepGhostModule",
    "RepGhostBottleneck",
    "build_block",
]
