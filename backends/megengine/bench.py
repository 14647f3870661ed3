"""`reparam bench`, MegEngine side: `python -m backends.megengine.bench CONFIG_JSON` (.venv-mge).

Forms: train and deploy (our blocks, eager, eval mode) and the plain reference (`PlainNet`:
`megengine.module.Conv2d` + activation, global average pool, `megengine.module.Linear`, built from
reparam_core.bench.plain and loaded with the deploy form's weights). Fast paths: each form as a
`jit.trace(symbolic=True, capture_as_const=True)` graph; `compile_s` is its first (tracing) call.
With `mge_fastrun` (`reparam bench --mge-fastrun`) also the deploy form with MegEngine's profiled
kernels (backends.megengine.profiling): `deploy/fastrun` (eager, every call inside `fastrun()`) and
`deploy/traced+fastrun` (the exported .mge artifact loaded with every operator's strategy set to
PROFILE); their `compile_s` is the first call, which profiles every new convolution shape (once
per machine: the choices persist in MegEngine's cache file), kept out of the timed rounds.

Threads: MegEngine's default CPU comp node ("xpux"/"cpux") computes on one worker thread; the
`multithread<N>` device runs each operator on a pool of N threads. `setup` makes
`multithread<threads>` (default: os.cpu_count()) the default device, so every tensor and
parameter created afterwards lives there; it must therefore run before anything is built.
Measured with MegEngine 1.13 on a 2-core x86 machine: convolutions use the pool (eager deploy
RepVGG-A0 1.4-1.6x faster with multithread2 than cpux when both cores are free, no gain when
another process holds one), but `F.matmul` stays on one thread on every device
(MKL_NUM_THREADS/OMP_NUM_THREADS ignored), so the matmul peak is the faster of `F.matmul` and the
same GEMM written as a 1x1 convolution, which uses the pool.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import megengine as mge
import megengine.functional as F
import megengine.module as M
import numpy as np
from megengine.jit import trace

from backends import megengine as bm  # imports MegEngine with its CUDA probing noise swallowed
from backends.megengine.blocks import write_tensor
from backends.megengine.export import TracedGraph
from backends.megengine.profiling import fastrun
from reparam_core import get_spec, state_schema
from reparam_core.bench.plain import plain_layers
from reparam_core.bench.plan import BackendBench, BenchConfig, FastPath, gemm_gflops, main

ACTS = {"relu": M.ReLU, "silu": M.SiLU, "identity": M.Identity}


def _eval(module: M.Module) -> M.Module:
    """module.eval(), returning the module (MegEngine's eval() returns None, unlike torch's)."""
    module.eval()
    return module


class PlainNet(M.Module):
    """linear(flatten(avg_pool(features(x)))) with `features` a Sequential of Conv2d/activation."""

    def __init__(self, features: list[M.Module], pool: M.Module, linear: M.Linear) -> None:
        super().__init__()
        self.features = M.Sequential(*features)
        self.pool = pool
        self.linear = linear

    def forward(self, x: mge.Tensor) -> mge.Tensor:
        return self.linear(F.flatten(self.pool(self.features(x)), 1))


def plain_model(model: str, state: Mapping[str, np.ndarray]) -> PlainNet:
    """The deploy network as MegEngine's own layers, weights from a deploy-form neutral state,
    written with the backend's `write_tensor` (MegEngine layouts from the core, no `.data`)."""
    spec = get_spec(model)
    schema = state_schema(spec, "deploy")

    def write(tensor: mge.Tensor, key: str) -> None:
        write_tensor(tensor, state[key], schema[key], key)

    layers: list[M.Module] = []
    for p in plain_layers(spec):
        conv = M.Conv2d(
            p.in_channels,
            p.out_channels,
            p.kernel_size,
            stride=p.stride,
            padding=p.padding,
            dilation=p.dilation,
            groups=p.groups,
            bias=True,
        )
        write(conv.weight, f"{p.key}.weight")
        write(conv.bias, f"{p.key}.bias")
        layers += [conv, ACTS[p.act]()]
    classes, features = schema["linear.weight"].shape
    head = M.Linear(features, classes)
    write(head.weight, "linear.weight")
    write(head.bias, "linear.bias")
    net = PlainNet(layers, M.AdaptiveAvgPool2d(1), head)
    net.eval()
    return net


def _timed_call(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    """fn()'s result and the seconds it took."""
    t0 = time.perf_counter()
    y = fn()
    return y, time.perf_counter() - t0


class MegEngineBench(BackendBench):
    name = "megengine"
    api = bm

    def setup(self, threads: int | None) -> dict[str, Any]:
        """Make `multithread<threads>` (default: all cores) the default device; versions."""
        n = threads or os.cpu_count() or 1
        mge.set_default_device(f"multithread{n}")
        return {
            "megengine": mge.__version__,
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "threads": n,
            "device": mge.get_default_device(),
        }

    def matmul_gflops(self, n: int, repeats: int) -> float:
        """float32 n x n x n GEMM GFLOP/s: the faster of `F.matmul` (one thread on every device)
        and the same GEMM as a 1x1 convolution (which uses the thread pool); one warm-up,
        median of `repeats` synchronised calls each."""
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
        ta, tb = mge.tensor(a), mge.tensor(b)
        x, w = mge.tensor(b.reshape(1, n, n, 1)), mge.tensor(a.reshape(n, n, 1, 1))
        return max(
            gemm_gflops(lambda: F.matmul(ta, tb).numpy(), n, repeats),
            gemm_gflops(lambda: F.conv2d(x, w).numpy(), n, repeats),
        )

    def build(self, model: str, form: str, state: Mapping[str, np.ndarray]) -> M.Module:
        if form == "plain":
            return plain_model(model, state)
        return _eval(bm.load_state(bm.create_model(model, deploy=form == "deploy"), state))

    def predict(self, module: M.Module, x: np.ndarray) -> np.ndarray:
        y: np.ndarray = bm.predict(module, x)
        return y

    def forward(self, module: M.Module, x: np.ndarray) -> Callable[[], np.ndarray]:
        """Eager eval-mode forward; `.numpy()` of the output waits for the whole computation."""
        _eval(module)
        xt = mge.tensor(np.ascontiguousarray(x, np.float32))
        return lambda: module(xt).numpy()

    def _traced(self, module: M.Module, x: np.ndarray) -> FastPath:
        _eval(module)

        def infer(data: mge.Tensor) -> mge.Tensor:
            return module(data)

        traced = trace(symbolic=True, capture_as_const=True)(infer)  # trace is untyped: no decorator

        xt = mge.tensor(np.ascontiguousarray(x, np.float32))
        fn = lambda: traced(xt).numpy()  # noqa: E731
        y, compile_s = _timed_call(fn)  # the first call traces and compiles the graph
        return FastPath(fn, y, compile_s)

    def fast_paths(self, modules: Mapping[str, M.Module], x: np.ndarray, config: BenchConfig) -> dict[str, FastPath]:
        """`<form>/traced` for every form; tracing takes seconds, so `config.compile` (meant for
        the slow torch.compile) does not gate it."""
        out = {f"{form}/traced": self._traced(m, x) for form, m in modules.items()}
        if config.mge_fastrun:
            out["deploy/fastrun"] = self._fastrun(modules["deploy"], x)
            out["deploy/traced+fastrun"] = self._traced_fastrun(modules["deploy"], x)
        return out

    def _fastrun(self, module: M.Module, x: np.ndarray) -> FastPath:
        forward = self.forward(module, x)

        def fn() -> np.ndarray:
            with fastrun():
                return forward()

        y, profile_s = _timed_call(fn)  # the first call profiles every new conv shape
        return FastPath(fn, y, profile_s)

    def _traced_fastrun(self, module: M.Module, x: np.ndarray) -> FastPath:
        with tempfile.TemporaryDirectory(prefix="reparam-bench-") as tmp:
            t0 = time.perf_counter()
            path = bm.export_traced(module, os.path.join(tmp, "m.mge"), x.shape)
            graph = TracedGraph(path, fastrun=True)
        y = graph.run(x)  # compiles, profiles every new conv shape
        return FastPath(lambda: graph.run(x), y, time.perf_counter() - t0)


if __name__ == "__main__":
    sys.exit(main(MegEngineBench, "backends.megengine.bench"))
