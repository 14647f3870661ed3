"""Issue 26 end to end: timm's FastViT and RepViT (random weights, randomised BN statistics and
layer scales, nothing downloaded) through the timm key map into every backend (torch, flax, and
MegEngine through its worker in .venv-mge), against timm itself.

Per (model, backend), on one 1x3x64x64 input, every output compared with timm's as
max|y - y_timm| / max|y_timm| within the family's tolerance (parity_tests/tolerance.py):

- train:  timm's train-form state loaded into the backend's train form  == timm in eval mode;
- fused:  that model re-parameterized by the backend  == timm after `reparameterize_model`;
- deploy: timm's own re-parameterized state, key-mapped, loaded into the backend's deploy form
          == timm after `reparameterize_model` (the deploy key map and layouts).

timm runs once per model (module-level cache); the backends share it."""

from __future__ import annotations

import copy
import functools
import importlib
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import pytest

from parity_tests.backend_rule import missing_backend
from parity_tests.tolerance import model_tolerance, rel_err
from reparam_core import ReparamError, get_spec, state_schema
from reparam_core.weights.keymaps import to_canonical

MODELS = ("fastvit_t8", "fastvit_sa12", "repvit_m0_9", "repvit_m1")
BACKENDS = ("torch", "flax", "megengine")
NUM_CLASSES = 10
SIZE = 64


@dataclass(frozen=True)
class Reference:
    """timm's states (canonical keys) and outputs for one model."""

    train_state: dict[str, np.ndarray]
    deploy_state: dict[str, np.ndarray]
    schemes: tuple[str, str]  # the key scheme each state_dict was read as
    x: np.ndarray
    train_y: np.ndarray
    deploy_y: np.ndarray


def _timm() -> ModuleType:
    from backends.torch import zoo

    return zoo.import_timm()


def _randomized(timm: ModuleType, name: str):
    """timm's model with NUM_CLASSES classes in eval mode; every BN's statistics and affine
    parameters and every layer scale (`gamma`) drawn at random: the defaults make BN an identity
    and FastViT's 1e-5 layer scales hide whole branches."""
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=NUM_CLASSES).eval()
    g = torch.Generator().manual_seed(1)
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


def _canonical(model, name: str) -> tuple[dict[str, np.ndarray], str]:
    """A timm model's state_dict (without BN's `num_batches_tracked`) under the canonical
    (official) names, and the key scheme it was read as."""
    raw = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    return to_canonical(raw, get_spec(name, NUM_CLASSES))


@functools.cache
def reference(name: str) -> Reference:
    import torch

    timm = _timm()
    model = _randomized(timm, name)
    x = np.random.default_rng(2).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    deployed = timm.utils.reparameterize_model(copy.deepcopy(model))
    with torch.no_grad():
        train_y = model(torch.from_numpy(x)).numpy()
        deploy_y = deployed(torch.from_numpy(x)).numpy()
    (train, train_scheme), (deploy, deploy_scheme) = _canonical(model, name), _canonical(deployed, name)
    return Reference(train, deploy, (train_scheme, deploy_scheme), x, train_y, deploy_y)


def _start(backend: str):
    """The backend's surface: the module (torch, flax) or the shared MegEngine worker."""
    if backend == "megengine":
        from backends.megengine.remote import shared

        return shared()
    return importlib.import_module(f"backends.{backend}")


def _in_process(api: ModuleType, name: str, ref: Reference) -> dict[str, np.ndarray]:
    train = api.load_state(api.create_model(name, num_classes=NUM_CLASSES), ref.train_state)
    out = {"train": api.predict(train, ref.x)}
    fused = api.reparameterize(train)
    del train
    out["fused"] = api.predict(fused, ref.x)
    del fused
    deploy = api.load_state(api.create_model(name, num_classes=NUM_CLASSES, deploy=True), ref.deploy_state)
    out["deploy"] = api.predict(deploy, ref.x)
    return out


def _megengine(w, name: str, ref: Reference) -> dict[str, np.ndarray]:
    n = NUM_CLASSES
    return {
        "train": w.predict(state=ref.train_state, x=ref.x, form="train", model=name, num_classes=n),
        "fused": w.predict(
            state=ref.train_state, x=ref.x, form="train", reparameterize=True, model=name, num_classes=n
        ),
        "deploy": w.predict(state=ref.deploy_state, x=ref.x, form="deploy", model=name, num_classes=n),
    }


@pytest.fixture(scope="module")
def timm(pytestconfig: pytest.Config) -> ModuleType:
    try:
        return _timm()
    except ImportError as e:
        missing_backend(pytestconfig, f"timm cannot be imported through backends.torch.zoo: {e}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_backend_equals_timm(timm: ModuleType, name: str, backend: str, pytestconfig: pytest.Config) -> None:
    ref = reference(name)
    spec = get_spec(name, NUM_CLASSES)
    assert ref.schemes == ("timm", "timm")
    assert set(ref.train_state) == set(state_schema(spec, "train"))
    assert set(ref.deploy_state) == set(state_schema(spec, "deploy"))
    try:
        surface = _start(backend)
    except (ImportError, ReparamError, OSError) as e:
        missing_backend(pytestconfig, f"backend {backend} cannot start here: {type(e).__name__}: {e}")
    got = _megengine(surface, name, ref) if backend == "megengine" else _in_process(surface, name, ref)
    expected = {"train": ref.train_y, "fused": ref.deploy_y, "deploy": ref.deploy_y}
    tol = model_tolerance(spec)
    errors = {form: rel_err(got[form], y) for form, y in expected.items()}
    assert all(e <= tol for e in errors.values()), f"{name} in {backend}: {errors} (tolerance {tol:.1e})"
