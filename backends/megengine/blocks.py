"""One generic MegEngine module built from a block description (reparam_core.blocks.nodes).

`RepModule(spec, deploy)` holds the description of its form (`desc`), builds every
parameterised leaf (layers.py) at its dotted module path (name scopes become `Scope` modules,
numeric child names like `rbr_dense.0` allowed), so `state_dict()` keys are exactly the
canonical keys; every nested `Block` becomes a child module of class `block_class(kind)`.
`forward` interprets the description, one rule per node type (traceable by `jit.trace`). A
Scale or Bias node is one parameter, `param`, held by the module at its `name`: the block itself
for an empty name (UniRepLKNet's `gamma`, FastViT's `layer_scale`), the module another node built
there (UniRepLKNet's GRN `act.1`, whose `beta` is a Bias), or else a name scope.

`reparameterize()` computes `reparameterize_state` from this module's neutral state and builds
the deploy-form module of the same class holding it: built `empty` (no random initial values,
0-element conv placeholders), then every tensor set in one pass as a new MegEngine tensor made
from the state (a copy: nothing is shared with the source, which is left untouched). MegEngine
has no `.data`: assigning one is a silent no-op, so values are only ever written as new tensors
(`load_state_dict`, `setattr`) or with `tensor[...] = value`.

A nested block's module holds its `Block` description as its `spec` (a description is its own
spec), so it converts, exports and loads like a standalone block.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping
from functools import reduce
from typing import Any, ClassVar

import numpy as np

from reparam_core import ReparamError, ShapeMismatchError, SpecError, TensorInfo
from reparam_core.blocks.fuse import reparameterize_state
from reparam_core.blocks.fusion import identity_kernel
from reparam_core.blocks.l2 import custom_l2_penalty, l2_terms
from reparam_core.blocks.nodes import (
    Add,
    Aux,
    Bias,
    Block,
    Description,
    Model,
    Node,
    Rep,
    Scale,
    SpecLike,
    children,
    in_form,
    rep_blocks,
)
from reparam_core.blocks.schema import Form, schema_of
from reparam_core.weights.layouts import from_megengine, oihw_to_megengine, to_megengine

from .layers import FREE_LEAVES, PARAM_LEAVES, F, M, Tensor, channel_affine, channel_param, functional, leaf_module, mge

# --------------------------------------------------------------------------- module tree


class Scope(M.Module):
    """A name scope of a module path (`rbr_dense` holding `conv` and `bn`, `stage1` holding
    `0`, `1`, ...): children by attribute name, numeric ones also by index (`scope[0]`); it also
    holds the parameter of a Scale or Bias named after it (`layer_scale.gamma`)."""

    def __getitem__(self, key: int | str) -> M.Module:
        return getattr(self, str(key))

    def forward(self, x: Tensor) -> Tensor:
        raise ReparamError(
            f"{self._name or 'a scope'} is a name scope of the description, not a layer: call the module that owns it"
        )


def _check_free(parent: M.Module, name: str, path: str) -> None:
    if not name or name in vars(parent) or hasattr(type(parent), name):
        raise SpecError(f"module path {path!r}: {name!r} is empty or already taken in {type(parent).__name__}")


def _scope(parent: M.Module, part: str, path: str) -> M.Module:
    """The child `part` of `parent` on the way along `path`, a new Scope where there is none."""
    scope = vars(parent).get(part)
    if scope is None:
        _check_free(parent, part, path)
        scope = Scope()
        setattr(parent, part, scope)
    return scope


def place(root: M.Module, path: str, module: M.Module) -> None:
    """Attach `module` at the dotted `path` under `root`, creating the scopes on the way."""
    *scopes, last = path.split(".")
    parent = root
    for part in scopes:
        parent = _scope(parent, part, path)
        if not isinstance(parent, Scope):
            raise SpecError(f"module path {path!r}: {part!r} is a {type(parent).__name__}, not a name scope")
    _check_free(parent, last, path)
    setattr(parent, last, module)


def hold(root: M.Module, node: Scale | Bias) -> None:
    """Put the parameter of a Scale or Bias at `name.param` under `root`: on the module already
    at `name` (root itself for an empty name), else on a new name scope there."""
    owner = root
    for part in node.name.split(".") if node.name else ():
        owner = _scope(owner, part, node.key)
    _check_free(owner, node.param, node.key)
    setattr(owner, node.param, channel_param(node))


def owned_nodes(node: Node | Model | Aux) -> Iterator[Node | Aux]:
    """The nodes a module builds itself: everything under `node` except the insides of nested
    blocks (those are child modules of their own)."""
    for child in children(node):
        yield child
        if isinstance(child, (Rep, Add, Aux)):
            yield from owned_nodes(child)


# --------------------------------------------------------------------------- forward rules


def run(module: RepModule, nodes: tuple[Node, ...], x: Tensor) -> Tensor:
    """A chain of nodes on x (the empty chain is the identity)."""
    for node in nodes:
        x = apply(module, node, x)
    return x


def _weighted(c: float, y: Tensor) -> Tensor:
    return y if c == 1.0 else y * c


def _rep(module: RepModule, node: Rep, x: Tensor) -> Tensor:
    """[x if residual] + scale(bn(sum_i c_i branch_i(x))) (or the branches concatenated)."""
    outs = [run(module, branch, x) for branch in node.branches]
    if node.combine == "concat":
        y = F.concat(outs, axis=1)
    else:
        y = reduce(operator.add, [_weighted(node.coefficient(i), out) for i, out in enumerate(outs)])
    for after in (node.bn, node.scale):
        if after is not None:
            y = apply(module, after, y)
    return x + y if node.residual else y


def _add(module: RepModule, node: Add, x: Tensor) -> Tensor:
    return reduce(operator.add, [run(module, branch, x) for branch in node.branches])


def apply(module: RepModule, node: Node, x: Tensor) -> Tensor:
    """One node on x: a parameter-free rule (layers.functional), a Rep or Add of chains, or the
    child module at the path of a parameterised leaf or a nested block."""
    if isinstance(node, FREE_LEAVES):
        return functional(node, x, module.training)
    if isinstance(node, Rep):
        return _rep(module, node, x)
    if isinstance(node, Add):
        return _add(module, node, x)
    if isinstance(node, (Scale, Bias)):
        return channel_affine(node, getattr(module.module_at(node.name), node.param), x)
    if isinstance(node, (*PARAM_LEAVES, Block)):
        return module.module_at(node.name)(x)
    raise SpecError(f"the MegEngine backend has no rule for {type(node).__name__}")


# --------------------------------------------------------------------------- states


def live_tensors(module: RepModule) -> dict[str, Tensor]:
    """The module's own tensors (parameters and BN statistics) by canonical key, in schema order,
    taken from the leaf modules at their paths (MegEngine's `state_dict()` walk is slow)."""
    out = {}
    for key in module.schema():
        path, _, field = key.rpartition(".")
        out[key] = getattr(module.module_at(path), field)
    return out


def neutral_array(tensor: Tensor, info: TensorInfo) -> np.ndarray:
    """A MegEngine tensor in its module layout as a canonical array (OIHW, flat BN, float32)."""
    return np.ascontiguousarray(from_megengine(np.asarray(tensor.numpy(), np.float32), info), dtype=np.float32)


def neutral_state(module: RepModule) -> dict[str, np.ndarray]:
    """The module's tensors as a neutral state (canonical keys in schema order, OIHW, float32)."""
    schema = module.schema()
    return {key: neutral_array(tensor, schema[key]) for key, tensor in live_tensors(module).items()}


def native_array(value: np.ndarray, info: TensorInfo) -> np.ndarray:
    """A canonical tensor in MegEngine's `state_dict()` shape (layouts.to_megengine), float32."""
    return np.ascontiguousarray(to_megengine(np.asarray(value, np.float32), info), dtype=np.float32)


def module_layout(value: np.ndarray, info: TensorInfo) -> np.ndarray:
    """A canonical tensor in the shape it has on its MegEngine module: `state_dict()`'s shape,
    except BN tensors, which a BN module holds as (1, C, 1, 1)."""
    v = native_array(value, info)
    return v.reshape(1, -1, 1, 1) if info.kind.startswith("bn.") else v


def write_state(module: RepModule, state: Mapping[str, np.ndarray]) -> None:
    """Write a validated neutral `state` into the module's own tensors in place (`t[...] = v`,
    leaf by leaf at the schema's paths). MegEngine's `load_state_dict` rebuilds `state_dict()`
    recursively for every submodule, which takes tens of seconds on deep models (MobileOne-S0:
    35 s against 0.5 s this way)."""
    schema = module.schema()
    for key, tensor in live_tensors(module).items():
        write_tensor(tensor, state[key], schema[key], key)


def write_tensor(tensor: Tensor, value: np.ndarray, info: TensorInfo, key: str = "") -> None:
    """Write a canonical (OIHW, flat BN) value into a live MegEngine tensor in place
    (`t[...] = v`, in the module's layout: `module_layout`)."""
    v = module_layout(value, info)
    if tuple(v.shape) != tuple(tensor.shape):
        raise ShapeMismatchError(
            f"{key or info.kind}: value of shape {tuple(v.shape)} does not "
            f"fit the MegEngine tensor of shape {tuple(tensor.shape)}"
        )
    tensor[...] = v


# --------------------------------------------------------------------------- the module

_CLASSES: dict[str, type[RepModule]] = {}


class RepModule(M.Module):
    """A block or model built from its description: `spec`, a fixed form (`deploy`) and `desc`
    (the description in that form). Subclasses name the official class they stand for in
    `kind` and refuse a spec of another kind."""

    kind: ClassVar[str] = ""
    spec: SpecLike
    deploy: bool
    desc: Description

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            _CLASSES.setdefault(cls.kind, cls)

    def __init__(self, spec: SpecLike, deploy: bool = False, *, empty: bool = False) -> None:
        """`empty=True` draws no random initial values and gives convs 0-element weights: for
        `_holding`, which sets every tensor right after."""
        super().__init__()
        desc = in_form(spec, "deploy" if deploy else "train")
        if self.kind and desc.kind != self.kind:
            raise ReparamError(
                f"{type(self).__name__} builds {self.kind!r} blocks; the spec "
                f"describes {desc.kind!r} (use build_block or block_class)"
            )
        self.spec = spec
        self.deploy = bool(deploy)
        self.desc = desc
        owned = list(owned_nodes(desc))
        for node in owned:
            if isinstance(node, Block):
                place(self, node.name, block_class(node.kind)(node, self.deploy, empty=empty))
            elif isinstance(node, PARAM_LEAVES):
                place(self, node.name, leaf_module(node, empty))
        for node in owned:  # after the modules: a parameter may join one (a GRN's `beta`)
            if isinstance(node, (Scale, Bias)):
                hold(self, node)

    @property
    def form(self) -> Form:
        return "deploy" if self.deploy else "train"

    def schema(self, prefix: str = "") -> dict[str, TensorInfo]:
        return schema_of(self.desc, prefix)

    def module_at(self, path: str) -> M.Module:
        """The child module at a dotted path ('' is the module itself)."""
        module: M.Module = self
        for part in path.split(".") if path else ():
            module = getattr(module, part)
        return module

    def forward(self, x: Tensor) -> Tensor:
        return run(self, self.desc.body, x)

    def _require_train(self, what: str) -> None:
        if self.deploy:
            raise ReparamError(f"{what}: defined on the train form only; this {type(self).__name__} is in deploy form")

    def forward_with_aux(self, x: Tensor) -> dict[str, Tensor]:
        """The main output ("main") and every auxiliary head's (train form only)."""
        self._require_train("forward_with_aux")
        heads = self.desc.aux if isinstance(self.desc, Model) else ()
        taps = {a.tap: a for a in heads}
        out: dict[str, Tensor] = {}
        for node in self.desc.body:
            x = apply(self, node, x)
            aux = taps.get(node.name) if isinstance(node, Block) else None
            if aux is not None:
                out[aux.name] = run(self, aux.body, x)
        return {"main": x, **out}

    def rep_blocks(self) -> list[tuple[str, RepModule]]:
        """The re-parameterizable blocks (innermost blocks holding a Rep), with their module
        paths; the module itself ('') when it is a block holding a Rep directly."""
        own = [("", self)] if isinstance(self.desc, Block) and any(isinstance(n, Rep) for n in self.desc.body) else []
        return own + [(path, self.module_at(path)) for path, _ in rep_blocks(self.desc)]

    def custom_l2(self) -> Tensor:
        """RepVGGplus' custom L2 summed over every re-parameterizable block, identity branch
        included (train form only)."""
        self._require_train("custom_l2")
        found = self.rep_blocks()
        if not found:
            raise ReparamError(f"custom_l2: {type(self).__name__} holds no re-parameterizable block")
        return reduce(operator.add, [l2_term(block) for _, block in found])

    def reparameterize(self) -> RepModule:
        """A NEW deploy-form module computing the same function (itself when already deploy)."""
        if self.deploy:
            return self
        dst = type(self)._holding(self.spec, reparameterize_state(self.spec, neutral_state(self)), deploy=True)
        dst.train(self.training)
        return dst

    @classmethod
    def _holding(cls, spec: SpecLike, state: Mapping[str, np.ndarray], deploy: bool) -> RepModule:
        """A module of this class holding a complete neutral `state` of its form (trusted: the
        core's fused state), built `empty`; every tensor is then a new MegEngine tensor made
        from the state, in one pass (copied, never shared)."""
        module = cls(spec, deploy, empty=True)
        for key, info in module.schema().items():
            path, _, field = key.rpartition(".")
            leaf = module.module_at(path)
            setattr(leaf, field, type(getattr(leaf, field))(module_layout(state[key], info), no_cache=True))
        return module


def l2_term(block: RepModule) -> Tensor:
    """One block's custom L2 on its own (differentiable) MegEngine tensors."""
    if not isinstance(block.desc, Block):
        raise SpecError(f"custom L2: {block.desc.kind} is a model; the L2 is taken per block")
    t = l2_terms(block.desc)
    k3 = block.module_at(t.dense_conv).weight
    k1 = block.module_at(t.one_conv).weight
    lead = tuple(k3.shape[:-3])  # (O,) or (g, O/g): MegEngine's kernel layout
    ch, cw = t.centre

    def scale(bn_path: str) -> Tensor:
        bn = block.module_at(bn_path)
        return F.reshape((bn.weight / F.sqrt(bn.running_var + bn.eps)).detach(), lead + (1, 1, 1))

    centre = k3[..., ch : ch + 1, cw : cw + 1]
    t3, t1 = scale(t.dense_bn), scale(t.one_bn)
    if t.identity_bn is None:
        return custom_l2_penalty(k3, centre, k1, t3, t1)
    eye = identity_kernel(t.out_channels, t.groups, 1, np.float32)
    eye = mge.tensor(oihw_to_megengine(eye, t.groups))
    return custom_l2_penalty(k3, centre, k1, t3, t1, eye, scale(t.identity_bn))


def block_class(kind: str) -> type[RepModule]:
    """The module class of an official kind; a subclass is made (and cached) on the fly for a
    kind no class was written for."""
    cls = _CLASSES.get(kind)
    if cls is None:
        cls = type(
            kind,
            (RepModule,),
            {"kind": kind, "__module__": __name__, "__doc__": f"{kind}, built from its description."},
        )
    return cls


class RepVGGBlock(RepModule):
    """RepVGG block: `rbr_dense.conv/.bn`, `rbr_1x1`, `rbr_identity`, SE `se` before the act;
    deploy form `rbr_reparam`."""

    kind = "RepVGGBlock"


class RepConv(RepModule):
    """YOLOv7's RepConv: the RepVGG block with conv/BN pairs named `0`/`1` (`rbr_dense.0`)."""

    kind = "RepConv"


class RepVGGplusBlock(RepModule):
    """RepVGGplus block: SE after the activation (module `post_se`)."""

    kind = "RepVGGplusBlock"


class RepGhostModule(RepModule):
    """RepGhost module: `primary_conv.0/.1`, the depthwise `cheap_operation.0/.1` plus the BN
    shortcut `fusion_bn.0`; deploy form `cheap_operation` is one depthwise conv with bias."""

    kind = "RepGhostModule"


class RepGhostBottleneck(RepModule):
    """ghost1 -> (depthwise stride conv + BN) -> SE -> ghost2, plus the identity or the conv
    shortcut `shortcut.0..3`."""

    kind = "RepGhostBottleneck"


__all__ = [
    "RepModule",
    "Scope",
    "block_class",
    "place",
    "hold",
    "owned_nodes",
    "run",
    "apply",
    "l2_term",
    "neutral_state",
    "neutral_array",
    "live_tensors",
    "native_array",
    "module_layout",
    "write_tensor",
    "write_state",
    "RepVGGBlock",
    "RepConv",
    "RepVGGplusBlock",
    "RepGhostModule",
    "RepGhostBottleneck",
]
