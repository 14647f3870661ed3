"""Registered models in every backend (torch, flax, MegEngine through its worker): the neutral
state round trip (bit-exact, schema order), train and deploy forward against the float64 oracle,
the deploy state against reparam_core.reparameterize_state, a deploy-form model built directly
loading that state; load_state validation; RepVGGplus aux heads and custom L2 (in-process).

By default the cheapest registered models that cover every family (the plain RepVGG, a grouped
one, RepVGGplus with its post-SE blocks, split stage 3 and aux heads, RepGhostNet); `--slow`
runs the rest of the registry too. Inputs 1x3x32x32 (every model reaches 1x1 at its last stage).

Replaces the model-vs-oracle tests of tests/torch/test_models.py, tests/flax/test_flax_models.py
and tests/megengine/test_mge_models.py.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
from backend_adapters import BACKENDS, IN_PROCESS, Target, assert_state_equal, check_outcome

from parity_tests.tolerance import model_tolerance, rel_err
from reparam_core import (
    CheckpointError,
    ReparamError,
    ShapeMismatchError,
    describe,
    get_spec,
    list_models,
    random_state,
    reparameterize_state,
    schema_for,
)
from reparam_core.blocks.oracle import forward, forward_with_aux
from reparam_core.families.specs import repvgg_spec

NUM_CLASSES = 10
SIZE = 32
FAST = (
    "RepVGG-mini",
    "RepVGG-A0",
    "RepVGG-B1g4",
    "RepVGGplus-L2pse",
    "repghostnet_0_5x",
    "MobileOne-S0",
    "QARepVGG-A0",
    "RepViT-M0.9",
    "FastViT-T8",
    "UniRepLKNet-A",
)
MODELS = [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in list_models()]
# full-size models through three backends: the root conftest releases memory (JAX's compiled
# programs, freed heap) after each test, so that the process's peak is one model's
pytestmark = pytest.mark.release_memory_per_test


def _kind(name: str) -> str:
    return describe(get_spec(name, NUM_CLASSES)).kind


def test_fast_models_cover_every_family_of_the_registry() -> None:
    assert set(FAST) <= set(list_models())
    assert {_kind(n) for n in FAST} == {_kind(n) for n in list_models()}
    assert any(b.groups > 1 for n in FAST if n.startswith("RepVGG-") for _, b in get_spec(n).blocks())


def _input(batch: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)


@lru_cache(maxsize=1)
def _model_data(name: str) -> tuple:
    """Spec, train state, input, oracle logits and the core's fused state, once per model (the
    backend parameter varies fastest, so the three backends share them)."""
    spec = get_spec(name, NUM_CLASSES)
    state = random_state(spec, "train", seed=0)
    x = _input()
    return spec, state, x, forward(spec, state, x, "train"), reparameterize_state(spec, state)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("name", MODELS)
def test_model_train_and_deploy_match_oracle(backend, name: str) -> None:
    spec, state, x, expected, fused = _model_data(name)
    out = backend.run(Target(spec, model=name, num_classes=NUM_CLASSES), state, x, fused)
    assert out.y_train.shape == (1, NUM_CLASSES)
    check_outcome(out, spec, state, fused, expected, model_tolerance(spec))
    print(
        f"\n{backend.name} {name}: rel err train {rel_err(out.y_train, expected):.2e} "
        f"deploy {rel_err(out.y_deploy, expected):.2e} (tol {model_tolerance(spec):.1e})"
    )


# ----------------------------------------------------------------------------- load_state validation

MINI = "RepVGG-mini"


def _mini() -> tuple[Target, dict, np.ndarray]:
    spec = get_spec(MINI, NUM_CLASSES)
    return Target(spec, model=MINI, num_classes=NUM_CLASSES), random_state(spec, "train", 0), _input()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_load_state_validates_models(backend) -> None:
    target, state, x = _mini()
    with_nbt = {**state, "stage0.rbr_dense.bn.num_batches_tracked": np.zeros((), np.int64)}
    y = backend.load_and_predict(target, with_nbt, x)  # ignored
    assert rel_err(y, forward(target.spec, state, x, "train")) <= model_tolerance(target.spec)
    with pytest.raises(CheckpointError, match="linear.bias"):
        backend.load_and_predict(target, {k: v for k, v in state.items() if k != "linear.bias"}, x)
    with pytest.raises(ShapeMismatchError, match="linear.weight"):
        backend.load_and_predict(target, {**state, "linear.weight": np.zeros((3, 3), np.float32)}, x)
    with pytest.raises(CheckpointError):  # deploy keys into a train model
        backend.load_and_predict(target, reparameterize_state(target.spec, state), x)


# ----------------------------------------------------------------------------- aux heads, custom L2

# The structure of RepVGGplus-L2pse (post-SE, split stage 3, three aux heads) at small widths.
PLUS_SMALL = repvgg_spec(
    "RepVGGplus-small", (2, 2, 2, 1), (0.25, 0.25, 0.25, 0.5), se="post", se_divisor=4, num_classes=5, plus=True
)
AUX_HEADS = {"main", "stage1_aux", "stage2_aux", "stage3_first_aux"}


def _custom_l2_reference(spec, state: dict, with_identity: bool = True) -> float:
    """numpy float64, per block: off-centre sum of squares of the dense kernel
    + sum(eq_centre^2 / (t3^2 + t1^2 + I tid^2)), eq_centre = K3c t3 + K1 t1 + I tid."""
    total = 0.0
    for prefix, b in spec.blocks():
        p = lambda k: np.asarray(state[f"{prefix}.{k}"], np.float64)  # noqa: E731
        t = lambda bn: (p(f"{bn}.weight") / np.sqrt(p(f"{bn}.running_var") + b.eps)).reshape(-1, 1, 1, 1)  # noqa: E731
        k3, k1 = p("rbr_dense.conv.weight"), p("rbr_1x1.conv.weight")
        c = b.kernel_size // 2
        centre = k3[:, :, c : c + 1, c : c + 1]
        t3, t1 = t("rbr_dense.bn"), t("rbr_1x1.bn")
        eq = centre * t3 + k1 * t1
        den = np.broadcast_to(t3**2 + t1**2, eq.shape).copy()
        if with_identity and b.has_identity:
            tid = t("rbr_identity")[:, 0, 0, 0]
            per = b.in_channels // b.groups
            for i in range(b.out_channels):  # identity taps: (i, i mod C/g)
                eq[i, i % per] += tid[i]
                den[i, i % per] += tid[i] ** 2
        total += (k3**2).sum() - (centre**2).sum() + (eq**2 / den).sum()
    return float(total)


@pytest.mark.parametrize("backend", IN_PROCESS, indirect=True)
def test_repvggplus_aux_heads_and_custom_l2(backend) -> None:
    spec = PLUS_SMALL
    target = Target(spec)
    state = random_state(spec, "train", seed=11)
    x = _input()
    tol = model_tolerance(spec)
    model = backend.loaded(target, state)

    out = backend.forward_with_aux(model, x)
    expected = forward_with_aux(spec, state, x)
    assert set(out) == AUX_HEADS == set(expected) == {"main", *(a.name for a in describe(spec).aux)}
    for k, v in out.items():
        assert v.shape == (1, 5), k
        assert rel_err(v, expected[k]) <= tol, k
    assert rel_err(out["main"], forward(spec, state, x, "train")) <= tol
    assert rel_err(backend.api.predict(model, x), out["main"]) <= tol

    l2 = backend.custom_l2(model)
    ref = _custom_l2_reference(spec, state)
    assert abs(l2 - ref) <= 1e-5 * abs(ref), (l2, ref)
    # the identity branch counts (a penalty that left it out would fail the line above)
    assert abs(ref - _custom_l2_reference(spec, state, with_identity=False)) > 1e-3 * ref

    deploy = backend.api.reparameterize(model)
    deploy_state = backend.api.export_state(deploy)
    assert list(deploy_state) == list(schema_for(spec, "deploy"))
    assert not any(k.endswith("_aux") or "_aux." in k for k in deploy_state)
    assert_state_equal(backend.api.export_state(model), state)
    assert rel_err(backend.api.predict(deploy, x), expected["main"]) <= tol
    with pytest.raises(ReparamError, match="train form only"):
        backend.custom_l2(deploy)
    with pytest.raises(ReparamError, match="train form only"):
        backend.forward_with_aux(deploy, x)
