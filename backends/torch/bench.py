"""`reparam bench`, PyTorch side: run as `python -m backends.torch.bench CONFIG_JSON` (.venv).

Forms: train and deploy (our blocks, eager NCHW, inference mode) and the plain reference
(`nn.Sequential` of `nn.Conv2d` + activation, pool, `nn.Linear`, built from
reparam_core.bench.plain and loaded with the deploy form's weights). Fast paths of the deploy form:
channels_last, `torch.compile`, and both; the plain reference in channels_last too. Other
runtimes and precisions of the same deploy form: its ONNX export in ONNX Runtime (float32, and
int8 QDQ quantized per output channel, calibrated on the bench input: a speed figure, accuracy
is `reparam quantize`'s), the same two graphs in OpenVINO (float32 and int8 with precision hint
f32, and the float32 graph in bf16 where the CPU has AVX-512 BF16 or AMX), and torch eager under
CPU bf16 autocast.
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
from reparam_core.bench.plan import (
    INT8_PATH,
    ORT_PATH,
    OV_BF16_PATH,
    OV_INT8_PATH,
    OV_PATH,
    BackendBench,
    BenchConfig,
    FastPath,
    gemm_gflops,
    main,
)

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
        if config.onnxruntime or config.openvino:
            # the deploy form is one of ours (build), what export_onnx takes
            out.update(self._onnx_engines(cast(bt.RepModule, modules["deploy"]), x, config))
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

    def _onnx_engines(self, module: bt.RepModule, x: np.ndarray, config: BenchConfig) -> dict[str, FastPath]:
        """The deploy form exported to ONNX, float32 as exported and int8 (QDQ, weights per output
        channel, 7-bit where the CPU has no VNNI/AMX int8 dot product) calibrated on `x`, run with
        torch's thread count by ONNX Runtime (`config.onnxruntime`) and by OpenVINO
        (`config.openvino`; bf16 too with `config.bf16` where the CPU has it). first-call s:
        export (+ quantization), then session creation or compilation and the first run."""
        from backends.onnx import quantize_qdq
        from reparam_core.quant.hardware import has_int8_dot

        with tempfile.TemporaryDirectory(prefix="reparam-bench-") as tmp:
            t0 = time.perf_counter()
            path = bt.export_onnx(module, os.path.join(tmp, "deploy.onnx"), x.shape)
            export_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            int8 = quantize_qdq(path, x, reduce_range=not has_int8_dot(), batch=len(x))
            quantize_s = time.perf_counter() - t0
            out: dict[str, FastPath] = {}
            if config.onnxruntime:
                out[ORT_PATH] = _ort_path(path, x, export_s, "float32")
                out[INT8_PATH] = _ort_path(int8, x, quantize_s, "int8")
            if config.openvino:
                out.update(_openvino_paths(path, int8, x, export_s, quantize_s, config.bf16))
            return out


def _ort_path(graph: str | bytes, x: np.ndarray, prior_s: float, precision: str) -> FastPath:
    """An ONNX Runtime session over `graph` with torch's thread count, run once on `x`;
    compile_s is `prior_s` (export or quantization) plus the session's creation and first run."""
    from backends.onnx import ort_session

    t0 = time.perf_counter()
    sess = ort_session(graph, threads=torch.get_num_threads())
    feed = {sess.get_inputs()[0].name: x}  # type: ignore[attr-defined]

    def fn() -> np.ndarray:
        y: np.ndarray = sess.run(None, feed)[0]  # type: ignore[attr-defined]
        return y

    y = np.asarray(fn(), np.float32)
    return FastPath(fn, y, prior_s + time.perf_counter() - t0, precision, "onnxruntime")


def _openvino_paths(
    path: str, int8: bytes, x: np.ndarray, export_s: float, quantize_s: float, bf16: bool
) -> dict[str, FastPath]:
    """The float32 graph at `path` and the int8 QDQ graph `int8` compiled by OpenVINO for CPU
    with torch's thread count and precision hint f32; with `bf16` (and a CPU that has it) the
    float32 graph with hint bf16 too."""
    from backends.onnx.openvino import has_bf16, model_from_onnx_bytes, read_model

    out = {OV_PATH: _openvino_path(read_model(path), x, export_s, "float32")}
    if bf16 and has_bf16():
        out[OV_BF16_PATH] = _openvino_path(read_model(path), x, export_s, "bfloat16")
    out[OV_INT8_PATH] = _openvino_path(model_from_onnx_bytes(int8), x, quantize_s, "int8")
    return out


def _openvino_path(model: object, x: np.ndarray, prior_s: float, precision: str) -> FastPath:
    """`model` compiled by OpenVINO (precision hint f32 for float32 and int8, bf16 for bfloat16)
    and run once on `x`; compile_s is `prior_s` plus the compilation and the first run."""
    from backends.onnx.openvino import compile_model, runner

    t0 = time.perf_counter()
    run = runner(compile_model(model, "bfloat16" if precision == "bfloat16" else "float32", torch.get_num_threads()))
    y = run(x)
    return FastPath(lambda: run(x), y, prior_s + time.perf_counter() - t0, precision, "openvino")


if __name__ == "__main__":
    sys.exit(main(TorchBench, "backends.torch.bench"))
