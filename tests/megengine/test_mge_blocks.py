"""MegEngine-specific block checks (the oracle matrix runs for every backend in tests/backends):
class choice, deploy conversion really writes (MegEngine has no `.data`); custom L2; training with
SGD + GradManager and torch-equivalent BN momentum checked against a numpy reference."""

from __future__ import annotations

import megengine as mge
import megengine.functional as F
import megengine.optimizer as optim
import numpy as np
import pytest
from megengine.autodiff import GradManager
from mge_testutil import model_tolerance, rand_input, random_block_params, rel_err

from backends.megengine import (
    RepConv,
    RepGhostBottleneck,
    RepGhostModule,
    RepVGGBlock,
    RepVGGplus,
    RepVGGplusBlock,
    build_block,
    create_model,
    export_state,
    load_state,
    predict,
    reparameterize,
    repconv_spec,
)
from reparam_core import (
    CheckpointError,
    ReparamError,
    RepBlockSpec,
    RepGhostBottleneckSpec,
    RepGhostModuleSpec,
    ShapeMismatchError,
    block_kernel_bias,
    block_schema,
    get_spec,
    random_state,
)
from reparam_core.blocks import oracle
from reparam_core.blocks.fusion import identity_kernel
from reparam_core.families.specs import repvgg_spec


def test_block_class_checks_and_block_state_errors():
    # build_block picks the class by kind (the oracle matrix runs in tests/backends)
    assert type(build_block(RepBlockSpec(8, 8))) is RepVGGBlock
    assert type(build_block(RepBlockSpec(8, 8, se="post", se_channels=4))) is RepVGGplusBlock
    assert type(build_block(repconv_spec(8, 8))) is RepConv
    assert type(build_block(RepGhostBottleneckSpec(8, 16, 8))) is RepGhostBottleneck
    assert type(build_block(RepGhostModuleSpec(8, 12))) is RepGhostModule
    with pytest.raises(ReparamError):
        RepConv(RepBlockSpec(4, 4))
    with pytest.raises(ReparamError):
        RepVGGBlock(RepBlockSpec(4, 4, se="post", se_channels=1))
    with pytest.raises(ReparamError):
        RepVGGplusBlock(RepBlockSpec(4, 4))
    block = build_block(RepBlockSpec(4, 4))
    params = random_block_params(block_schema(RepBlockSpec(4, 4), "train"))
    bad = {k: v for k, v in params.items() if k != "rbr_identity.weight"}
    with pytest.raises(CheckpointError, match="rbr_identity.weight"):
        load_state(block, bad)
    bad = {**params, "rbr_1x1.conv.weight": np.zeros((4, 4, 3, 3), np.float32)}
    with pytest.raises(ShapeMismatchError, match="rbr_1x1.conv.weight"):
        load_state(block, bad)


def test_deploy_parameters_hold_fused_values_not_fresh_init():
    """The `.data` trap: MegEngine silently ignores `p.data = v`; the conversion must really
    write the fused values into the deploy block's parameters."""
    spec = RepBlockSpec(8, 8, groups=2)
    block = load_state(build_block(spec), random_block_params(block_schema(spec, "train"), 7))
    # the trap itself, demonstrated: assigning .data leaves the parameter unchanged
    probe = build_block(spec, deploy=True)
    before = probe.rbr_reparam.weight.numpy().copy()
    try:
        probe.rbr_reparam.weight.data = np.zeros_like(before)
    except Exception:
        pass
    np.testing.assert_array_equal(probe.rbr_reparam.weight.numpy(), before)

    kernel, bias = block_kernel_bias(spec, export_state(block))
    deployed = block.reparameterize()
    w = deployed.rbr_reparam.weight.numpy()
    b = deployed.rbr_reparam.bias.numpy()
    assert w.shape == (2, 4, 4, 3, 3) and b.shape == (1, 8, 1, 1)  # MegEngine's own shapes
    np.testing.assert_allclose(w.reshape(kernel.shape), kernel, rtol=0, atol=1e-7)
    np.testing.assert_allclose(b.reshape(-1), bias, rtol=0, atol=1e-7)
    fresh = build_block(spec, deploy=True)
    assert not np.allclose(fresh.rbr_reparam.weight.numpy(), w)
    assert not np.allclose(fresh.rbr_reparam.bias.numpy(), b)
    # ghost module too
    gspec = RepGhostModuleSpec(4, 6)
    gm = load_state(build_block(gspec), random_block_params(block_schema(gspec, "train"), 2))
    gd = gm.reparameterize()
    k2, b2 = block_kernel_bias(gspec, export_state(gm))
    np.testing.assert_allclose(gd.cheap_operation.weight.numpy().reshape(k2.shape), k2, atol=1e-7)
    np.testing.assert_allclose(gd.cheap_operation.bias.numpy().reshape(-1), b2, atol=1e-7)


def _custom_l2_reference(spec, state):
    """numpy: per block, off-centre sum of squares + sum(eq_centre^2 / (t3^2 + t1^2 + I tid^2))."""
    total = 0.0
    for prefix, b in spec.blocks():
        p = lambda k: np.asarray(state[f"{prefix}.{k}"], np.float64)  # noqa: E731
        t = lambda bn: p(f"{bn}.weight") / np.sqrt(p(f"{bn}.running_var") + b.eps)  # noqa: E731
        k3, k1 = p("rbr_dense.conv.weight"), p("rbr_1x1.conv.weight")
        c = b.kernel_size // 2
        centre = k3[:, :, c : c + 1, c : c + 1]
        t3 = t("rbr_dense.bn")[:, None, None, None]
        t1 = t("rbr_1x1.bn")[:, None, None, None]
        eq = centre * t3 + k1 * t1
        den = t3**2 + t1**2
        if b.has_identity:
            eye = identity_kernel(b.out_channels, b.groups, 1)
            tid = t("rbr_identity")[:, None, None, None]
            eq, den = eq + eye * tid, den + eye * tid**2
        total += (k3**2).sum() - (centre**2).sum() + (eq**2 / den).sum()
    return total


def test_repvggplus_aux_and_custom_l2():
    # RepVGGplus-L2pse itself is covered by test_mge_models; a small RepVGGplus of the same
    # structure (post-SE, split stage3, aux heads) keeps this test fast.
    spec = repvgg_spec(
        "RepVGGplus-small", (2, 2, 2, 1), (0.25, 0.25, 0.25, 0.5), se="post", se_divisor=4, num_classes=5, plus=True
    )
    state = random_state(spec, "train", seed=11)
    model = load_state(RepVGGplus(spec), state)
    x = rand_input((1, 3, 32, 32))
    model.eval()
    out = model.forward_with_aux(mge.tensor(x))
    assert set(out) == {"main", "stage1_aux", "stage2_aux", "stage3_first_aux"}
    assert all(v.shape == (1, 5) for v in out.values())
    assert rel_err(out["main"].numpy(), oracle.forward(spec, state, x, "train")) <= model_tolerance(spec)
    l2 = float(model.custom_l2().numpy())
    ref = _custom_l2_reference(spec, state)
    assert abs(l2 - ref) <= 1e-5 * abs(ref), (l2, ref)
    deployed = reparameterize(model)
    assert not any(k.endswith("_aux") or "_aux." in k for k in deployed.state_dict())
    with pytest.raises(ReparamError, match="train form only"):
        deployed.custom_l2()
    with pytest.raises(ReparamError):
        deployed.forward_with_aux(mge.tensor(x))


def _bn_reference(x, running_mean, running_var, momentum=0.1):
    """torch semantics: running = (1 - m) * running + m * batch_stat, unbiased var."""
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    n = x.shape[0] * x.shape[2] * x.shape[3]
    var_unbiased = x.var(axis=(0, 2, 3), dtype=np.float64) * n / (n - 1)
    return ((1 - momentum) * running_mean + momentum * mean, (1 - momentum) * running_var + momentum * var_unbiased)


def test_bn_momentum_matches_torch_semantics():
    """A lone BN module trained for 3 SGD steps: running stats == numpy torch reference
    (MegEngine momentum 0.9 == torch 0.1; MegEngine's running_var is unbiased like torch's)."""
    spec = RepGhostModuleSpec(3, 4)  # primary conv feeds BN; simplest: check its BN input
    block = build_block(spec)
    params = random_block_params(block_schema(spec, "train"), 4)
    load_state(block, params)
    conv, bn = block.primary_conv[0], block.primary_conv[1]
    rm = params["primary_conv.1.running_mean"].astype(np.float64)
    rv = params["primary_conv.1.running_var"].astype(np.float64)
    gm = GradManager().attach(block.parameters())
    opt = optim.SGD(block.parameters(), lr=0.05, momentum=0.9)
    block.train()
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.normal(1.0, 2.0, (4, 3, 6, 5)).astype(np.float32)
        pre = conv(mge.tensor(x)).numpy().astype(np.float64)  # BN input with current weights
        rm, rv = _bn_reference(pre, rm, rv)
        with gm:
            loss = (block(mge.tensor(x)) ** 2).mean()
            gm.backward(loss)
        opt.step().clear_grad()
    got = export_state(block)
    np.testing.assert_allclose(got["primary_conv.1.running_mean"], rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["primary_conv.1.running_var"], rv, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.9


def test_training_reaches_every_branch_and_still_converts():
    spec = get_spec("RepVGG-mini", 10)
    model = load_state(create_model("RepVGG-mini", num_classes=10), random_state(spec, "train", 2))
    before = export_state(model)
    gm = GradManager().attach(model.parameters())
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(3)
    model.train()
    params = dict(model.named_parameters())
    for step in range(3):
        x = mge.tensor(rng.normal(size=(4, 3, 32, 32)).astype(np.float32))
        y = mge.tensor(rng.integers(0, 10, 4).astype(np.int32))
        with gm:
            loss = F.nn.cross_entropy(model(x), y)
            gm.backward(loss)
        if step == 0:
            for branch in (
                "rbr_dense.conv.weight",
                "rbr_dense.bn.weight",
                "rbr_1x1.conv.weight",
                "rbr_1x1.bn.weight",
                "rbr_identity.weight",
                "rbr_identity.bias",
            ):
                keys = [k for k in params if k.endswith(branch)]
                assert keys, branch
                assert any(params[k].grad is not None and np.abs(params[k].grad.numpy()).max() > 0 for k in keys), (
                    branch
                )
        opt.step().clear_grad()
    after = export_state(model)
    for k in before:
        if k.endswith("running_mean") and k.startswith("stage1"):
            assert not np.array_equal(before[k], after[k]), k  # BN statistics moved
    x = rand_input((2, 3, 32, 32), 9)
    ref = oracle.forward(spec, after, x, "train")
    assert rel_err(predict(model, x), ref) <= model_tolerance(spec)
    assert rel_err(predict(reparameterize(model), x), ref) <= model_tolerance(spec)
    assert model.training  # predict restored the mode
