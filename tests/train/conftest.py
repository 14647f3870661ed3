"""The runs shared by several `reparam train` test files: the uninterrupted digits run (resume
and porting tests) and a PyTorch run from a given --init state (the other trainers' steps are
compared to it)."""

from __future__ import annotations

import pytest
from train_testutil import INIT_STEPS, MODEL, run_train

from reparam_core.formats.safetensors_io import save_file

# 3 epochs of 22 steps (1,437 training digits, global batch 64), augmentation on
RUN = ("--epochs", "3", "--global-batch", "64")


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    run_train(out, *RUN)
    return out


@pytest.fixture(scope="session")
def init_file(tmp_path_factory):
    """A neutral train-form state: PyTorch's initialisation under torch.manual_seed(7)."""
    import torch

    import backends.torch as bt

    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("init") / "init.safetensors"
    save_file(bt.export_state(bt.create_model(MODEL, num_classes=10)), path)
    return path


@pytest.fixture(scope="session")
def torch_from_init(init_file, tmp_path_factory):
    """The PyTorch trainer's INIT_STEPS from init_file."""
    out = tmp_path_factory.mktemp("torch-init")
    run_train(out, "--framework", "torch", "--init", str(init_file), *INIT_STEPS)
    return out
