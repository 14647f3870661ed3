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
    Flatten,
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
from reparam_core.blocks.nodes import Bias, Description, Node, Scale, SpecLike, rep_blocks

from .layers import (
    CHANNEL_WISE,
    LEAF_FUNCTIONS,
    LEAF_MODULES,
    ChannelBias,
    ChannelScale,
    ModuleLeaf,
    Plan,
    RepPlan,
    Step,
    add,
    call,
    channel_view,
    channels_last,
    dropout,
    rep,
    run,
    scale_by,
    shift_by,
    submodule,
)

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

    def __init__(self, spec: SpecLike, deploy: bool = False, *, rank: int = 4) -> None:
        super().__init__()
        self.spec = spec
        self.deploy = bool(deploy)
        self.rank = rank
        self.desc: Description = in_form(spec, "deploy" if deploy else "train")
        if self.desc.kind != type(self).kind:
            needs = f" ({self.needs})" if self.needs else ""
            raise ReparamError(
                f"{type(self).__name__} needs a {self.kind!r} spec{needs}, got a "
                f"{self.desc.kind!r} one (use build_block or create_model, which "
                "pick the class)"
            )
        self._plan, self.out_rank = self._chain(self.desc.body, rank)
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

    def _chain(self, nodes: tuple[Node, ...], rank: int) -> tuple[Plan, int]:
        """The plan of a chain on a tensor with `rank` axes, and the rank of its output."""
        plan = []
        for n in nodes:
            step, rank = self._step(n, rank)
            plan.append(step)
        return tuple(plan), rank

    def _step(self, node: Node, rank: int) -> tuple[Step, int]:
        """Build what `node` needs (on a tensor with `rank` axes, 4 or 2) and return the step that
        applies it and the rank of its output."""
        if isinstance(node, Block):
            block = block_class(node.kind)(node, self.deploy, rank=rank)
            self._place(node.name, block)
            return (submodule, node.name), block.out_rank
        if isinstance(node, Rep):
            branches = tuple(self._chain(b, rank)[0] for b in node.branches)  # built first: forward order
            bn = None if node.bn is None else self._leaf(node.bn)
            scale = None if node.scale is None else self._channel_parameter(node.scale, rank)
            plan = RepPlan(branches, node.combine == "concat", node.coefficients, bn, scale, node.residual)
            return (rep, plan), rank
        if isinstance(node, Add):
            chains = [self._chain(b, rank) for b in node.branches]
            return (add, tuple(p for p, _ in chains)), chains[0][1] if chains else rank
        if isinstance(node, Dropout):
            return (dropout, node.p), rank
        if isinstance(node, (Scale, Bias)):
            return self._channel_parameter(node, rank), rank
        if isinstance(node, ModuleLeaf) and type(node) in LEAF_MODULES:
            channel_wise = rank > 2 and isinstance(node, CHANNEL_WISE)
            return (channels_last if channel_wise else submodule, self._leaf(node)), rank
        if type(node) in LEAF_FUNCTIONS:
            return (call, LEAF_FUNCTIONS[type(node)](node)), 2 if isinstance(node, Flatten) else rank
        raise SpecError(f"{self.desc.kind}: the torch backend has no rule for a {type(node).__name__} node ({node!r})")

    def _leaf(self, node: ModuleLeaf) -> str:
        """Register the native module of a parameterised leaf at its name; returns the name."""
        self._place(node.name, LEAF_MODULES[type(node)](node))
        return node.name

    def _channel_parameter(self, node: Scale | Bias, rank: int) -> Step:
        """A Scale's or Bias' parameter at its key `node.key`: in a ChannelScale / ChannelBias of
        its own at `node.name` when that path is free; otherwise (an empty name, or the path of
        another node's module, e.g. a GRN's `beta` added in a Rep) registered on the module
        already there (this module for an empty name), the step reading it by key."""
        if node.name and not self._has_module(node.name):
            holder = ChannelScale if isinstance(node, Scale) else ChannelBias
            self._place(node.name, holder(node.channels, node.param, node.stored_shape, rank))
            return submodule, node.name
        owner = self.get_submodule(node.name)
        if hasattr(owner, node.param):
            raise SpecError(f"{self.desc.kind}: parameter {node.key!r} is used twice or names an attribute")
        init = torch.ones if isinstance(node, Scale) else torch.zeros
        owner.register_parameter(node.param, nn.Parameter(init(node.stored_shape)))
        return (scale_by if isinstance(node, Scale) else shift_by), (node.key, channel_view(rank))

    def _has_module(self, path: str) -> bool:
        try:
            self.get_submodule(path)
        except AttributeError:
            return False
        return True

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
            tap = self.get_submodule(head.tap)
            rank = tap.out_rank if isinstance(tap, RepModule) else self.rank
            out[at] = (*out.get(at, ()), (head.name, self._chain(head.body, rank)[0]))
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
            new = type(self)(self.spec, deploy=True, rank=self.rank)
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


def build_block(spec: SpecLike, *, deploy: bool = False, rank: int = 4) -> RepModule:
    """A block module from its spec (or description), in train (default) or deploy form, on
    N x C x H x W (`rank` 4, the default) or N x C (2: a block after a Flatten)."""
    return block_class(block_kind(spec))(spec, deploy=deploy, rank=rank)


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
