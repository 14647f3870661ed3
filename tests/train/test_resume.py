"""Checkpoints: SIGKILL during an epoch, then --resume, ends with the weights of the
uninterrupted run (bit for bit) and the same metrics; SIGTERM mid-epoch writes a checkpoint
there (exit 143) and --resume from it does too."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest
from train_testutil import MODEL, ROOT, command, env, metrics, run_train, trained

from conftest import RUN
from reparam_core.formats.safetensors_io import load_file

STEPS_PER_EPOCH = 22


def _start(out):
    return subprocess.Popen(
        command(out, *RUN), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _checkpoint_step(out) -> int:
    return json.loads(load_file(out / "checkpoint.safetensors")[1]["reparam_train"])["step"]


def _wait_for_checkpoint(proc, out, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (out / "checkpoint.safetensors").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.01)


def _same_run(out, reference) -> None:
    resumed, _ = trained(out)
    expected, _ = trained(reference)
    assert set(resumed) == set(expected)
    for k in expected:
        assert np.array_equal(resumed[k], expected[k]), k
    keys = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images")
    assert [{k: r[k] for k in keys} for r in metrics(out)] == [{k: r[k] for k in keys} for r in metrics(reference)]


def test_sigkill_then_resume_equals_uninterrupted(digits_run, tmp_path) -> None:
    out = tmp_path / "killed"
    proc = _start(out)
    _wait_for_checkpoint(proc, out)  # written at the end of epoch 1: epoch 2 is running
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / f"{MODEL}-train.safetensors").exists(), "the run finished before the kill"
    step = _checkpoint_step(out)
    assert step % STEPS_PER_EPOCH == 0 and step < 3 * STEPS_PER_EPOCH
    run_train(out, *RUN, "--resume")
    _same_run(out, digits_run)


@pytest.mark.slow  # ~10 s alone, 30 s on a loaded machine: kept out of the 4-minute default run
def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(digits_run, tmp_path) -> None:
    out = tmp_path / "terminated"
    proc = _start(out)
    _wait_for_checkpoint(proc, out)
    first = _checkpoint_step(out)
    time.sleep(0.3)  # a few steps into epoch 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    step = _checkpoint_step(out)
    assert first < step < 3 * STEPS_PER_EPOCH and step % STEPS_PER_EPOCH != 0, step
    run_train(out, *RUN, "--resume")
    _same_run(out, digits_run)


def test_resume_refuses_other_settings(digits_run, tmp_path) -> None:
    out = tmp_path / "other"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes((digits_run / "checkpoint.safetensors").read_bytes())
    proc = run_train(out, "--epochs", "3", "--global-batch", "32", "--resume", check=False)
    assert proc.returncode == 2 and "other settings (" in proc.stderr and "global_batch" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_flax_sigkill_then_resume_equals_uninterrupted(tmp_path) -> None:
    args = ("--framework", "flax", "--epochs", "2", "--global-batch", "64")
    reference = tmp_path / "reference"
    run_train(reference, *args)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        command(out, *args), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (out / f"{MODEL}-train.safetensors").exists(), "the run finished before the kill"
    assert _checkpoint_step(out) == STEPS_PER_EPOCH
    run_train(out, *args, "--resume")
    _same_run(out, reference)
