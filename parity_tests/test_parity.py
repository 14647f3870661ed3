"""The parity matrix: every case in every backend, train form, deploy form and deploy artifact,
against the float64 oracle and against each other."""
from __future__ import annotations

import pytest
from hypothesis import given, settings

from .cases import block_matrix, model_cases, random_block_cases
from .harness import BACKENDS, Case, CaseResult, run_case, strict

ARTIFACT_MODELS = {"RepVGG-A0", "RepVGG-B1g4", "RepVGG-D2se", "RepVGGplus-L2pse", "repghostnet_1_0x"}


def check(result: CaseResult, runners: dict) -> None:
    assert not result.failures, result.failures
    if strict():
        assert set(runners) == set(BACKENDS)
    expected = {(b, f) for b in runners for f in ("train", "deploy")}
    assert expected <= set(result.errors), sorted(expected - set(result.errors))
    bad = {k: v for k, v in result.errors.items() if not v <= result.tolerance}
    assert not bad, f"{result.case.name}: over tolerance {result.tolerance:.1e}: {bad}"
    worst_pair = max(result.pairwise.values(), default=0.0)
    assert worst_pair <= 2 * result.tolerance, (result.case.name, worst_pair)


@pytest.mark.parametrize("case", model_cases(), ids=lambda c: c.name)
def test_model(case: Case, runners: dict) -> None:
    check(run_case(case, runners, artifacts=case.name in ARTIFACT_MODELS), runners)


@pytest.mark.parametrize("case", block_matrix(), ids=lambda c: c.name)
def test_block(case: Case, runners: dict) -> None:
    result = run_case(case, runners, artifacts=True)
    check(result, runners)
    assert {(b, "artifact") for b in runners} <= set(result.errors)


# a third of the profile: 100 random blocks in CI, 1000 with --slow
@settings(max_examples=settings.default.max_examples // 3)
@given(case=random_block_cases())
def test_random_block(case: Case, runners: dict) -> None:
    check(run_case(case, runners), runners)
