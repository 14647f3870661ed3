"""MegEngine side of `reparam bench` (.venv-mge): the plain reference and the traced fast paths
compute what the deploy form computes, so the comparison is fair."""

from __future__ import annotations

import megengine.module as M
import numpy as np
import pytest

from backends.megengine.bench import MegEngineBench, PlainNet, plain_model
from reparam_core import get_spec, random_state
from reparam_core.bench.plan import BenchConfig, rel_err


@pytest.fixture(scope="module")
def bench() -> MegEngineBench:
    b = MegEngineBench()
    b.setup(None)
    return b


@pytest.mark.parametrize("name", ["RepVGG-A0", "RepVGG-B1g4"])
def test_plain_reference_and_traced_equal_deploy_form(bench: MegEngineBench, name: str) -> None:
    train = bench.build(name, "train", random_state(get_spec(name), "train", seed=3))
    deploy = bench.reparameterize(train)
    plain = plain_model(name, bench.export_state(deploy))
    kinds = {type(m) for m in plain.modules()}
    assert kinds <= {PlainNet, M.Sequential, M.Conv2d, M.ReLU, M.AdaptiveAvgPool2d, M.Linear}
    convs = [m for m in plain.modules() if isinstance(m, M.Conv2d)]
    assert len(convs) == len(get_spec(name).blocks())
    if name == "RepVGG-B1g4":  # grouped weights are MegEngine's 5-D layout
        assert {c.weight.ndim for c in convs} == {4, 5}
    x = np.random.default_rng(0).standard_normal((2, 3, 33, 33)).astype(np.float32)
    y_deploy = bench.predict(deploy, x)
    assert rel_err(bench.predict(plain, x), y_deploy) < 1e-6
    assert rel_err(bench.predict(train, x), y_deploy) < 1e-5
    fast = bench.fast_paths({"train": train, "deploy": deploy, "plain": plain}, x, BenchConfig())
    assert set(fast) == {"train/traced", "deploy/traced", "plain/traced"}
    for path in fast.values():
        assert rel_err(path.output, y_deploy) < 1e-5 and path.compile_s > 0
        assert rel_err(path.fn(), y_deploy) < 1e-5


def test_plain_weights_are_really_written(bench: MegEngineBench) -> None:
    """MegEngine has no .data: a silently skipped write would leave the random init."""
    state = random_state(get_spec("RepVGG-A0"), "deploy", seed=5)
    plain = plain_model("RepVGG-A0", state)
    conv = next(m for m in plain.modules() if isinstance(m, M.Conv2d))
    np.testing.assert_array_equal(conv.weight.numpy(), state["stage0.rbr_reparam.weight"])
    np.testing.assert_array_equal(conv.bias.numpy().reshape(-1), state["stage0.rbr_reparam.bias"])
