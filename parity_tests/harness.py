"""The parity harness: identical neutral weights into every backend, train form and deploy form
(and each framework's deploy artifact), every output compared with the float64 oracle and with
every other output.

torch and flax run in this process; MegEngine runs in `.venv-mge` through the worker
(backends.megengine.remote), started once and reused.
"""

from __future__ import annotations

import importlib
import itertools
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from reparam_core import ReparamError, SpecError, get_spec, random_state
from reparam_core.blocks.oracle import block_forward, forward
from reparam_core.families.specs import BlockSpec, block_spec_to_dict

from .tolerance import BLOCK_REL, model_tolerance, rel_err

BACKENDS = ("torch", "flax", "megengine")
FORMS = ("train", "deploy", "artifact")
ARTIFACT = {"torch": "onnx", "flax": "stablehlo", "megengine": "mge"}


@dataclass(frozen=True)
class Case:
    """One parity case: a registered model or a single block, an input shape and a seed."""

    name: str
    shape: tuple[int, int, int, int]
    model: str | None = None
    block: BlockSpec | None = None
    num_classes: int = 10
    seed: int = 0

    @property
    def spec(self):
        return get_spec(self.model, self.num_classes) if self.model else self.block

    @property
    def tolerance(self) -> float:
        return model_tolerance(self.spec) if self.model else BLOCK_REL

    def state(self) -> dict[str, np.ndarray]:
        return random_state(self.spec, "train", seed=self.seed)

    def input(self) -> np.ndarray:
        return np.random.default_rng(self.seed + 1).normal(size=self.shape).astype(np.float32)

    def oracle(self, state: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        if self.model:
            return forward(self.spec, state, x, "train")
        if self.block is None:
            raise SpecError(f"case {self.name}: neither a model nor a block")
        return block_forward(self.block, state, x, "train")

    def describe(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "seed": self.seed}
        if self.model:
            d["model"] = self.model
        else:
            d["block"] = block_spec_to_dict(self.block)
        return d


class Runner(Protocol):
    name: str

    def run(self, case: Case, state: dict, x: np.ndarray, artifacts: bool, workdir: Path) -> dict[str, np.ndarray]:
        """Outputs by form: 'train', 'deploy' and (with artifacts) 'artifact'."""


class InProcessRunner:
    """torch or flax: the backend module's surface, called directly."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.api = importlib.import_module(f"backends.{name}")

    def _build(self, case: Case):
        if case.model:
            return self.api.create_model(case.model, num_classes=case.num_classes)
        return self.api.build_block(case.block)

    def run(self, case: Case, state: dict, x: np.ndarray, artifacts: bool, workdir: Path) -> dict[str, np.ndarray]:
        train = self._build(case)
        self.api.load_state(train, state)
        out = {"train": self.api.predict(train, x)}
        deploy = self.api.reparameterize(train)
        del train  # the deploy form owns its tensors: one model alive during the export (memory)
        out["deploy"] = self.api.predict(deploy, x)
        if artifacts:
            out["artifact"] = self._artifact(deploy, x, workdir / f"{case.name}.{ARTIFACT[self.name]}")
        return out

    def _artifact(self, deploy, x: np.ndarray, path: Path) -> np.ndarray:
        if self.name == "torch":
            import onnxruntime as ort

            self.api.export_onnx(deploy, path, input_shape=x.shape)
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return sess.run(None, {sess.get_inputs()[0].name: x})[0]
        self.api.export_stablehlo(deploy, path, input_shape=x.shape)
        return np.asarray(self.api.load_stablehlo(path)(x))


class MegEngineRunner:
    name = "megengine"

    def __init__(self) -> None:
        from backends.megengine.remote import shared

        self.worker = shared()

    def run(self, case: Case, state: dict, x: np.ndarray, artifacts: bool, workdir: Path) -> dict[str, np.ndarray]:
        w, m, b, n = self.worker, case.model, case.block, case.num_classes
        out = {
            "train": w.predict(state=state, x=x, form="train", model=m, block=b, num_classes=n),
            "deploy": w.predict(state=state, x=x, form="train", reparameterize=True, model=m, block=b, num_classes=n),
        }
        if artifacts:
            out["artifact"] = w.export_traced(
                state=state, x=x, form="train", artifact=workdir / f"{case.name}.mge", model=m, block=b, num_classes=n
            )
        return out


def make_runners(names: tuple[str, ...] = BACKENDS) -> tuple[dict[str, Runner], dict[str, str]]:
    """The runners that can start here, and the reason for each that cannot."""
    makers: dict[str, Callable[[], Runner]] = {
        "torch": lambda: InProcessRunner("torch"),
        "flax": lambda: InProcessRunner("flax"),
        "megengine": MegEngineRunner,
    }
    runners, unavailable = {}, {}
    for name in names:
        try:
            runners[name] = makers[name]()
        except (ImportError, ReparamError, OSError) as e:
            unavailable[name] = f"{type(e).__name__}: {e}"
    return runners, unavailable


@dataclass
class CaseResult:
    case: Case
    tolerance: float
    oracle_seconds: float
    errors: dict[tuple[str, str], float] = field(default_factory=dict)  # (backend, form) vs oracle
    pairwise: dict[tuple[str, str, str, str], float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # backend -> exception text

    @property
    def worst(self) -> tuple[tuple[str, str], float]:
        return max(self.errors.items(), key=lambda kv: kv[1])

    @property
    def ok(self) -> bool:
        return not self.failures and all(e <= self.tolerance for e in self.errors.values())

    def to_json(self) -> dict:
        return {
            "case": self.case.describe(),
            "tolerance": self.tolerance,
            "ok": self.ok,
            "cells": [{"backend": b, "form": f, "rel_err": e} for (b, f), e in self.errors.items()],
            "pairwise": [
                {"a": f"{a}/{fa}", "b": f"{b}/{fb}", "rel_err": e} for (a, fa, b, fb), e in self.pairwise.items()
            ],
            "seconds": {"oracle": self.oracle_seconds, **self.seconds},
            "failures": self.failures,
        }


def run_case(case: Case, runners: dict[str, Runner], artifacts: bool = False) -> CaseResult:
    state, x = case.state(), case.input()
    t0 = time.perf_counter()
    ref = case.oracle(state, x)
    result = CaseResult(case, case.tolerance, time.perf_counter() - t0)
    outputs: dict[tuple[str, str], np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="reparam-parity-") as tmp:
        for name, runner in runners.items():
            t0 = time.perf_counter()
            try:
                got = runner.run(case, state, x, artifacts, Path(tmp))
            except Exception as e:
                result.failures[name] = f"{type(e).__name__}: {e}"
                continue
            finally:
                result.seconds[name] = time.perf_counter() - t0
            for form, y in got.items():
                outputs[(name, form)] = y
                result.errors[(name, form)] = rel_err(y, ref)
    for a, b in itertools.combinations(sorted(outputs), 2):
        result.pairwise[a + b] = rel_err(outputs[a], outputs[b])
    return result
