"""`reparam bench`'s measurement plan: one process per backend runs it; the parent reads its events.

A backend supplies a `Bench` (how to build, convert, copy and run its models, its fast paths and
its matmul); the plan, the same for every backend, lives here once:

  per model: conversion time of `reparameterize` vs `copy.deepcopy` (paired rounds); outputs of
  train / deploy / plain reference / fast paths checked against each other; throughput of every
  form timed in interleaved rounds after warm-up; conv-equivalent GFLOP/s (2 x reparam_core's
  direct-convolution MAC count / time: a Winograd or FFT kernel does fewer real operations, so
  this can exceed a GEMM rate); the framework's float32 GEMM GFLOP/s measured in the same
  process (the parent divides by the best GEMM of every backend of the run); peak resident
  memory of each form, each in a fresh child process of its own.

Protocol: `python -m backends.<backend>.bench CONFIG_JSON` (the child, `main`) writes JSON lines on
its original stdout (`{"event": "stage", ...}` while it runs, then `{"event": "result",
"result": {...}}`); anything the frameworks print goes to stderr. `--memory PROBE_JSON` runs one
memory probe instead. `run_child` is the parent's end: it starts the child and reads the lines.
numpy and the standard library only (runs in .venv and in .venv-mge).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from reparam_core.bench.plain import has_plain_reference
from reparam_core.bench.protocol import open_protocol
from reparam_core.bench.timing import interleaved_times, paired_ratio, summarize
from reparam_core.blocks.counting import count_macs, count_params
from reparam_core.errors import BackendUnavailableError
from reparam_core.families.specs import get_spec
from reparam_core.weights.state import random_state

Fn = Callable[[], Any]
GEMM_N = 2048  # the float32 GEMM probe: GEMM_N x GEMM_N x GEMM_N
ORT_PATH, INT8_PATH = "deploy/onnxruntime", "deploy/onnxruntime-int8"  # int8 over float32, same runtime
OV_PATH, OV_BF16_PATH, OV_INT8_PATH = "deploy/openvino", "deploy/openvino-bf16", "deploy/openvino-int8"


@dataclass(frozen=True)
class BenchConfig:
    models: tuple[str, ...] = ("RepVGG-A0",)
    batch: int = 8
    size: int = 224
    repeats: int = 5
    convert_repeats: int = 3
    threads: int | None = None
    seed: int = 0
    compile: bool = True  # the slow-to-build fast paths (torch.compile)
    conversion_only: bool = False
    memory: bool = True
    mge_fastrun: bool = False  # MegEngine's profiled kernels as extra fast paths
    onnxruntime: bool = True  # torch side: the deploy form in ONNX Runtime, float32 and int8
    openvino: bool = True  # torch side: the deploy form in OpenVINO, float32, bf16 (where the CPU has it) and int8
    bf16: bool = True  # torch side: the deploy form under CPU bf16 autocast (and in OpenVINO bf16)


@dataclass
class FastPath:
    """A faster way to run one form: its callable, its output on the bench input (checked against
    the eager deploy form) and the one-off build/compile/profiling time (its first call),
    reported apart from throughput."""

    fn: Fn
    output: np.ndarray
    compile_s: float = 0.0
    precision: str = "float32"  # "int8", "bfloat16": its outputs are compared, not required equal
    engine: str | None = None  # what runs it ("onnxruntime", "openvino"); None: the backend itself


class Bench(Protocol):
    name: str

    def setup(self, threads: int | None) -> dict[str, Any]: ...  # versions, threads in use
    def matmul_gflops(self, n: int, repeats: int) -> float: ...
    def build(self, model: str, form: str, state: Mapping[str, np.ndarray]) -> Any: ...
    def reparameterize(self, module: Any) -> Any: ...
    def deepcopy(self, module: Any) -> Any: ...
    def export_state(self, module: Any) -> dict[str, np.ndarray]: ...
    def predict(self, module: Any, x: np.ndarray) -> np.ndarray: ...
    def forward(self, module: Any, x: np.ndarray) -> Fn: ...  # eager, synchronous
    def fast_paths(self, modules: Mapping[str, Any], x: np.ndarray, config: BenchConfig) -> dict[str, FastPath]: ...


class BackendBench:
    """What every backend's Bench does the same way, through its backend module `api`
    (`backends.torch`, ...): conversion, neutral state export and the deep copy conversion is
    timed against (`copy.deepcopy` copies every array in every framework; Flax's `nnx.clone`
    would share them)."""

    api: ModuleType

    def reparameterize(self, module: Any) -> Any:
        return self.api.reparameterize(module)

    def deepcopy(self, module: Any) -> Any:
        return copy.deepcopy(module)

    def export_state(self, module: Any) -> dict[str, np.ndarray]:
        state: dict[str, np.ndarray] = self.api.export_state(module)
        return state


def gemm_gflops(fn: Fn, n: int, repeats: int) -> float:
    """GFLOP/s of `fn`, a synchronous float32 n x n x n matrix product: 2 n^3 / median time."""
    return 2 * n**3 / float(np.median(interleaved_times({"gemm": fn}, repeats)["gemm"])) / 1e9


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    """max |y - ref| / max |ref| in float64."""
    ref64 = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(y, np.float64) - ref64).max() / max(np.abs(ref64).max(), 1e-30))


def bench_input(config: BenchConfig) -> np.ndarray:
    rng = np.random.default_rng(config.seed)
    return rng.standard_normal((config.batch, 3, config.size, config.size)).astype(np.float32)


# --------------------------------------------------------------------------- memory


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_probe(bench: Bench, model: str, form: str, config: BenchConfig) -> dict[str, Any]:
    """Peak resident memory of building `form` of `model`, loading its weights and running one
    batch, in MiB above the process's resident size before (framework imported, input made)."""
    bench.setup(config.threads)
    spec = get_spec(model)
    x = bench_input(config)
    state = random_state(spec, "train" if form == "train" else "deploy", config.seed)
    reset_peak_rss()
    base = _status_kib("VmRSS")
    bench.predict(bench.build(model, form, state), x)
    peak = _status_kib("VmHWM")
    return {"baseline_mib": base / 1024, "peak_mib": peak / 1024, "delta_mib": (peak - base) / 1024}


def memory_in_child(module: str, model: str, form: str, config: BenchConfig) -> dict[str, Any]:
    """memory_probe in a fresh `python -m module` so that no other form's memory is counted."""
    req = json.dumps({"model": model, "form": form, "config": asdict(config)})
    proc = subprocess.run(
        [sys.executable, "-m", module, "--memory", req], capture_output=True, text=True, cwd=os.getcwd()
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    probe: dict[str, Any] = json.loads(lines[-1])
    return probe


# --------------------------------------------------------------------------- the plan


def conversion(bench: Bench, train: Any, repeats: int) -> dict[str, Any]:
    """`reparameterize` vs `copy.deepcopy` of the same train-form model, in paired rounds."""
    times = interleaved_times(
        {"reparameterize": lambda: bench.reparameterize(train), "deepcopy": lambda: bench.deepcopy(train)}, repeats
    )
    return {
        "reparameterize_s": float(np.median(times["reparameterize"])),
        "deepcopy_s": float(np.median(times["deepcopy"])),
        "ratio": paired_ratio(times["reparameterize"], times["deepcopy"]),
        "runs_s": times,
    }


def bench_model(
    bench: Bench, model: str, config: BenchConfig, module: str, stage: Callable[[str], None]
) -> dict[str, Any]:
    spec = get_spec(model)
    out: dict[str, Any] = {
        "params": {f: count_params(spec, f) for f in ("train", "deploy")},
        "macs": {f: count_macs(spec, f, config.size) for f in ("train", "deploy")},
    }
    stage(f"{model}: conversion")
    train = bench.build(model, "train", random_state(spec, "train", config.seed))
    out["conversion"] = conversion(bench, train, config.convert_repeats)
    if config.conversion_only:
        return out
    deploy = bench.reparameterize(train)
    modules = {"train": train, "deploy": deploy}
    if has_plain_reference(spec):
        modules["plain"] = bench.build(model, "plain", bench.export_state(deploy))
    x = bench_input(config)
    stage(f"{model}: outputs and fast paths")
    outputs = {k: bench.predict(m, x) for k, m in modules.items()}
    fns = {k: bench.forward(m, x) for k, m in modules.items()}
    fast = bench.fast_paths(modules, x, config)
    exact = {k: f for k, f in fast.items() if f.precision == "float32"}
    low = {k: f for k, f in fast.items() if f.precision != "float32"}
    out["check_rel_err_vs_deploy"] = {
        k: rel_err(y, outputs["deploy"])
        for k, y in {**outputs, **{k: f.output for k, f in exact.items()}}.items()
        if not k.startswith("train")
    }
    out["check_rel_err_vs_deploy"]["train"] = rel_err(outputs["train"], outputs["deploy"])
    out["precision"] = {k: f.precision for k, f in fast.items()}
    out["engine"] = {k: f.engine or bench.name for k, f in fast.items()}
    if low:  # reduced precision: how far from float32, not a correctness check
        out["low_precision_vs_deploy"] = {
            k: {
                "rel_err": rel_err(f.output, outputs["deploy"]),
                "top1_agreement": float((f.output.argmax(1) == outputs["deploy"].argmax(1)).mean()),
            }
            for k, f in low.items()
        }
    out["compile_s"] = {k: f.compile_s for k, f in fast.items()}
    fns.update({k: f.fn for k, f in fast.items()})
    stage(f"{model}: timing {len(fns)} forms x {config.repeats} rounds")
    times = interleaved_times(fns, config.repeats)
    out["forms"] = summarize(times, config.batch)
    ratios: dict[str, Any] = {"deploy_over_train": paired_ratio(times["train"], times["deploy"])}
    if "plain" in times:
        ratios["deploy_over_plain"] = paired_ratio(times["plain"], times["deploy"])
    deploy_fast = {k: paired_ratio(times["deploy"], times[k]) for k in fast if k.startswith("deploy/")}
    if deploy_fast:
        ratios["fast_over_deploy"] = deploy_fast
    float32_fast = {k: v for k, v in deploy_fast.items() if k in exact}
    if float32_fast:  # the best float32 path; reduced precision is reported beside it
        best = max(float32_fast, key=float32_fast.__getitem__)
        ratios.update(best_fast_path=best, best_fast_over_deploy=float32_fast[best])
    if INT8_PATH in times and ORT_PATH in times:
        ratios["int8_over_ort_fp32"] = paired_ratio(times[ORT_PATH], times[INT8_PATH])
    ratios.update(best_int8(times, [k for k, f in fast.items() if f.precision == "int8"]))
    out["ratios"] = ratios
    out["conv_equiv_gflops"] = {
        k: 2 * out["macs"]["train" if k.split("/")[0] == "train" else "deploy"] * config.batch / v["median_s"] / 1e9
        for k, v in out["forms"].items()
    }
    if config.memory:
        stage(f"{model}: memory")
        out["memory"] = {f: memory_in_child(module, model, f, config) for f in modules}
    return out


def best_int8(times: Mapping[str, list[float]], int8: Sequence[str]) -> dict[str, Any]:
    """The fastest of the `int8` paths over ONNX Runtime float32 (`best_int8_path`,
    `best_int8_over_ort_fp32`) and over OpenVINO float32 (`best_int8_over_openvino_fp32`), each
    a median of paired rounds; only the figures whose paths were timed."""
    if not int8:
        return {}
    ref = ORT_PATH if ORT_PATH in times else OV_PATH if OV_PATH in times else None
    if ref is None:
        return {}
    over = {k: paired_ratio(times[ref], times[k]) for k in int8}
    best = max(over, key=over.__getitem__)
    out: dict[str, Any] = {"best_int8_path": best}
    for key, path in (("best_int8_over_ort_fp32", ORT_PATH), ("best_int8_over_openvino_fp32", OV_PATH)):
        if path in times:
            out[key] = paired_ratio(times[path], times[best])
    return out


def run_plan(bench: Bench, config: BenchConfig, module: str, emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every model of config through bench_model; returns the backend's whole result."""
    t0 = time.perf_counter()
    total = len(config.models) * (2 if config.conversion_only else 4) + 1
    done = [0]

    def stage(name: str) -> None:
        emit({"event": "stage", "backend": bench.name, "name": name, "done": done[0], "total": total})
        done[0] += 1

    result: dict[str, Any] = {
        "backend": bench.name,
        "config": asdict(config),
        "environment": bench.setup(config.threads),
    }
    stage("GEMM rate")
    result["gemm_gflops"] = bench.matmul_gflops(GEMM_N, max(config.repeats, 3))
    result["models"] = {m: bench_model(bench, m, config, module, stage) for m in config.models}
    result["seconds"] = time.perf_counter() - t0
    return result


def stage_count(config: BenchConfig) -> int:
    """How many stage events run_plan emits for `config` (the parent's progress bar)."""
    return 1 + len(config.models) * (1 if config.conversion_only else 3 + config.memory)


# --------------------------------------------------------------------------- process entry


def config_from_json(data: Mapping[str, Any]) -> BenchConfig:
    data = dict(data)
    data["models"] = tuple(data.get("models", BenchConfig.models))
    return BenchConfig(**data)


def main(make_bench: Callable[[], Bench], module: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    parser.add_argument("config", nargs="?", default="{}", help="BenchConfig as JSON")
    parser.add_argument("--memory", metavar="PROBE_JSON", help="run one memory probe")
    args = parser.parse_args(argv)
    proto = open_protocol()

    def emit(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    bench = make_bench()
    if args.memory:
        req = json.loads(args.memory)
        emit(memory_probe(bench, req["model"], req["form"], config_from_json(req["config"])))
    else:
        emit({"event": "result", "result": run_plan(bench, config_from_json(json.loads(args.config)), module, emit)})
    return 0


def run_child(
    cmd: Sequence[str], cwd: str | os.PathLike[str], name: str, on_stage: Callable[[str], None]
) -> dict[str, Any]:
    """The parent's end of the protocol: run `cmd` (a backend's `python -m ... CONFIG_JSON`) in
    `cwd`, pass each stage name to `on_stage` and return the result; BackendUnavailableError with
    the last lines of the child's stderr when it fails."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=subprocess.PIPE, stderr=err, text=True)
        result: dict[str, Any] | None = None
        for line in proc.stdout or ():
            event = json.loads(line)
            if event["event"] == "stage":
                on_stage(event["name"])
            else:
                result = event["result"]
        proc.wait()
        if proc.returncode != 0 or result is None:
            err.seek(0)
            tail = err.read().strip().splitlines()[-15:]
            raise BackendUnavailableError(f"{name} benchmark failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return result


__all__ = [
    "GEMM_N",
    "ORT_PATH",
    "INT8_PATH",
    "OV_PATH",
    "OV_BF16_PATH",
    "OV_INT8_PATH",
    "best_int8",
    "BenchConfig",
    "FastPath",
    "Bench",
    "BackendBench",
    "gemm_gflops",
    "rel_err",
    "bench_input",
    "memory_probe",
    "memory_in_child",
    "run_plan",
    "stage_count",
    "main",
    "config_from_json",
    "run_child",
]
