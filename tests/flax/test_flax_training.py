"""Training semantics: BatchNorm running statistics equal PyTorch's (momentum 0.9 == torch 0.1,
UNBIASED batch variance in the running var), gradients reach every branch, optax steps with
nnx.Optimizer, and the trained model still converts exactly. RepVGGplus aux heads and custom_l2
against the torch backend."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from flax_testutil import loaded_model, model_input, model_state, model_tolerance, rel_err

import backends.flax as bf
import backends.torch as bt
from backends.flax.layers import BatchNorm
from backends.flax.state import variables
from reparam_core import ReparamError, RepBlockSpec, get_spec, random_state
from reparam_core.blocks import oracle
from reparam_core.families.specs import repvgg_spec


def _batches(n: int, shape: tuple[int, ...], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * 2 + 0.5).astype(np.float32) for _ in range(n)]


def test_batchnorm_running_stats_match_torch() -> None:
    c = 5
    rng = np.random.default_rng(0)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c)
    mean, var = rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c)
    tbn = torch.nn.BatchNorm2d(c, eps=1e-5, momentum=0.1).train()
    with torch.no_grad():
        for p, v in ((tbn.weight, gamma), (tbn.bias, beta), (tbn.running_mean, mean), (tbn.running_var, var)):
            p.copy_(torch.from_numpy(v.astype(np.float32)))
    fbn = BatchNorm(c, eps=1e-5)  # momentum 0.9 (Flax convention) == torch 0.1
    assert fbn.momentum == pytest.approx(0.9)
    for v, a in ((fbn.scale, gamma), (fbn.bias, beta), (fbn.mean, mean), (fbn.var, var)):
        v.set_value(jnp.asarray(a, jnp.float32))
    # nnx.BatchNorm for contrast: it stores the BIASED batch variance
    nbn = nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    nbn.mean.set_value(jnp.asarray(mean, jnp.float32))
    nbn.var.set_value(jnp.asarray(var, jnp.float32))
    for x in _batches(4, (2, c, 3, 5)):  # n = 30 per channel: n / (n - 1) is visible
        yt = tbn(torch.from_numpy(x)).detach().numpy()
        yf = np.asarray(fbn(jnp.asarray(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
        nbn(jnp.asarray(x.transpose(0, 2, 3, 1)))
        np.testing.assert_allclose(yf, yt, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fbn.mean[...]), tbn.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(fbn.var[...]), tbn.running_var.numpy(), rtol=1e-6, atol=1e-6)
    # the documented difference: nnx.BatchNorm's running var differs from torch's
    assert np.abs(np.asarray(nbn.var[...]) - tbn.running_var.numpy()).max() > 1e-3
    # inference mode uses the running statistics
    x = _batches(1, (2, c, 3, 5), seed=9)[0]
    fbn.use_running_average = True
    yt = tbn.eval()(torch.from_numpy(x)).detach().numpy()
    yf = np.asarray(fbn(jnp.asarray(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(yf, yt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "spec", [RepBlockSpec(6, 6, groups=2, conv_bias=True), bf.repconv_spec(6, 12, stride=2)], ids=["repvgg", "repconv"]
)
def test_block_training_mode_matches_torch_backend(spec: RepBlockSpec) -> None:
    from flax_testutil import random_params

    from reparam_core.blocks.schema import block_schema

    params = random_params(block_schema(spec, "train"), 3)
    fb = bf.load_state(bf.empty_block(spec), params)
    tb = bt.load_state(bt.build_block(spec), params).train()
    for x in _batches(3, (4, 6, 7, 9), seed=4):
        yt = tb(torch.from_numpy(x)).detach().numpy()
        yf = np.asarray(fb(jnp.asarray(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
        assert rel_err(yf, yt) <= 1e-5
    ft, tt = bf.export_state(fb), bt.export_state(tb)
    for k in ft:
        np.testing.assert_allclose(ft[k], tt[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _tiny_plus():
    return repvgg_spec(
        "tiny-plus", (2, 2, 2, 1), (0.25, 0.25, 0.25, 0.5), se="post", se_divisor=4, num_classes=10, plus=True
    )


def test_training_steps_reach_every_branch_and_still_convert() -> None:
    name = "RepVGG-mini"
    spec = get_spec(name, 10)
    model = loaded_model(name, model_state(name, num_classes=10), num_classes=10)
    x = jnp.asarray(model_input(name, batch=4).transpose(0, 2, 3, 1))
    labels = jnp.asarray([1, 3, 5, 7])

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()

    before = bf.export_state(model)
    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    params = variables(model, (nnx.Param,))
    assert set(flat) == set(params)
    for key, g in flat.items():  # every branch of every block, the head too
        assert np.abs(g).max() > 0, key
    assert any(".rbr_identity." in k for k in flat) and any(".rbr_1x1." in k for k in flat)

    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt):
        loss, g = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, g)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(4)]
    assert np.isfinite(losses).all() and losses[-1] < float(loss)
    after = bf.export_state(model)
    for key in ("stage1.0.rbr_dense.bn.running_mean", "stage2.1.rbr_identity.running_var"):
        assert not np.allclose(after[key], before[key]), key  # BN stats updated
    assert not np.allclose(after["stage2.1.rbr_1x1.conv.weight"], before["stage2.1.rbr_1x1.conv.weight"])

    xin = model_input(name, batch=2, seed=5)
    expected = oracle.forward(spec, after, xin, "train")
    y_train = bf.predict(model, xin)
    deploy = bf.reparameterize(model)
    y_deploy = bf.predict(deploy, xin)
    tol = model_tolerance(spec)
    assert rel_err(y_train, expected) <= tol and rel_err(y_deploy, expected) <= tol


def test_repvggplus_aux_heads_and_custom_l2_match_torch() -> None:
    spec = _tiny_plus()
    state = random_state(spec, "train", 7)
    fm = bf.load_state(nnx.eval_shape(lambda: bf.RepVGGplus(spec)), state)
    tm = bt.load_state(bt.RepVGGplus(spec), state).eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        t_out = tm.forward_with_aux(torch.from_numpy(x))
    f_out = nnx.jit(lambda m, v: m.forward_with_aux(v))(bf.inference_view(fm), jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert set(f_out) == {"main", "stage1_aux", "stage2_aux", "stage3_first_aux"} == set(t_out)
    for k in f_out:
        assert rel_err(np.asarray(f_out[k]), t_out[k].numpy()) <= 1e-5, k
    np.testing.assert_allclose(np.asarray(f_out["main"]), bf.predict(fm, x), rtol=1e-5, atol=1e-6)

    l2 = nnx.jit(lambda m: m.custom_l2())(fm)
    assert float(l2) == pytest.approx(float(tm.custom_l2().detach()), rel=1e-5)
    grads = nnx.jit(nnx.grad(lambda m: m.custom_l2()))(fm)
    g = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    assert np.abs(g["stage1.blocks.1.rbr_dense.conv.kernel"]).max() > 0
    assert np.abs(g["stage1.blocks.1.rbr_1x1.conv.kernel"]).max() > 0
    # BN scales are detached in the penalty
    assert np.abs(g["stage1.blocks.1.rbr_identity.scale"]).max() == 0

    deploy = bf.reparameterize(fm)
    assert not hasattr(deploy, "stage1_aux")
    assert rel_err(bf.predict(deploy, x), oracle.forward(spec, state, x, "train")) <= 1e-4
    with pytest.raises(ReparamError, match="train form only"):
        deploy.custom_l2()
    with pytest.raises(ReparamError, match="train form only"):
        deploy.forward_with_aux(jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ReparamError, match="train form only"):
        deploy.stage0.custom_l2()
