"""Flax data parallel: the same 5 steps on 2 host devices (the batch sharded, the parameters
replicated, BN statistics over the global batch) and on 1 device give the same weights and BN
statistics. Each run is a subprocess: XLA_FLAGS must be set before JAX starts."""

from __future__ import annotations

import numpy as np
import pytest
from train_testutil import max_rel_diff, metrics, run_train, trained

RTOL = 1e-5
COMMON = ("--framework", "flax", "--max-steps", "5", "--global-batch", "16", "--no-augment")


def test_two_devices_equal_one(tmp_path) -> None:
    runs = {}
    for n in (1, 2):
        runs[n] = tmp_path / f"dev{n}"
        run_train(runs[n], *COMMON, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        assert [r["processes"] for r in metrics(runs[n])] == [n]
    one, meta = trained(runs[1])
    two, _ = trained(runs[2])
    assert "flax" in meta["producer"]
    rel, key = max_rel_diff(two, one)
    assert rel <= RTOL, (key, rel)
    assert not np.allclose(one["stage1.0.rbr_dense.bn.running_mean"], 0.0)
    assert metrics(runs[2])[0]["train_loss"] == pytest.approx(metrics(runs[1])[0]["train_loss"], rel=1e-5)
