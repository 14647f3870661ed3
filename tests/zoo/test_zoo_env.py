"""The model-zoo environment (issue 25): timm, ultralytics and mmpretrain import through the
project's one way (backends.torch.zoo), build models with random weights (nothing downloaded), and
their own re-parameterization matches the original; the torchvision workaround leaves torchvision's
pure-Python parts working. A missing library fails under CI (parity_tests/backend_rule.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn

from backends.torch import zoo

RTOL = 1e-5


def _need(request: pytest.FixtureRequest, load: Callable[[], ModuleType], what: str) -> ModuleType:
    """The library, or the backend rule's verdict on its absence (never a plain skip under CI)."""
    try:
        return load()
    except ImportError as e:
        reason = f"{what} cannot be imported through backends.torch.zoo: {e}"
        try:
            from parity_tests.backend_rule import missing_backend
        except ImportError:
            pytest.fail(reason)
        missing_backend(request.config, reason)


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y64, r64 = y.double(), ref.double()
    return float((y64 - r64).abs().max() / r64.abs().max())


def _bns(m: nn.Module) -> int:
    return sum(isinstance(s, nn.modules.batchnorm._BatchNorm) for s in m.modules())


def _x(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(n)


def test_torchvision_pure_python_parts_work(request):
    tv = _need(request, zoo.import_torchvision, "torchvision")
    # the two schemas its import needs exist, whether torchvision's own _C defined them or the shim did
    assert hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "qnms")
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    iou = tv.ops.box_iou(boxes, boxes)
    np.testing.assert_allclose(iou.numpy(), [[1, 1 / 3, 0], [1 / 3, 1, 0], [0, 0, 1]], rtol=1e-6)
    cxcywh = tv.ops.box_convert(boxes[:1], "xyxy", "cxcywh")
    assert cxcywh.tolist() == [[5.0, 5.0, 10.0, 10.0]]
    from torchvision.transforms.v2 import functional as TF

    img = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 8, 8)
    assert TF.resize(img, [4, 4], antialias=True).shape == (2, 4, 4)
    assert torch.equal(TF.horizontal_flip(img), img.flip(-1))
    net = tv.models.mobilenet_v3_small(weights=None, num_classes=7).eval()
    assert net(_x(64)).shape == (1, 7)
    if zoo.torchvision_ops_shimmed():
        # schemas only: the C++ ops themselves stay unavailable, with torchvision's own error
        with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
            tv.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    else:
        assert tv.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 1, 2]


def test_timm_repvgg_a0_reparameterizes(request):
    timm = _need(request, zoo.import_timm, "timm")
    model = timm.create_model("repvgg_a0", pretrained=False, num_classes=10).eval()
    _randomize_bn(model)
    x = _x(64)
    y = model(x)
    assert y.shape == (1, 10)
    fused = timm.utils.reparameterize_model(model, inplace=False)
    assert _bns(model) > 0 and _bns(fused) == 0
    assert _rel_err(fused(x), y) < RTOL


def test_ultralytics_yolov8n_builds_and_fuses(request):
    _need(request, zoo.import_ultralytics, "ultralytics")
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", verbose=False).eval()  # built from the packaged YAML
    _randomize_bn(model)
    x = _x(64)
    y = model(x)[0]
    assert y.shape == (1, 84, 8 * 8 + 4 * 4 + 2 * 2)  # 4 box + 80 classes, anchors of strides 8/16/32
    fused = copy.deepcopy(model).fuse(verbose=False)
    assert _bns(model) == 57 and _bns(fused) == 0
    assert _rel_err(fused(x)[0], y) < RTOL


def test_mmpretrain_mobileone_s0_switches_to_deploy(request):
    mmpretrain = _need(request, zoo.import_mmpretrain, "mmpretrain")
    model = mmpretrain.get_model("mobileone-s0_8xb32_in1k", pretrained=False).eval()  # packaged config
    _randomize_bn(model)
    x = _x(64)
    y = model(x)  # mode="tensor": the head's logits
    assert y.shape == (1, 1000)
    fused = copy.deepcopy(model)
    fused.backbone.switch_to_deploy()
    assert _bns(model) > 0 and _bns(fused) == 0
    assert _rel_err(fused(x), y) < RTOL


def test_missing_library_fails_under_ci(request, monkeypatch):
    """Under CI=true an absent zoo library is a failure, not a skip."""
    monkeypatch.setenv("CI", "true")

    def absent() -> ModuleType:
        raise ImportError("No module named 'timm'")

    with pytest.raises(pytest.fail.Exception, match="timm cannot be imported"):
        _need(request, absent, "timm")
