"""ONNX export of the deploy form: op set (no BatchNormalization, no Add of branches) and
onnxruntime parity with predict."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from torch_testutil import loaded_model, model_state, rel_err

import backends.torch as bt
from reparam_core import get_spec

ORT_RTOL = 1e-5


def _export_and_run(module: bt.RepModule, path, shape: tuple[int, ...]) -> tuple[Counter, float]:
    was_deploy = module.deploy
    bt.export_onnx(module, path, input_shape=shape)
    assert module.deploy is was_deploy  # the input model is left as it was
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = Counter(node.op_type for node in graph.graph.node)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x})
    return ops, rel_err(y, bt.predict(bt.reparameterize(module), x))


def test_repvgg_a0_onnx_is_a_plain_conv_stack(tmp_path) -> None:
    model = loaded_model("RepVGG-A0", model_state("RepVGG-A0"))
    ops, err = _export_and_run(model, tmp_path / "a0.onnx", (1, 3, 64, 64))
    assert set(ops) <= {"Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm", "Reshape"}
    assert ops["Conv"] == len(get_spec("RepVGG-A0").blocks()) == 22
    assert ops["Relu"] == 22
    assert err <= ORT_RTOL


def test_repghostnet_onnx_has_no_bn_and_only_residual_adds(tmp_path) -> None:
    name = "repghostnet_0_5x"
    model = loaded_model(name, model_state(name))
    ops, err = _export_and_run(model, tmp_path / "ghost.onnx", (1, 3, 64, 64))
    assert "BatchNormalization" not in ops
    assert set(ops) <= {
        "Conv",
        "Relu",
        "Add",
        "Mul",
        "HardSigmoid",
        "GlobalAveragePool",
        "ReduceMean",
        "Flatten",
        "Gemm",
        "Reshape",
    }
    n_bottlenecks = sum(len(stage) for stage in get_spec(name).stages)
    assert ops["Add"] == n_bottlenecks  # one residual Add per bottleneck, no branch Adds
    assert err <= ORT_RTOL


@pytest.mark.parametrize(
    "spec", [bt.repconv_spec(8, 8), bt.repconv_spec(8, 8, groups=8)], ids=["repconv", "repconv-dw"]
)
def test_repconv_block_onnx_is_conv_silu(tmp_path, spec) -> None:
    block = bt.build_block(spec)
    ops, err = _export_and_run(block, tmp_path / "rc.onnx", (1, 8, 15, 15))
    assert set(ops) <= {"Conv", "Sigmoid", "Mul"} and ops["Conv"] == 1
    assert err <= ORT_RTOL
