"""The library's surface on the families described with the issue-26 nodes (FastViT, RepViT,
UniRepLKNet), with no code of their own behind it: `reparam info` (the stage table, parameters
and MACs in both forms), `reparam verify` (every backend's train and deploy form against the
float64 oracle; with --artifacts the ONNX, traced .mge and StableHLO files, attention included),
the trainers' weight-decay rule (by role: LayerNorm, GRN, layer scales, Bias nodes and BN1d are
never decayed, whatever their official shape, in every trainer), synchronised BN over BN1d,
`reparam train` steps that agree across PyTorch, Flax and MegEngine, and `reparam bench` rows.

Sizes are small (32 or 64 pixels, batch 1..16, 2 steps); the whole-model runs are subprocesses or
the parity harness, one model at a time. The step agreement of FastViT-T8 and RepViT-M0.9, the
benchmark and the artifact check (which the parity matrix makes in CI for the same two models)
are slow-marked (--slow): minutes each, mostly Flax's compilation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backends.megengine.remote import mge_python
from parity_tests.backend_rule import missing_backend
from reparam_core import count_macs, count_params, get_spec, random_state, state_schema
from reparam_core import training as tr
from reparam_core.formats.safetensors_io import load_file, save_file
from reparam_core.weights.layouts import flax_key
from scripts.cli import main

pytestmark = pytest.mark.release_memory_per_test

ROOT = Path(__file__).resolve().parents[2]

MODELS = ("FastViT-T8", "RepViT-M0.9", "UniRepLKNet-A")
# the deploy artifacts: attention (FastViT-SA12) and UniRepLKNet's pointwise Linear / GRN / LayerNorm
ARTIFACT_MODELS = ("FastViT-SA12", "UniRepLKNet-A")
BACKENDS = ("torch", "flax", "megengine")
# the parameters that plain weight decay must leave alone, by schema role (whatever their shape)
NOT_DECAYED = {
    "FastViT-SA12": {"bn.weight", "bn.bias", "scale.weight"},
    "RepViT-M0.9": {"bn.weight", "bn.bias", "conv.bias", "linear.bias"},
    "UniRepLKNet-A": {"layernorm.weight", "layernorm.bias", "grn.gamma", "bias.bias", "scale.weight"},
}


def _env() -> dict[str, str]:
    """The subprocesses' environment: this checkout first, one OpenMP thread per process."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    e.pop("TORCHELASTIC_RUN_ID", None)
    return e


@pytest.fixture
def megengine_env(pytestconfig: pytest.Config) -> None:
    if not mge_python().exists():
        missing_backend(pytestconfig, f"MegEngine environment not found ({mge_python()})")


def _reparam(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `reparam ARGV` run in this process."""
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


# --------------------------------------------------------------------------- reparam info


@pytest.mark.parametrize("name", (*MODELS, "FastViT-SA12"))
def test_info_prints_stages_parameters_and_macs(capsys: pytest.CaptureFixture[str], name: str) -> None:
    status, out, err = _reparam(capsys, ["info", name])
    assert status == 0 and not err, err
    spec = get_spec(name)
    train, deploy = count_params(spec, "train"), count_params(spec, "deploy")
    assert deploy < train
    lines = out.splitlines()
    params = next(ln for ln in lines if ln.startswith("parameters"))
    assert params.split() == ["parameters", f"{train / 1e6:.2f}", "M", f"{deploy / 1e6:.2f}", "M"]
    macs = next(ln for ln in lines if ln.startswith("MACs @224"))
    t, d = count_macs(spec, "train", 224), count_macs(spec, "deploy", 224)
    assert 0 < d <= t and macs.split()[2:] == [f"{t / 1e9:.3f}", "G", f"{d / 1e9:.3f}", "G"]
    # the stage table: one row per run of blocks, channels chained from the 3 input channels on
    header = lines.index(next(ln for ln in lines if ln.startswith("stage ")))
    rows = [ln.split() for ln in lines[header + 1 : lines.index("", header)]]
    assert rows and len({r[0] for r in rows}) == len(rows)  # stage names distinct
    chain = [tuple(int(c) for c in r[2].split("->")) for r in rows]
    assert chain[0][0] == 3 and all(a[1] == b[0] for a, b in zip(chain, chain[1:]))
    assert all(len(r[3].split(",")) == int(r[1]) for r in rows)  # one stride per block


# --------------------------------------------------------------------------- reparam verify


def _verify(capsys: pytest.CaptureFixture[str], tmp_path: Path, models: tuple[str, ...], *flags: str) -> list[dict]:
    out_json = tmp_path / "verify.json"
    status, out, err = _reparam(
        capsys, ["verify", "--models", ",".join(models), "--no-blocks", *flags, "--json", str(out_json)]
    )
    assert status == 0, out + err
    report = json.loads(out_json.read_text())
    assert report["unavailable"] == {}
    return report["cases"]


def test_verify_every_backend_agrees(capsys: pytest.CaptureFixture[str], tmp_path: Path, megengine_env: None) -> None:
    cases = _verify(capsys, tmp_path, MODELS, "--size", "32")
    assert sorted(c["case"]["model"] for c in cases) == sorted(MODELS)
    for case in cases:
        cells = {(c["backend"], c["form"]): c["rel_err"] for c in case["cells"]}
        assert set(cells) == {(b, f) for b in BACKENDS for f in ("train", "deploy")}
        assert case["ok"] and not case["failures"], case
        assert max(cells.values()) <= case["tolerance"]


@pytest.mark.slow  # in CI the parity matrix exports and checks these two models' artifacts
def test_deploy_artifacts_match_the_oracle(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, megengine_env: None
) -> None:
    """ONNX (torch, run in ONNX Runtime), traced .mge (MegEngine) and StableHLO (Flax) of the
    deploy form at 1x3x64x64, each against the float64 oracle of the train form."""
    cases = _verify(capsys, tmp_path, ARTIFACT_MODELS, "--size", "64", "--artifacts")
    assert sorted(c["case"]["model"] for c in cases) == sorted(ARTIFACT_MODELS)
    for case in cases:
        assert case["case"]["shape"] == [1, 3, 64, 64]
        cells = {(c["backend"], c["form"]): c["rel_err"] for c in case["cells"]}
        assert {(b, "artifact") for b in BACKENDS} <= set(cells)
        assert case["ok"] and not case["failures"], case
        assert max(cells.values()) <= case["tolerance"]


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", sorted(NOT_DECAYED))
def test_weight_decay_is_by_role_in_every_trainer(name: str) -> None:
    """tr.decayed_keys picks conv and linear weights only; GRN's (1, 1, 1, C) gamma and FastViT's
    (C, 1, 1) layer scales are not decayed although they are not 1-D. The PyTorch optimizer's
    decayed group and the Flax decay mask are exactly that set (MegEngine's groups take the
    canonical keys as they are)."""
    import jax
    from flax import nnx

    import backends.flax.train as flax_train
    import backends.torch.train as torch_train
    from backends.flax.models import create_model as flax_model
    from backends.torch.models import create_model as torch_model

    spec = get_spec(name, 10)
    schema = state_schema(spec, "train")
    decayed = tr.decayed_keys(spec)
    assert decayed == {k for k, t in schema.items() if t.kind in ("conv.weight", "linear.weight")}
    kept = {schema[k].kind for k in schema if k not in decayed and schema[k].learnable}
    assert NOT_DECAYED[name] <= kept
    if name != "RepViT-M0.9":  # some of those have more than one axis in their official shape
        assert any(len(schema[k].shape) > 1 for k in schema if schema[k].kind in NOT_DECAYED[name])

    cfg = tr.TrainConfig(model=name)
    model = torch_model(name, num_classes=10)
    opt = torch_train._optimizer(model, cfg, decayed)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in opt.param_groups[0]["params"]} == decayed
    assert opt.param_groups[0]["weight_decay"] == cfg.wd and opt.param_groups[1]["weight_decay"] == 0.0

    params = nnx.state(flax_model(name, num_classes=10, rngs=nnx.Rngs(0)), nnx.Param)
    mask = flax_train._decay_mask(params, {flax_key(k, schema[k]) for k in decayed})
    assert sum(bool(v) for v in jax.tree_util.tree_leaves(mask)) == len(decayed)


def test_sync_bn_covers_batchnorm1d() -> None:
    """--sync-bn converts RepViT's classifier BatchNorm1d (N x C) as well as every BatchNorm2d,
    keeping the tensors; in one process the converted model computes what the original does."""
    import torch
    from torch import nn

    from backends.torch.models import create_model
    from backends.torch.train import DistBatchNorm1d, DistBatchNorm2d, convert_sync_bn

    torch.manual_seed(0)
    model = create_model("RepViT-M0.9", num_classes=10).train()
    before = {type(m) for m in model.modules()}
    assert {nn.BatchNorm1d, nn.BatchNorm2d} <= before
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    convert_sync_bn(model)
    after = {type(m) for m in model.modules()}
    assert not {nn.BatchNorm1d, nn.BatchNorm2d} & after and {DistBatchNorm1d, DistBatchNorm2d} <= after
    model.load_state_dict(state)  # the statistics the first call moved
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def _train(model: str, out: Path, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "train", "--model", model, "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _checkpoint(out: Path, prefix: str) -> dict[str, np.ndarray]:
    arrays, _ = load_file(out / "checkpoint.safetensors")
    return {
        k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix) and not k.endswith("num_batches_tracked")
    }


# 2 steps at batch 16 without augmentation, from one random --init state (every layer scale, GRN
# gamma and BN far from its default), EMA on; a large weight decay, so that a parameter decayed in
# one trainer and not in another would show (lr 0.1 * 16 / 256 * wd 1: 0.6% per step).
STEPS = ("--max-steps", "2", "--global-batch", "16", "--no-augment", "--ema", "0.5", "--wd", "1")
# Largest per-tensor difference to PyTorch's, relative to max(max |torch|, FLOOR). Measured:
# UniRepLKNet-A 4e-5, FastViT-T8 1.6e-5. RepViT-M0.9 1.0e-2 (MegEngine) and 2.2e-3 (Flax), in
# its second stem conv: at this random init the stem's gradients are ~100x its weights, so the
# float32 gradient differences of one step (median 1e-3 relative in MegEngine, 3e-4 in Flax,
# measured per tensor) show as they are in the weights; a wrong forward or gradient is O(1).
STEP_TOL = {"UniRepLKNet-A": 1e-3, "FastViT-T8": 1e-3, "RepViT-M0.9": 3e-2}
# A tensor whose gradient is zero in exact arithmetic (the bias of a BN followed by another BN)
# moves by float32 noise only; it is compared at the scale of FLOOR.
FLOOR = 1e-3
SLOW_STEPS = pytest.mark.slow


def _worst(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> tuple[float, str]:
    """max over tensors of max |got - ref| / max(max |ref|, FLOOR), and its key."""
    assert set(got) == set(ref)
    return max(
        (float(np.abs(got[k].astype(np.float64) - ref[k]).max()) / max(float(np.abs(ref[k]).max()), FLOOR), k)
        for k in ref
    )


@pytest.mark.parametrize(
    "name",
    ("UniRepLKNet-A", pytest.param("FastViT-T8", marks=SLOW_STEPS), pytest.param("RepViT-M0.9", marks=SLOW_STEPS)),
)
def test_train_steps_agree_across_backends(name: str, tmp_path: Path, megengine_env: None) -> None:
    """From one neutral train-form state, `reparam train` in PyTorch, Flax and MegEngine end 2
    steps with the same weights, BN running statistics (BN1d too) and EMA (MegEngine: its
    checkpoint's weights and EMA; Flax: the final (EMA) file): the Rep forward in train mode
    (coefficients, residual, scale after the sum), LayerNorm, GRN, the layer scales and the
    weight-decay rule agree."""
    init = tmp_path / "init.safetensors"
    save_file(random_state(get_spec(name, 10), "train", seed=3), init)
    outs = {b: tmp_path / b for b in BACKENDS}
    for backend, out in outs.items():
        _train(name, out, "--framework", backend, "--init", str(init), *STEPS)
    start, _ = load_file(init)
    final = {b: load_file(out / f"{name}-train.safetensors")[0] for b, out in outs.items()}
    assert _worst(final["torch"], start)[0] > 1e-2  # the steps moved the weights
    results = {
        "megengine/model": _worst(_checkpoint(outs["megengine"], "model."), _checkpoint(outs["torch"], "model.")),
        "megengine/ema": _worst(_checkpoint(outs["megengine"], "ema."), _checkpoint(outs["torch"], "ema.")),
        "megengine/final": _worst(final["megengine"], final["torch"]),
        "flax/final": _worst(final["flax"], final["torch"]),
    }
    assert all(rel <= STEP_TOL[name] for rel, _ in results.values()), results


# --------------------------------------------------------------------------- reparam bench


@pytest.mark.slow  # minutes: every backend's process, Flax's jit of both forms
def test_bench_runs_on_the_new_families(tmp_path: Path, megengine_env: None) -> None:
    """`reparam bench` at a tiny setting: every backend times both forms of both models (no plain
    reference: they are not conv stacks) and checks the deploy form against the train form.
    No assertion on any time."""
    out_json = tmp_path / "bench.json"
    models = ("FastViT-T8", "RepViT-M0.9")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.cli",
            "bench",
            "--models",
            ",".join(models),
            "--backends",
            ",".join(BACKENDS),
            "--batch",
            "1",
            "--size",
            "32",
            "--repeats",
            "1",
            "--convert-repeats",
            "1",
            "--no-compile",
            "--no-memory",
            "--no-openvino",
            "--no-bf16",
            "--json",
            str(out_json),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(out_json.read_text())
    assert report["unavailable"] == {} and set(report["backends"]) == set(BACKENDS)
    for backend, res in report["backends"].items():
        for model in models:
            r = res["models"][model]
            assert {"train", "deploy"} <= set(r["forms"]) and "plain" not in r["forms"]
            assert r["ratios"]["deploy_over_train"] > 0
            assert max(r["check_rel_err_vs_deploy"].values()) < 1e-4, (backend, model, r["check_rel_err_vs_deploy"])
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith(tuple(f"{b} " for b in BACKENDS))]
    assert {(r[0], r[1]) for r in rows} >= {(b, m) for b in BACKENDS for m in models}
