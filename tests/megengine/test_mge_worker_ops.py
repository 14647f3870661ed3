"""The worker's `run_traced` and `time` operations through their client (MgeWorker), which
`reparam demo` uses for the traced artifact's outputs and MegEngine's throughput."""

from __future__ import annotations

import pytest
from mge_testutil import model_tolerance, rand_input, rel_err

from backends.megengine.remote import MgeWorker
from reparam_core import get_spec, random_state, reparameterize_state
from reparam_core.blocks import oracle
from reparam_core.errors import ReparamError

MODEL = "RepVGG-mini"


@pytest.fixture(scope="module")
def worker():
    with MgeWorker() as w:
        yield w


@pytest.fixture(scope="module")
def state():
    return random_state(get_spec(MODEL, 10), "train", 4)


def test_run_traced_any_batch(worker, state, tmp_path):
    """An artifact traced at batch 1 runs on a batch of 5 and gives the deploy form's logits."""
    spec = get_spec(MODEL, 10)
    deploy = reparameterize_state(spec, state)
    art = tmp_path / "mini.mge"
    first = worker.export_traced(
        model=MODEL, num_classes=10, form="deploy", state=deploy, x=rand_input((1, 3, 32, 32)), artifact=art
    )
    x = rand_input((5, 3, 32, 32), seed=2)
    y = worker.run_traced(art, x)
    ref = oracle.forward(spec, state, x, "train")
    # measured 3.4e-7 (batch 5) and 2.3e-7 (batch 1); model_tolerance: 1.7e-5 (7 convs)
    tol = model_tolerance(spec)
    assert y.shape == (5, 10) and rel_err(y, ref) <= tol
    assert rel_err(first, oracle.forward(spec, state, rand_input((1, 3, 32, 32)), "train")) <= tol
    with pytest.raises(ReparamError, match="FileNotFoundError"):
        worker.run_traced(tmp_path / "missing.mge", x)


def test_time_forms(worker, state):
    """`repeats` timed rounds of each form, every one a positive number of seconds; a deploy-form
    state is refused (the op re-parameterizes the train form itself)."""
    x = rand_input((4, 3, 32, 32))
    times = worker.time_forms(model=MODEL, num_classes=10, state=state, x=x, repeats=3, warmup=0)
    assert set(times) == {"train", "deploy"}
    assert all(len(v) == 3 and all(t > 0 for t in v) for v in times.values()), times
    with pytest.raises(ReparamError, match="train form"):
        worker.request(
            op="time", model=MODEL, block=None, num_classes=10, form="deploy", state="unused", input="unused", repeats=1
        )
    assert worker.request(op="ping")["ok"] is True  # still serving
