"""An ONNX graph pass that re-parameterizes a model from its exported graph alone.

Every `Add`/`Sum` whose operands are branches reading the same tensor (Conv, BatchNormalization,
identity, AveragePool, per-channel or scalar Mul/Add constants, and the BN-and-pad of Diverse
Branch Block as exported by torch: `Sub c -> Pad -> Add c` with c the padded value; `Sub` of
two branches and a per-channel `Mul` on a sum count as signed / scaled terms), plus a
BatchNormalization right after it, and every lone Conv followed by BatchNormalization or
per-channel Mul/Add constants, becomes one Conv. A BN on features right before or after a
linear layer (Gemm, MatMul by a constant (+ Add), also through timm LinearNorm's flatten/reshape)
goes into it, parallel linear heads on one input summed or averaged become one, and a BN read
only by an unpadded conv goes into that conv, and `t + 0` goes. All of it is matched by the core
(reparam_core.blocks.graphmatch, on a neutral view of the graph this pass builds: Gemm / MatMul
as `linear`, Reshape / Flatten as reshapes, an input read for its shape only not read; it applies
the rewrites, Gemm or MatMul + Add for a linear layer, and names them `gemm` / `matmul`, `head`,
`x0.5`); the core decides and computes every fusion
(reparam_core.blocks.graphfuse.fuse_branches: Rep validation, float64 kernel and bias;
reparam_core.blocks.fusion: fuse_linear_bn, fuse_bn_linear, fuse_bn_conv, merge_heads); what it
refuses stays as it was and is listed in the report with the reason, and so is every BN left.
`Identity` nodes are looked through; values computed from constants, shapes and dtypes only
(constant folding left undone, as by torch's dynamo exporter with optimize=False) are evaluated
with onnx's shape inference and numpy reference evaluator, without rewriting the graph. onnx +
numpy only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from reparam_core import BN, AvgPool, CheckpointError, Conv, FusionError, Scale
from reparam_core.blocks.graphfuse import FusedSum, FuseReport, Stage, affine_bn
from reparam_core.blocks.graphmatch import ConvRewrite, Dense, GraphView, LinearRewrite, Naming, Op, ViewNode, match


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

_RANDOM = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")

_SHAPE_ONLY: dict[str, dict[int, bool]] = {
    "Shape": {0: True},
    "Size": {0: True},
    "EyeLike": {0: True},
    "CastLike": {1: False},
}
"""Inputs whose shape (True) or only dtype (False) determines an op's output, not their values."""


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
        self.shapes: dict[str, Shape] = {}
        self.types: dict[str, int] = {}
        self._infer()
        self._fold_constants()
        self.index()

    def _infer(self) -> None:
        """Shapes and element types of every value onnx's shape inference can fix (with data
        propagation, so that shapes computed by Shape/Gather/Concat are followed)."""
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model, data_prop=True)
        except Exception:  # an op the inference does not know: what it knows without data propagation
            inferred = onnx.shape_inference.infer_shapes(self.model)
        for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
            t = vi.type.tensor_type
            if t.elem_type:
                self.types[vi.name] = t.elem_type
            if t.HasField("shape"):
                self.shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        for i in self.model.graph.initializer:
            self.types.setdefault(i.name, i.data_type)

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
        """The value of every node output that depends on constants, shapes and dtypes only
        (Shape of a tensor of static shape, CastLike to its dtype, and whatever is computed from
        those and constants: the bias `Expand(CastLike(0, x), Shape(W)[0:1])` of torch's
        dynamo exporter without its optimizer). onnx's reference evaluator computes every
        value; a tensor read only for its shape or dtype is fed as a zero-strided placeholder of
        the inferred shape and dtype. The graph itself is not changed: a node whose value is
        known goes only when nothing reads it any more (_Pass._drop_unused)."""
        for n in self.model.graph.node:
            if n.domain not in ("", "ai.onnx") or n.op_type in _RANDOM:
                continue
            if n.op_type == "Constant":
                a = _attrs(n)
                self.values[n.output[0]] = numpy_helper.to_array(a["value"]) if "value" in a else self._eval(n, {})[0]
                continue
            feeds = self._feeds(n)
            if feeds is None:
                continue
            try:
                outs = self._eval(n, feeds)
            except Exception:
                continue
            self.values.update({o: v for o, v in zip(n.output, outs) if o})

    def _feeds(self, n: onnx.NodeProto) -> dict[str, np.ndarray] | None:
        """The inputs of n when its outputs depend on known values and shapes/dtypes only."""
        if not any(n.input):
            return None
        feeds: dict[str, np.ndarray] = {}
        meta = _SHAPE_ONLY.get(n.op_type, {})
        for k, name in enumerate(n.input):
            if not name or name in feeds:
                continue
            v = self.values.get(name)
            if v is None and k in meta:
                v = self._placeholder(name, meta[k])
            if v is None:
                return None
            feeds[name] = v
        return feeds

    def _placeholder(self, name: str, need_shape: bool) -> np.ndarray | None:
        """Zeros standing for a tensor read only for its dtype (and its shape, when need_shape):
        None unless shape inference fixed them."""
        t = self.types.get(name)
        if not t:
            return None
        try:
            dt = helper.tensor_dtype_to_np_dtype(t)
        except Exception:
            return None
        if not need_shape:
            return np.zeros((), dt)
        s = self.shapes.get(name)
        if s is None or any(d is None for d in s):
            return None
        return np.broadcast_to(np.zeros((), dt), tuple(int(d) for d in s if d is not None))

    def _eval(self, n: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        inputs = [i for i in dict.fromkeys(n.input) if i]
        graph = helper.make_graph(
            [n],
            "const",
            [helper.make_tensor_value_info(i, onnx.TensorProto.UNDEFINED, None) for i in inputs],
            [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in n.output if o],
        )
        ref = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)]))
        outs = ref.run(None, {i: feeds[i] for i in inputs})
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

    def origin(self, name: str) -> str:
        """`name (Op node)`, or `name (a graph input)`: where a tensor comes from, for reasons."""
        p = self.producer.get(name)
        return f"{name} ({p.op_type} {p.name})" if p is not None else f"{name} (a graph input)"

    def const(self, name: str) -> np.ndarray | None:
        return self.values.get(name)

    def channels(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return s[1] if s and len(s) == 4 else None


def _per_channel(c: np.ndarray, channels: int | None) -> np.ndarray | None:
    """A constant that broadcasts as one value per channel of an NCHW tensor, as (C,)."""
    if c.size == 1 and c.ndim <= 4 and channels is not None:  # a scalar: the same on every channel
        return np.full(channels, c.reshape(-1)[0], dtype=np.float64)
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
            if w is None or (len(n.input) > 2 and n.input[2] and b is None):
                which = 1 if w is None else 2
                return (
                    None,
                    f"Conv {n.name}: its {('', 'weight', 'bias')[which]} {g.origin(n.input[which])} is not a constant",
                    None,
                )
            if w.ndim != 4:
                return None, f"Conv {n.name} is not 2-D (weight shape {w.shape})", None
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

    # ---------------------------------------------------------------- the matcher's view

    def view(self) -> GraphView:
        """The graph as the core matcher sees it (reparam_core.blocks.graphmatch): one node per
        output (a node's later outputs read nothing there); constants are no values."""
        g = self.g
        nodes: list[ViewNode] = []
        for n in g.model.graph.node:
            if all(o in g.values for o in n.output if o):
                continue
            nodes.append(self._view_node(n))
            nodes += [ViewNode(o, n.name or o, f"{n.op_type} {n.name}") for o in n.output[1:] if o]
        return GraphView(nodes, {o.name for o in g.model.graph.output}, g.shapes)

    def _view_node(self, n: onnx.NodeProto) -> ViewNode:
        """n in the matcher's terms: Add / Sum, Sub (of a value or of a constant), Mul / Div by a
        constant, zero Pad, Gemm / MatMul, Reshape / Flatten, or what it computes as branch
        primitives (stage); an input read only for its shape or dtype is none."""
        g = self.g
        key, label, what = n.output[0], n.name or n.output[0], f"{n.op_type} {n.name}"
        meta = _SHAPE_ONLY.get(n.op_type, {})
        values = tuple(i for k, i in enumerate(n.input) if i and g.const(i) is None and k not in meta)
        consts = [g.const(i) for i in n.input if i and g.const(i) is not None]
        of_const = len(n.input) == 2 and len(consts) == 1 and (n.op_type in ("Add", "Mul") or values == (n.input[0],))
        if n.op_type in ("Add", "Sub", "Sum") and values and (not consts or (n.op_type != "Sum" and of_const)):
            st, _, x = self.stage(n)  # an Add / Sub of a per-channel constant is a stage too
            op: Op = "sub" if n.op_type == "Sub" else "add"
            return ViewNode(key, label, what, op, values, tuple(st) if st and x else None, const=(consts or [None])[0])
        if n.op_type in ("Mul", "Div") and len(values) == 1 and of_const:
            st, why, _ = self.stage(n)
            scaled: Op = "mul" if n.op_type == "Mul" else "div"
            return ViewNode(key, label, what, scaled, values, tuple(st) if st else None, why, consts[0])
        if n.op_type == "Pad" and values and values[0] == n.input[0]:
            return ViewNode(key, label, what, "pad", values[:1], pad=self._zero_pad(n))
        if n.op_type in ("Gemm", "MatMul"):
            lin = self._dense(n)
            if isinstance(lin, tuple):
                return ViewNode(key, label, what, "linear", (lin[1],), dense=lin[0])
            return ViewNode(key, label, what, "linear", values, reason=lin)
        if n.op_type in ("Reshape", "Flatten") and values and values[0] == n.input[0]:
            return ViewNode(key, label, what, "reshape", values)
        st, why, x = self.stage(n)
        kind: Op = "conv" if n.op_type == "Conv" else "bn" if n.op_type == "BatchNormalization" else "other"
        if st is None or x is None:
            return ViewNode(key, label, what, kind, values, None, why)
        return ViewNode(key, label, what, kind, (x, *(v for v in values if v != x)), tuple(st), why)

    def _zero_pad(self, pad: onnx.NodeProto) -> int | None:
        """The width of a Pad of constant zeros, the same on the four spatial sides of NCHW."""
        g = self.g
        pads = g.const(pad.input[1]) if len(pad.input) > 1 else None
        value = g.const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else None
        if pads is None or _attrs(pad).get("mode", b"constant") not in (b"constant", "constant"):
            return None
        if value is not None and np.any(value != 0):
            return None
        p = [int(v) for v in pads.reshape(-1)]
        if len(p) != 8 or any(p[i] for i in (0, 1, 4, 5)) or len(set(p[2:4] + p[6:8])) != 1:
            return None
        return p[2]

    def conv(self, rw: ConvRewrite) -> ViewNode:
        """The matcher's conv rewrite on the graph: a Conv node (new initializers) in place of its nodes."""
        g = self.g
        end = g.producer[rw.end]
        f = rw.conv
        conv = helper.make_node(
            "Conv",
            [rw.source, *self._add_init(rw.name, weight=rw.kernel, bias=rw.bias)],
            [end.output[0]],
            name=rw.name,
            kernel_shape=list(f.kernel),
            strides=list(f.stride),
            pads=[*f.padding, *f.padding],
            dilations=list(f.dilation),
            group=f.groups,
        )
        self._replace([g.producer[v] for v in rw.consumed if v != rw.end], end, conv)
        return rw.node(end.output[0], f"Conv {rw.name}")

    def run(self) -> None:
        """Everything through the core's matcher (module doc), then the nodes and initializers
        nothing reads any more go."""
        view = self.view()
        matched = match(view, self, Naming(head="head"))
        self.report.fused += matched.fused
        self.report.left += matched.left
        self._drop_unused()

    def _replace(
        self, nodes: Sequence[onnx.NodeProto], end: onnx.NodeProto, new: onnx.NodeProto | list[onnx.NodeProto]
    ) -> None:
        """Put `new` (one node or a chain) where `end` was and remove `nodes` (the graph's order
        stays topological: `new` reads only what `nodes` read, all written before `end`)."""
        graph = self.g.model.graph
        dead = {id(m) for m in (*nodes, end)}
        keep: list[onnx.NodeProto] = []
        for m in graph.node:
            if m is end:
                keep += new if isinstance(new, list) else [new]
            elif id(m) not in dead:
                keep.append(m)
        del graph.node[:]
        graph.node.extend(keep)
        self.g.index()

    def _add_init(self, name: str, **arrays: np.ndarray) -> list[str]:
        """New initializers `name.key`, known to the pass as constants (a fused conv can take the
        BN or constants after it in a later step)."""
        self.g.model.graph.initializer.extend(numpy_helper.from_array(v, f"{name}.{k}") for k, v in arrays.items())
        self.g.values.update({f"{name}.{k}": v for k, v in arrays.items()})
        return [f"{name}.{k}" for k in arrays]

    # ---------------------------------------------------------------- linear layers

    def _dense(self, n: onnx.NodeProto) -> tuple[Dense, str] | str:
        """A Gemm, or a MatMul by a constant, as y = x W^T + b and the x it reads; a reason when
        it cannot be read so."""
        if n.op_type == "Gemm":
            return self._gemm(n)
        g = self.g
        w = g.const(n.input[1])
        if w is None or g.const(n.input[0]) is not None:
            return f"MatMul {n.name}: its right operand {g.origin(n.input[1])} is not a constant"
        shape = g.shapes.get(n.input[0])
        if w.ndim != 2 or shape is None or len(shape) < 2:
            return f"MatMul {n.name} is not a tensor times a matrix (input shape {shape}, weight {w.shape})"
        return Dense(w.T, None, "matmul"), n.input[0]

    def _gemm(self, n: onnx.NodeProto) -> tuple[Dense, str] | str:
        g, a = self.g, _attrs(n)
        w = g.const(n.input[1])
        c = g.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if w is None or (len(n.input) > 2 and n.input[2] and c is None):
            return f"Gemm {n.name}: its weight or bias is not a constant"
        if a.get("transA", 0):
            return f"Gemm {n.name} transposes its input (transA)"
        w = w if a.get("transB", 0) else w.T
        out = w.shape[0]
        if c is not None and not (c.size in (1, out) and c.shape[-1:] in ((1,), (out,)) and c.ndim <= 2):
            return f"Gemm {n.name}: its bias of shape {c.shape} is not one value per output"
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        if alpha != 1.0:
            w = (w.astype(np.float64) * alpha).astype(w.dtype)
        bias = None if c is None else (np.broadcast_to(c.reshape(-1), (out,)) * beta).astype(w.dtype)
        return Dense(w, bias, "gemm"), n.input[0]

    def linear(self, rw: LinearRewrite) -> list[ViewNode]:
        """The matcher's linear rewrite: y = x W^T + b written to end's value in place of its
        nodes, a Gemm on a 2-D x, MatMul by W^T then Add b on an N-D one."""
        g, name, x = self.g, rw.name, rw.source
        end = g.producer[rw.end]
        out = end.output[0]
        if len(g.shapes.get(x) or ()) == 2:
            w, b = self._add_init(name, weight=rw.weight, bias=rw.bias)
            new = [helper.make_node("Gemm", [x, w, b], [out], name=name, transB=1)]
            views = [ViewNode(out, name, f"Gemm {name}", "linear", (x,), dense=Dense(rw.weight, rw.bias, "gemm"))]
        else:
            w, b = self._add_init(name, weight_t=np.ascontiguousarray(rw.weight.T), bias=rw.bias)
            mm = f"{name}.matmul"
            new = [
                helper.make_node("MatMul", [x, w], [mm], name=name),
                helper.make_node("Add", [mm, b], [out], name=f"{name}.add"),
            ]
            views = [
                ViewNode(mm, name, f"MatMul {name}", "linear", (x,), dense=Dense(rw.weight, None, "matmul")),
                ViewNode(out, f"{name}.add", f"Add {name}.add", "add", (mm,), const=rw.bias),
            ]
        self._replace([g.producer[v] for v in rw.consumed if v != rw.end], end, new)
        return views

    def bypass(self, value: str, to: str) -> None:
        """The matcher's bypass: the node writing `value` goes, its readers read `to`."""
        n = self.g.producer[value]
        for m in self.g.model.graph.node:
            for k, i in enumerate(m.input):
                if i == value:
                    m.input[k] = to
        self._replace([], n, [])

    # ---------------------------------------------------------------- the report

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


SUMMARY_OPS = (("BatchNormalization",), ("Conv",), ("Add",), ("Gemm", "MatMul"))


def summary_counts(model: onnx.ModelProto) -> dict[str, int]:
    """The report's op counts: BatchNormalization, Conv, Add and Gemm/MatMul nodes."""
    h = op_histogram(model)
    return {"/".join(ops): sum(h.get(o, 0) for o in ops) for ops in SUMMARY_OPS}


def _became(fused: FusedSum, ops: Mapping[str, str]) -> FusedSum:
    """A linear fusion named by the op it became (Gemm, or MatMul + Add)."""
    if fused.op == "conv" or fused.into not in ops:
        return fused
    return replace(fused, op="MatMul + Add" if ops[fused.into] == "MatMul" else ops[fused.into])


def fuse_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FuseReport]:
    """A copy of `model` with every fusable branch sum, BN after it, and conv -> BN / Mul / Add
    constant chain replaced by one Conv (reparam_core computes it in float64), and the report
    (with the op counts before and after)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    p = _Pass(out)
    p.run()
    onnx.checker.check_model(out)
    ops = {n.name: n.op_type for n in out.graph.node}
    p.report.fused = [_became(f, ops) for f in p.report.fused]
    p.report.before, p.report.after = summary_counts(model), summary_counts(out)
    return out, p.report


__all__ = ["load", "op_histogram", "fuse_model"]
