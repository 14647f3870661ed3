"""Training: SGD steps update BN running statistics, gradients reach every branch, the trained
model still converts exactly; RepVGGplus aux heads and custom L2 (identity branch included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_testutil import model_tolerance, rel_err

import backends.torch as bt
from reparam_core import ReparamError, get_spec
from reparam_core.blocks import oracle
from reparam_core.families.specs import repvgg_spec

PLUS_MINI = repvgg_spec(
    "RepVGGplus-mini", (1, 2, 2, 1), (0.25, 0.25, 0.25, 0.5), se="post", se_divisor=4, num_classes=10, plus=True
)


def _bn_stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def _train(model: torch.nn.Module, loss_fn, steps: int = 3, size: int = 32) -> dict[str, torch.Tensor]:
    """`steps` SGD steps on random data; returns the gradients of the first step."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    first: dict[str, torch.Tensor] = {}
    for step in range(steps):
        x = torch.randn(4, 3, size, size)
        y = torch.randint(0, 10, (4,))
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        if step == 0:
            first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return first


def _check_trained_converts(model: bt.RepModule, spec, size: int = 32) -> None:
    x = np.random.default_rng(5).standard_normal((2, 3, size, size)).astype(np.float32)
    expected = oracle.forward(spec, bt.export_state(model), x, "train")
    assert rel_err(bt.predict(model, x), expected) <= model_tolerance(spec)
    assert rel_err(bt.predict(bt.reparameterize(model), x), expected) <= model_tolerance(spec)


def _ce(model, x, y):
    return F.cross_entropy(model(x), y)


def test_repvgg_sgd_updates_bn_and_reaches_every_branch() -> None:
    model = bt.create_model("RepVGG-mini", num_classes=10)
    before = _bn_stats(model)
    grads = _train(model, _ce)
    after = _bn_stats(model)
    assert all(not torch.equal(before[k], after[k]) for k in before), "stale BN statistics"
    assert all(int(v) == 3 for k, v in model.state_dict().items() if k.endswith("tracked"))
    n_identity = 0
    for prefix, block in model.rep_blocks():
        for branch in ("rbr_dense.conv.weight", "rbr_1x1.conv.weight", "rbr_dense.bn.weight", "rbr_1x1.bn.bias"):
            assert grads[f"{prefix}.{branch}"].abs().sum() > 0, f"{prefix}.{branch}"
        if block.rbr_identity is not None:
            n_identity += 1
            assert grads[f"{prefix}.rbr_identity.weight"].abs().sum() > 0
            assert grads[f"{prefix}.rbr_identity.bias"].abs().sum() > 0
    assert n_identity == 2
    _check_trained_converts(model, get_spec("RepVGG-mini", 10))


def test_repghostnet_sgd_updates_fusion_bn() -> None:
    model = bt.create_model("repghostnet_0_5x", num_classes=10)
    before = _bn_stats(model)
    grads = _train(model, _ce, steps=2)
    after = _bn_stats(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    for name in (
        "blocks.0.0.ghost1.fusion_bn.0.weight",
        "blocks.0.0.ghost1.cheap_operation.0.weight",
        "blocks.8.3.ghost2.fusion_bn.0.bias",
        "blocks.8.3.se.conv_reduce.weight",
    ):
        assert grads[name].abs().sum() > 0, name
    _check_trained_converts(model, get_spec("repghostnet_0_5x", 10))


def _numpy_custom_l2(spec, state: dict[str, np.ndarray], with_identity: bool = True) -> float:
    total = 0.0
    for prefix, b in spec.blocks():
        g = lambda k: state[f"{prefix}.{k}"].astype(np.float64)  # noqa: E731
        t = lambda bn: (g(f"{bn}.weight") / np.sqrt(g(f"{bn}.running_var") + b.eps)).reshape(-1, 1, 1, 1)  # noqa: E731
        k3, k1 = g("rbr_dense.conv.weight"), g("rbr_1x1.conv.weight")
        t3, t1 = t("rbr_dense.bn"), t("rbr_1x1.bn")
        eq = k3[:, :, 1:2, 1:2] * t3 + k1 * t1
        denom = np.broadcast_to(t3**2 + t1**2, eq.shape).copy()
        if with_identity and b.has_identity:
            tid = t("rbr_identity")[:, 0, 0, 0]
            per = b.in_channels // b.groups
            for i in range(b.out_channels):  # identity taps: (i, i mod C/g)
                eq[i, i % per] += tid[i]
                denom[i, i % per] += tid[i] ** 2
        total += (k3**2).sum() - (k3[:, :, 1, 1] ** 2).sum() + (eq**2 / denom).sum()
    return total


def test_repvggplus_aux_heads_custom_l2_and_training() -> None:
    model = bt.RepVGGplus(PLUS_MINI)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    out = model.forward_with_aux(x)
    assert set(out) == {"main", "stage1_aux", "stage2_aux", "stage3_first_aux"}
    assert all(v.shape == (2, 10) for v in out.values())
    torch.testing.assert_close(out["main"], model(x))

    state = bt.export_state(model)
    l2 = model.custom_l2()
    assert l2.requires_grad
    expected = _numpy_custom_l2(PLUS_MINI, state)
    assert abs(float(l2.detach()) - expected) <= 1e-5 * expected
    assert abs(expected - _numpy_custom_l2(PLUS_MINI, state, with_identity=False)) > 1e-3 * expected

    def loss(m, xb, yb):
        o = m.forward_with_aux(xb)
        return sum(F.cross_entropy(v, yb) for v in o.values()) + 1e-4 * m.custom_l2()

    grads = _train(model, loss, steps=2, size=64)
    assert grads["stage1_aux.0.conv.weight"].abs().sum() > 0
    assert grads["stage1.blocks.0.post_se.down.weight"].abs().sum() > 0
    _check_trained_converts(model, PLUS_MINI, size=64)

    deploy = bt.reparameterize(model)
    assert not any(k.endswith("_aux.3.weight") for k in deploy.state_dict())
    with pytest.raises(ReparamError, match="train form only"):
        deploy.custom_l2()
    with pytest.raises(ReparamError, match="train form only"):
        deploy.forward_with_aux(x)
