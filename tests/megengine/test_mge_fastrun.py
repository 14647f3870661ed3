"""MegEngine fastrun (profiled kernel selection): same outputs as the default heuristic kernels
within float rounding, eager and through the traced artifact; the global setting is restored."""

from __future__ import annotations

import megengine as mge
import pytest
from mge_testutil import rand_input, rel_err

from backends.megengine import create_model, export_traced, fastrun, load_state, predict, reparameterize, run_traced
from reparam_core import get_spec, random_state

FASTRUN_RTOL = 1e-5  # another algorithm (Winograd, im2col, direct) sums in another order


@pytest.mark.parametrize(
    "name,size",
    [
        ("RepVGG-mini", 32),
        # profiling every depthwise shape of a fresh machine takes ~70 s on 2 cores
        pytest.param("repghostnet_0_5x", 32, marks=pytest.mark.slow),
    ],
)
def test_fastrun_equals_default(tmp_path, name: str, size: int) -> None:
    spec = get_spec(name, 10)
    train = load_state(create_model(name, num_classes=10), random_state(spec, "train", 2))
    deploy = reparameterize(train)
    x = rand_input((2, 3, size, size))
    y = predict(deploy, x)
    assert mge.config.benchmark_kernel is False
    y_fast = predict(deploy, x, fastrun=True)
    assert mge.config.benchmark_kernel is False  # restored
    assert rel_err(y_fast, y) <= FASTRUN_RTOL
    path = export_traced(deploy, tmp_path / "m.mge", input_shape=x.shape)
    assert rel_err(run_traced(path, x, fastrun=True), y) <= FASTRUN_RTOL


def test_fastrun_context_sets_and_restores_profiling() -> None:
    with fastrun():
        assert mge.config.benchmark_kernel is True
        with fastrun(False):
            assert mge.config.benchmark_kernel is True  # disabled: changes nothing
    assert mge.config.benchmark_kernel is False
