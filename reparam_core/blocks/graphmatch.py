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
  (the longest such chain the core accepts).

Each match is decided by the core (graphfuse.fuse_branches: Rep validation, float64 kernel and
bias) and handed to the adapter as a `ConvRewrite`, which applies it to its graph and returns
the node that now writes the value; the view is updated with it, so that later matches see the
fused conv. What is refused is listed (`LeftAlone`) with the reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from ..errors import FusionError
from .fusion import bn_zero
from .graphfuse import FusedSum, LeftAlone, Stage, affine_bn, branch_kind, fuse_branches
from .nodes import BN, Conv, PadBN, Scale

Shape = tuple[int | None, ...]
"""A tensor shape (None: a dimension the adapter could not fix)."""

Op = Literal["add", "sub", "pad", "conv", "bn", "output", "other"]
"""The op kinds of the view: `add` (inputs summed, plus `const`), `sub` (inputs[0] - inputs[1],
or inputs[0] - `const`), `pad` (zero padding of `pad` pixels on the four spatial sides; `pad`
None for any other pad), `conv`, `bn` (readable or not), `output` (the graph's outputs) and
`other`. What the format must not let the matcher touch (torch: an in-place add into a tensor
read after it) the adapter shows as `other`."""


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


class GraphView:
    """The nodes of a graph in order, how many readers each value has (graph outputs count),
    the shapes of the values, and `count`, the last k of the fused nodes named reparam_fused_<k>
    (the adapter's own fusions count on from it too)."""

    def __init__(
        self, nodes: Iterable[ViewNode], outputs: Iterable[str], shapes: Mapping[str, Shape], count: int = 0
    ) -> None:
        self.nodes: dict[str, ViewNode] = {n.name: n for n in nodes}
        self.uses: Counter[str] = Counter(i for n in self.nodes.values() for i in n.inputs)
        self.uses.update(outputs)
        self.shapes = dict(shapes)
        self.count = count

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

    def replace(self, consumed: Sequence[str], end: str, new: ViewNode) -> None:
        """`new` in place of `end`, the `consumed` nodes gone; end's readers read new."""
        gone = {*consumed, end}
        for v in gone:
            self.uses.subtract(self.nodes[v].inputs)
        nodes = {}
        for k, n in self.nodes.items():
            if k == end:
                nodes[new.name] = new
            elif k not in gone:
                renamed = new.name != end and end in n.inputs
                nodes[k] = replace(n, inputs=tuple(new.name if i == end else i for i in n.inputs)) if renamed else n
        self.nodes = nodes
        readers = self.uses.pop(end, 0)
        self.uses[new.name] += readers
        self.uses.update(new.inputs)
        if end in self.shapes:
            self.shapes[new.name] = self.shapes[end]


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


Apply = Callable[[ConvRewrite], ViewNode]
"""The adapter's half: apply a rewrite to the graph, return the node that writes `end`'s value now."""


@dataclass
class Matched:
    """What `match` did: the fusions in order, the candidates left, and, by value, why a BN after
    a conv was not folded into it (the adapter lists it, or lets a later rule of its own try)."""

    fused: list[FusedSum] = field(default_factory=list)
    left: list[LeftAlone] = field(default_factory=list)
    bn_notes: dict[str, str] = field(default_factory=dict)


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


Walk = tuple[str, list[Stage], list[str], str | None]
"""A branch walked back from a summed term: (the value it reads, its stages first to last, the
values of the nodes it consumes, why it stopped early)."""


class _Matcher:
    def __init__(self, view: GraphView, apply: Apply, then_bn: bool) -> None:
        self.g = view
        self.apply = apply
        self.then_bn = then_bn
        self.out = Matched()

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
        consumed = tuple(dict.fromkeys([*nodes, last, end]))
        g.count += 1
        name = f"reparam_fused_{g.count}"
        kinds = tuple(branch_kind(b) for b in branches) + (("then bn",) if post is not None else ())
        labels = tuple(sorted({g.nodes[v].label for v in consumed}))
        dt = _dtype(branches)
        report = FusedSum(labels, kinds, fused.kernel, name)
        rewrite = ConvRewrite(end, source, consumed, fused, kernel.astype(dt), bias.astype(dt), name, report)
        new = self.apply(rewrite)
        g.replace([v for v in consumed if v != end], end, new)
        self.out.fused.append(report)
        return None

    # ---------------------------------------------------------------- conv chains

    def chain(self, conv: ViewNode) -> None:
        """A conv and the primitives after it as one conv: the longest chain the core accepts;
        a BN after the conv that cannot go in is noted with the reason."""
        g = self.g
        if conv.stages is None or not conv.inputs:
            for u in g.users(conv.name):
                if u.op == "bn" and conv.reason:
                    self.out.bn_notes.setdefault(u.name, f"after {conv.what}: {conv.reason}")
            return
        if g.readers(conv.name) > 1:
            for u in g.users(conv.name):
                if u.op == "bn" and u.inputs[0] == conv.name:
                    others = ", ".join(w.name for w in g.users(conv.name) if w is not u)
                    self.out.bn_notes.setdefault(u.name, f"conv {conv.name} before it is also read by {others}")
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
                    self.out.bn_notes.setdefault(u.name, u.reason)
                break
            after.append(u)
            last = u
        first_why = None
        for j in range(len(after), 0, -1):
            k = j - 1 if self.then_bn and _is_bn(after[j - 1]) else j  # the BN taken as the one after
            nodes = [conv, *after[:k]]
            stages = [st for u in nodes for st in u.stages or ()]
            why = self.fuse(nodes[-1].name, conv.inputs[0], [stages], [u.name for u in nodes[:-1]])
            if why is None:
                return
            first_why = why
        if after and first_why is not None and after[0].op == "bn":
            self.out.bn_notes.setdefault(after[0].name, first_why)


def match(view: GraphView, apply: Apply, then_bn: bool = False) -> Matched:
    """Every sum of branches, then every conv chain, of the view as one conv each (module doc):
    the rewrites are handed to `apply` as they are decided; the view ends as the fused graph.
    `then_bn`: the report names a BN that ends a conv chain `then bn` (torch's report: conv3x3,
    then bn) rather than as a stage of the chain (ONNX's: conv3x3+bn); the fusion is the same."""
    m = _Matcher(view, apply, then_bn)
    for v in m.roots():
        n = view.node(v)
        if n is not None and m.is_sum(n):
            m.try_sum(v)
    for v in list(view.nodes):
        n = view.node(v)
        if n is not None and n.op == "conv":
            m.chain(n)
    return m.out


__all__ = ["Op", "ViewNode", "GraphView", "ConvRewrite", "Apply", "Matched", "per_channel", "match"]
