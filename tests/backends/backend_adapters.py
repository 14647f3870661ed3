"""The three backends behind one interface, for the backend-parametrised suite in tests/backends.

torch and flax run in this process; MegEngine runs in `.venv-mge` through its worker
(backends.megengine.remote.shared(), the client parity_tests/harness.py uses). Every adapter takes and
returns neutral (canonical-key, OIHW) float32 states and NCHW numpy arrays, so one set of
assertions (check_outcome) holds every backend to the float64 oracle and the core's fusion.

The in-process adapters also check, on the live modules, what the worker cannot show: the class
(`type(m) is <backend>.<kind>`), the form flag, native state paths == the core schema (torch:
`state_dict()` keys and shapes; Flax: `native_state` keys == `flax_key`, shapes HWIO), that
`reparameterize` returns a new module, leaves its input untouched and is the identity on a
deploy-form module. For MegEngine those live-module facts (and its native 5-D grouped layout)
stay in tests/megengine.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

import numpy as np

from parity_tests.tolerance import FUSED_STATE_REL, rel_err
from reparam_core import describe, schema_for
from reparam_core.blocks.fuse import fused_modules
from reparam_core.blocks.nodes import in_form
from reparam_core.blocks.schema import is_model

BACKENDS = ("torch", "flax", "megengine")
IN_PROCESS = ("torch", "flax")

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class Target:
    """What to build: a block spec, a registered model (by name), or a model spec (in-process
    only: the worker builds registered models by name)."""

    spec: Any
    model: str | None = None
    num_classes: int = 10

    @property
    def kind(self) -> str:
        """The official class name, which every backend exports."""
        return describe(self.spec).kind

    @property
    def is_block(self) -> bool:
        return not is_model(self.spec)


@dataclass
class Outcome:
    """What one backend produced from a train-form state and an input."""

    y_train: np.ndarray  # the loaded train-form module's output
    train_state: State  # export_state of that module (must round-trip bit-exactly)
    y_deploy: np.ndarray  # output after reparameterize
    deploy_state: State  # export_state after reparameterize
    y_direct: np.ndarray  # a deploy-form module built directly and loaded with the core's fused state
    ordered: bool = True  # whether the states arrive in the backend's own key order


class Adapter(Protocol):
    name: str

    def run(self, target: Target, state: State, x: np.ndarray, fused: State) -> Outcome:
        """Load `state` into a train-form build, predict, reparameterize, predict, export both;
        build the deploy form directly, load `fused` into it, predict."""

    def load_and_predict(self, target: Target, state: State, x: np.ndarray, form: str = "train") -> np.ndarray:
        """Build `target` in `form`, load_state(state), predict(x): load errors propagate."""


# --------------------------------------------------------------------------- in-process


class InProcess:
    """torch or flax: the backend module's public functions, called directly."""

    name: str

    def __init__(self) -> None:
        self.api = importlib.import_module(f"backends.{self.name}")

    # -- per framework
    def build(self, target: Target, deploy: bool) -> Any:
        raise NotImplementedError

    def native(self, module: Any) -> dict[str, tuple[int, ...]]:
        """The module's own state paths and shapes, in the module's order."""
        raise NotImplementedError

    def expected_native(self, schema: dict) -> dict[str, tuple[int, ...]]:
        """The native paths and shapes that a core schema maps to in this framework."""
        raise NotImplementedError

    def forward_with_aux(self, model: Any, x: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def custom_l2(self, model: Any) -> float:
        raise NotImplementedError

    # -- shared
    def loaded(self, target: Target, state: State, deploy: bool = False) -> Any:
        return self.api.load_state(self.build(target, deploy), state)

    def check_module(self, module: Any, target: Target, form: str) -> None:
        """Class, form flag and native state paths/shapes (in forward order) of a live module."""
        cls = self.api.block_class(target.kind)  # the named class, or one made for the kind
        assert type(module) is cls and cls.kind == target.kind, (type(module), cls)
        if hasattr(self.api, target.kind):  # a kind with a hand-named class exports it
            assert cls is getattr(self.api, target.kind)
        assert module.deploy is (form == "deploy")
        native = self.native(module)
        expected = self.expected_native(schema_for(target.spec, form))
        assert list(native) == list(expected)  # same paths, in forward order
        assert native == expected

    def run(self, target: Target, state: State, x: np.ndarray, fused: State) -> Outcome:
        api = self.api
        train = self.loaded(target, state)
        self.check_module(train, target, "train")
        exported = api.export_state(train)
        y_train = api.predict(train, x)

        deploy = api.reparameterize(train)
        assert deploy is not train and type(deploy) is type(train)
        assert api.reparameterize(deploy) is deploy and deploy.reparameterize() is deploy
        self.check_module(deploy, target, "deploy")
        self.check_module(train, target, "train")  # the input is left untouched...
        assert_state_equal(api.export_state(train), state)  # ...values included
        y_deploy = api.predict(deploy, x)
        deploy_state = api.export_state(deploy)
        del train, deploy  # full-size models (RepVGGplus-L2pse: 544 MB): at most two live at once

        direct = self.loaded(target, fused, deploy=True)
        self.check_module(direct, target, "deploy")
        return Outcome(y_train, exported, y_deploy, deploy_state, api.predict(direct, x))

    def load_and_predict(self, target: Target, state: State, x: np.ndarray, form: str = "train") -> np.ndarray:
        return self.api.predict(self.loaded(target, state, deploy=form == "deploy"), x)


class TorchAdapter(InProcess):
    name = "torch"

    def build(self, target: Target, deploy: bool) -> Any:
        """Blocks through build_block; models on the meta device (no slow random init),
        materialised empty for load_state to fill (as torch users load checkpoints)."""
        import torch

        if target.is_block:
            return self.api.build_block(target.spec, deploy=deploy)
        with torch.device("meta"):
            if target.model is not None:
                model = self.api.create_model(target.model, num_classes=target.num_classes, deploy=deploy)
            else:
                model = getattr(self.api, target.kind)(target.spec, deploy=deploy)
        model = model.to_empty(device="cpu")
        for name, buf in model.named_buffers():
            if name.endswith("num_batches_tracked"):
                buf.zero_()
        return model

    def native(self, module: Any) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}

    def expected_native(self, schema: dict) -> dict[str, tuple[int, ...]]:
        return {k: info.shape for k, info in schema.items()}

    def forward_with_aux(self, model: Any, x: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model.forward_with_aux(torch.from_numpy(x))
        finally:
            model.train(was_training)
        return {k: v.numpy() for k, v in out.items()}

    def custom_l2(self, model: Any) -> float:
        return float(model.custom_l2().detach())


class FlaxAdapter(InProcess):
    name = "flax"

    def build(self, target: Target, deploy: bool) -> Any:
        """Abstract builds (nnx.eval_shape: nothing initialised) for load_state to fill."""
        from flax import nnx

        if target.is_block:
            return self.api.empty_block(target.spec, deploy=deploy)
        if target.model is not None:
            return self.api.empty_model(target.model, num_classes=target.num_classes, deploy=deploy)
        cls = getattr(self.api, target.kind)
        return nnx.eval_shape(lambda: cls(target.spec, deploy=deploy, rngs=nnx.Rngs(0)))

    def native(self, module: Any) -> dict[str, tuple[int, ...]]:
        return {k: tuple(np.shape(v)) for k, v in self.api.native_state(module).items()}

    def expected_native(self, schema: dict) -> dict[str, tuple[int, ...]]:
        from reparam_core.weights.layouts import flax_key, to_flax

        return {flax_key(k, info): to_flax(np.zeros(info.shape, np.float32), info).shape for k, info in schema.items()}

    def forward_with_aux(self, model: Any, x: np.ndarray) -> dict[str, np.ndarray]:
        import jax.numpy as jnp

        out = self.api.inference_view(model).forward_with_aux(jnp.asarray(x.transpose(0, 2, 3, 1)))
        return {k: np.asarray(v) for k, v in out.items()}

    def custom_l2(self, model: Any) -> float:
        return float(model.custom_l2())


# --------------------------------------------------------------------------- MegEngine


class MegEngineAdapter:
    """MegEngine in .venv-mge through the worker: neutral states and NCHW arrays both ways."""

    name = "megengine"

    def __init__(self) -> None:
        from backends.megengine.remote import shared

        self.worker = shared()

    @staticmethod
    def _target(target: Target) -> dict:
        if target.is_block:
            return {"block": target.spec}
        if target.model is None:
            raise ValueError("the MegEngine worker builds registered models by name only")
        return {"model": target.model, "num_classes": target.num_classes}

    def run(self, target: Target, state: State, x: np.ndarray, fused: State) -> Outcome:
        t = self._target(target)
        y_train, exported = self.worker.predict(state=state, x=x, form="train", return_state=True, **t)
        y_deploy, deploy_state = self.worker.predict(
            state=state, x=x, form="train", reparameterize=True, return_state=True, **t
        )
        y_direct = self.worker.predict(state=fused, x=x, form="deploy", **t)
        # safetensors files carry no key order: the worker's states are compared as mappings
        return Outcome(y_train, exported, y_deploy, deploy_state, y_direct, ordered=False)

    def load_and_predict(self, target: Target, state: State, x: np.ndarray, form: str = "train") -> np.ndarray:
        return self.worker.predict(state=state, x=x, form=form, **self._target(target))


_MAKERS = {"torch": TorchAdapter, "flax": FlaxAdapter, "megengine": MegEngineAdapter}


@cache
def adapter(name: str) -> Adapter:
    """The adapter of one backend, started once per session (failures are not cached)."""
    return _MAKERS[name]()


# --------------------------------------------------------------------------- assertions


def same_keys(got: State, keys: Any, ordered: bool = True) -> bool:
    """The same keys, and in the same order when `ordered`."""
    return list(got) == list(keys) if ordered else set(got) == set(keys)


def assert_state_equal(got: State, expected: State, ordered: bool = True) -> None:
    """Same keys (in the same order when `ordered`), float32, bit-identical values."""
    assert same_keys(got, expected, ordered)
    for k, v in expected.items():
        assert got[k].dtype == np.float32, (k, got[k].dtype)
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def fused_keys(spec: Any) -> set[str]:
    """The deploy-state keys that fusion computes (every other deploy key is passed through)."""
    modules = fused_modules(in_form(spec, "train"))
    return {f"{m}.{field}" for m in modules for field in ("weight", "bias")}


def check_outcome(out: Outcome, spec: Any, state: State, fused: State, expected: np.ndarray, tol: float) -> None:
    """The assertions every backend must pass on every block and model."""
    assert_state_equal(out.train_state, state, out.ordered)  # neutral round trip, schema order

    assert out.y_train.shape == expected.shape
    assert rel_err(out.y_train, expected) <= tol, ("train", rel_err(out.y_train, expected))

    # deploy state == reparameterize_state: fused tensors to float32 rounding, the rest exact
    assert same_keys(out.deploy_state, schema_for(spec, "deploy"), out.ordered)
    computed = fused_keys(spec)
    for k, v in fused.items():
        got = out.deploy_state[k]
        assert got.dtype == np.float32 and got.shape == v.shape, (k, got.dtype, got.shape)
        if k in computed:
            scale = max(float(np.abs(v).max()), 1e-12)
            assert float(np.abs(got - v).max()) <= FUSED_STATE_REL * scale, k
        else:
            np.testing.assert_array_equal(got, v, err_msg=k)

    assert rel_err(out.y_deploy, expected) <= tol, ("deploy", rel_err(out.y_deploy, expected))
    assert rel_err(out.y_direct, expected) <= tol, ("direct", rel_err(out.y_direct, expected))
