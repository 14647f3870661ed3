"""Issue 26's user story through `reparam` (scripts.cli.main, in this process): a timm FastViT or
RepViT checkpoint (`torch.save(model.state_dict(), ...)`, random weights and BN statistics,
10 classes, nothing downloaded) converts to safetensors under the official names with timm's
values, converts back under timm's names into a file timm loads strictly with identical outputs;
timm's own deploy form (after `reparameterize_model`) converts in and back as well, equal to
reparam's fusion of the train checkpoint; `reparam info` and `reparam verify` know the models;
another architecture's checkpoint exits 2 naming keys, writing nothing."""

from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from parity_tests.backend_rule import missing_backend
from parity_tests.tolerance import rel_err
from reparam_core import count_params, get_spec, state_schema
from reparam_core.formats.safetensors_io import load_file
from reparam_core.weights.keymaps import to_canonical
from scripts.cli import main

MODELS = ("fastvit_t8", "repvit_m0_9")
NUM_CLASSES = 10
# reparam fuses in float64 and rounds once, timm fuses in float32: the two deploy states differ
# by float32 rounding only.
FUSED_REL = 1e-5


@pytest.fixture(scope="module")
def timm(pytestconfig: pytest.Config) -> ModuleType:
    from backends.torch import zoo

    try:
        return zoo.import_timm()
    except ImportError as e:
        missing_backend(pytestconfig, f"timm cannot be imported through backends.torch.zoo: {e}")


def _randomized(timm: ModuleType, name: str, seed: int = 0):
    """timm's model in eval mode with every BN's statistics and affine parameters and every
    layer scale (`gamma`) drawn at random, so that no tensor is at its default."""
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=NUM_CLASSES).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
        for key, p in model.named_parameters():
            if key.endswith("gamma"):
                p.copy_(0.25 + 0.5 * torch.rand(p.shape, generator=g))
    return model


def _numpy(model) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def _reparam(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `reparam ARGV` run in this process."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        status = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


def _output(model, x):
    import torch

    with torch.no_grad():
        return model(x)


def _round_trip(timm, capsys, tmp: Path, name: str, model, form: str) -> dict[str, np.ndarray]:
    """timm checkpoint -> official-name safetensors -> timm-name .pth: checks each file and
    returns the safetensors' state."""
    import torch

    spec = get_spec(name, NUM_CLASSES)
    src, out, back = tmp / f"{name}-{form}.pth", tmp / f"{name}-{form}.safetensors", tmp / f"{name}-{form}-back.pth"
    torch.save(model.state_dict(), src)

    status, _, err = _reparam(capsys, "convert", src, out, "--model", name)
    assert status == 0, err
    written, _ = load_file(out)
    assert set(written) == set(state_schema(spec, form))
    expected, scheme = to_canonical(_numpy(model), spec)
    assert scheme == "timm"
    assert set(expected) == set(written)
    for k, v in expected.items():
        assert written[k].dtype == np.float32 and np.array_equal(written[k], v), k

    status, _, err = _reparam(capsys, "convert", out, back, "--model", name, "--to-scheme", "timm")
    assert status == 0, err
    fresh = timm.create_model(name, num_classes=NUM_CLASSES).eval()
    if form == "deploy":
        fresh = timm.utils.reparameterize_model(fresh)
    fresh.load_state_dict(torch.load(back, weights_only=True), strict=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(_output(fresh, x), _output(model, x))
    return written


@pytest.mark.parametrize("name", MODELS)
def test_timm_checkpoint_converts_in_and_back(timm, capsys, tmp_path: Path, name: str) -> None:
    model = _randomized(timm, name)
    _round_trip(timm, capsys, tmp_path, name, model, "train")


@pytest.mark.parametrize("name", MODELS)
def test_timm_deploy_checkpoint_converts_in_and_back(timm, capsys, tmp_path: Path, name: str) -> None:
    """timm's re-parameterized model's state_dict is reparam's deploy form under timm's names;
    reparam's own fusion of the train checkpoint (`--to-deploy`) gives the same tensors."""
    import torch

    model = _randomized(timm, name)
    deployed = timm.utils.reparameterize_model(copy.deepcopy(model))
    written = _round_trip(timm, capsys, tmp_path, name, deployed, "deploy")
    params = sum(v.size for k, v in written.items() if not k.endswith(("running_mean", "running_var")))
    assert params == count_params(get_spec(name, NUM_CLASSES), "deploy")  # what `reparam info` reports

    src, fused = tmp_path / f"{name}.pth", tmp_path / f"{name}-fused.safetensors"
    torch.save(model.state_dict(), src)
    status, _, err = _reparam(capsys, "convert", src, fused, "--model", name, "--to-deploy", "--verify")
    assert status == 0, err
    ours, _ = load_file(fused)
    assert set(ours) == set(written)
    errors = {k: rel_err(ours[k], v) for k, v in written.items()}
    assert max(errors.values()) <= FUSED_REL, max(errors.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("name", MODELS)
def test_info_and_verify_know_the_model(capsys, tmp_path: Path, name: str) -> None:
    """`reparam info` and `reparam verify` take model names (not files): both accept timm's."""
    canonical = get_spec(name).name
    status, out, err = _reparam(capsys, "info", name, "--size", "64")
    assert status == 0, err
    assert out.startswith(f"{canonical} ")
    report = tmp_path / "verify.json"
    status, out, err = _reparam(
        capsys, "verify", "--models", name, "--backends", "torch", "--no-blocks", "--size", "32", "--json", report
    )
    assert status == 0, err
    assert canonical in out and report.exists()


def test_other_architecture_exits_2_naming_keys(timm, capsys, tmp_path: Path) -> None:
    import torch

    src, dst = tmp_path / "fastvit_t8.pth", tmp_path / "out.safetensors"
    torch.save(timm.create_model("fastvit_t8", num_classes=NUM_CLASSES).state_dict(), src)
    before = set(tmp_path.iterdir())
    status, _, err = _reparam(capsys, "convert", src, dst, "--model", "repvit_m0_9")
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reparam convert: error: "), err
    assert "Traceback" not in err
    assert "RepViT-M0.9" in lines[0] and "stem.0.conv_kxk.0.conv.weight" in lines[0], lines[0]
    assert set(tmp_path.iterdir()) == before
