"""The uninterrupted digits run shared by the resume and porting tests."""
from __future__ import annotations

import pytest
from train_testutil import run_train

# 3 epochs of 22 steps (1,437 training digits, global batch 64), augmentation on
RUN = ("--epochs", "3", "--global-batch", "64")


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    run_train(out, *RUN)
    return out
