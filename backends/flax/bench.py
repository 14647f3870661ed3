"""`reparam bench`, Flax NNX side: run as `python -m backends.flax.bench CONFIG_JSON` (.venv).

Forms: train and deploy (our modules, inference view, eager op-by-op NHWC forward) and the plain
reference (`PlainNet`: `nnx.Conv` computing through the backend's conv primitive + activation,
global mean pool, `nnx.Linear`, built from reparam_core.bench.plain and loaded with the deploy form's
weights). Fast paths: every form as one whole-model `jax.jit` (nnx.split outside, nnx.merge
inside), compile time reported apart.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxlib import version as jaxlib_version

from backends import flax as bf
from backends.flax import layers as bf_layers
from reparam_core import SpecError, get_spec, state_schema
from reparam_core.bench.plain import plain_layers
from reparam_core.bench.plan import BackendBench, BenchConfig, FastPath, gemm_gflops, main
from reparam_core.weights.layouts import to_flax

ACTS: dict[str, Callable[[jax.Array], jax.Array]] = {"relu": jax.nn.relu, "silu": jax.nn.silu, "identity": lambda x: x}


class PlainNet(nnx.Module):
    """The deploy network as Flax's own layers (NHWC in, logits out); `acts` name each conv's
    activation (static)."""

    def __init__(self, model: str, *, rngs: nnx.Rngs) -> None:
        spec = get_spec(model)
        layers = plain_layers(spec)
        self.convs = nnx.List(
            [
                nnx.Conv(
                    p.in_channels,
                    p.out_channels,
                    (p.kernel_size, p.kernel_size),
                    strides=(p.stride, p.stride),
                    padding=((p.padding, p.padding), (p.padding, p.padding)),
                    kernel_dilation=(p.dilation, p.dilation),
                    feature_group_count=p.groups,
                    use_bias=True,
                    rngs=rngs,
                    conv_general_dilated=bf_layers.conv_general_dilated,
                )
                for p in layers
            ]
        )
        self.acts = tuple(p.act for p in layers)
        classes, features = state_schema(spec, "deploy")["linear.weight"].shape
        self.linear = nnx.Linear(features, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv, act in zip(self.convs, self.acts):
            x = ACTS[act](conv(x))
        return self.linear(jnp.mean(x, axis=(1, 2)))


FlaxModel = PlainNet | bf.RepModule  # what build returns: the plain reference or one of ours


def plain_model(model: str, state: Mapping[str, np.ndarray]) -> PlainNet:
    """PlainNet built abstractly (no random init) and filled from a deploy-form neutral state
    (Flax layouts from the core's to_flax)."""
    spec = get_spec(model)
    schema = state_schema(spec, "deploy")

    def put(param: nnx.Param[jax.Array] | None, key: str) -> None:
        if param is None:
            raise SpecError(f"{model}: the plain network has no parameter for {key!r}")
        param.set_value(jnp.asarray(to_flax(np.asarray(state[key], np.float32), schema[key])))

    net = nnx.eval_shape(lambda: PlainNet(model, rngs=nnx.Rngs(0)))
    for p, conv in zip(plain_layers(spec), net.convs):
        put(conv.kernel, f"{p.key}.weight")
        put(conv.bias, f"{p.key}.bias")
    put(net.linear.kernel, "linear.weight")
    put(net.linear.bias, "linear.bias")
    return net


def inference(module: FlaxModel) -> FlaxModel:
    """Our models in inference mode (a view sharing the variables); PlainNet has no mode."""
    return module if isinstance(module, PlainNet) else bf.inference_view(module)


def nhwc(x: np.ndarray) -> jax.Array:
    """NCHW numpy -> NHWC float32 jax array."""
    return jnp.transpose(jnp.asarray(np.asarray(x, np.float32)), (0, 2, 3, 1))


class FlaxBench(BackendBench):
    name = "flax"
    api = bf

    def setup(self, threads: int | None) -> dict[str, Any]:
        # XLA's CPU thread pool is sized at import (all schedulable cores) and cannot be changed
        # afterwards, so a requested count is recorded but not applied.
        env: dict[str, Any] = {
            "jax": jax.__version__,
            "jaxlib": jaxlib_version.__version__,
            "flax": flax.__version__,
            "python": sys.version.split()[0],
            "threads": f"XLA default (all {len(os.sched_getaffinity(0))} cores)",
        }
        if threads:
            env["threads_requested_not_applied"] = threads
        return env

    def matmul_gflops(self, n: int, repeats: int) -> float:
        rng = np.random.default_rng(0)
        a, b = (jnp.asarray(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
        dot = jax.jit(jnp.dot)
        return gemm_gflops(lambda: dot(a, b).block_until_ready(), n, repeats)

    def build(self, model: str, form: str, state: Mapping[str, np.ndarray]) -> FlaxModel:
        if form == "plain":
            return plain_model(model, state)
        return bf.load_state(bf.empty_model(model, deploy=form == "deploy"), state)

    def predict(self, module: FlaxModel, x: np.ndarray) -> np.ndarray:
        if isinstance(module, PlainNet):
            return np.asarray(module(nhwc(x)), np.float32)
        return bf.predict(module, x)

    def forward(self, module: FlaxModel, x: np.ndarray) -> Callable[[], jax.Array]:
        view, xj = inference(module), nhwc(x)
        return lambda: view(xj).block_until_ready()

    def _jit(self, module: FlaxModel, x: np.ndarray) -> FastPath:
        """The whole model as one jax.jit; compile_s is the first call (trace + compile + run)."""
        graphdef, state = nnx.split(inference(module))

        @jax.jit
        def fwd(state: nnx.State[Any, Any], x: jax.Array) -> jax.Array:
            y: jax.Array = nnx.merge(graphdef, state)(x)
            return y

        xj = nhwc(x)
        t0 = time.perf_counter()
        y = fwd(state, xj).block_until_ready()
        compile_s = time.perf_counter() - t0
        return FastPath(lambda: fwd(state, xj).block_until_ready(), np.asarray(y, np.float32), compile_s)

    def fast_paths(self, modules: Mapping[str, FlaxModel], x: np.ndarray, config: BenchConfig) -> dict[str, FastPath]:
        return {f"{form}/jit": self._jit(modules[form], x) for form in ("deploy", "train", "plain") if form in modules}


if __name__ == "__main__":
    sys.exit(main(FlaxBench, "backends.flax.bench"))
