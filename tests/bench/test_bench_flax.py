"""Flax side of `reparam bench`: the plain reference and the jitted fast paths are fair."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from backends.flax.bench import FlaxBench, PlainNet, plain_model
from reparam_core import get_spec, random_state
from reparam_core.bench.plan import BenchConfig, rel_err


@pytest.mark.parametrize("name", ["RepVGG-A0", "RepVGG-B1g4"])
def test_plain_reference_and_jit_equal_deploy_form(name: str) -> None:
    bench = FlaxBench()
    train = bench.build(name, "train", random_state(get_spec(name), "train", seed=3))
    deploy = bench.reparameterize(train)
    plain = plain_model(name, bench.export_state(deploy))
    # written with Flax's own layers only: no reparam module inside
    kinds = {type(m) for _, m in nnx.iter_graph(plain) if isinstance(m, nnx.Module)}
    assert kinds <= {PlainNet, nnx.List, nnx.Conv, nnx.Linear}
    assert len(plain.convs) == len(get_spec(name).blocks())
    x = np.random.default_rng(0).standard_normal((2, 3, 33, 33)).astype(np.float32)  # odd: s2 pads
    y_deploy = bench.predict(deploy, x)
    assert rel_err(bench.predict(plain, x), y_deploy) < 1e-6
    assert rel_err(bench.predict(train, x), y_deploy) < 1e-5
    fast = bench.fast_paths({"train": train, "deploy": deploy, "plain": plain}, x, BenchConfig())
    assert set(fast) == {"train/jit", "deploy/jit", "plain/jit"}
    for path in fast.values():
        assert rel_err(path.output, y_deploy) < 1e-5 and path.compile_s > 0
        assert rel_err(np.asarray(path.fn()), y_deploy) < 1e-5
