"""Idempotence: re-parameterizing a deploy model is a no-op (the same object, same weights) in
the torch and flax backends, and the train-form-only API (RepVGGplus.custom_l2) on a deploy model
raises a clear ReparamError. (MegEngine: not covered here -- its backend lives behind the worker
process in .venv-mge; see backends/megengine tests.)"""

from __future__ import annotations

import numpy as np
import pytest

from parity_tests.backend_rule import require_module
from reparam_core import get_spec, random_state
from reparam_core.errors import ReparamError

BACKENDS = ["torch", "flax"]


def backend(name, config):
    require_module(config, name)
    return require_module(config, f"backends.{name}")


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("model", ["RepVGG-mini", "repghostnet_0_5x"])
def test_reparameterize_deploy_is_a_no_op(name, model, pytestconfig):
    be = backend(name, pytestconfig)
    spec = get_spec(model, 10)
    m = be.create_model(model, num_classes=10, deploy=False)
    be.load_state(m, random_state(spec, "train", seed=1))
    d = be.reparameterize(m)
    assert d.deploy and d is not m and m.deploy is False
    before = be.export_state(d)
    assert be.reparameterize(d) is d
    assert d.reparameterize() is d
    after = be.export_state(d)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert np.array_equal(be.predict(d, x), be.predict(be.reparameterize(d), x))


@pytest.mark.parametrize("name", BACKENDS)
def test_custom_l2_on_deploy_repvggplus_raises(name, pytestconfig):
    be = backend(name, pytestconfig)
    m = be.create_model("RepVGGplus-L2pse", num_classes=10, deploy=True)
    with pytest.raises(ReparamError, match="train form only"):
        m.custom_l2()
