"""`reparam bench`, PyTorch side: run as `python -m scripts.bench_torch CONFIG_JSON` (.venv).

Forms: train and deploy (our blocks, eager NCHW, inference mode) and the plain reference
(`nn.Sequential` of `nn.Conv2d` + activation, pool, `nn.Linear`, built from
reparam_core.plain and loaded with the deploy form's weights). Fast paths of the deploy form:
channels_last, `torch.compile`, and both; the plain reference in channels_last too.
"""
from __future__ import annotations

import copy
import sys
import time
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from backends import torch as bt
from reparam_core.plain import plain_layers
from reparam_core import get_spec

from .bench_runner import BackendBench, BenchConfig, FastPath, gemm_gflops, main

ACTS = {"relu": nn.ReLU, "silu": nn.SiLU, "identity": nn.Identity}


def plain_model(model: str, state: Mapping[str, np.ndarray]) -> nn.Sequential:
    """The deploy network as torch's own layers, weights from a deploy-form neutral state."""
    spec = get_spec(model)
    layers: list[nn.Module] = []
    weights: dict[str, np.ndarray] = {}
    for p in plain_layers(spec):
        for field in ("weight", "bias"):
            weights[f"{len(layers)}.{field}"] = state[f"{p.key}.{field}"]
        layers += [nn.Conv2d(p.in_channels, p.out_channels, p.kernel_size, p.stride, p.padding,
                             p.dilation, p.groups, bias=True), ACTS[p.act]()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    for field in ("weight", "bias"):
        weights[f"{len(layers)}.{field}"] = state[f"linear.{field}"]
    net = nn.Sequential(*layers, nn.Linear(spec.num_features, spec.num_classes))
    net.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()})
    return net.eval()


class TorchBench(BackendBench):
    name = "torch"
    api = bt

    def setup(self, threads: int | None) -> dict:
        if threads:
            torch.set_num_threads(threads)
        return {"torch": torch.__version__, "python": sys.version.split()[0],
                "threads": torch.get_num_threads()}

    def matmul_gflops(self, n: int, repeats: int) -> float:
        a, b = torch.randn(n, n), torch.randn(n, n)
        return gemm_gflops(lambda: torch.mm(a, b), n, repeats)

    def build(self, model: str, form: str, state: Mapping[str, np.ndarray]) -> nn.Module:
        if form == "plain":
            return plain_model(model, state)
        return bt.load_state(bt.create_model(model, deploy=form == "deploy"), state).eval()

    def predict(self, module: nn.Module, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module.eval()(torch.from_numpy(x)).numpy()

    def forward(self, module: nn.Module, x: np.ndarray, channels_last: bool = False) -> Any:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        xt = torch.from_numpy(x).contiguous(memory_format=fmt)

        def fn() -> torch.Tensor:
            with torch.inference_mode():
                return module(xt)
        return fn

    def _fast(self, module: nn.Module, x: np.ndarray, channels_last: bool) -> FastPath:
        t0 = time.perf_counter()
        fn = self.forward(module, x, channels_last)
        y = fn().float().numpy()  # the first call compiles a torch.compile'd module
        return FastPath(fn, y, time.perf_counter() - t0)

    def fast_paths(self, modules: Mapping[str, nn.Module], x: np.ndarray,
                   config: BenchConfig) -> dict[str, FastPath]:
        cl = lambda m: copy.deepcopy(m).to(memory_format=torch.channels_last)  # noqa: E731
        out = {"deploy/channels_last": self._fast(cl(modules["deploy"]), x, True)}
        if "plain" in modules:
            out["plain/channels_last"] = self._fast(cl(modules["plain"]), x, True)
        if config.compile:
            out["deploy/compile"] = self._fast(torch.compile(modules["deploy"]), x, False)
            out["deploy/compile+channels_last"] = self._fast(
                torch.compile(cl(modules["deploy"])), x, True)
        return out


if __name__ == "__main__":
    sys.exit(main(TorchBench, "scripts.bench_torch"))
