"""The trained multi-branch model (the uninterrupted digits run) converts to deploy form and
gives identical predictions on the validation split in PyTorch, Flax and MegEngine (through the
worker in .venv-mge), in both forms, and from the deploy file the trainer wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest
from train_testutil import MODEL, metrics, trained

from reparam_core import training as tr

LOGIT_ATOL = 1e-4  # float32 logits of the same weights in different frameworks


@pytest.fixture(scope="module")
def val():
    data = tr.load_digits(32)
    # the fixed split: round(20%) of every class (1,797 digits: 359 validation images)
    assert len(data.val_idx) == sum(round(0.2 * n) for n in np.bincount(data.labels)) == 359
    return data.val()


def test_trained_model_ports_to_every_framework(digits_run, val) -> None:
    import backends.flax as bf
    import backends.torch as bt
    from backends.megengine.remote import shared

    x, y = val
    train_state, meta = trained(digits_run, "train")
    deploy_state, deploy_meta = trained(digits_run, "deploy")
    assert meta["form"] == "train" and deploy_meta["form"] == "deploy"
    assert json.loads(meta["data"])["n_val"] == len(y)
    torch_train = bt.load_state(bt.create_model(MODEL, num_classes=10), train_state)
    ref = bt.predict(torch_train, x)
    accuracy = float((ref.argmax(1) == y).mean())
    assert accuracy == pytest.approx(metrics(digits_run)[-1]["val_acc"], abs=1e-9)
    assert accuracy > 0.8  # 3 epochs learn the digits (chance: 10%)
    flax_train = bf.load_state(bf.empty_model(MODEL, num_classes=10), train_state)
    worker = shared()
    logits = {
        "torch/deploy (reparameterized)": bt.predict(bt.reparameterize(torch_train), x),
        "torch/deploy (file)": bt.predict(
            bt.load_state(bt.create_model(MODEL, num_classes=10, deploy=True), deploy_state), x
        ),
        "flax/train": bf.predict(flax_train, x),
        "flax/deploy (reparameterized)": bf.predict(bf.reparameterize(flax_train), x),
        "flax/deploy (file)": bf.predict(
            bf.load_state(bf.empty_model(MODEL, num_classes=10, deploy=True), deploy_state), x
        ),
        "megengine/train": worker.predict(model=MODEL, num_classes=10, form="train", state=train_state, x=x),
        "megengine/deploy (reparameterized)": worker.predict(
            model=MODEL, num_classes=10, form="train", state=train_state, x=x, reparameterize=True
        ),
        "megengine/deploy (file)": worker.predict(model=MODEL, num_classes=10, form="deploy", state=deploy_state, x=x),
    }
    for name, out in logits.items():
        assert np.array_equal(out.argmax(1), ref.argmax(1)), name
        assert np.abs(out - ref).max() < LOGIT_ATOL, (name, float(np.abs(out - ref).max()))
