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


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in list_models()])
def test_registry_model_onnx_fuses_to_deploy_export(name: str, tmp_path) -> None:
    spec = get_spec(name, 10)
    state = random_state(spec, "train", 0)
    model = bt.load_state(bt.empty_model(name, num_classes=10), state).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    train = bo.load(_export(model, torch.from_numpy(x), str(tmp_path / "train.onnx")))
    deploy = bo.load(bt.export_onnx(model, tmp_path / "deploy.onnx", (1, 3, 32, 32)))
    fused, report = bo.fuse_model(train)
    assert bo.op_histogram(fused) == bo.op_histogram(deploy)
    assert sum(bo.op_histogram(train).values()) > sum(bo.op_histogram(fused).values())
    assert len(report.fused) >= len(reps(in_form(spec, "train")))
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
