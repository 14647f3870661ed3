"""The recipe in each backend: which parameters get plain weight decay (none of BN and biases;
for RepVGGplus, not the kernels its custom L2 covers), the same set in PyTorch and Flax, and
the Flax update rule equal to PyTorch's SGD (Nesterov, weight decay) step for step."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import backends.flax as bf
import backends.torch as bt
from backends.flax.train import _decay_mask, _key
from backends.torch.train import _optimizer
from reparam_core import training as tr
from reparam_core.blocks.schema import state_schema
from reparam_core.families.specs import repvgg_spec
from reparam_core.weights.layouts import flax_key

PLUS_MINI = repvgg_spec(
    "RepVGGplus-mini", (1, 2, 2, 1), (0.25, 0.25, 0.25, 0.5), se="post", se_divisor=4, num_classes=10, plus=True
)


def _torch_decayed(model: torch.nn.Module, decayed_keys: set[str]) -> set[str]:
    opt = _optimizer(model, tr.TrainConfig(model="m", wd=1e-4), decayed_keys)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 1e-4 and opt.param_groups[1]["weight_decay"] == 0
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    return {n for n, p in model.named_parameters() if id(p) in decayed}


@pytest.mark.parametrize("spec", [PLUS_MINI, None], ids=["RepVGGplus-mini", "RepVGG-mini"])
def test_weight_decay_sets_agree_between_backends(spec) -> None:
    tm = bt.RepVGGplus(spec) if spec is not None else bt.create_model("RepVGG-mini", num_classes=10)
    spec = tm.spec
    kernels = tr.custom_l2_kernels(spec)
    decayed = _torch_decayed(tm, tr.decayed_keys(spec))
    conv_weights = {
        k for k, info in state_schema(spec, "train").items() if k.endswith(".weight") and len(info.shape) > 1
    }
    assert decayed == conv_weights - kernels
    if spec is PLUS_MINI:
        assert kernels and not decayed & kernels
        assert any(".post_se." in k for k in decayed) and any("_aux." in k for k in decayed)
    fm = bf.load_state(
        nnx.eval_shape(lambda: bf.RepVGGplus(spec))
        if spec is PLUS_MINI
        else bf.empty_model("RepVGG-mini", num_classes=10),
        bt.export_state(tm),
    )
    schema = state_schema(spec, "train")
    mask = _decay_mask(nnx.state(fm, nnx.Param), {flax_key(k, schema[k]) for k in tr.decayed_keys(spec)})
    flax_decayed = {_key(path) for path, on in jax.tree_util.tree_flatten_with_path(mask)[0] if on}
    assert flax_decayed == {flax_key(k, schema[k]) for k in decayed}


def test_flax_update_rule_equals_torch_sgd() -> None:
    """Three steps on one tensor with fixed gradients: torch.optim.SGD(nesterov, weight decay)
    and optax (add_decayed_weights, trace(nesterov), -lr) give the same parameters."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((4, 3)).astype(np.float32)
    grads = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(3)]
    lrs = [0.1, 0.05, 0.02]
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    tx = optax.chain(optax.add_decayed_weights(0.01), optax.trace(decay=0.9, nesterov=True))
    w, state = w0.copy(), tx.init(w0)
    for g, lr in zip(grads, lrs):
        p.grad = torch.from_numpy(g)
        opt.param_groups[0]["lr"] = lr
        opt.step()
        u, state = tx.update(g, state, w)
        w = w - lr * np.asarray(u)
    np.testing.assert_allclose(w, p.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert np.abs(w - w0).max() > 0.01
