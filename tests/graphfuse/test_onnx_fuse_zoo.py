"""`reparam fuse` on real zoo models' ONNX exports (backends/onnx): ultralytics YOLOv8n through
torch's dynamo exporter without its optimizer (every bias-less conv's bias is the shape-only
subgraph Expand(CastLike(0, x), Shape(W)[0:1])), timm's MobileOne and FastViT through the
TorchScript exporter: no BatchNormalization left, no more convs than the library's own fuse,
and the unfused model's outputs."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

import backends.onnx as bo
from backends.torch import zoo
from parity_tests.tolerance import rel_err


def randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters (any BN dimension); eval mode."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _first(y: object) -> torch.Tensor:
    while isinstance(y, (list, tuple)):
        y = y[0]
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"no tensor output: {type(y).__name__}")
    return y


def _export(m: torch.nn.Module, x: torch.Tensor, path: str, dynamo: bool) -> str:
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(m, (x,), path, input_names=["input"], dynamo=True, optimize=False, external_data=False)
        else:
            torch.onnx.export(m, (x,), path, input_names=["input"], opset_version=17, dynamo=False)
    return path


def _ort(path_or_model: object, x: np.ndarray) -> np.ndarray:
    data = path_or_model.SerializeToString()  # type: ignore[attr-defined]
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def _convs(m: torch.nn.Module) -> int:
    return sum(isinstance(c, torch.nn.Conv2d) for c in m.modules())


def _check(model: torch.nn.Module, lib_convs: int, x: torch.Tensor, path: str, dynamo: bool) -> None:
    want = _first(model(x)).numpy()
    src = bo.load(_export(model, x, path, dynamo))
    fused, report = bo.fuse_model(src)
    h = bo.op_histogram(fused)
    assert "BatchNormalization" not in h, report
    assert h["Conv"] <= lib_convs
    assert rel_err(_ort(fused, x.numpy()), want) <= 1e-5


@pytest.mark.slow
def test_yolov8n_dynamo_unoptimized_export_fuses(tmp_path) -> None:
    """YOLOv8n at 1x3x64x64 (about 12 s of CPU, 25 s on the shared machine: the export dominates)."""
    zoo.import_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        model = randomize_bn(DetectionModel("yolov8n.yaml", verbose=False))
        lib = _convs(DetectionModel("yolov8n.yaml", verbose=False).eval().fuse(verbose=False))
    with torch.no_grad():
        _check(model, lib, torch.randn(1, 3, 64, 64), str(tmp_path / "y.onnx"), dynamo=True)


@pytest.mark.parametrize("name", [pytest.param("mobileone_s0", marks=pytest.mark.slow), "fastvit_t8"])
def test_timm_train_form_fuses_to_reparameterized_convs(name: str, tmp_path) -> None:
    timm = zoo.import_timm()
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, pretrained=False))
    deploy = timm.utils.reparameterize_model(timm.create_model(name, pretrained=False).eval())
    with torch.no_grad():
        _check(model, _convs(deploy), torch.randn(1, 3, 64, 64), str(tmp_path / "m.onnx"), dynamo=False)
