"""backends/onnx and `reparam fuse`: this project's train-form models exported to ONNX fuse to
the deploy form's op counts and give the oracle's outputs in ONNX Runtime; blocks of every
branch kind (DBB's Sub-Pad-Add included) through both torch exporters; traps stay; the CLI."""

from __future__ import annotations

import collections
import os
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from graphfuse_util import C, QABlock, randomize, trap
from onnx import helper, numpy_helper
from test_onnx_fuse_zoo import randomize_bn

import backends.onnx as bo
import backends.torch as bt
from parity_tests.tolerance import BLOCK_REL, model_tolerance, rel_err
from reparam_core import get_spec, in_form, list_models, random_state
from reparam_core.blocks import oracle
from reparam_core.blocks.nodes import reps
from scripts.cli import main

FAST = {"RepVGG-mini", "repghostnet_0_5x"}


def _export(m: torch.nn.Module, x: torch.Tensor, path: str, dynamo: bool = False) -> str:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = {"external_data": False} if dynamo else {"opset_version": 17}
        torch.onnx.export(m.eval(), (x,), path, input_names=["input"], output_names=["output"], dynamo=dynamo, **kw)
    return path


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# A gap of the matcher, measured: UniRepLKNet's `pwconv2.2` BN reads its Linear through a
# Transpose and a layer-scale Mul follows (12 BatchNormalization left in UniRepLKNet-A, 27 in -T).
UNFUSED = pytest.mark.xfail(
    strict=True, reason="a BN behind a transpose after a MatMul (UniRepLKNet's pwconv2) is not folded"
)


def _registry_marks(name: str) -> tuple:
    marks = () if name in FAST else (pytest.mark.slow,)
    return (*marks, UNFUSED) if name.startswith("UniRepLKNet-") else marks


def _without_mul(hist: dict) -> dict:
    return {k: v for k, v in hist.items() if k != "Mul"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=_registry_marks(n)) for n in list_models()])
def test_registry_model_onnx_fuses_to_deploy_export(name: str, tmp_path) -> None:
    spec = get_spec(name, 10)
    state = random_state(spec, "train", 0)
    model = bt.load_state(bt.empty_model(name, num_classes=10), state).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    train = bo.load(_export(model, torch.from_numpy(x), str(tmp_path / "train.onnx")))
    deploy = bo.load(bt.export_onnx(model, tmp_path / "deploy.onnx", (1, 3, 32, 32)))
    fused, report = bo.fuse_model(train)
    # the same ops as the deploy export, except that the pass also folds a per-channel Mul into
    # the conv before it (FastViT's layer scales, which its official deploy form keeps)
    assert _without_mul(bo.op_histogram(fused)) == _without_mul(bo.op_histogram(deploy))
    assert bo.op_histogram(fused).get("Mul", 0) <= bo.op_histogram(deploy).get("Mul", 0)
    assert sum(bo.op_histogram(train).values()) > sum(bo.op_histogram(fused).values())
    # the exporter folds a one-branch Rep's conv + BN (MobileOne-S1..S4's 1x1 where the channels
    # change) itself: only the sums are certain to be left to the pass
    assert len(report.fused) >= sum(len(r.branches) > 1 for _, r in reps(in_form(spec, "train")))
    want = oracle.forward(spec, state, x, "train")
    assert rel_err(_ort(fused, x), want) <= model_tolerance(spec)


def _blocks() -> dict:
    """The generic-node blocks of the torch backend's tests (DBB, ACNet, MobileOne, QARepVGG
    descriptions), reused rather than written again."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "torch"))
    # by its file name, as pytest imports it: `tests.torch...` finds any installed top-level
    # `tests` package first (model_index installs one)
    from test_generic import BLOCKS

    return {k: v for k, v in BLOCKS.items() if "concat" not in k}


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    "case", ["dbb-padbn-avgpool", "acnet-non-square-g2-s2", "mobileone-scale-identity", "qarepvgg-bn-after-sum"]
)
def test_block_of_every_branch_kind(case: str, dynamo: bool, tmp_path) -> None:
    from reparam_core import random_tensors, schema_of

    desc = _blocks()[case]
    m = bt.build_block(desc)
    bt.load_state(m, random_tensors(schema_of(desc), seed=3))
    x = np.random.default_rng(1).standard_normal((1, desc.body[0].fused.in_channels, 9, 9)).astype(np.float32)
    src = bo.load(_export(m, torch.from_numpy(x), str(tmp_path / "b.onnx"), dynamo))
    fused, report = bo.fuse_model(src)
    assert len(report.fused) == 1 and report.left == []
    assert bo.op_histogram(fused)["Conv"] == 1 + (2 if "mobileone" in case else 0)  # + SE
    assert "Add" not in bo.op_histogram(fused) and "Pad" not in bo.op_histogram(fused)
    want = oracle.forward(desc, random_tensors(schema_of(desc), seed=3), x, "train")
    assert rel_err(_ort(fused, x), want) <= BLOCK_REL


def test_dynamo_export_of_a_user_block(tmp_path) -> None:
    torch.manual_seed(0)
    m = randomize(QABlock())
    x = torch.randn(1, C, 8, 8)
    src = bo.load(_export(m, x, str(tmp_path / "qa.onnx"), dynamo=True))
    fused, report = bo.fuse_model(src)
    assert [f.branches for f in report.fused] == [("conv3x3", "conv1x1", "identity", "then bn")]
    assert bo.op_histogram(fused) == {"Conv": 1, "Relu": 1}
    assert rel_err(_ort(fused, x.numpy()), _ort(src, x.numpy())) <= BLOCK_REL


@pytest.mark.parametrize(
    "name,reason",
    [("relu-in-branch", "(Relu "), ("stride-mismatch", "stride (2, 2) differs"), ("other-tensor", "(Tanh ")],
)
def test_onnx_trap_is_not_fused(name: str, reason: str, tmp_path) -> None:
    torch.manual_seed(2)
    m = randomize(trap(name))
    x = torch.randn(1, C, 8, 8)
    src = bo.load(_export(m, x, str(tmp_path / "t.onnx")))
    fused, report = bo.fuse_model(src)
    assert [f for f in report.fused if len(f.branches) > 1] == []
    assert bo.op_histogram(fused)["Add"] == 1
    assert any(reason in a.reason for a in report.left), report
    assert rel_err(_ort(fused, x.numpy()), _ort(src, x.numpy())) <= BLOCK_REL


def _asymmetric_pads_model(path: str) -> str:
    """Hand-written ONNX: a 3x3 conv (pads 1) plus a 2x2 conv with pads [0, 0, 1, 1]."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((C, C, 3, 3)).astype(np.float32), "w3"),
        numpy_helper.from_array(rng.standard_normal((C, C, 2, 2)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w3"], ["a"], "c3", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w2"], ["b"], "c2", pads=[0, 0, 1, 1]),
        helper.make_node("Add", ["a", "b"], ["y"], "sum"),
    ]
    x, y = (helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, C, 8, 8]) for n in "xy")
    graph = helper.make_graph(nodes, "asym", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_asymmetric_pads_stay(tmp_path) -> None:
    src = bo.load(_asymmetric_pads_model(str(tmp_path / "a.onnx")))
    fused, report = bo.fuse_model(src)
    assert report.fused == [] and bo.op_histogram(fused) == {"Conv": 2, "Add": 1}
    assert "asymmetric pads [0, 0, 1, 1]" in report.left[0].reason


# --------------------------------------------------------------------------- CLI


def test_cli_fuse_verify_prints_histograms_and_error(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    src = _export(randomize(QABlock()), torch.randn(1, C, 8, 8), str(tmp_path / "qa.onnx"))
    dst = tmp_path / "out.onnx"
    assert main(["fuse", src, str(dst), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "before: 6 nodes: Conv 2, Add 2, BatchNormalization 1, Relu 1" in out
    assert "after:  2 nodes: Conv 1, Relu 1" in out
    assert "ops before -> after: BatchNormalization 1 -> 0, Conv 2 -> 1, Add 2 -> 0, Gemm/MatMul 0 -> 0" in out
    err = float(out.split("verify: max relative error ")[1].split()[0])
    assert 0 <= err <= 1e-5
    assert collections.Counter(n.op_type for n in onnx.load(dst).graph.node) == {"Conv": 1, "Relu": 1}
    assert main(["fuse", src, str(dst)]) == 2  # exists: refused without --overwrite


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all", "truncated"])
def test_cli_bad_input_exits_2_without_output(content, tmp_path, capsys) -> None:
    src = tmp_path / "bad.onnx"
    if content == "truncated":
        good = _asymmetric_pads_model(str(tmp_path / "good.onnx"))
        content = open(good, "rb").read()[:200]
    src.write_bytes(content)
    dst = tmp_path / "out.onnx"
    assert main(["fuse", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reparam fuse: error: ") and str(src) in err and "Traceback" not in err
    assert not dst.exists() and os.listdir(tmp_path) == [p for p in os.listdir(tmp_path) if not p.startswith(".out")]


# --------------------------------------------------------------------------- shapes, linear layers, heads


def _bn_inits(prefix: str, c: int, rng: np.random.Generator) -> list[onnx.TensorProto]:
    vals = {"g": rng.standard_normal(c), "b": rng.standard_normal(c), "m": rng.standard_normal(c) * 0.5}
    vals["v"] = rng.random(c) + 0.5
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}{k}") for k, v in vals.items()]


def _shape_bias_model(read_elsewhere: bool = False) -> onnx.ModelProto:
    """A bias-less conv as torch's dynamo exporter writes it without its optimizer: the bias is
    Expand(CastLike(0, x), Shape(W)[0:1]); then a BN. With read_elsewhere the shape slice is
    also a graph output (it must stay)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((C, C, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "s0"),
        numpy_helper.from_array(np.array([1], np.int64), "s1"),
        *_bn_inits("bn.", C, rng),
    ]
    nodes = [
        helper.make_node("CastLike", ["zero", "x"], ["z"], "castlike"),
        helper.make_node("Shape", ["w"], ["ws"], "shape"),
        helper.make_node("Slice", ["ws", "s0", "s1"], ["c"], "slice"),
        helper.make_node("Expand", ["z", "c"], ["bias"], "expand"),
        helper.make_node("Conv", ["x", "w", "bias"], ["y0"], "conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["y0", "bn.g", "bn.b", "bn.m", "bn.v"], ["y"], "bn"),
    ]
    x, y = (helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, C, 8, 8]) for n in "xy")
    outs = [y] + ([helper.make_tensor_value_info("c", onnx.TensorProto.INT64, [1])] if read_elsewhere else [])
    graph = helper.make_graph(nodes, "shape_bias", [x], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _x() -> np.ndarray:
    return np.random.default_rng(5).standard_normal((1, C, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("read_elsewhere", [False, True])
def test_shape_only_bias_is_folded_input_unchanged(read_elsewhere: bool) -> None:
    src = _shape_bias_model(read_elsewhere)
    before = src.SerializeToString()
    fused, report = bo.fuse_model(src)
    assert src.SerializeToString() == before
    assert [f.branches for f in report.fused] == [("conv3x3+bn",)] and report.left == []
    want = {"Conv": 1} | ({"Shape": 1, "Slice": 1} if read_elsewhere else {})
    assert bo.op_histogram(fused) == want
    assert rel_err(_ort(fused, _x()), _ort(src, _x())) <= BLOCK_REL


def test_input_dependent_bias_is_reported() -> None:
    """A conv bias computed from the input's values (not its shape) is no constant: the conv
    and its BN stay, and the report says why."""
    src = _shape_bias_model()
    g = src.graph
    g.node[0].CopyFrom(helper.make_node("ReduceMean", ["x"], ["z"], "mean", keepdims=0, axes=[0, 1, 2, 3]))
    src.opset_import[0].version = 17
    fused, report = bo.fuse_model(src)
    assert report.fused == [] and bo.op_histogram(fused)["BatchNormalization"] == 1
    assert [a.node for a in report.left] == ["bn"]
    assert "bias bias (Expand expand) is not a constant" in report.left[0].reason


class _Heads(torch.nn.Module):
    """BN -> Linear (timm's NormLinear) twice on one input, averaged (DeiT/LeViT/RepViT
    distillation heads), after Linear -> BN on a 2-D tensor."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = torch.nn.Linear(8, 6)
        self.bn0 = torch.nn.BatchNorm1d(6)
        self.bn1, self.bn2 = torch.nn.BatchNorm1d(6), torch.nn.BatchNorm1d(6)
        self.h1, self.h2 = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)

    def forward(self, x):
        z = self.bn0(self.lin(x))
        a, b = self.h1(self.bn1(z)), self.h2(self.bn2(z))
        return {"div": (a + b) / 2, "mul": (a + b) * 0.5, "sum": a + b}[self.how]


@pytest.mark.parametrize("how", ["div", "mul", "sum"])
def test_bn_linear_and_averaged_heads_become_one_gemm(how: str, tmp_path) -> None:
    x = torch.randn(3, 8)
    src = bo.load(_export(randomize_bn(_Heads(how)), x, str(tmp_path / "h.onnx")))
    assert bo.op_histogram(src)["BatchNormalization"] == 3
    fused, report = bo.fuse_model(src)
    assert bo.op_histogram(fused) == {"Gemm": 2}, report
    kinds = sorted(f.branches for f in report.fused)
    assert ("gemm+bn",) in kinds and kinds.count(("bn+gemm",)) == 2 and report.left == []
    assert any(k[:2] == ("head", "head") for k in kinds)
    assert rel_err(_ort(fused, x.numpy()), _ort(src, x.numpy())) <= BLOCK_REL


class _BNConv(torch.nn.Module):
    """A BN before a 1x1 conv (NextViT), and a BN before a padded 3x3 conv (not exact: stays)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1, self.c1 = torch.nn.BatchNorm2d(C), torch.nn.Conv2d(C, 2 * C, 1)
        self.bn3, self.c3 = torch.nn.BatchNorm2d(2 * C), torch.nn.Conv2d(2 * C, C, 3, padding=1, bias=False)

    def forward(self, x):
        return self.c3(self.bn3(torch.relu(self.c1(self.bn1(x)))))


def test_bn_before_1x1_conv_fused_before_padded_conv_reported(tmp_path) -> None:
    x = torch.randn(1, C, 8, 8)
    src = bo.load(_export(randomize_bn(_BNConv()), x, str(tmp_path / "b.onnx")))
    fused, report = bo.fuse_model(src)
    assert bo.op_histogram(fused) == {"Conv": 2, "Relu": 1, "BatchNormalization": 1}
    assert [f.branches for f in report.fused] == [("bn+conv1x1",)]
    assert len(report.left) == 1 and "cannot be fused exactly" in report.left[0].reason
    assert rel_err(_ort(fused, x.numpy()), _ort(src, x.numpy())) <= BLOCK_REL


class _RepMixer(torch.nn.Module):
    """FastViT's RepMixer in train form: x + ls * (mixer(x) - norm(x)), the mixer a depthwise
    kxk conv + BN, a depthwise 1x1 conv + BN and a BN, the norm a BN; then `0 + conv(x)` (a
    scalar constant on a conv, as timm's MobileOne sums start)."""

    def __init__(self) -> None:
        super().__init__()
        self.k = torch.nn.Sequential(torch.nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False), torch.nn.BatchNorm2d(C))
        self.s = torch.nn.Sequential(torch.nn.Conv2d(C, C, 1, groups=C, bias=False), torch.nn.BatchNorm2d(C))
        self.skip, self.norm = torch.nn.BatchNorm2d(C), torch.nn.BatchNorm2d(C)
        self.ls = torch.nn.Parameter(torch.randn(C, 1, 1))
        self.out = torch.nn.Conv2d(C, C, 1)

    def forward(self, x):
        y = x + self.ls * (self.k(x) + self.s(x) + self.skip(x) - self.norm(x))
        return sum([self.out(torch.relu(y))])


def test_sub_and_scale_of_sums_fuse(tmp_path) -> None:
    x = torch.randn(1, C, 8, 8)
    src = bo.load(_export(randomize_bn(_RepMixer()), x, str(tmp_path / "r.onnx")))
    fused, report = bo.fuse_model(src)
    assert bo.op_histogram(fused) == {"Conv": 2, "Relu": 1}, report
    assert report.left == []
    assert rel_err(_ort(fused, x.numpy()), _ort(src, x.numpy())) <= BLOCK_REL


class _LinearNorm(torch.nn.Module):
    """timm LeViT's LinearNorm on tokens: Linear (a MatMul on 3-D) -> flatten(0, 1) -> BN1d ->
    reshape_as (its Shape reads the MatMul's output for the shape only)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn = torch.nn.Linear(8, 6, bias=False), torch.nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.linear(x)
        return torch.nn.functional.hardswish(self.bn(y.flatten(0, 1)).reshape_as(y))


def test_linear_reshape_bn_fuses(tmp_path) -> None:
    x = torch.randn(2, 5, 8)
    src = bo.load(_export(randomize_bn(_LinearNorm()), x, str(tmp_path / "l.onnx")))
    fused, report = bo.fuse_model(src)
    h = bo.op_histogram(fused)
    assert "BatchNormalization" not in h and h["MatMul"] == 1 and h["Add"] == 1, report
    assert [f.branches for f in report.fused] == [("matmul+reshape+bn",)] and report.left == []
    assert rel_err(_ort(fused, x.numpy()), _ort(src, x.numpy())) <= BLOCK_REL


def test_cli_names_linear_fusions_and_counts_ops(tmp_path, capsys) -> None:
    src = _export(randomize_bn(_Heads("div")), torch.randn(3, 8), str(tmp_path / "h.onnx"))
    assert main(["fuse", src, str(tmp_path / "out.onnx"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "ops before -> after: BatchNormalization 3 -> 0, Conv 0 -> 0, Add 1 -> 0, Gemm/MatMul 3 -> 2" in out
    assert "fused head + head + x0.5 -> Gemm reparam_fused_" in out and "conv1x1" not in out
    assert "4 fused, 0 left alone" in out
