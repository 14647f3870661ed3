"""An ONNX graph pass that re-parameterizes a model from its exported graph alone.

Every `Add`/`Sum` whose operands are branches reading the same tensor (Conv, BatchNormalization,
identity, AveragePool, per-channel Mul/Add constants, and the BN-and-pad of Diverse Branch
Block as exported by torch: `Sub c -> Pad -> Add c` with c the padded value), plus a
BatchNormalization right after it, and every lone Conv followed by BatchNormalization or
per-channel Mul/Add constants, becomes one Conv. The pass translates what it finds into the
core's block description and the core decides and computes the fusion
(reparam_core.blocks.graphfuse.fuse_branches: Rep validation, float64 kernel and bias); what it
refuses stays as it was and is listed in the report with the reason. `Identity` nodes are
looked through; values computed from constants only (constant folding left undone) are
evaluated with onnx's numpy reference evaluator. onnx + numpy only.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from reparam_core import BN, AvgPool, CheckpointError, Conv, FusionError, PadBN, Scale
from reparam_core.blocks.graphfuse import FusedSum, FuseReport, LeftAlone, Stage, affine_bn, branch_kind, fuse_branches


def load(path: str) -> onnx.ModelProto:
    """Read and check an ONNX file; CheckpointError naming the file when it is not a complete,
    valid ONNX model."""
    try:
        model = onnx.load(path)  # external data (the dynamo exporter's .data file) too
        onnx.checker.check_model(model)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a valid ONNX model ({first})") from None
    if not model.graph.node:
        raise CheckpointError(f"{path} holds an ONNX model with no nodes")
    return model


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type the main graph holds, most frequent first."""
    return dict(Counter(n.op_type for n in model.graph.node).most_common())


Shape = tuple[int | None, ...]
"""A tensor shape from shape inference (None: a dimension it could not fix)."""


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _sym(p: list[int]) -> tuple[int, int] | None:
    """ONNX 2-D pads [top, left, bottom, right] as (h, w) when symmetric."""
    if len(p) != 4 or p[0] != p[2] or p[1] != p[3]:
        return None
    return int(p[0]), int(p[1])


class _Graph:
    """The main graph with what the pass needs: producers, use counts, constant values."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self._bypass_identities()
        self.values: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=17)
        self._fold_constants()
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes: dict[str, Shape] = {}
        for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
            dims = vi.type.tensor_type.shape.dim
            self.shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
        self.index()

    def _bypass_identities(self) -> None:
        g = self.model.graph
        outputs = {o.name for o in g.output}
        rename: dict[str, str] = {}
        keep = []
        for n in g.node:
            if n.op_type == "Identity" and n.output[0] not in outputs:
                rename[n.output[0]] = rename.get(n.input[0], n.input[0])
            else:
                keep.append(n)
        for n in keep:
            for i, name in enumerate(n.input):
                if name in rename:
                    n.input[i] = rename[name]
        del g.node[:]
        g.node.extend(keep)

    def _fold_constants(self) -> None:
        """The value of every node output that depends on constants only."""
        for n in self.model.graph.node:
            if n.domain not in ("", "ai.onnx") or n.op_type in (
                "RandomNormal",
                "RandomUniform",
                "RandomNormalLike",
                "RandomUniformLike",
            ):
                continue
            if n.op_type == "Constant":
                self.values[n.output[0]] = (
                    numpy_helper.to_array(_attrs(n)["value"]) if ("value" in _attrs(n)) else self._eval(n)[0]
                )
            elif all(i in self.values or i == "" for i in n.input) and n.input:
                try:
                    outs = self._eval(n)
                except Exception:
                    continue
                self.values.update({o: v for o, v in zip(n.output, outs) if o})

    def _eval(self, n: onnx.NodeProto) -> list[np.ndarray]:
        inputs = [i for i in n.input if i]
        graph = helper.make_graph(
            [n],
            "const",
            [helper.make_tensor_value_info(i, onnx.TensorProto.UNDEFINED, None) for i in inputs],
            [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in n.output if o],
        )
        ref = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)]))
        outs = ref.run(None, {i: self.values[i] for i in inputs})
        if not isinstance(outs, list):  # a dict only with intermediate=True
            raise FusionError(
                f"evaluating {n.op_type} {n.name}: the reference evaluator returned "
                f"{type(outs).__name__}, not a list of outputs"
            )
        return outs

    def index(self) -> None:
        g = self.model.graph
        self.producer = {o: n for n in g.node for o in n.output}
        self.uses: Counter[str] = Counter(i for n in g.node for i in n.input)
        self.uses.update(o.name for o in g.output)

    def const(self, name: str) -> np.ndarray | None:
        return self.values.get(name)

    def channels(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return s[1] if s and len(s) == 4 else None


def _per_channel(c: np.ndarray, channels: int | None) -> np.ndarray | None:
    """A constant that broadcasts as one value per channel of an NCHW tensor, as (C,)."""
    if c.ndim == 4 and c.shape[0] == 1 and c.shape[2:] == (1, 1):
        v = c.reshape(-1)
    elif c.ndim == 3 and c.shape[1:] == (1, 1):
        v = c.reshape(-1)
    else:
        return None
    if channels is not None and v.shape[0] not in (channels,):
        return None
    return v.astype(np.float64)


class _Pass:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.g = _Graph(model)
        self.report = FuseReport("onnx graph")
        self.count = 0

    # ---------------------------------------------------------------- primitives

    def stage(self, n: onnx.NodeProto) -> tuple[list[Stage] | None, str | None, str | None]:
        """The branch primitives node n computes and the tensor it reads: (stages, None, input);
        (None, reason, None) when n is a primitive that cannot be fused; (None, None, None)
        when n is none."""
        g, a = self.g, _attrs(n)
        op = n.op_type
        if op == "Conv":
            w = g.const(n.input[1])
            b = g.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if w is None or w.ndim != 4 or (len(n.input) > 2 and n.input[2] and b is None):
                return None, None, None
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                return None, f"Conv {n.name} uses auto_pad", None
            pads = _sym(list(a.get("pads", [0, 0, 0, 0])))
            if pads is None:
                return None, f"Conv {n.name} has asymmetric pads {list(a['pads'])}", None
            groups = int(a.get("group", 1))
            conv = Conv(
                "",
                w.shape[1] * groups,
                w.shape[0],
                tuple(w.shape[2:]),
                tuple(a.get("strides", [1, 1])),
                pads,
                tuple(a.get("dilations", [1, 1])),
                groups,
                b is not None,
            )
            params = {"weight": w} | ({"bias": b} if b is not None else {})
            return [Stage(conv, params)], None, n.input[0]
        if op == "BatchNormalization":
            vals = [g.const(i) for i in n.input[1:5]]
            consts = [v for v in vals if v is not None]
            if len(consts) != len(vals) or a.get("training_mode", 0):
                return None, f"BatchNormalization {n.name} is in training mode", None
            if len(n.output) > 1 and any(g.uses[o] for o in n.output[1:] if o):
                return None, f"BatchNormalization {n.name} outputs running statistics", None
            scale, bias, mean, var = consts
            node = BN("", scale.shape[0], float(a.get("epsilon", 1e-5)))
            return (
                [Stage(node, {"weight": scale, "bias": bias, "running_mean": mean, "running_var": var})],
                None,
                n.input[0],
            )
        if op == "AveragePool":
            k = list(a.get("kernel_shape", []))
            pads = _sym(list(a.get("pads", [0, 0, 0, 0])))
            s = list(a.get("strides", [1, 1]))
            if (
                len(k) != 2
                or k[0] != k[1]
                or pads is None
                or pads[0] != pads[1]
                or s[0] != s[1]
                or a.get("ceil_mode", 0)
                or (pads != (0, 0) and not a.get("count_include_pad", 0))
                or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            ):
                return None, f"AveragePool {n.name} is not square, symmetric, zero-counting", None
            return [Stage(AvgPool(int(k[0]), int(s[0]), pads[0]), {})], None, n.input[0]
        if op in ("Mul", "Add", "Sub") and len(n.input) == 2:
            order = [(0, 1), (1, 0)] if op != "Sub" else [(0, 1)]
            for xi, ci in order:
                c = g.const(n.input[ci])
                x = n.input[xi]
                if c is None or g.const(x) is not None:
                    continue
                v = _per_channel(c, g.channels(x))
                if v is None:
                    return None, None, None
                if op == "Mul":
                    return [Stage(Scale("", v.shape[0]), {"weight": v})], None, x
                return [affine_bn(v.shape[0], None, -v if op == "Sub" else v)], None, x
            return None, None, None
        return None, None, None

    def pad_bn(self, add: onnx.NodeProto) -> tuple[list[Stage], str, list[onnx.NodeProto]] | None:
        """`pre -> Sub c -> Pad p (zeros, spatial, symmetric) -> Add c`, where `pre` is a conv
        whose bias is c or a BN whose BN(0) is c: the conv (without bias) and a PadBN, or the
        BN as a PadBN (Diverse Branch Block's BN-and-pad): (stages, the tensor `pre` reads, the
        nodes consumed); None when `add` is no such pattern."""
        g = self.g
        if add.op_type != "Add" or len(add.input) != 2:
            return None
        for pi, ci in ((0, 1), (1, 0)):
            pad, c = g.producer.get(add.input[pi]), g.const(add.input[ci])
            if pad is None or c is None or pad.op_type != "Pad" or g.uses[pad.output[0]] != 1:
                continue
            sub = g.producer.get(pad.input[0])
            pads = g.const(pad.input[1]) if len(pad.input) > 1 else None
            mode = _attrs(pad).get("mode", b"constant")
            value = g.const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else None
            if (
                sub is None
                or sub.op_type != "Sub"
                or pads is None
                or mode not in (b"constant", "constant")
                or (value is not None and np.any(value != 0))
                or g.uses[sub.output[0]] != 1
            ):
                continue
            shift = g.const(sub.input[1])
            if shift is None:
                continue
            p = [int(v) for v in pads.reshape(-1)]
            if len(p) != 8 or any(p[i] for i in (0, 1, 4, 5)) or len(set(p[2:4] + p[6:8])) != 1:
                continue
            cv = _per_channel(c, None)
            if cv is None or not np.array_equal(shift, c):
                continue
            pre = g.producer.get(sub.input[0])
            if pre is None or g.uses[pre.output[0]] != 1:
                continue
            st, _, x = self.stage(pre)
            if not st or len(st) != 1 or x is None:
                continue
            node, prm = st[0].node, st[0].params
            tol = 1e-6 * max(float(np.abs(cv).max()), 1e-30)
            if isinstance(node, Conv) and node.bias and np.abs(prm["bias"] - cv).max() <= tol:
                conv = Stage(
                    Conv(
                        "",
                        node.in_channels,
                        node.out_channels,
                        node.kernel,
                        node.stride,
                        node.padding,
                        node.dilation,
                        node.groups,
                    ),
                    {"weight": prm["weight"]},
                )
                b = affine_bn(node.out_channels, None, prm["bias"])
                return ([conv, Stage(PadBN("", node.out_channels, p[2], 0.0), b.params)], x, [add, pad, sub, pre])
            if isinstance(node, BN):
                zero = prm["bias"] - prm["running_mean"] * prm["weight"] / np.sqrt(
                    prm["running_var"].astype(np.float64) + node.eps
                )
                if np.abs(zero - cv).max() <= tol:
                    return ([Stage(PadBN("", node.channels, p[2], node.eps), prm)], x, [add, pad, sub, pre])
        return None

    # ---------------------------------------------------------------- branches and sums

    def branch(self, term: str) -> tuple[str, list[Stage], list[onnx.NodeProto], str | None]:
        """Walk back from a summed tensor through single-use primitives."""
        g = self.g
        stages: list[Stage] = []
        nodes: list[onnx.NodeProto] = []
        name, why = term, None
        while g.uses[name] == 1 and name in g.producer:
            n = g.producer[name]
            found = self.pad_bn(n)
            if found is not None:
                padded, src, consumed = found
                nodes += consumed
                stages += padded[::-1]
                name = src
                continue
            st, reason, x = self.stage(n)
            if st is None or x is None:
                why = reason
                break
            nodes.append(n)
            stages += st[::-1]
            name = x
        return name, stages[::-1], nodes, why

    def _is_sum(self, n: onnx.NodeProto) -> bool:
        return n.op_type in ("Add", "Sum") and all(self.g.const(i) is None for i in n.input)

    def terms(self, n: onnx.NodeProto) -> tuple[list[str], list[onnx.NodeProto]]:
        terms, sums = [], [n]
        for i in n.input:
            p = self.g.producer.get(i)
            if p is not None and self._is_sum(p) and self.g.uses[i] == 1:
                t, s = self.terms(p)
                terms += t
                sums += s
            else:
                terms.append(i)
        return terms, sums

    def try_sum(self, n: onnx.NodeProto) -> None:
        if not self._try_tree(n):
            for i in n.input:
                p = self.g.producer.get(i)
                if p is not None and self._is_sum(p) and self.g.uses[i] == 1:
                    self.try_sum(p)

    def _try_tree(self, n: onnx.NodeProto) -> bool:
        g = self.g
        terms, sums = self.terms(n)
        out = g.shapes.get(n.output[0])
        if any(not _same_shape(g.shapes.get(t), out) for t in terms):
            self.report.left.append(LeftAlone(n.name or n.output[0], "operands broadcast"))
            return False
        walks = [self.branch(t) for t in terms]
        sources = [w[0] for w in walks]
        common = max(sources, key=sources.count)  # the first on a tie
        bad = sorted(
            (i for i, s in enumerate(sources) if s != common), key=lambda i: walks[i][3] is None
        )  # a branch stopped by a reason first
        if bad:
            s, _, _, stop = walks[bad[0]]
            p = g.producer.get(s)
            what = f"{p.op_type} {p.name}" if p is not None else "a graph input"
            self.report.left.append(
                LeftAlone(
                    n.name or n.output[0], stop or (f"branch {bad[0]} reads {s} ({what}), the others read {common}")
                )
            )
            return False
        return self.fuse(n, common, [w[1] for w in walks], [m for w in walks for m in w[2]] + sums)

    def fuse(self, last: onnx.NodeProto, source: str, branches: list[list[Stage]], nodes: list[onnx.NodeProto]) -> bool:
        g = self.g
        end, post = last, None
        users = [m for m in g.model.graph.node if last.output[0] in m.input]
        if g.uses[last.output[0]] == 1 and users and users[0].op_type == "BatchNormalization":
            st, _, _ = self.stage(users[0])
            if st is not None:
                end, post = users[0], st[0]
        out_ch = _out_channels(branches, g.channels(source), g.channels(last.output[0]))
        cin = g.channels(source) or _in_channels(branches)
        where = last.name or last.output[0]
        if cin is None or out_ch is None:
            self.report.left.append(LeftAlone(where, "channel count unknown"))
            return False
        try:
            fused, (kernel, bias) = fuse_branches(branches, cin, out_ch, post)
        except FusionError as e:
            self.report.left.append(LeftAlone(where, str(e)))
            return False
        self.count += 1
        name = f"reparam_fused_{self.count}"
        dt = _dtype(branches)
        graph = g.model.graph
        graph.initializer.extend(
            [
                numpy_helper.from_array(kernel.astype(dt), f"{name}.weight"),
                numpy_helper.from_array(bias.astype(dt), f"{name}.bias"),
            ]
        )
        conv = helper.make_node(
            "Conv",
            [source, f"{name}.weight", f"{name}.bias"],
            [end.output[0]],
            name=name,
            kernel_shape=list(fused.kernel),
            strides=list(fused.stride),
            pads=[*fused.padding, *fused.padding],
            dilations=list(fused.dilation),
            group=fused.groups,
        )
        dead = {id(m) for m in (*nodes, end)}
        keep = []
        for m in graph.node:
            if m is end:
                keep.append(conv)
            elif id(m) not in dead:
                keep.append(m)
        del graph.node[:]
        graph.node.extend(keep)
        g.index()
        kinds = tuple(branch_kind(b) for b in branches) + (("then bn",) if post else ())
        self.report.fused.append(
            FusedSum(tuple(sorted({m.name or m.output[0] for m in (*nodes, end)})), kinds, fused.kernel, name)
        )
        return True

    def run(self) -> None:
        """Sums first, then lone conv chains. Nodes are looked up again by their first output
        after every rewrite (a rewrite rebuilds the node list, which copies its messages)."""
        graph = self.g.model.graph
        roots = [
            n.output[0]
            for n in graph.node
            if self._is_sum(n)
            and not (
                self.g.uses[n.output[0]] == 1 and any(self._is_sum(u) for u in graph.node if n.output[0] in u.input)
            )
        ]
        for out in roots:
            n = self.g.producer.get(out)
            if n is not None and self._is_sum(n):
                self.try_sum(n)
        for out in [n.output[0] for n in graph.node if n.op_type == "Conv"]:
            n = self.g.producer.get(out)
            if n is None or n.op_type != "Conv":
                continue
            head, _, src = self.stage(n)
            if head is None or src is None:
                continue
            chain, last, nodes = list(head), n, []
            while self.g.uses[last.output[0]] == 1:
                users = [m for m in graph.node if last.output[0] in m.input]
                if not users:
                    break
                st, _, x = self.stage(users[0])
                if st is None or x != last.output[0] or self._feeds_pad(users[0]):
                    break
                nodes.append(last)
                chain += st
                last = users[0]
            if nodes:
                self.fuse(last, src, [chain], nodes)
        self._drop_unused()

    def _feeds_pad(self, n: onnx.NodeProto) -> bool:
        """Whether n's output goes into a Pad (the `Sub c` of a BN-and-pad, kept whole)."""
        return any(n.output[0] in m.input and m.op_type == "Pad" for m in self.g.model.graph.node)

    def _drop_unused(self) -> None:
        """Remove nodes and initializers nothing reads any more (the consumed branches'
        constant inputs)."""
        graph = self.g.model.graph
        while True:
            self.g.index()
            dead = [
                n
                for n in graph.node
                if not any(self.g.uses[o] for o in n.output if o) and all(o in self.g.values for o in n.output if o)
            ]
            if not dead:
                break
            ids = {id(n) for n in dead}
            keep = [n for n in graph.node if id(n) not in ids]
            del graph.node[:]
            graph.node.extend(keep)
        used = set(self.g.uses)
        keep_init = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep_init)


def _same_shape(a: Shape | None, b: Shape | None) -> bool:
    """False only when both shapes are known and differ (a broadcasting Add)."""
    if a is None or b is None:
        return True
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _out_channels(branches: list[list[Stage]], cin: int | None, shape_c: int | None) -> int | None:
    if shape_c is not None:
        return shape_c
    for b in branches:
        for st in reversed(b):
            n = st.node
            if isinstance(n, Conv):
                return n.out_channels
            if isinstance(n, (BN, PadBN, Scale)):
                return n.channels
    return cin


def _in_channels(branches: list[list[Stage]]) -> int | None:
    for b in branches:
        for st in b:
            n = st.node
            if isinstance(n, Conv):
                return n.in_channels
            if isinstance(n, (BN, PadBN, Scale)):
                return n.channels
    return None


def _dtype(branches: list[list[Stage]]) -> np.dtype:
    for b in branches:
        for st in b:
            if "weight" in st.params:
                return np.asarray(st.params["weight"]).dtype
    return np.dtype(np.float32)


def fuse_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FuseReport]:
    """A copy of `model` with every fusable branch sum, BN after it, and conv -> BN / Mul / Add
    constant chain replaced by one Conv (reparam_core computes it in float64), and the report."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    p = _Pass(out)
    p.run()
    onnx.checker.check_model(out)
    return out, p.report


__all__ = ["load", "op_histogram", "fuse_model"]
