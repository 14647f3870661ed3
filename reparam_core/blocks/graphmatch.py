"""The pattern matching of the graph fusers (backends/torch/graph_fuse.py, backends/onnx),
written once over a neutral view of a graph, framework-free.

An adapter shows its graph as a `GraphView`: one `ViewNode` per value a node writes, with a
neutral op kind, the graph values it reads (constants are no values), what it computes as
branch primitives (core `Stage`s) or why it cannot be one, the constant of an add / sub, the
width of a zero pad, and the shapes of the values. `match` finds on it, in this order:

- sums of branches on one tensor: a tree of single-reader adds (an add of a zero constant
  counts; a `Sub` of two values is a sum with its second operand negated; a per-channel
  scale on a single-reader sum is pushed into its terms, as FastViT's `x + ls * (a - b)`;
  pass-throughs between the sums are looked through),
  each term walked back through single-reader primitives, and through the BN-and-pad of
  Diverse Branch Block written as ops, `pad(pre - c) + c` with c = BN(0) of a BN `pre` or the
  bias of a conv `pre` (`pad_bn`), to the tensor it reads; a BN read only by the sum goes in
  too. A tree that is not one conv is tried again at each of its inner sums;
- conv chains: a conv and the primitives after it, each reading the one before and read once
  (the longest such chain the core accepts);

and, before those, linear layers (`Dense`: a `linear` node, or one without bias and an add of a
constant per output feature, as ONNX's MatMul + Add), in graph order of their BNs:

- a BN over the features of an (N, C) value right after a linear layer (through pass-throughs,
  or through reshapes keeping the last axis, as LeViT's `bn(lin(x).flatten(0, 1))`: the BN goes,
  its readers read the reshape), else right before one (through pass-throughs), into it
  (fusion.fuse_linear_bn / fuse_bn_linear);
- parallel linear heads on one tensor, summed, then scaled by a number or not (averaged
  distillation heads), as one (fusion.merge_heads);

and after them a BN read only by a conv (exact when the conv does not pad: fusion.fuse_bn_conv),
`t + 0` of unchanged shape dropped (an absent MobileOne branch), and every BN left listed with
why it stayed.

Each match is decided by the core (graphfuse.fuse_branches: Rep validation, float64 kernel and
bias; fusion.py's linear rules) and handed to the adapter (`Adapter`) as a `ConvRewrite`, a
`LinearRewrite` or a bypass, which applies it to its graph and returns the nodes that now write
the value; the view is updated with them, so that later matches see the fused layer. What is
refused is listed (`LeftAlone`) with the reason. The report's names of linear fusions are the
adapter's (`Naming`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import numpy as np

from ..errors import FusionError
from .fusion import bn_zero, fuse_bn_conv, fuse_bn_linear, fuse_linear_bn, merge_heads
from .graphfuse import FusedSum, LeftAlone, Stage, affine_bn, branch_kind, fuse_branches
from .nodes import BN, Conv, PadBN, Scale

Shape = tuple[int | None, ...]
"""A tensor shape (None: a dimension the adapter could not fix)."""

Op = Literal["add", "sub", "mul", "div", "pad", "conv", "bn", "linear", "reshape", "output", "other"]
"""The op kinds of the view: `add` (inputs summed, plus `const`), `sub` (inputs[0] - inputs[1],
or inputs[0] - `const`), `mul` (inputs[0] * `const`), `div` (inputs[0] / `const`), `pad` (zero
padding of `pad` pixels on the four spatial sides; `pad` None for any other pad), `conv`, `bn`
(readable or not), `linear` (`dense` when readable), `reshape` (of inputs[0], row-major),
`output` (the graph's outputs) and `other`. A value read only for its shape or dtype is no
input. What the format must not let the matcher touch (torch: an in-place add into a tensor
read after it) the adapter shows as `other`."""


@dataclass(frozen=True)
class Dense:
    """A linear layer y = x W^T + b over the last axis of x."""

    weight: np.ndarray
    """(out, in)"""
    bias: np.ndarray | None
    kind: str
    """its name in the report: `linear`, `gemm`, `matmul`"""


@dataclass(frozen=True)
class ViewNode:
    """One node of a graph, named by the value it writes."""

    name: str
    """the value it writes: its key in the view"""
    label: str
    """its name in the report"""
    what: str
    """how a reason names it: `module ReLU`, `Relu /act/Relu`"""
    op: Op = "other"
    inputs: tuple[str, ...] = ()
    """the graph values it reads, the one its primitives read first"""
    stages: tuple[Stage, ...] | None = None
    """the branch primitives it computes on inputs[0], first to last (() for a pass-through
    such as an eval dropout); None when it computes none"""
    reason: str | None = None
    """why it cannot be read as the primitive it looks like (a train-mode BN, ...)"""
    const: np.ndarray | None = None
    """`add` / `sub`: the constant operand (a number as a 0-d array)"""
    pad: int | None = None
    """`pad`: the width of its zero padding"""
    dense: Dense | None = None
    """`linear`: the layer, when its weight (and bias) are constants"""


class GraphView:
    """The nodes of a graph in order, how many readers each value has (graph outputs count),
    the shapes of the values, and `count`, the last k of the new nodes named <prefix>_<k>."""

    def __init__(self, nodes: Iterable[ViewNode], outputs: Iterable[str], shapes: Mapping[str, Shape]) -> None:
        self.nodes: dict[str, ViewNode] = {n.name: n for n in nodes}
        self.uses: Counter[str] = Counter(i for n in self.nodes.values() for i in n.inputs)
        self.outputs = set(outputs)
        """the graph's outputs by name (a format whose outputs are no node: ONNX)"""
        self.uses.update(self.outputs)
        self.shapes = dict(shapes)
        self.count = 0

    def readers(self, value: str) -> int:
        """How many inputs of nodes (and graph outputs) read `value`."""
        return self.uses[value]

    def node(self, value: str) -> ViewNode | None:
        return self.nodes.get(value)

    def users(self, value: str) -> list[ViewNode]:
        return [n for n in self.nodes.values() if value in n.inputs]

    def channels(self, value: str) -> int | None:
        """C of an N x C x H x W value."""
        s = self.shapes.get(value)
        return s[1] if s is not None and len(s) == 4 else None

    def describe(self, value: str) -> str:
        """What writes `value`, for a reason: its node's `what`, or `a graph input`."""
        n = self.nodes.get(value)
        return n.what if n is not None else "a graph input"

    def replace(self, consumed: Sequence[str], end: str, new: Sequence[ViewNode]) -> None:
        """The `new` nodes (first to last) in place of `end`, the `consumed` nodes gone; end's
        readers read the last."""
        gone = {*consumed, end}
        for v in gone:
            self.uses.subtract(self.nodes[v].inputs)
        last = new[-1].name
        nodes: dict[str, ViewNode] = {}
        for k, n in self.nodes.items():
            if k == end:
                nodes.update((m.name, m) for m in new)
            elif k not in gone:
                renamed = last != end and end in n.inputs
                nodes[k] = replace(n, inputs=tuple(last if i == end else i for i in n.inputs)) if renamed else n
        self.nodes = nodes
        readers = self.uses.pop(end, 0)
        self.uses[last] += readers
        for m in new:
            self.uses.update(m.inputs)
        if end in self.shapes:
            self.shapes[last] = self.shapes[end]

    def bypass(self, value: str) -> None:
        """The node writing `value` gone, its readers reading its first input."""
        n = self.nodes.pop(value)
        self.uses.subtract(n.inputs)
        to = n.inputs[0]
        for k, m in self.nodes.items():
            if value in m.inputs:
                self.nodes[k] = replace(m, inputs=tuple(to if i == value else i for i in m.inputs))
        self.uses[to] += self.uses.pop(value, 0)


@dataclass(frozen=True)
class ConvRewrite:
    """One conv with bias in place of nodes: it reads `source` and writes the value `end` wrote."""

    end: str
    source: str
    consumed: tuple[str, ...]
    """the values of the nodes it replaces, `end` included"""
    conv: Conv
    """its geometry"""
    kernel: np.ndarray
    """OIHW, in the dtype of the branches' tensors (float32 when none has one)"""
    bias: np.ndarray
    name: str
    """the new node's (and its parameters') name: reparam_fused_<k>"""
    report: FusedSum

    def node(self, value: str, what: str) -> ViewNode:
        """The view node of the new conv, writing `value`."""
        conv = replace(self.conv, name="", bias=True)
        params = {"weight": self.kernel, "bias": self.bias}
        return ViewNode(value, self.name, what, "conv", (self.source,), (Stage(conv, params),))


@dataclass(frozen=True)
class LinearRewrite:
    """One linear layer y = source W^T + b in place of nodes: it writes the value `end` wrote."""

    end: str
    source: str
    consumed: tuple[str, ...]
    """the values of the nodes it replaces, `end` included"""
    weight: np.ndarray
    """(out, in), in the dtype of the layer it replaces"""
    bias: np.ndarray
    name: str
    report: FusedSum


class Adapter(Protocol):
    """The adapter's half: apply a rewrite to its graph and return the view nodes that now
    compute `end`'s value (first to last, the last writing it)."""

    def conv(self, rw: ConvRewrite) -> ViewNode: ...

    def linear(self, rw: LinearRewrite) -> list[ViewNode]: ...

    def bypass(self, value: str, to: str) -> None:
        """Remove the node writing `value` (never a graph output); its readers read `to`."""


@dataclass(frozen=True)
class Naming:
    """How an adapter's report names what the core fused: `then_bn`, a BN that ends a conv chain
    as `then bn` (torch: conv3x3, then bn) rather than a stage of it (ONNX: conv3x3+bn); the
    prefix of a new linear layer's name (its count shared with the convs'); a merged head (None:
    by its `Dense.kind`); the scale of averaged heads (a format string of the number); the tag of
    a BN fused through a reshape (`matmul+reshape+bn`)."""

    then_bn: bool = False
    linear: str = "reparam_fused"
    head: str | None = None
    scale: str = "x{:g}"
    reshape: str = "reshape+"


@dataclass
class Matched:
    """What `match` did: the fusions in order, and the candidates left with why (every BN still
    in the graph among them)."""

    fused: list[FusedSum] = field(default_factory=list)
    left: list[LeftAlone] = field(default_factory=list)


def per_channel(c: np.ndarray) -> np.ndarray | None:
    """A constant of shape (1, C, 1, 1) or (C, 1, 1) (one value per channel of an NCHW tensor)
    as (C,) float64; None for any other shape."""
    if (c.ndim == 4 and c.shape[0] == 1 and c.shape[2:] == (1, 1)) or (c.ndim == 3 and c.shape[1:] == (1, 1)):
        return np.asarray(c, np.float64).reshape(-1)
    return None


def _same_shape(a: Shape | None, b: Shape | None) -> bool:
    """False only when both shapes are known and differ (a broadcasting add)."""
    if a is None or b is None:
        return True
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """a == b per channel up to 1e-6 of b's largest magnitude (float32 rounding)."""
    return a.shape == b.shape and bool(np.abs(a - b).max() <= 1e-6 * max(float(np.abs(b).max()), 1e-30))


def _in_channels(branches: Sequence[Sequence[Stage]]) -> int | None:
    for b in branches:
        for st in b:
            n = st.node
            if isinstance(n, Conv):
                return n.in_channels
            if isinstance(n, (BN, PadBN, Scale)):
                return n.channels
    return None


def _out_channels(branches: Sequence[Sequence[Stage]]) -> int | None:
    for b in branches:
        for st in reversed(b):
            n = st.node
            if isinstance(n, Conv):
                return n.out_channels
            if isinstance(n, (BN, PadBN, Scale)):
                return n.channels
    return None


def _dtype(branches: Sequence[Sequence[Stage]]) -> np.dtype:
    """The dtype of the branches' first weight (float32 when none has one)."""
    for b in branches:
        for st in b:
            if "weight" in st.params:
                return np.asarray(st.params["weight"]).dtype
    return np.dtype(np.float32)


def _is_bn(n: ViewNode) -> bool:
    """n is a readable BN (not a PadBN, not a per-channel affine map spelled otherwise)."""
    return n.op == "bn" and n.stages is not None and len(n.stages) == 1 and isinstance(n.stages[0].node, BN)


def _bn_args(n: ViewNode) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """(gamma, beta, mean, var, eps) of a readable BN (`_is_bn`)."""
    st = n.stages[0] if n.stages else None
    if st is None or not isinstance(st.node, BN):
        raise FusionError(f"{n.what} is no readable BN")
    p = st.params
    return p["weight"], p["bias"], p["running_mean"], p["running_var"], st.node.eps


def _number(n: ViewNode) -> float | None:
    """The nonzero number a `mul` multiplies by (a `div`: 1 / its divisor), or None."""
    c = n.const
    if n.op not in ("mul", "div") or c is None or c.size != 1 or float(c.reshape(-1)[0]) == 0:
        return None
    v = float(c.reshape(-1)[0])
    return v if n.op == "mul" else 1.0 / v


Walk = tuple[str, list[Stage], list[str], str | None]
"""A branch walked back from a summed term: (the value it reads, its stages first to last, the
values of the nodes it consumes, why it stopped early)."""


class _Matcher:
    def __init__(self, view: GraphView, adapter: Adapter, naming: Naming) -> None:
        self.g = view
        self.adapter = adapter
        self.naming = naming
        self.out = Matched()
        self.bn_notes: dict[str, str] = {}
        """by value, why a BN was not folded (its entry in the listing of the BNs left)"""

    # ---------------------------------------------------------------- branches

    def pad_bn(self, value: str) -> tuple[list[Stage], str, list[str]] | None:
        """`pad(pre - c) + c` at `value`, zero padding p on the spatial sides, with c per channel
        equal to BN(0) of a BN `pre` (a PadBN) or to the bias of a conv `pre` (the conv without
        its bias, then a PadBN adding it): (the stages, the value `pre` reads, the nodes
        consumed); None when it is no such pattern."""
        g = self.g
        add = g.node(value)
        if add is None or add.op != "add" or add.const is None or len(add.inputs) != 1:
            return None
        pad = g.node(add.inputs[0])
        if pad is None or pad.op != "pad" or pad.pad is None or g.readers(pad.name) != 1 or not pad.inputs:
            return None
        sub = g.node(pad.inputs[0])
        if sub is None or sub.op != "sub" or sub.const is None or len(sub.inputs) != 1 or g.readers(sub.name) != 1:
            return None
        c = per_channel(add.const)
        if c is None or sub.const.shape != add.const.shape or not np.array_equal(sub.const, add.const):
            return None
        pre = g.node(sub.inputs[0])
        if pre is None or g.readers(pre.name) != 1 or pre.stages is None or len(pre.stages) != 1 or not pre.inputs:
            return None
        node, prm = pre.stages[0].node, pre.stages[0].params
        consumed = [value, pad.name, sub.name, pre.name]
        if isinstance(node, Conv) and node.bias and _close(np.asarray(prm["bias"], np.float64), c):
            conv = Stage(replace(node, bias=False), {"weight": prm["weight"]})
            shift = affine_bn(node.out_channels, None, prm["bias"]).params
            return [conv, Stage(PadBN("", node.out_channels, pad.pad, 0.0), shift)], pre.inputs[0], consumed
        if isinstance(node, BN):
            try:
                zero = bn_zero(prm["weight"], prm["bias"], prm["running_mean"], prm["running_var"], node.eps)
            except FusionError:
                return None
            if _close(zero, c):
                return [Stage(PadBN("", node.channels, pad.pad, node.eps), prm)], pre.inputs[0], consumed
        return None

    def branch(self, term: str) -> Walk:
        """Walk back from a summed value through single-reader primitives."""
        g = self.g
        stages: list[Stage] = []
        nodes: list[str] = []
        value, why = term, None
        while g.readers(value) == 1 and (n := g.node(value)) is not None:
            padded = self.pad_bn(value)
            if padded is not None:
                found, value, consumed = padded
                nodes += consumed
                stages += found[::-1]
                continue
            if n.stages is None or not n.inputs:
                why = n.reason
                break
            nodes.append(value)
            stages += n.stages[::-1]
            value = n.inputs[0]
        return value, stages[::-1], nodes, why

    # ---------------------------------------------------------------- sums

    @staticmethod
    def is_sum(n: ViewNode) -> bool:
        """An add of values (and of a zero constant at most)."""
        return n.op == "add" and bool(n.inputs) and (n.const is None or not np.any(n.const))

    def _is_sum_like(self, n: ViewNode) -> bool:
        """A sum, or a `Sub` of two values whose second has a known channel count."""
        return self.is_sum(n) or (
            n.op == "sub" and n.const is None and len(n.inputs) == 2 and self.g.channels(n.inputs[1]) is not None
        )

    def _negate(self, value: str) -> Stage:
        c = self.g.channels(value) or 0
        return Stage(Scale("", c), {"weight": -np.ones(c)})

    def terms(
        self, n: ViewNode, after: tuple[Stage, ...] = ()
    ) -> tuple[list[tuple[str, tuple[Stage, ...]]], list[str]]:
        """The summands of a tree of single-reader sums, each with the per-channel stages applied
        to it after the sum (`after`: a Sub's negation, the scales on an inner sum), and the
        values of the sum (and scale) nodes consumed."""
        terms: list[tuple[str, tuple[Stage, ...]]] = []
        sums = [n.name]
        for k, i in enumerate(n.inputs):
            tail = ((self._negate(i),) if n.op == "sub" and k == 1 else ()) + after
            inner, scales, muls = self._scaled_sum(i)
            if inner is not None:
                t, s = self.terms(inner, scales + tail)
                terms += t
                sums += [*muls, *s]
            else:
                terms.append((i, tail))
        return terms, sums

    def _scaled_sum(self, value: str) -> tuple[ViewNode | None, tuple[Stage, ...], list[str]]:
        """`value` as single-reader per-channel scales and pass-throughs on a single-reader sum
        (FastViT's `0 + bn(x)` behind an nn.Identity): (the sum, the scales in the order they
        apply, the values of the nodes between); (None, (), []) when it is not."""
        g = self.g
        scales: list[Stage] = []
        muls: list[str] = []
        while g.readers(value) == 1 and (p := g.node(value)) is not None:
            if self._is_sum_like(p):
                return p, tuple(scales), muls
            if p.stages == () and p.inputs:  # a pass-through (an eval dropout, nn.Identity)
                muls.append(value)
                value = p.inputs[0]
                continue
            if p.stages is None or len(p.stages) != 1 or not isinstance(p.stages[0].node, Scale) or not p.inputs:
                break
            scales.insert(0, p.stages[0])
            muls.append(value)
            value = p.inputs[0]
        return None, (), []

    def roots(self) -> list[str]:
        """The sums not read by a sum alone."""
        g = self.g
        return [
            v
            for v, n in g.nodes.items()
            if self.is_sum(n) and not (g.readers(v) == 1 and any(self.is_sum(u) for u in g.users(v)))
        ]

    def try_sum(self, value: str) -> None:
        """Fuse the tree of sums at `value` as one conv; failing that, each inner sum of it."""
        if self._try_tree(value):
            return
        n = self.g.node(value)
        for i in n.inputs if n is not None else ():
            p = self.g.node(i)
            if p is not None and self.is_sum(p) and self.g.readers(i) == 1:
                self.try_sum(i)

    def _try_tree(self, value: str) -> bool:
        g = self.g
        n = g.node(value)
        if n is None:
            return False
        terms, sums = self.terms(n)
        if len(terms) < 2:
            return False  # a tensor plus a zero: not a sum of branches
        out = g.shapes.get(value)
        shapes = [g.shapes.get(t) for t, _ in terms]
        if out is not None and (len(out) != 4 or not all(_same_shape(s, out) for s in shapes)):
            self.out.left.append(LeftAlone(n.label, f"operands of shapes {shapes} broadcast or are not 4-D"))
            return False
        walks = [
            (s, stages + list(tail), nodes, why)
            for (s, stages, nodes, why), (_, tail) in zip((self.branch(t) for t, _ in terms), terms)
        ]
        sources = [w[0] for w in walks]
        common = max(sources, key=sources.count)  # the first on a tie
        bad = sorted((i for i, s in enumerate(sources) if s != common), key=lambda i: walks[i][3] is None)
        if bad:  # a branch stopped by a reason first
            s, _, _, stop = walks[bad[0]]
            reason = stop or f"branch {bad[0]} reads {s} ({g.describe(s)}), the others read {common}"
            self.out.left.append(LeftAlone(n.label, reason))
            return False
        why = self.fuse(value, common, [w[1] for w in walks], [v for w in walks for v in w[2]] + sums)
        if why is not None:
            self.out.left.append(LeftAlone(n.label, why))
        return why is None

    # ---------------------------------------------------------------- the rewrite

    def _post_bn(self, last: str) -> ViewNode | None:
        """The BN that alone reads `last`, or None."""
        users = self.g.users(last)
        if self.g.readers(last) != 1 or len(users) != 1:
            return None
        u = users[0]
        return u if _is_bn(u) and u.inputs[0] == last else None

    def fuse(self, last: str, source: str, branches: list[list[Stage]], nodes: list[str]) -> str | None:
        """One conv (and a BN after it) in place of `last` and `nodes`: None when the adapter
        has applied it, else why the core refused."""
        g = self.g
        post = self._post_bn(last)
        cin = g.channels(source) or _in_channels(branches)
        cout = g.channels(last) or _out_channels(branches) or cin
        if cin is None or cout is None:
            return "channel count unknown"
        post_stage = post.stages[0] if post is not None and post.stages else None
        try:
            fused, (kernel, bias) = fuse_branches(branches, cin, cout, post_stage)
        except FusionError as e:
            return str(e)
        end = last if post is None else post.name
        kinds = tuple(branch_kind(b) for b in branches) + (("then bn",) if post is not None else ())
        dt = _dtype(branches)
        self._conv(end, source, [*nodes, last], fused, (kernel.astype(dt), bias.astype(dt)), kinds)
        return None

    def _name(self, prefix: str) -> str:
        self.g.count += 1
        return f"{prefix}_{self.g.count}"

    def _labels(self, values: Iterable[str]) -> tuple[str, ...]:
        return tuple(sorted({self.g.nodes[v].label for v in values}))

    def _conv(
        self,
        end: str,
        source: str,
        nodes: Sequence[str],
        conv: Conv,
        kb: tuple[np.ndarray, np.ndarray],
        kinds: tuple[str, ...],
    ) -> None:
        """One conv (kernel, bias) = kb reading `source` in place of `nodes` and `end`."""
        consumed = tuple(dict.fromkeys([*nodes, end]))
        name = self._name("reparam_fused")
        report = FusedSum(self._labels(consumed), kinds, conv.kernel, name)
        new = self.adapter.conv(ConvRewrite(end, source, consumed, conv, kb[0], kb[1], name, report))
        self.g.replace([v for v in consumed if v != end], end, [new])
        self.out.fused.append(report)

    # ---------------------------------------------------------------- conv chains

    def chain(self, conv: ViewNode) -> None:
        """A conv and the primitives after it as one conv: the longest chain the core accepts;
        a BN after the conv that cannot go in is noted with the reason."""
        g = self.g
        if conv.stages is None or not conv.inputs:
            for u in g.users(conv.name):
                if u.op == "bn" and conv.reason:
                    self.bn_notes.setdefault(u.name, f"after {conv.what}: {conv.reason}")
            return
        if g.readers(conv.name) > 1:
            for u in g.users(conv.name):
                if u.op == "bn" and u.inputs[0] == conv.name:
                    others = ", ".join(w.name for w in g.users(conv.name) if w is not u)
                    self.bn_notes.setdefault(u.name, f"conv {conv.name} before it is also read by {others}")
            return
        after: list[ViewNode] = []
        last = conv
        while g.readers(last.name) == 1:
            users = g.users(last.name)
            if len(users) != 1:
                break
            u = users[0]
            if not u.stages or u.inputs[0] != last.name or any(w.op == "pad" for w in g.users(u.name)):
                if u.op == "bn" and u.stages is None and u.reason and last is conv:
                    self.bn_notes.setdefault(u.name, u.reason)
                break
            after.append(u)
            last = u
        first_why = None
        for j in range(len(after), 0, -1):
            k = j - 1 if self.naming.then_bn and _is_bn(after[j - 1]) else j  # the BN taken as the one after
            nodes = [conv, *after[:k]]
            stages = [st for u in nodes for st in u.stages or ()]
            why = self.fuse(nodes[-1].name, conv.inputs[0], [stages], [u.name for u in nodes[:-1]])
            if why is None:
                return
            first_why = why
        if after and first_why is not None and after[0].op == "bn":
            self.bn_notes.setdefault(after[0].name, first_why)

    # ---------------------------------------------------------------- linear layers

    def dense(self, value: str) -> tuple[Dense, str, list[str]] | None:
        """The linear layer writing `value`: (it, the value it reads, its nodes first to last):
        a readable `linear` node, or an add of a constant per output feature on a single-reader
        one without bias (ONNX's MatMul + Add); None for anything else."""
        g = self.g
        n = g.node(value)
        if n is not None and n.op == "linear" and n.dense is not None and n.inputs:
            return n.dense, n.inputs[0], [value]
        if n is None or n.op != "add" or n.const is None or len(n.inputs) != 1 or g.readers(n.inputs[0]) != 1:
            return None
        lin = g.node(n.inputs[0])
        if lin is None or lin.op != "linear" or lin.dense is None or lin.dense.bias is not None or not lin.inputs:
            return None
        out = lin.dense.weight.shape[0]
        if n.const.size != out or n.const.shape[-1:] != (out,):
            return None
        return replace(lin.dense, bias=n.const.reshape(-1)), lin.inputs[0], [lin.name, value]

    def _back(self, value: str, op: str | None) -> tuple[str, list[str]]:
        """From `value` back through single-reader pass-throughs (op None) or `op` nodes: (the
        value reached, the nodes passed)."""
        g, passed = self.g, []
        while g.readers(value) == 1 and (n := g.node(value)) is not None and n.inputs:
            if n.stages != () if op is None else n.op != op:
                break
            passed.append(value)
            value = n.inputs[0]
        return value, passed

    def _forward(self, value: str) -> tuple[str, list[str]]:
        """From `value` on through the single-reader pass-throughs reading it: (the value
        reached, the nodes passed)."""
        g, passed = self.g, []
        while g.readers(value) == 1 and len(users := g.users(value)) == 1:
            u = users[0]
            if u.stages != () or u.inputs[0] != value:
                break
            passed.append(u.name)
            value = u.name
        return value, passed

    def _linear(
        self,
        end: str,
        source: str,
        nodes: Sequence[str],
        kb: tuple[np.ndarray, np.ndarray],
        dense: Dense,
        kinds: tuple[str, ...],
        listed: Sequence[str] = (),
    ) -> None:
        """One linear layer (weight, bias) = kb reading `source` in place of `nodes` and `end`
        (`listed`: nodes gone before it, named in the report too)."""
        consumed = tuple(dict.fromkeys([*nodes, end]))
        name = self._name(self.naming.linear)
        report = FusedSum(tuple(sorted({*self._labels(consumed), *listed})), kinds, (1, 1), name, op="linear")
        dt = dense.weight.dtype
        new = self.adapter.linear(
            LinearRewrite(end, source, consumed, kb[0].astype(dt), kb[1].astype(dt), name, report)
        )
        self.g.replace([v for v in consumed if v != end], end, new)
        self.out.fused.append(report)

    def bn_linear(self, bn: ViewNode) -> None:
        """A BN over the features of an (N, C) value into the linear layer right before it, else
        into the one right after it (module doc)."""
        g = self.g
        if not _is_bn(bn) or len(g.shapes.get(bn.inputs[0]) or ()) != 2:
            return
        if not self._linear_bn(bn):
            self._bn_then_linear(bn)

    def _linear_bn(self, bn: ViewNode) -> bool:
        """Linear -> BN (through pass-throughs, or reshapes keeping the last axis) as one
        linear layer; False when no linear layer is right before the BN."""
        g = self.g
        value, passed = self._back(bn.inputs[0], None)
        value, reshapes = self._back(value, "reshape") if not passed else (value, [])
        found = self.dense(value) if g.readers(value) == 1 else None
        if found is None:
            return False
        dense, source, nodes = found
        out = dense.weight.shape[0]
        if reshapes and ((g.shapes.get(value) or (None,))[-1] != out or bn.name in g.outputs):
            self.bn_notes.setdefault(
                bn.name, f"the BN reads {g.describe(value)}'s output reshaped, not per output feature"
            )
            return False
        try:
            kb = fuse_linear_bn(dense.weight, dense.bias, *_bn_args(bn))
        except FusionError as e:
            self.bn_notes.setdefault(bn.name, str(e))
            return True
        kind = (f"{dense.kind}+{self.naming.reshape if reshapes else ''}bn",)
        if reshapes:  # the BN goes first: its readers read the reshape
            self.adapter.bypass(bn.name, bn.inputs[0])
            g.bypass(bn.name)
            self._linear(nodes[-1], source, nodes[:-1], kb, dense, kind, (bn.label,))
        else:
            self._linear(bn.name, source, [*nodes, *passed], kb, dense, kind)
        return True

    def _bn_then_linear(self, bn: ViewNode) -> None:
        """BN -> linear (through pass-throughs) as one linear layer."""
        g = self.g
        value, passed = self._forward(bn.name)
        lin = next((u for u in g.users(value) if u.op == "linear" and u.inputs[0] == value), None)
        if lin is None:
            return
        ends = [lin.name] + ([u.name for u in g.users(lin.name)] if g.readers(lin.name) == 1 else [])
        found = next((f for e in reversed(ends) if (f := self.dense(e)) is not None and f[1] == value), None)
        if found is None:
            self.bn_notes.setdefault(bn.name, lin.reason or f"{lin.what} after it is no constant linear layer")
            return
        if g.readers(value) != 1:
            self.bn_notes.setdefault(bn.name, f"{bn.what} before {lin.what} is also read elsewhere")
            return
        dense, _, nodes = found
        try:
            kb = fuse_bn_linear(dense.weight, dense.bias, *_bn_args(bn))
        except FusionError as e:
            self.bn_notes.setdefault(bn.name, str(e))
            return
        self._linear(nodes[-1], bn.inputs[0], [bn.name, *passed, *nodes[:-1]], kb, dense, (f"bn+{dense.kind}",))

    def _add_tree(self, n: ViewNode) -> tuple[list[str], list[str]]:
        """The operands of a tree of single-reader adds of values (no constant), and the adds."""
        terms: list[str] = []
        adds = [n.name]
        for i in n.inputs:
            p = self.g.node(i)
            if p is not None and p.op == "add" and p.const is None and self.g.readers(i) == 1:
                t, a = self._add_tree(p)
                terms += t
                adds += a
            else:
                terms.append(i)
        return terms, adds

    def _head(self, term: str) -> tuple[Dense, str, list[str], float] | None:
        """A summed term as a linear head times a number: (the layer, the value it reads, its
        nodes, the number: 1 unless a single-reader `mul` / `div` by one follows the layer)."""
        n = self.g.node(term)
        c = _number(n) if n is not None else None
        if n is not None and c is not None and self.g.readers(n.inputs[0]) == 1:
            f = self.dense(n.inputs[0])
            return None if f is None else (f[0], f[1], [*f[2], term], c)
        f = self.dense(term)
        return None if f is None else (f[0], f[1], f[2], 1.0)

    def heads(self, n: ViewNode) -> None:
        """(c1 h1(x) + ... + cn hn(x)) [* c or / c], the c numbers: parallel linear heads on one
        tensor, summed (averaged, weighted), as one linear layer (at the root of the adds)."""
        g = self.g
        if n.op != "add" or n.const is not None or len(n.inputs) < 2:
            return
        users = g.users(n.name)
        if g.readers(n.name) == 1 and len(users) == 1 and users[0].op == "add" and users[0].const is None:
            return  # an inner add: merged at the root
        terms, adds = self._add_tree(n)
        found = [self._head(t) for t in terms]
        heads = [f for f in found if f is not None]
        if len(heads) != len(terms) or len(set(terms)) != len(terms):
            return
        sources = sorted({f[1] for f in heads})
        if len(sources) != 1:
            self.out.left.append(LeftAlone(n.label, f"linear heads read different tensors {sources}"))
            return
        if any(g.readers(t) != 1 for t in terms):
            self.out.left.append(LeftAlone(n.label, "a linear head's output is also read elsewhere"))
            return
        scale = users[0] if g.readers(n.name) == 1 and len(users) == 1 and users[0].inputs[0] == n.name else None
        coef = _number(scale) if scale is not None else None
        try:
            kb = merge_heads([(f[0].weight, f[0].bias) for f in heads], [f[3] * (coef or 1.0) for f in heads])
        except FusionError as e:
            self.out.left.append(LeftAlone(n.label, str(e)))
            return
        fmt = self.naming.scale.format
        kinds = tuple((self.naming.head or f[0].kind) + ("" if f[3] == 1 else f" {fmt(f[3])}") for f in heads)
        kinds += (fmt(coef),) if coef is not None and coef != 1 else ()
        nodes = [v for f in heads for v in f[2]] + adds
        end = scale.name if scale is not None and coef is not None else n.name
        self._linear(end, sources[0], nodes, kb, heads[0][0], kinds)

    # ---------------------------------------------------------------- after the convs

    def bn_conv(self, bn: ViewNode) -> None:
        """A BN read only by a conv, into the conv (exact only where the conv does not pad)."""
        g = self.g
        users = g.users(bn.name)
        if not _is_bn(bn) or g.readers(bn.name) != 1 or len(users) != 1 or users[0].op != "conv":
            return
        conv = users[0]
        st = conv.stages[0] if conv.stages and len(conv.stages) == 1 else None
        if st is None or not isinstance(st.node, Conv) or conv.inputs[0] != bn.name:
            self.bn_notes.setdefault(bn.name, conv.reason or f"the BN is not {conv.what}'s input")
            return
        c = st.node
        try:
            k, b = fuse_bn_conv(st.params["weight"], st.params.get("bias"), c.groups, *_bn_args(bn), c.padding)
        except FusionError as e:
            self.bn_notes.setdefault(bn.name, f"before {conv.what}: {e}")
            return
        dt = np.asarray(st.params["weight"]).dtype
        kind = f"bn+conv{c.kernel[0]}x{c.kernel[1]}"
        self._conv(conv.name, bn.inputs[0], [bn.name], replace(c, bias=True), (k.astype(dt), b.astype(dt)), (kind,))

    def zero_add(self, n: ViewNode) -> None:
        """`t + 0` that changes no shape is t: dropped (not a graph output)."""
        g = self.g
        if n.op != "add" or len(n.inputs) != 1 or n.const is None or np.any(n.const) or n.name in g.outputs:
            return
        shape = g.shapes.get(n.name)
        if shape is None or None in shape or g.shapes.get(n.inputs[0]) != shape:
            return
        self.adapter.bypass(n.name, n.inputs[0])
        g.bypass(n.name)

    def list_bns(self) -> None:
        """Every BN still in the view, listed with why it stayed (unless it or that reason, as
        the reason a sum was left, is listed already)."""
        g = self.g
        listed = {a.node for a in self.out.left} | {a.reason for a in self.out.left}
        for v, n in g.nodes.items():
            why = self.bn_notes.get(v) or n.reason
            if n.op != "bn" or n.label in listed or why in listed:
                continue
            src = n.inputs[0] if n.inputs else ""
            p = g.node(src)
            if why is None and p is not None and p.op in ("conv", "linear") and g.readers(src) > 1:
                why = f"{p.what}'s output {src} is also read by {g.readers(src) - 1} other node(s)"
            if why is None:
                after = ", ".join(u.what for u in g.users(v)) or "a graph output"
                why = f"BN between {g.describe(src)} and {after}: no conv or linear layer to fold it into"
            self.out.left.append(LeftAlone(n.label, why))


def _each(view: GraphView, rule: Callable[[ViewNode], None]) -> None:
    """`rule` on every node of the view in order that is still there when its turn comes."""
    for v in list(view.nodes):
        n = view.node(v)
        if n is not None:
            rule(n)


def match(view: GraphView, adapter: Adapter, naming: Naming) -> Matched:
    """BNs into linear layers, linear heads, every sum of branches, every conv chain, BNs into
    the convs after them, `t + 0` (module doc), each rewrite handed to `adapter` as it is decided;
    the view ends as the fused graph, every BN left in it listed."""
    m = _Matcher(view, adapter, naming)
    _each(view, lambda n: m.bn_linear(n) if n.op == "bn" else None)
    _each(view, m.heads)
    for v in m.roots():
        n = view.node(v)
        if n is not None and m.is_sum(n):
            m.try_sum(v)
    for v in list(view.nodes):
        n = view.node(v)
        if n is not None and n.op == "conv":
            m.chain(n)
    _each(view, lambda n: m.bn_conv(n) if n.op == "bn" else None)
    _each(view, m.zero_add)
    m.list_bns()
    return m.out


__all__ = [
    "Op",
    "Dense",
    "ViewNode",
    "GraphView",
    "ConvRewrite",
    "LinearRewrite",
    "Adapter",
    "Naming",
    "Matched",
    "per_channel",
    "match",
]
