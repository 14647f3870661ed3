"""Re-parameterize any torch model: a graph pass that merges parallel conv/BN branches.

`fuse(module, example_input)` captures the module's graph (torch.fx symbolic tracing; fx with
forward's non-tensor defaults fixed, for a classifier's `mode='tensor'`; torch.export where tracing
fails or the traced graph computes other values than the module, as fx does for `t += u` read
again), shows it to the core's matcher (reparam_core.blocks.graphmatch) as a neutral view and
applies the matcher's rewrites: every sum whose operands are branches reading the same tensor
(conv, conv + BN, BN, identity, average pool, per-channel scale, 1x1 -> kxk chains, Diverse
Branch Block's 1x1 -> BN-and-pad -> kxk, ACNet's 1xk / kx1, a difference of branches and a
per-channel scale on it as in FastViT's RepMixer), plus a BN right after the sum, and every lone
conv -> BN (-> per-channel) chain becomes ONE conv, a BN read only by an unpadded conv goes into
it, every BN1d -> Linear, Linear -> BN1d (also LeViT's `bn(lin(x).flatten(0, 1)).reshape_as(..)`)
and sum (or mean) of Linear heads on one tensor becomes ONE Linear, and `t + 0` is dropped; every
BN left is listed with the reason. This pass builds the view (nn.Linear / F.linear as `linear`,
`t.flatten(0, 1)` as a reshape, `reshape_as`'s shape operand not read) and applies the rewrites
(nn.Conv2d / nn.Linear modules, bypassed nodes), and names linear fusions its way (`linear`,
`times 0.5`, reparam_linear_<k>). Norm and conv subclasses are traced into, so their
functional F.batch_norm / F.conv2d on parameters count like the modules (their `x.ndim` checks
do not count as readers); an in-place add is a sum unless the tensor it writes into (or a view
of it) is read after it (else the view shows it as an opaque op). The report's summary line gives
the BN / Conv / Add / Linear counts before and after. Whether branches are exactly one conv is
decided by the core (`Rep` validation, reparam_core.blocks.fuse.check_rep) and the fused kernel
and bias are computed by the core (float64). Anything the core refuses, or that is not a branch
primitive (a nonlinearity, train-mode BN, a branch reading another tensor), is left exactly as it
was and listed in the report with the reason.
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Callable
from typing import Any, TypeGuard

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from reparam_core import BN, AvgPool, Conv, FusionError, PadBN, ReparamError, Scale
from reparam_core.blocks.graphfuse import FusedSum, FuseReport, LeftAlone, Stage
from reparam_core.blocks.graphmatch import ConvRewrite, Dense, GraphView, LinearRewrite, Naming, Op, ViewNode, match
from reparam_core.blocks.nodes import Pair, pair

from .layers import ChannelScale, PadBatchNorm

Tensor = torch.Tensor
aten = torch.ops.aten

# --------------------------------------------------------------------------- capture


class _Tracer(fx.Tracer):
    """fx tracing that keeps this library's padding-aware BN whole and remembers the module path
    being traced when tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (PadBatchNorm, ChannelScale)) or super().is_leaf_module(m, qualname)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def _fixed_defaults(module: nn.Module) -> dict[str, Any]:
    """forward's arguments after the first that have a default which is not a tensor (a `mode`
    string, a flag, `data_samples=None`): the values a call with one input gives them."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and not isinstance(p.default, Tensor)
    }


def _trace(module: nn.Module, concrete: dict[str, Any] | None) -> tuple[fx.GraphModule | None, Exception, str]:
    """fx tracing (with `concrete` arguments fixed): (graph module or None, the error, where)."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(module, concrete_args=concrete)
        return fx.GraphModule(tracer.root, graph, type(module).__name__), ReparamError(""), ""
    except Exception as e:
        return None, e, tracer.failed_in or "(the top-level module)"


def _differs(module: nn.Module, gm: fx.GraphModule, x: Tensor) -> Exception | None:
    """Why the traced graph does not compute what the module computes on x, or None. fx records
    `t += u` on a traced tensor as t + u (no write into t), so a model that reads t again after
    it traces to a different function; torch.export records the write. The module's buffers
    (train-mode BN statistics) are restored afterwards."""
    saved = {k: v.clone() for k, v in module.named_buffers()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[x.device.index or 0] if x.is_cuda else []):
            torch.manual_seed(0)  # the same random draws for both (dropout, drop path)
            want = [t for t in torch.utils._pytree.tree_leaves(module(x)) if isinstance(t, Tensor)]
            torch.manual_seed(0)
            got = [t for t in torch.utils._pytree.tree_leaves(gm(x)) if isinstance(t, Tensor)]
    except Exception as e:
        return e
    finally:
        with torch.no_grad():
            for k, v in module.named_buffers():
                v.copy_(saved[k])
    for a, b in zip((t.double() for t in want), (t.double() for t in got)):
        if a.shape != b.shape or not torch.allclose(
            a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max()) if a.numel() else 0
        ):
            return ReparamError("the traced graph computes other values than the module (an in-place write?)")
    return None if len(want) == len(got) else ReparamError("the traced graph returns other outputs than the module")


def capture(module: nn.Module, example_input: Tensor) -> tuple[fx.GraphModule, str]:
    """The module's graph: fx symbolic tracing; else fx tracing with forward's non-tensor
    defaults fixed (a classifier's `mode='tensor'`: the graph of a call with one input); else
    torch.export (example shapes fixed). Raises ReparamError naming the submodule where tracing
    stopped when none works."""
    gm, fx_error, where = _trace(module, None)
    if gm is not None:
        differs = _differs(module, gm, example_input)
        if differs is None:
            return gm, "torch.fx"
        fx_error, where = differs, "(the traced graph)"
    fixed = _fixed_defaults(module)
    if fixed:
        gm, _, _ = _trace(module, fixed)
        if gm is not None and _differs(module, gm, example_input) is None:
            return gm, f"torch.fx with {', '.join(f'{k}={v!r}' for k, v in fixed.items())}"
    try:
        gm = torch.export.export(module, (example_input,), strict=False).module()
        return gm, "torch.export"
    except Exception as e:
        raise ReparamError(
            f"cannot capture the graph of {type(module).__name__}: torch.fx tracing failed in "
            f"submodule {where!r} ({type(fx_error).__name__}: {str(fx_error).splitlines()[0]}) "
            f"and torch.export failed ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None


# --------------------------------------------------------------------------- op tables

ADDS = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor}
INPLACE_ADDS = {operator.iadd, aten.add_.Tensor, "add_"}
ADD_METHODS = {"add", "add_"}
LINEARS = {F.linear, torch.nn.functional.linear, aten.linear.default}
DROPOUTS = {F.dropout, aten.dropout.default}
DIVS = {operator.truediv, torch.div, aten.div.Tensor}
# reads of a tensor's metadata that do not depend on its values and are the same for every
# tensor a fold may put in its place (timm's `_assert(x.ndim == 4)` in its norm layers)
META_ATTRS = {"ndim", "dtype", "device", "is_cuda"}
META_METHODS = {"dim"}
# ops whose result may share memory with their first argument (an in-place add into one of
# them writes into the other); aten overloads say so in their schema
VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.narrow, torch.transpose, torch.permute}
VIEW_FUNCTIONS |= {torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.movedim, torch.t}
VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "narrow", "transpose", "permute", "squeeze"}
VIEW_METHODS |= {"unsqueeze", "expand", "expand_as", "chunk", "split", "contiguous", "detach", "t", "unflatten"}
VIEW_METHODS |= {"movedim", "unbind", "as_strided", "type_as", "to", "float", "type"}
MULS = {operator.mul, operator.imul, torch.mul, aten.mul.Tensor}
SUBS = {operator.sub, torch.sub, aten.sub.Tensor}
CONVS = {F.conv2d, torch.conv2d, aten.conv2d.default}
POOLS = {F.avg_pool2d, aten.avg_pool2d.default}
CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
POOL_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None}
# F.batch_norm and aten.batch_norm order their tensors differently
BN_ARGS = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    aten.batch_norm.default: (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "training",
        "momentum",
        "eps",
        "cudnn_enabled",
    ),
}
BN_OTHER = {aten._native_batch_norm_legit_no_training.default, aten.native_batch_norm.default}
BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


def _args(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name: the defaults, then the positional and keyword arguments
    (fx arguments of any type; each rule checks the ones it reads)."""
    out = dict(defaults)
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _is_add(node: fx.Node) -> bool:
    """a + b, in place or not (operator, torch, Tensor method or aten spelling)."""
    known = (node.op == "call_function" and node.target in ADDS) or (
        node.op == "call_method" and node.target in ADD_METHODS
    )
    return known and bool(node.kwargs.get("alpha", 1) == 1) and len(node.args) == 2


def _is_inplace_add(node: fx.Node) -> bool:
    return _is_add(node) and node.target in INPLACE_ADDS


def _is_meta_read(node: fx.Node) -> bool:
    """A read of a tensor's rank, dtype or device only (not of its values or shape)."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        return node.args[1] in META_ATTRS
    return node.op == "call_method" and node.target in META_METHODS and len(node.args) == 1


def _may_alias(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether node's result may share memory with its first argument: a view, a pass-through
    module (nn.Identity returns its input), an in-place op, an unknown op reading only it."""
    t = node.target
    if node.op == "call_module" and isinstance(t, str):
        m = modules.get(t)
        return isinstance(m, (nn.Identity, nn.Dropout, nn.Flatten, nn.Unflatten)) or bool(getattr(m, "inplace", False))
    if node.op == "call_method" and isinstance(t, str):
        return t in VIEW_METHODS or t.endswith("_")
    if isinstance(t, torch._ops.OpOverload):
        return any(r.alias_info is not None for r in t._schema.returns)
    return node.op == "call_function" and (t in VIEW_FUNCTIONS or t in INPLACE_ADDS or t is F.dropout)


# --------------------------------------------------------------------------- the pass


Found = tuple[tuple[Stage, ...] | None, str | None, fx.Node | None]
"""What a graph node computes as branch primitives: (stages, None, input) — () for a
pass-through; (None, reason, None) for a primitive that cannot be fused; (None, None, None) for
no primitive."""


class _Pass:
    def __init__(self, gm: fx.GraphModule, example_input: Tensor) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.meta: dict[fx.Node, Any] = {}
        self.consts: dict[fx.Node, Tensor] = {}
        self._run(example_input)
        self.report_left: list[LeftAlone] = []
        self.report_fused: list[FusedSum] = []
        self.erased: set[str] = set()
        self.erased_attrs: set[str] = set()
        self.by_name: dict[str, fx.Node] = {}  # the matcher's values: the nodes that write them
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.unsafe = {n: why for n in gm.graph.nodes if _is_inplace_add(n) and (why := self._inplace_hazard(n))}

    def is_add(self, n: fx.Node) -> bool:
        """a + b that may be treated as a value (an in-place add only where nothing reads the
        tensor it writes into after it)."""
        return _is_add(n) and n not in self.unsafe

    def _inplace_hazard(self, add: fx.Node) -> str | None:
        """Why the in-place add `add` cannot be read as a + b, or None: it writes into a model
        input or parameter, or into a tensor (or a view of it) that is read after it."""
        target = add.args[0]
        if not isinstance(target, fx.Node):
            return f"in-place add {add.name} writes into a constant"
        root = target
        while _may_alias(root, self.modules) and root.args and isinstance(root.args[0], fx.Node):
            root = root.args[0]
        if root.op in ("placeholder", "get_attr"):
            return f"in-place add {add.name} writes into {root.name}, a model input or parameter"
        aliases, stack = {root}, [root]
        while stack:
            n = stack.pop()
            for u in n.users:
                if u is not add and u not in aliases and u.args and u.args[0] is n and _may_alias(u, self.modules):
                    aliases.add(u)
                    stack.append(u)
        late = [
            (a, u)
            for a in aliases
            for u in a.users
            if u is not add and self.order[u] > self.order[add] and not _is_meta_read(u)
        ]
        if late:
            a, u = min(late, key=lambda au: self.order[au[1]])
            return f"in-place add {add.name} writes into {a.name}, which {u.name} reads after it"
        return None

    # ---------------------------------------------------------------- values and shapes

    def _run(self, x: Tensor) -> None:
        """One interpreted run: the shape of every tensor node, the value of every node that
        does not depend on the input (parameters, constant expressions of them)."""
        const: set[fx.Node] = set()
        for n in self.gm.graph.nodes:
            if n.op == "get_attr" or (
                n.op in ("call_function", "call_method")
                and n.all_input_nodes
                and all(a in const for a in n.all_input_nodes)
            ):
                const.add(n)
        outer = self

        class _Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                out = super().run_node(n)
                if isinstance(out, Tensor):
                    outer.meta[n] = (tuple(out.shape), out.dtype, out.device)
                    if n in const:
                        outer.consts[n] = out.detach()
                return out

        with torch.no_grad():
            _Recorder(self.gm).run(x)

    def shape(self, n: Any) -> tuple[int, ...] | None:
        return self.meta[n][0] if isinstance(n, fx.Node) and n in self.meta else None

    def const(self, n: Any) -> Tensor | None:
        return self.consts.get(n) if isinstance(n, fx.Node) else None

    # ---------------------------------------------------------------- primitives

    def stage(self, n: fx.Node) -> Found:
        """The branch primitive computed by graph node n: (stage, None, input) — stage None for
        a pass-through (identity, eval dropout); (None, reason, None) when n looks like a
        primitive that cannot be fused; (None, None, None) when it is no primitive (also when
        it reads no graph tensor)."""
        if n.op == "call_module":
            m = self.modules[n.target]
            x = n.args[0] if n.args else None
            if not isinstance(x, fx.Node):
                return None, None, None
            if isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and not m.training):
                return (), None, x
            if isinstance(m, nn.Conv2d) and type(m) is nn.Conv2d:
                return self._conv(n, x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, m.padding_mode)
            if isinstance(m, PadBatchNorm):
                return self._bn(n, x, m.running_mean, m.running_var, m.weight, m.bias, m.eps, m.training, m.pad)
            if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
                return self._bn(
                    n, x, m.running_mean, m.running_var, m.weight, m.bias, m.eps, m.training and m.track_running_stats
                )
            if type(m) is nn.AvgPool2d:
                return self._pool(
                    n, x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override
                )
            if isinstance(m, ChannelScale):
                return self._scale(n, x, m.vector.detach())
            return None, None, None
        if n.op != "call_function":
            return None, None, None
        if n.target in DROPOUTS:  # functional dropout, an identity when not training
            a = _args(n, ("input", "p", "training"), {"training": n.target is F.dropout})
            return (
                ((), None, a["input"])
                if a["training"] is False and isinstance(a["input"], fx.Node)
                else (None, None, None)
            )
        if n.target in CONVS:
            a = _args(n, CONV_ARGS, CONV_DEFAULTS)
            w, b = self.const(a["weight"]), self.const(a["bias"])
            if w is None or (a["bias"] is not None and b is None):
                return None, f"conv {n.name} has weights computed from the input", None
            if not isinstance(a["input"], fx.Node):
                return None, None, None
            return self._conv(n, a["input"], w, b, a["stride"], a["padding"], a["dilation"], a["groups"], "zeros")
        if n.target in BN_ARGS:
            a = _args(n, BN_ARGS[n.target], BN_DEFAULTS)
            mean, var, weight, bias = (self.const(a[k]) for k in ("running_mean", "running_var", "weight", "bias"))
            if mean is None or var is None:
                return None, f"BN {n.name} has no running statistics", None
            if not isinstance(a["input"], fx.Node):
                return None, None, None
            return self._bn(n, a["input"], mean, var, weight, bias, a["eps"], bool(a["training"]))
        if n.target in POOLS:
            a = _args(n, POOL_ARGS, POOL_DEFAULTS)
            if not isinstance(a["input"], fx.Node):
                return None, None, None
            return self._pool(
                n,
                a["input"],
                a["kernel_size"],
                a["stride"] or a["kernel_size"],
                a["padding"],
                a["ceil_mode"],
                a["count_include_pad"],
                a["divisor_override"],
            )
        if n.target in MULS and len(n.args) == 2:
            for x, c in (n.args, n.args[::-1]):
                cv = self.const(c)
                if isinstance(x, fx.Node) and self.const(x) is None and cv is not None:
                    return self._scale(n, x, cv)
        return None, None, None

    def _conv(
        self,
        n: fx.Node,
        x: fx.Node,
        w: Tensor,
        b: Tensor | None,
        stride: Any,
        padding: Any,
        dilation: Any,
        groups: int,
        mode: str,
    ) -> Found:
        d = _pair_arg(dilation)
        if mode != "zeros" or w.dim() != 4:
            return None, f"conv {n.name} is not a zero-padded 2-D conv", None
        k = (w.shape[2], w.shape[3])
        if isinstance(padding, str):
            if padding == "same" and any(di * (ki - 1) % 2 for di, ki in zip(d, k)):
                return None, f"conv {n.name}: padding='same' is asymmetric for this kernel", None
            padding = (0, 0) if padding == "valid" else tuple(di * (ki - 1) // 2 for di, ki in zip(d, k))
        cin, cout = w.shape[1] * int(groups), w.shape[0]
        conv = Conv(
            "",
            cin,
            cout,
            kernel=k,
            stride=_pair_arg(stride),
            padding=_pair_arg(padding),
            dilation=d,
            groups=int(groups),
            bias=b is not None,
        )
        params = {"weight": w.detach().cpu().numpy()}
        if b is not None:
            params["bias"] = b.detach().cpu().numpy()
        return (Stage(conv, params),), None, x

    def _bn(
        self,
        n: fx.Node,
        x: fx.Node,
        mean: Tensor | None,
        var: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        training: bool,
        pad: int = 0,
    ) -> Found:
        if training or mean is None or var is None:
            return None, f"BN {n.name} is in training mode (batch statistics)", None
        c = mean.shape[0]
        tensors = {
            "running_mean": mean,
            "running_var": var,
            "weight": torch.ones(c) if weight is None else weight,
            "bias": torch.zeros(c) if bias is None else bias,
        }
        params = {k: v.detach().cpu().numpy() for k, v in tensors.items()}
        node = PadBN("", c, pad, float(eps)) if pad else BN("", c, float(eps))
        return (Stage(node, params),), None, x

    def _pool(
        self, n: fx.Node, x: fx.Node, kernel: Any, stride: Any, padding: Any, ceil: bool, count_pad: bool, divisor: Any
    ) -> Found:
        k, s, p = _pair_arg(kernel), _pair_arg(stride), _pair_arg(padding)
        if ceil or divisor is not None or (not count_pad and p != (0, 0)):
            return None, f"avg pool {n.name} uses ceil_mode, a divisor or excludes padding", None
        if k[0] != k[1] or s[0] != s[1] or p[0] != p[1]:
            return None, f"avg pool {n.name} is not square", None
        return (Stage(AvgPool(k[0], s[0], p[0]), {}),), None, x

    def _scale(self, n: fx.Node, x: fx.Node, c: Tensor) -> Found:
        shape = self.shape(x)
        if (
            shape is None
            or len(shape) != 4
            or c.numel() != shape[1]
            or tuple(c.shape) not in ((shape[1], 1, 1), (1, shape[1], 1, 1))
        ):
            return None, None, None
        return (Stage(Scale("", shape[1]), {"weight": c.detach().reshape(-1).cpu().numpy()}),), None, x

    # ---------------------------------------------------------------- the matcher's view

    def view(self) -> GraphView:
        """The graph as the core matcher sees it (reparam_core.blocks.graphmatch): constants
        (parameters, expressions of them) are no values, metadata reads read nothing."""
        self.by_name = {n.name: n for n in self.gm.graph.nodes}
        nodes = [self._view_node(n) for n in self.gm.graph.nodes if n not in self.consts]
        shapes = {n.name: self.meta[n][0] for n in self.gm.graph.nodes if n in self.meta}
        return GraphView(nodes, (), shapes)

    def _value(self, a: Any) -> np.ndarray | None:
        """A constant operand as numpy (a number as a 0-d array), None when a is none."""
        if isinstance(a, fx.Node):
            c = self.const(a)
            return None if c is None else _np(c)
        return np.asarray(float(a)) if isinstance(a, (int, float)) and not isinstance(a, bool) else None

    def _is_value(self, a: Any) -> TypeGuard[fx.Node]:
        return isinstance(a, fx.Node) and self.const(a) is None

    def _same_dtype(self, n: fx.Node, x: fx.Node) -> bool:
        """n's result has x's dtype (an add of a constant that casts is no affine map of x)."""
        return n in self.meta and x in self.meta and self.meta[n][1] == self.meta[x][1]

    def _view_node(self, n: fx.Node) -> ViewNode:
        """n in the matcher's terms: add, sub (of a value, or of a constant, the dtype kept),
        mul / div by a constant, zero pad, linear, a leading flatten, or what it computes as
        branch primitives (stage); `y.reshape_as(t)` does not read t's values."""
        label, what = _label(n), _what(n, self.modules)
        if _is_meta_read(n):
            return ViewNode(n.name, label, what)
        binary = n.op == "call_function" and len(n.args) == 2 and not n.kwargs
        if self.is_add(n) or (binary and n.target in SUBS):
            op: Op = "add" if self.is_add(n) else "sub"
            values = [a for a in n.args if self._is_value(a)]
            consts = [self._value(a) for a in n.args if not self._is_value(a)]
            names = tuple(a.name for a in values)
            if op == "sub" and not self._is_value(n.args[0]):
                return ViewNode(n.name, label, what, "other", names)
            if len(consts) == 1 and consts[0] is not None and self._same_dtype(n, values[0]):
                return ViewNode(n.name, label, what, op, names, const=consts[0])
            return ViewNode(n.name, label, what, op if not consts else "other", names)
        if binary and n.target in (MULS | DIVS) and sum(self._is_value(a) for a in n.args) == 1:
            x, c = n.args if self._is_value(n.args[0]) else n.args[::-1]
            cv = self._value(c)
            if isinstance(x, fx.Node) and cv is not None and (n.target in MULS or x is n.args[0]):
                st, why, _ = self.stage(n)
                return ViewNode(n.name, label, what, "mul" if n.target in MULS else "div", (x.name,), st, why, cv)
        if n.op == "call_function" and n.target is F.pad and n.args and self._is_value(n.args[0]):
            return ViewNode(n.name, label, what, "pad", (n.args[0].name,), pad=_zero_pad(n))
        dense = self._dense(n)
        if dense is not None:
            return ViewNode(n.name, label, what, "linear", (dense[1].name,), dense=dense[0])
        if _is_leading_flatten(n) and self._is_value(n.args[0]):
            return ViewNode(n.name, label, what, "reshape", (n.args[0].name,))
        st, why, x = self.stage(n)
        kind = _op_kind(n, self.modules)
        seen: Op = "output" if n.op == "output" else "conv" if kind == "Conv" else "bn" if kind == "BN" else "other"
        first = (x.name,) if x is not None else ()
        shape_only = n.args[1] if n.op == "call_method" and n.target in ("reshape_as", "view_as") else None
        others = tuple(
            a.name for a in n.all_input_nodes if a is not x and a is not shape_only and self.const(a) is None
        )
        return ViewNode(n.name, label, what, seen, first + others, st if x is not None else None, why)

    def conv(self, rw: ConvRewrite) -> ViewNode:
        """The matcher's conv rewrite on the graph: an nn.Conv2d module in place of its nodes."""
        f = rw.conv
        conv = nn.Conv2d(f.in_channels, f.out_channels, f.kernel, f.stride, f.padding, f.dilation, f.groups, bias=True)
        new = self.install(self.by_name[rw.end], self.by_name[rw.source], rw.name, conv, rw.kernel, rw.bias)
        self.erase({self.by_name[v] for v in rw.consumed})
        self.by_name[new.name] = new
        return rw.node(new.name, _what(new, self.modules))

    def install(
        self, end: fx.Node, source: fx.Node, name: str, layer: nn.Conv2d | nn.Linear, w: np.ndarray, b: np.ndarray
    ) -> fx.Node:
        """Give `layer` the weight w and bias b, add it as submodule `name` and let every reader
        of `end` read layer(source) instead."""
        _, dtype, device = self.meta[end]
        if layer.bias is None:  # impossible: built with bias=True
            raise FusionError(f"{name}: {type(layer).__name__}(bias=True) has no bias")
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            layer.bias.copy_(torch.from_numpy(np.ascontiguousarray(b)))
        self.gm.add_submodule(name, layer.to(device=device, dtype=dtype))
        self.modules[name] = layer
        with self.gm.graph.inserting_before(end):
            new = self.gm.graph.call_module(name, (source,))
        end.replace_all_uses_with(new)
        self.meta[new] = self.meta[end]
        return new

    def erase(self, dead: set[fx.Node]) -> None:
        """Erase the nodes a fold consumed (their metadata reads become constants), then the
        parameters and constant expressions nothing reads any more."""
        for n in dead:
            self._const_meta_reads(n)
        for n in reversed(list(self.gm.graph.nodes)):
            if n in dead:
                self.gm.graph.erase_node(n)
                if n.op == "call_module":
                    self.erased.add(n.target)
        for n in reversed(list(self.gm.graph.nodes)):  # parameters (and constant expressions
            if n in self.consts and not n.users:  # of them) only the branches read
                if n.op == "get_attr" and isinstance(n.target, str):
                    self.erased_attrs.add(n.target)
                self.gm.graph.erase_node(n)

    def _const_meta_reads(self, n: fx.Node) -> None:
        """Replace each read of n's rank, dtype or device by its recorded value."""
        if n not in self.meta:
            return
        shape, dtype, device = self.meta[n]
        for u in [u for u in n.users if _is_meta_read(u)]:
            what = u.args[1] if u.target is getattr else "ndim"
            value = {"ndim": len(shape), "dtype": dtype, "device": device, "is_cuda": device.type == "cuda"}[str(what)]
            for v in list(u.users):
                v.args = fx.node.map_arg(v.args, _substitute(u, value))
                v.kwargs = fx.node.map_arg(v.kwargs, _substitute(u, value))
            self.gm.graph.erase_node(u)

    # ---------------------------------------------------------------- linear layers

    def _dense(self, n: fx.Node) -> tuple[Dense, fx.Node] | None:
        """An nn.Linear or a functional linear with constant weights, and its input."""
        if n.op == "call_module" and isinstance(n.target, str) and type(self.modules.get(n.target)) is nn.Linear:
            m = self.modules[n.target]
            x = n.args[0] if n.args else None
            bias = None if m.bias is None else _np(m.bias)
            return (Dense(_np(m.weight), bias, "linear"), x) if isinstance(x, fx.Node) else None
        if n.op == "call_function" and n.target in LINEARS:
            a = _args(n, ("input", "weight", "bias"), {"bias": None})
            w, b = self.const(a["weight"]), self.const(a["bias"])
            if w is None or (a["bias"] is not None and b is None) or not isinstance(a["input"], fx.Node):
                return None
            return Dense(_np(w), None if b is None else _np(b), "linear"), a["input"]
        return None

    def linear(self, rw: LinearRewrite) -> list[ViewNode]:
        """The matcher's linear rewrite on the graph: an nn.Linear module in place of its nodes."""
        w = rw.weight
        layer = nn.Linear(w.shape[1], w.shape[0], bias=True)
        new = self.install(self.by_name[rw.end], self.by_name[rw.source], rw.name, layer, w, rw.bias)
        self.erase({self.by_name[v] for v in rw.consumed})
        self.by_name[new.name] = new
        dense = Dense(w, rw.bias, "linear")
        return [ViewNode(new.name, rw.name, _what(new, self.modules), "linear", (rw.source,), dense=dense)]

    def bypass(self, value: str, to: str) -> None:
        """The matcher's bypass: the node writing `value` goes, its readers read `to`."""
        n = self.by_name[value]
        n.replace_all_uses_with(self.by_name[to])
        self.erase({n})

    # ---------------------------------------------------------------- driver

    def run(self) -> None:
        for n, why in self.unsafe.items():
            self.report_left.append(LeftAlone(n.name, why))
        naming = Naming(then_bn=True, linear="reparam_linear", scale="times {:g}", reshape="")
        matched = match(self.view(), self, naming)  # everything: the core's matcher
        self.report_fused += matched.fused
        self.report_left += matched.left


def _is_leading_flatten(n: fx.Node) -> bool:
    """t.flatten(0, 1) / torch.flatten(t, 0, 1): the last dimension stays the last."""
    flat = (n.op == "call_method" and n.target == "flatten") or (n.op == "call_function" and n.target is torch.flatten)
    return flat and tuple(n.args[1:]) == (0, 1) and not n.kwargs


def _zero_pad(n: fx.Node) -> int | None:
    """The width of F.pad(t, [p] * 4) (constant zeros, the same on the four spatial sides)."""
    amount = n.args[1] if len(n.args) > 1 else n.kwargs.get("pad")
    mode = n.args[2] if len(n.args) > 2 else n.kwargs.get("mode", "constant")
    value = n.args[3] if len(n.args) > 3 else n.kwargs.get("value", None)
    if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(amount, (list, tuple)):
        return None
    if len(amount) != 4 or len(set(amount)) != 1 or not isinstance(amount[0], int):
        return None
    return amount[0]


def _substitute(node: fx.Node, value: Any) -> Callable[[fx.Node], Any]:
    """For fx.node.map_arg: `value` in place of `node`, every other node as it is."""
    return lambda a: value if a is node else a


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _op_kind(n: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """BN, Conv, Add or Linear for a graph node computing one (None for anything else)."""
    if n.op == "call_module" and isinstance(n.target, str):
        m = modules.get(n.target)
        kinds = ((nn.modules.batchnorm._BatchNorm, "BN"), (PadBatchNorm, "BN"), (nn.modules.conv._ConvNd, "Conv"))
        return next((k for cls, k in (*kinds, (nn.Linear, "Linear")) if isinstance(m, cls)), None)
    if n.op not in ("call_function", "call_method"):
        return None
    if _is_add(n):
        return "Add"
    t = n.target
    if t in BN_ARGS or t in BN_OTHER:
        return "BN"
    if t in CONVS or t is aten.convolution.default:
        return "Conv"
    return "Linear" if t in LINEARS or t is aten.addmm.default else None


def op_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many BN, Conv, Add and Linear ops the graph computes."""
    modules = dict(gm.named_modules())
    counts = dict.fromkeys(("BN", "Conv", "Add", "Linear"), 0)
    for n in gm.graph.nodes:
        kind = _op_kind(n, modules)
        if kind is not None:
            counts[kind] += 1
    return counts


def _pair_arg(v: Any) -> Pair:
    """An int, a 1-list or a pair (fx and aten spell geometry arguments all three ways)."""
    if isinstance(v, (list, tuple)) and len(v) == 1:
        return pair(int(v[0]))
    return pair(v)


def _what(n: fx.Node, modules: dict[str, nn.Module]) -> str:
    if n.op == "call_module" and isinstance(n.target, str):
        return f"module {type(modules[n.target]).__name__}"
    if n.op == "call_function":
        return f"function {getattr(n.target, '__name__', n.target)}"
    return n.op


def _label(n: fx.Node) -> str:
    return str(n.target) if n.op == "call_module" else n.name


def _delete_attrs(gm: fx.GraphModule, targets: set[str]) -> None:
    """Delete the parameters and buffers no node reads any more (the statistics of a functional
    BN that was folded), then the submodules left holding nothing that the graph uses."""
    read = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    owners = set()
    for target in sorted(targets - read):
        owner, _, attr = target.rpartition(".")
        mod = _submodule(gm, owner)
        if mod is not None and hasattr(mod, attr):
            delattr(mod, attr)
            owners.add(owner)
    prefixes = {t.rsplit(".", i)[0] for t in read if isinstance(t, str) for i in range(t.count(".") + 1)}
    for owner in sorted(owners, key=len, reverse=True):
        mod = _submodule(gm, owner)
        if owner and mod is not None and owner not in prefixes and not any(True for _ in mod.parameters()):
            gm.delete_submodule(owner)


def _submodule(gm: nn.Module, path: str) -> nn.Module | None:
    """gm's submodule at `path` ('' is gm), or None when there is none (any more)."""
    try:
        return gm.get_submodule(path) if path else gm
    except AttributeError:
        return None


def fuse(module: nn.Module, example_input: Tensor) -> fx.GraphModule:
    """A copy of `module` (put it in eval mode first) with every sum of parallel branches on one
    tensor, every BN after such a sum and every lone conv -> BN replaced by one conv, every BN1d ->
    Linear, Linear -> BN1d and sum or mean of Linear heads by one Linear, computed by reparam_core
    in float64; `t + 0` dropped; everything else as it was. The input module is not modified. The
    report is attached as `.fuse_report` (a FuseReport; print it)."""
    gm, how = capture(copy.deepcopy(module), example_input)
    before = op_counts(gm)
    p = _Pass(gm, example_input)
    p.run()
    used = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for target in sorted(p.erased - used):  # the modules of the fused branches only
        gm.delete_submodule(target)
    _delete_attrs(gm, p.erased_attrs)
    gm.graph.lint()
    gm.recompile()
    report = FuseReport(f"captured with {how}", p.report_fused, p.report_left, before, op_counts(gm))
    # torch types a module's unknown attributes (__getattr__/__setattr__) as Tensor | Module; at
    # runtime any other value is stored as a plain attribute
    gm.fuse_report = report  # type: ignore[assignment]
    return gm


__all__ = ["fuse", "capture", "FuseReport"]
