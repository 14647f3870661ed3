"""`reparam bench`, PyTorch side: run as `python -m backends.torch.bench CONFIG_JSON` (.venv).

Forms: train and deploy (our blocks, eager NCHW, inference mode) and the plain reference
(`nn.Sequential` of `nn.Conv2d` + activation, pool, `nn.Linear`, built from
reparam_core.bench.plain and loaded with the deploy form's weights). Fast paths of the deploy form:
channels_last, `torch.compile`, and both; the plain reference in channels_last too. Other
runtimes and precisions of the same deploy form: its ONNX export in ONNX Runtime (float32, and
int8 QDQ quantized per output channel, calibrated on the bench input: a speed figure, accuracy
is `reparam quantize`'s), and torch eager under CPU bf16 autocast.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from backends import torch as bt
from reparam_core import get_spec, state_schema
from reparam_core.bench.plain import plain_layers
from reparam_core.bench.plan import INT8_PATH, ORT_PATH, BackendBench, BenchConfig, FastPath, gemm_gflops, main

ACTS = {"relu": nn.ReLU, "silu": nn.SiLU, "identity": nn.Identity}
Net = Callable[[torch.Tensor], torch.Tensor]  # a module or its torch.compile'd form


def plain_model(model: str, state: Mapping[str, np.ndarray]) -> nn.Sequential:
    """The deploy network as torch's own layers, weights from a deploy-form neutral state."""
    spec = get_spec(model)
    layers: list[nn.Module] = []
    weights: dict[str, np.ndarray] = {}
    for p in plain_layers(spec):
        for field in ("weight", "bias"):
            weights[f"{len(layers)}.{field}"] = state[f"{p.key}.{field}"]
        layers += [
            nn.Conv2d(
                p.in_channels, p.out_channels, p.kernel_size, p.stride, p.padding, p.dilation, p.groups, bias=True
            ),
            ACTS[p.act](),
        ]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    for field in ("weight", "bias"):
        weights[f"{len(layers)}.{field}"] = state[f"linear.{field}"]
    classes, features = state_schema(spec, "deploy")["linear.weight"].shape
    net = nn.Sequential(*layers, nn.Linear(features, classes))
    net.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()})
    return net.eval()


def _channels_last(module: nn.Module) -> nn.Module:
    """A copy of `module` with its weights in channels_last memory format."""
    out = copy.deepcopy(module)
    out.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # in place; not in torch's stubs
    return out


class TorchBench(BackendBench):
    name = "torch"
    api = bt

    def setup(self, threads: int | None) -> dict[str, Any]:
        if threads:
            torch.set_num_threads(threads)
        return {"torch": torch.__version__, "python": sys.version.split()[0], "threads": torch.get_num_threads()}

    def matmul_gflops(self, n: int, repeats: int) -> float:
        a, b = torch.randn(n, n), torch.randn(n, n)
        return gemm_gflops(lambda: torch.mm(a, b), n, repeats)

    def build(self, model: str, form: str, state: Mapping[str, np.ndarray]) -> nn.Module:
        if form == "plain":
            return plain_model(model, state)
        return bt.load_state(bt.create_model(model, deploy=form == "deploy"), state).eval()

    def predict(self, module: nn.Module, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            y: np.ndarray = module.eval()(torch.from_numpy(x)).numpy()
        return y

    def forward(self, module: Net, x: np.ndarray, channels_last: bool = False) -> Callable[[], torch.Tensor]:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        xt = torch.from_numpy(x).contiguous(memory_format=fmt)

        def fn() -> torch.Tensor:
            with torch.inference_mode():
                y: torch.Tensor = module(xt)
            return y

        return fn

    def _fast(self, module: Net, x: np.ndarray, channels_last: bool) -> FastPath:
        t0 = time.perf_counter()
        fn = self.forward(module, x, channels_last)
        y = fn().float().numpy()  # the first call compiles a torch.compile'd module
        return FastPath(fn, y, time.perf_counter() - t0)

    def fast_paths(self, modules: Mapping[str, nn.Module], x: np.ndarray, config: BenchConfig) -> dict[str, FastPath]:
        out = {"deploy/channels_last": self._fast(_channels_last(modules["deploy"]), x, True)}
        if "plain" in modules:
            out["plain/channels_last"] = self._fast(_channels_last(modules["plain"]), x, True)
        if config.compile:
            out["deploy/compile"] = self._fast(torch.compile(modules["deploy"]), x, False)
            out["deploy/compile+channels_last"] = self._fast(torch.compile(_channels_last(modules["deploy"])), x, True)
        if config.bf16:
            out["deploy/bf16-autocast"] = self._bf16(modules["deploy"], x)
        if config.onnxruntime:
            # the deploy form is one of ours (build), what export_onnx takes
            out.update(self._onnxruntime(cast(bt.RepModule, modules["deploy"]), x))
        return out

    def _bf16(self, module: nn.Module, x: np.ndarray) -> FastPath:
        """Eager deploy form under `torch.autocast("cpu", torch.bfloat16)`: convs and linears in
        bf16 (oneDNN's bf16 kernels need AVX-512 BF16 or AMX to be fast)."""
        xt = torch.from_numpy(x)

        def fn() -> torch.Tensor:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                y: torch.Tensor = module(xt)
            return y

        t0 = time.perf_counter()
        y = fn().float().numpy()
        return FastPath(fn, y, time.perf_counter() - t0, "bfloat16")

    def _onnxruntime(self, module: bt.RepModule, x: np.ndarray) -> dict[str, FastPath]:
        """The deploy form exported to ONNX and run by ONNX Runtime with torch's thread count:
        float32 as exported, and int8 (QDQ, weights per output channel, 7-bit where the CPU has
        no VNNI/AMX int8 dot product) calibrated on `x`. first-call s: export (+ quantization)
        and session creation."""
        from backends.onnx import quantize_qdq
        from reparam_core.quant.hardware import has_int8_dot

        with tempfile.TemporaryDirectory(prefix="reparam-bench-") as tmp:
            t0 = time.perf_counter()
            path = bt.export_onnx(module, os.path.join(tmp, "deploy.onnx"), x.shape)
            fp32 = _ort_path(path, x, t0, "float32")
            t0 = time.perf_counter()
            int8 = quantize_qdq(path, x, reduce_range=not has_int8_dot(), batch=len(x))
            return {ORT_PATH: fp32, INT8_PATH: _ort_path(int8, x, t0, "int8")}


def _ort_path(graph: str | bytes, x: np.ndarray, t0: float, precision: str) -> FastPath:
    """An ONNX Runtime session over `graph` with torch's thread count, run once on `x`;
    compile_s counts from `t0` (export or quantization) to the end of that first run."""
    from backends.onnx import ort_session

    sess = ort_session(graph, threads=torch.get_num_threads())
    feed = {sess.get_inputs()[0].name: x}  # type: ignore[attr-defined]

    def fn() -> np.ndarray:
        y: np.ndarray = sess.run(None, feed)[0]  # type: ignore[attr-defined]
        return y

    y = np.asarray(fn(), np.float32)
    return FastPath(fn, y, time.perf_counter() - t0, precision)


if __name__ == "__main__":
    sys.exit(main(TorchBench, "backends.torch.bench"))
