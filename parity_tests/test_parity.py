"""The parity matrix: every case in every backend, train form, deploy form and deploy artifact,
against the float64 oracle and against each other.

Every backend is required: torch, flax, and MegEngine (through its worker in `.venv-mge`). A
backend that cannot start here FAILS every test of the matrix. To run the matrix on the backends
that do start, pass `--allow-missing-backend`: each case is then checked on those backends and
reported as SKIPPED (naming what is missing and why), never as passed. Under CI (`CI=true`) the
option is ignored and a missing backend is always a failure.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from .backend_rule import missing_backend, strict
from .cases import block_matrix, model_cases, random_block_cases
from .harness import BACKENDS, Case, CaseResult, run_case

ARTIFACT_MODELS = {
    "RepVGG-A0",
    "RepVGG-B1g4",
    "RepVGG-D2se",
    "RepVGGplus-L2pse",
    "repghostnet_1_0x",
    "FastViT-SA12",
    "UniRepLKNet-A",
}
# FastViT, RepViT and UniRepLKNet: in CI the smallest of each, FastViT's attention variant and
# RepViT's legacy form (every node type of the three families); the larger ones with --slow.
SLOW_MODELS = {
    "FastViT-T12",
    "FastViT-S12",
    "FastViT-SA24",
    "FastViT-SA36",
    "FastViT-MA36",
    "RepViT-M1.0",
    "RepViT-M1.1",
    "RepViT-M1.5",
    "RepViT-M2.3",
    "RepViT-M2",
    "RepViT-M3",
    "UniRepLKNet-F",
    "UniRepLKNet-P",
    "UniRepLKNet-N",
    "UniRepLKNet-T",
}


def _missing_reason(missing: dict[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in sorted(missing.items()))


def require_backends(runners: dict, missing: dict[str, str], config: pytest.Config) -> None:
    """Fail unless every backend started, or the user opted out with --allow-missing-backend
    (never under CI); with no backend at all there is nothing to check: skip."""
    assert set(runners) | set(missing) == set(BACKENDS), (sorted(runners), sorted(missing))
    if not missing:
        return
    if strict() or not config.getoption("--allow-missing-backend") or not runners:
        # a failure, or (with the option, not under CI) a skip when no backend started at all
        missing_backend(config, f"backends unavailable: {_missing_reason(missing)}")


def skip_if_partial(runners: dict, missing: dict[str, str]) -> None:
    """After a case passed on the available backends: a partial matrix is a skip, not a pass."""
    if missing:
        pytest.skip(
            f"checked only on {', '.join(sorted(runners))}; missing "
            f"{_missing_reason(missing)} (--allow-missing-backend)"
        )


def check(result: CaseResult, runners: dict) -> None:
    assert not result.failures, result.failures
    expected = {(b, f) for b in runners for f in ("train", "deploy")}
    assert expected <= set(result.errors), sorted(expected - set(result.errors))
    bad = {k: v for k, v in result.errors.items() if not v <= result.tolerance}
    assert not bad, f"{result.case.name}: over tolerance {result.tolerance:.1e}: {bad}"
    worst_pair = max(result.pairwise.values(), default=0.0)
    assert worst_pair <= 2 * result.tolerance, (result.case.name, worst_pair)


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow if c.name in SLOW_MODELS else ()) for c in model_cases()],
    ids=lambda c: c.name,
)
def test_model(case: Case, runners: dict, missing_backends: dict, pytestconfig) -> None:
    require_backends(runners, missing_backends, pytestconfig)
    check(run_case(case, runners, artifacts=case.name in ARTIFACT_MODELS), runners)
    skip_if_partial(runners, missing_backends)


def test_slow_models_are_registry_models() -> None:
    """Every name held back for --slow is a registry model (a typo would run it in CI)."""
    assert SLOW_MODELS <= {c.name for c in model_cases()}


@pytest.mark.parametrize("case", block_matrix(), ids=lambda c: c.name)
def test_block(case: Case, runners: dict, missing_backends: dict, pytestconfig) -> None:
    require_backends(runners, missing_backends, pytestconfig)
    result = run_case(case, runners, artifacts=True)
    check(result, runners)
    assert {(b, "artifact") for b in runners} <= set(result.errors)
    skip_if_partial(runners, missing_backends)


def test_random_block(runners: dict, missing_backends: dict, pytestconfig) -> None:
    # checked before hypothesis runs: a missing backend is one failure, not a falsifying example
    require_backends(runners, missing_backends, pytestconfig)

    # a third of the profile: 100 random blocks in CI, 1000 with --slow
    @settings(max_examples=settings().max_examples // 3)
    @given(case=random_block_cases())
    def random_block(case: Case) -> None:
        check(run_case(case, runners), runners)

    random_block()
    skip_if_partial(runners, missing_backends)
