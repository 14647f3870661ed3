"""`reparam train --framework megengine` (one process in .venv-mge, driven from .venv):

- from the same --init state, 2 steps without augmentation (recipe lr with warm-up, weight
  decay, label smoothing, Nesterov momentum, EMA) end with the PyTorch trainer's weights, BN
  running statistics, momentum buffers and EMA;
- SIGTERM mid-epoch (checkpoint), then --resume, ends with the uninterrupted run's weights,
  EMA and metrics, bit for bit;
- the trained deploy file predicts what the train form does (in MegEngine);
- settings it does not have are refused before anything starts (exit 2, one line).
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from train_testutil import INIT_STEPS, MODEL, ROOT, env, max_rel_diff, metrics, run_train, trained

from backends.megengine.remote import mge_python
from parity_tests.backend_rule import missing_backend
from reparam_core import training as tr
from reparam_core.formats.safetensors_io import load_file


@pytest.fixture(autouse=True, scope="module")
def _megengine_environment(pytestconfig) -> None:
    """Every test here runs the MegEngine trainer: without its environment they fail (under CI, or
    without --allow-missing-backend), never skip silently."""
    if not mge_python().exists():
        missing_backend(pytestconfig, f"MegEngine environment not found ({mge_python()})")


# Weights and BN statistics after 2 steps: largest per-tensor relative difference 3.1e-5
# (measured; PyTorch against itself with 1 or 2 OpenMP threads: 1e-6). MegEngine's CPU gradients
# are less exact than PyTorch's (against a float64 PyTorch reference: 3e-5 at batch 16, but up to
# 6% at batch 64 for some kernels, measured), and training amplifies the difference, so the
# comparison is kept to 2 steps at batch 16.
REL_TOL = 1e-4
# Momentum buffers: the gradient of stage0's 1x1 kernel is a near-cancelling sum (1e-3 of the
# other kernels' gradients), 1% off per tensor; so the buffers are compared as one vector
# (measured 1.4e-5).
BUFFER_TOL = 1e-4
RUN = ("--framework", "megengine", "--max-steps", "8", "--global-batch", "64", "--ema", "0.5")
STOP_AT = 5  # SIGTERM during step 5 (of 22 in the epoch): a mid-epoch checkpoint


@pytest.fixture(scope="module")
def mge_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mge")
    run_train(out, *RUN)
    return out


def _checkpoint(out, prefix: str) -> dict[str, np.ndarray]:
    arrays, _ = load_file(out / "checkpoint.safetensors")
    return {
        k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix) and not k.endswith("num_batches_tracked")
    }


def _vector_rel_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """||a - b|| / ||b|| over all tensors as one vector."""
    assert set(a) == set(b)
    num = sum(float(np.square(a[k].astype(np.float64) - b[k]).sum()) for k in b)
    return (num / sum(float(np.square(b[k].astype(np.float64)).sum()) for k in b)) ** 0.5


def test_megengine_steps_equal_torch_steps(init_file, torch_from_init, tmp_path) -> None:
    torch_out, mge_out = torch_from_init, tmp_path / "megengine"
    run_train(mge_out, "--framework", "megengine", "--init", str(init_file), *INIT_STEPS)
    init, _ = load_file(init_file)
    weights = _checkpoint(mge_out, "model.")
    for key in ("stage1.0.rbr_dense.conv.weight", "stage0.rbr_dense.bn.running_var"):
        assert np.abs(weights[key] - init[key]).max() > 1e-3, key  # the steps moved them
    for prefix in ("model.", "ema."):  # weights and BN statistics, their EMA
        rel, key = max_rel_diff(_checkpoint(mge_out, prefix), _checkpoint(torch_out, prefix))
        assert rel <= REL_TOL, (prefix, key, rel)
    assert _vector_rel_diff(_checkpoint(mge_out, "opt."), _checkpoint(torch_out, "opt.")) <= BUFFER_TOL
    rel, key = max_rel_diff(trained(mge_out)[0], trained(torch_out)[0])  # the final (EMA) files
    assert rel <= REL_TOL, (key, rel)
    (m,), (t,) = metrics(mge_out), metrics(torch_out)
    assert m["step"] == t["step"] == 2 and m["images"] == t["images"] == 32
    assert m["train_loss"] == pytest.approx(t["train_loss"], rel=1e-5)
    assert m["val_acc"] == pytest.approx(t["val_acc"], abs=1 / 359 + 1e-9)  # one digit at most


_STOP_SCRIPT = """
import json, os, signal, sys
from backends.megengine.train import train
from reparam_core import training as tr

def on_step(done, total, loss, images):
    if done == {stop}:
        os.kill(os.getpid(), signal.SIGTERM)

cfg = tr.TrainConfig(**json.loads(sys.argv[1]))
summary = train(cfg, tr.read_dataset(sys.argv[2]), on_step=on_step)
print(json.dumps({{"steps": summary["steps"], "stopped": summary["stopped"]}}))
"""


def test_sigterm_then_resume_equals_uninterrupted(mge_run, tmp_path) -> None:
    out = tmp_path / "stopped"
    out.mkdir()
    data = tr.load_digits(32)
    tr.save_dataset(tmp_path / "digits.safetensors", data)
    cfg = tr.TrainConfig(model=MODEL, out=str(out), framework="megengine", max_steps=8, global_batch=64, ema=0.5)
    proc = subprocess.run(
        [
            str(mge_python()),
            "-c",
            _STOP_SCRIPT.format(stop=STOP_AT),
            json.dumps(vars(cfg)),
            str(tmp_path / "digits.safetensors"),
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"steps": STOP_AT, "stopped": True}
    progress = json.loads(load_file(out / "checkpoint.safetensors")[1]["reparam_train"])
    assert progress["step"] == STOP_AT and progress["sums"]["seen"] == STOP_AT * 64
    assert not (out / f"{MODEL}-train.safetensors").exists()
    run_train(out, *RUN, "--resume")
    resumed, expected = trained(out)[0], trained(mge_run)[0]
    assert set(resumed) == set(expected)
    for k in expected:
        assert np.array_equal(resumed[k], expected[k]), k
    keys = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images")
    assert [{k: r[k] for k in keys} for r in metrics(out)] == [{k: r[k] for k in keys} for r in metrics(mge_run)]


def test_deploy_file_predicts_as_train_form(mge_run) -> None:
    from backends.megengine.remote import shared

    x, y = tr.load_digits(32).val()
    train_state, meta = trained(mge_run, "train")
    deploy_state, deploy_meta = trained(mge_run, "deploy")
    assert meta["producer"] == "reparam train (megengine)" and deploy_meta["form"] == "deploy"
    worker = shared()
    ref = worker.predict(model=MODEL, num_classes=10, form="train", state=train_state, x=x)
    out = worker.predict(model=MODEL, num_classes=10, form="deploy", state=deploy_state, x=x)
    assert np.array_equal(out.argmax(1), ref.argmax(1))
    assert np.abs(out - ref).max() < 1e-4
    accuracy = float((ref.argmax(1) == y).mean())
    assert accuracy == pytest.approx(metrics(mge_run)[-1]["val_acc_ema"], abs=1e-9)  # EMA weights
    assert accuracy > 0.2  # 8 steps start to learn the digits (chance: 10%)


@pytest.mark.parametrize("flags, named", [(("--nproc", "2"), "--nproc"), (("--amp", "bf16"), "--amp bf16")])
def test_unsupported_settings_exit_2(tmp_path, flags, named) -> None:
    proc = run_train(tmp_path / "x", "--framework", "megengine", "--max-steps", "1", *flags, check=False)
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("framework", ["megengine", "flax"])
def test_init_refused_before_start(tmp_path, framework) -> None:
    proc = run_train(
        tmp_path / "x",
        "--framework",
        framework,
        "--max-steps",
        "1",
        "--init",
        str(tmp_path / "missing.safetensors"),
        check=False,
    )
    assert proc.returncode == 2 and "--init: no file" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "x").exists()
