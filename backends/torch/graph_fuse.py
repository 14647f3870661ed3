"""Re-parameterize any torch model: a graph pass that merges parallel conv/BN branches.

`fuse(module, example_input)` captures the module's graph (torch.fx symbolic tracing; torch.export
where tracing fails), finds every sum whose operands are branches reading the same tensor (conv,
conv + BN, BN, identity, average pool, per-channel scale, 1x1 -> kxk chains, Diverse Branch
Block's 1x1 -> BN-and-pad -> kxk, ACNet's 1xk / kx1), plus a BN right after the sum, and every
lone conv -> BN pair, and replaces each with ONE conv. The pass only translates what it finds
into the core's block description (`reparam_core.blocks.nodes.Rep`); whether the branches are exactly
one conv is decided by the core (`Rep` validation, reparam_core.blocks.fuse.check_rep) and the fused
kernel and bias are computed by the core (reparam_core.blocks.fuse.rep_kernel_bias, float64). Anything
the core refuses, or that is not a branch primitive (a nonlinearity, train-mode BN, a branch
reading another tensor), is left exactly as it was and listed in the report with the reason.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from reparam_core import BN, AvgPool, Conv, FusionError, PadBN, ReparamError, Scale
from reparam_core.blocks.graphfuse import FusedSum, FuseReport, LeftAlone, Stage, branch_kind, fuse_branches
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


def capture(module: nn.Module, example_input: Tensor) -> tuple[fx.GraphModule, str]:
    """The module's graph: fx symbolic tracing, else torch.export (example shapes fixed).
    Raises ReparamError naming the submodule where tracing stopped when neither works."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(module)
        return fx.GraphModule(tracer.root, graph, type(module).__name__), "torch.fx"
    except Exception as e:
        fx_error, where = e, tracer.failed_in or "(the top-level module)"
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

ADDS = {operator.add, operator.iadd, torch.add, aten.add.Tensor}
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
BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


def _args(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name: the defaults, then the positional and keyword arguments
    (fx arguments of any type; each rule checks the ones it reads)."""
    out = dict(defaults)
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _is_add(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target in ADDS
        and bool(node.kwargs.get("alpha", 1) == 1)
        and len(node.args) == 2
    )


# --------------------------------------------------------------------------- the pass


@dataclass(frozen=True)
class _Stage:
    """A branch primitive (the core's Stage) and the graph node it comes from."""

    node: fx.Node
    core: Stage


Found = tuple[_Stage | None, str | None, fx.Node | None]
"""What a graph node computes as a branch primitive: (stage, None, input) — stage None for a
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
        self.count = 0
        self.erased: set[str] = set()

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
                return None, None, x
            if isinstance(m, nn.Conv2d) and type(m) is nn.Conv2d:
                return self._conv(n, x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, m.padding_mode)
            if isinstance(m, PadBatchNorm):
                return self._bn(n, x, m.running_mean, m.running_var, m.weight, m.bias, m.eps, m.training, m.pad)
            if type(m) is nn.BatchNorm2d:
                return self._bn(
                    n, x, m.running_mean, m.running_var, m.weight, m.bias, m.eps, m.training and m.track_running_stats
                )
            if type(m) is nn.AvgPool2d:
                return self._pool(
                    n, x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override
                )
            if isinstance(m, ChannelScale):
                return self._scale(n, x, m.weight.detach().reshape(1, -1, 1, 1))
            return None, None, None
        if n.op != "call_function":
            return None, None, None
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
        return _Stage(n, Stage(conv, params)), None, x

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
        return _Stage(n, Stage(node, params)), None, x

    def _pool(
        self, n: fx.Node, x: fx.Node, kernel: Any, stride: Any, padding: Any, ceil: bool, count_pad: bool, divisor: Any
    ) -> Found:
        k, s, p = _pair_arg(kernel), _pair_arg(stride), _pair_arg(padding)
        if ceil or divisor is not None or (not count_pad and p != (0, 0)):
            return None, f"avg pool {n.name} uses ceil_mode, a divisor or excludes padding", None
        if k[0] != k[1] or s[0] != s[1] or p[0] != p[1]:
            return None, f"avg pool {n.name} is not square", None
        return _Stage(n, Stage(AvgPool(k[0], s[0], p[0]), {})), None, x

    def _scale(self, n: fx.Node, x: fx.Node, c: Tensor) -> Found:
        shape = self.shape(x)
        if (
            shape is None
            or len(shape) != 4
            or c.numel() != shape[1]
            or tuple(c.shape) not in ((shape[1], 1, 1), (1, shape[1], 1, 1))
        ):
            return None, None, None
        return _Stage(n, Stage(Scale("", shape[1]), {"weight": c.detach().reshape(-1).cpu().numpy()})), None, x

    # ---------------------------------------------------------------- branches and sums

    def branch(self, term: fx.Node) -> tuple[fx.Node, list[_Stage], list[fx.Node], str | None]:
        """Walk back from a summed term through single-use primitives: (the tensor the branch
        reads, its stages in forward order, the graph nodes it consumes, why it stopped early)."""
        stages: list[_Stage] = []
        nodes: list[fx.Node] = []
        n, why = term, None
        while isinstance(n, fx.Node) and len(n.users) == 1:
            padded = self.pad_bn(n)
            if padded is not None:
                st_pad, src, consumed = padded
                nodes += consumed
                stages.append(st_pad)
                n = src
                continue
            st, reason, x = self.stage(n)
            if x is None:
                why = reason
                break
            nodes.append(n)
            if st is not None:
                stages.append(st)
            n = x
        return n, stages[::-1], nodes, why

    def pad_bn(self, add: fx.Node) -> tuple[_Stage, fx.Node, list[fx.Node]] | None:
        """`F.pad(bn(x) - c, [p] * 4) + c` with c = BN(0) per channel (Diverse Branch Block's
        BN-and-pad, written functionally): one PadBN stage, x, the nodes it consumes."""
        if not _is_add(add):
            return None
        for pad, c in (add.args, add.args[::-1]):
            cv = self.const(c)
            if cv is None or not isinstance(pad, fx.Node) or pad.target is not F.pad or len(pad.users) != 1:
                continue
            sub = pad.args[0]
            amount = pad.args[1] if len(pad.args) > 1 else pad.kwargs.get("pad")
            value = pad.args[3] if len(pad.args) > 3 else pad.kwargs.get("value", None)
            mode = pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("mode", "constant")
            if (
                not isinstance(sub, fx.Node)
                or sub.target not in SUBS
                or len(sub.users) != 1
                or mode != "constant"
                or value not in (None, 0, 0.0)
                or not isinstance(amount, (list, tuple))
                or len(amount) != 4
                or len(set(amount)) != 1
            ):
                continue
            shift, bn, width = self.const(sub.args[1]), sub.args[0], amount[0]
            if (
                shift is None
                or not torch.equal(shift, cv)
                or not isinstance(width, int)
                or not isinstance(bn, fx.Node)
                or len(bn.users) != 1
            ):
                continue
            st, _, x = self.stage(bn)
            if st is None or x is None or not isinstance(st.core.node, BN):
                continue
            node, prm = st.core.node, st.core.params
            zero = prm["bias"] - prm["running_mean"] * prm["weight"] / np.sqrt(
                prm["running_var"].astype(np.float64) + node.eps
            )
            want = cv.detach().cpu().double().reshape(-1).numpy()
            if want.shape != zero.shape or np.abs(zero - want).max() > 1e-6 * max(float(np.abs(want).max()), 1e-30):
                continue
            core = Stage(PadBN("", node.channels, width, node.eps), prm)
            return _Stage(add, core), x, [add, pad, sub, bn]
        return None

    def terms(self, add: fx.Node) -> tuple[list[fx.Node], list[fx.Node], str | None]:
        """The flattened operands of a tree of adds (inner adds used only by it), the add nodes,
        and a reason when an operand is a non-zero constant."""
        terms: list[fx.Node] = []
        adds = [add]
        why = None
        for a in add.args:
            if isinstance(a, fx.Node) and _is_add(a) and len(a.users) == 1:
                t, inner, inner_why = self.terms(a)
                why = why or inner_why
                terms += t
                adds += inner
            elif isinstance(a, fx.Node) and self.const(a) is None:
                terms.append(a)
            elif not (isinstance(a, (int, float)) and a == 0):
                why = f"adds a constant ({a if not isinstance(a, fx.Node) else a.name})"
        return terms, adds, why

    def try_sum(self, add: fx.Node) -> None:
        """Fuse the tree of adds at `add` as one sum; failing that, each inner add of it."""
        if not self._try_tree(add):
            for a in add.args:
                if isinstance(a, fx.Node) and _is_add(a) and len(a.users) == 1:
                    self.try_sum(a)

    def _try_tree(self, add: fx.Node) -> bool:
        terms, adds, why = self.terms(add)
        if len(terms) < 2:
            return False  # a tensor plus constants: not a sum of branches
        if why is not None:
            self.report_left.append(LeftAlone(add.name, why))
            return False
        out = self.shape(add)
        if any(self.shape(t) != out for t in terms) or out is None or len(out) != 4:
            self.report_left.append(
                LeftAlone(add.name, f"operands of shapes {[self.shape(t) for t in terms]} broadcast or are not 4-D")
            )
            return False
        walks = [self.branch(t) for t in terms]
        sources = [w[0] for w in walks]
        common = max(sources, key=sources.count)  # the first on a tie
        bad = sorted(
            (i for i, s in enumerate(sources) if s is not common), key=lambda i: walks[i][3] is None
        )  # a branch stopped by a reason first
        if bad:
            i = bad[0]
            s, _, _, stop = walks[i]
            desc = stop or (f"branch {i} reads {s.name} ({_what(s, self.modules)}), the others read {common.name}")
            self.report_left.append(LeftAlone(add.name, desc))
            return False
        return self.fuse(add, common, [w[1] for w in walks], [n for w in walks for n in w[2]] + adds, add.name)

    def post_bn(self, last: fx.Node) -> _Stage | None:
        if len(last.users) != 1:
            return None
        (user,) = last.users
        st, _, x = self.stage(user)
        return st if st is not None and x is last and isinstance(st.core.node, BN) else None

    def fuse(
        self, last: fx.Node, source: fx.Node, branches: list[list[_Stage]], nodes: list[fx.Node], where: str
    ) -> bool:
        """Build the core's Rep; on success replace `last` (and a BN after it) by one conv."""
        post = self.post_bn(last)
        source_shape, last_shape = self.shape(source), self.shape(last)
        if source_shape is None or last_shape is None:
            self.report_left.append(LeftAlone(where, f"no recorded tensor shape for {source.name} or {last.name}"))
            return False
        cin, cout = source_shape[1], last_shape[1]
        try:
            fused, (kernel, bias) = fuse_branches(
                [[st.core for st in b] for b in branches], cin, cout, None if post is None else post.core
            )
        except FusionError as e:
            self.report_left.append(LeftAlone(where, str(e)))
            return False
        end = last if post is None else post.node
        self.count += 1
        name = f"reparam_fused_{self.count}"
        conv = nn.Conv2d(cin, cout, fused.kernel, fused.stride, fused.padding, fused.dilation, fused.groups, bias=True)
        _, dtype, device = self.meta[end]
        if conv.bias is None:  # impossible: built with bias=True
            raise FusionError(f"{name}: nn.Conv2d(bias=True) has no bias")
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
            conv.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias)))
        self.gm.add_submodule(name, conv.to(device=device, dtype=dtype))
        self.modules[name] = conv
        with self.gm.graph.inserting_before(end):
            new = self.gm.graph.call_module(name, (source,))
        end.replace_all_uses_with(new)
        self.meta[new] = self.meta[end]
        dead = set(nodes) | {end}
        for n in reversed(list(self.gm.graph.nodes)):
            if n in dead:
                self.gm.graph.erase_node(n)
                if n.op == "call_module":
                    self.erased.add(n.target)
        for n in reversed(list(self.gm.graph.nodes)):  # parameters (and constant expressions
            if n in self.consts and not n.users:  # of them) only the branches read
                self.gm.graph.erase_node(n)
        kinds = tuple(branch_kind([st.core for st in b]) for b in branches)
        if post is not None:
            kinds = (*kinds, "then bn")
        self.report_fused.append(FusedSum(tuple(sorted((_label(n) for n in dead), key=str)), kinds, fused.kernel, name))
        return True

    def run(self) -> None:
        graph = self.gm.graph
        roots = [n for n in graph.nodes if _is_add(n) and not (len(n.users) == 1 and _is_add(next(iter(n.users))))]
        for add in roots:
            if add.graph is graph:
                self.try_sum(add)
        for n in list(graph.nodes):  # lone conv -> BN pairs
            st, _, x = self.stage(n)
            if st is None or not isinstance(st.core.node, BN) or not isinstance(x, fx.Node):
                continue
            head, _, src = self.stage(x)
            if head is None or src is None or not isinstance(head.core.node, Conv) or len(x.users) != 1:
                continue
            self.fuse(x, src, [[head]], [x], n.name)


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


def fuse(module: nn.Module, example_input: Tensor) -> fx.GraphModule:
    """A copy of `module` (put it in eval mode first) with every sum of parallel branches on one
    tensor, every BN after such a sum and every lone conv -> BN replaced by one conv computed by
    reparam_core in float64; everything else as it was. The input module is not modified. The
    report is attached as `.fuse_report` (a FuseReport; print it)."""
    gm, how = capture(copy.deepcopy(module), example_input)
    p = _Pass(gm, example_input)
    p.run()
    used = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for target in sorted(p.erased - used):  # the modules of the fused branches only
        gm.delete_submodule(target)
    gm.graph.lint()
    gm.recompile()
    report = FuseReport(f"captured with {how}", p.report_fused, p.report_left)
    # torch types a module's unknown attributes (__getattr__/__setattr__) as Tensor | Module; at
    # runtime any other value is stored as a plain attribute
    gm.fuse_report = report  # type: ignore[assignment]
    return gm


__all__ = ["fuse", "capture", "FuseReport"]
