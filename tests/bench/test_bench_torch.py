"""PyTorch side of `reparam bench`: the plain reference is a fair comparison (same outputs)."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from backends.onnx.openvino import has_bf16
from backends.torch.bench import TorchBench, plain_model
from reparam_core import get_spec, random_state
from reparam_core.bench.plan import BenchConfig, bench_model, memory_in_child, rel_err

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("name", ["RepVGG-A0", "RepVGG-B1g4"])
def test_plain_reference_equals_deploy_form(name: str) -> None:
    bench = TorchBench()
    train = bench.build(name, "train", random_state(get_spec(name), "train", seed=3))
    deploy = bench.reparameterize(train)
    plain = plain_model(name, bench.export_state(deploy))
    # written with torch's own layers only: no reparam block inside
    assert {type(m) for m in plain.modules()} <= {
        nn.Sequential,
        nn.Conv2d,
        nn.ReLU,
        nn.AdaptiveAvgPool2d,
        nn.Flatten,
        nn.Linear,
    }
    assert sum(isinstance(m, nn.Conv2d) for m in plain.modules()) == len(get_spec(name).blocks())
    x = np.random.default_rng(0).standard_normal((2, 3, 40, 40)).astype(np.float32)
    y_deploy, y_plain = bench.predict(deploy, x), bench.predict(plain, x)
    assert rel_err(y_plain, y_deploy) < 1e-6
    assert rel_err(y_deploy, bench.predict(train, x)) < 1e-5


def test_bench_model_records_every_figure() -> None:
    config = BenchConfig(
        models=("RepVGG-A0",), batch=1, size=32, repeats=2, convert_repeats=1, compile=False, memory=False
    )
    bench = TorchBench()
    bench.setup(1)
    stages: list[str] = []
    r = bench_model(bench, "RepVGG-A0", config, "backends.torch.bench", stage=stages.append)
    assert len(stages) == 3
    ov_bf16 = {"deploy/openvino-bf16": "bfloat16"} if has_bf16() else {}  # this CPU's: AVX-512 BF16
    precision = {
        "deploy/channels_last": "float32",
        "plain/channels_last": "float32",
        "deploy/bf16-autocast": "bfloat16",
        "deploy/onnxruntime": "float32",
        "deploy/onnxruntime-int8": "int8",
        "deploy/openvino": "float32",
        **ov_bf16,
        "deploy/openvino-int8": "int8",
    }
    assert set(r["forms"]) == {"train", "deploy", "plain", *precision}
    assert all(len(f["runs_s"]) == 2 and f["images_per_s"] > 0 for f in r["forms"].values())
    # ONNX Runtime and OpenVINO float32 are checked like every float32 path (OpenVINO's precision
    # hint f32: its bf16 default would be ~5e-3 off); bf16 and int8 are reported apart
    assert max(r["check_rel_err_vs_deploy"].values()) < 1e-5
    assert {"deploy/onnxruntime", "deploy/openvino"} <= set(r["check_rel_err_vs_deploy"])
    assert r["precision"] == precision
    assert r["engine"] == {
        k: "onnxruntime" if "onnxruntime" in k else "openvino" if "openvino" in k else "torch" for k in precision
    }
    low = r["low_precision_vs_deploy"]
    assert set(low) == {k for k, v in precision.items() if v != "float32"}
    # bf16 keeps 8 mantissa bits, int8 QDQ about as many: off float32, nowhere near garbage
    assert all(1e-5 < v["rel_err"] < 0.5 for v in low.values()), low
    ra = r["ratios"]
    assert ra["int8_over_ort_fp32"] > 0
    assert ra["best_int8_path"] in ("deploy/onnxruntime-int8", "deploy/openvino-int8")
    assert ra["best_int8_over_ort_fp32"] > 0 and ra["best_int8_over_openvino_fp32"] > 0
    assert set(ra["fast_over_deploy"]) == set(precision) - {"plain/channels_last"}
    assert r["params"] == {"train": 9108968, "deploy": 8309384}
    assert ra["best_fast_path"] in ("deploy/channels_last", "deploy/onnxruntime", "deploy/openvino")
    assert r["conversion"]["ratio"] > 0 and r["conversion"]["deepcopy_s"] > 0
    g = r["conv_equiv_gflops"]["deploy"]
    assert g == pytest.approx(2 * r["macs"]["deploy"] / r["forms"]["deploy"]["median_s"] / 1e9)


def test_memory_probe_sees_the_model() -> None:
    """Each probe runs in a fresh process, so memory freed by earlier work is not reused."""
    config = BenchConfig(batch=1, size=32)
    small = memory_in_child("backends.torch.bench", "RepVGG-A0", "deploy", config)
    big = memory_in_child("backends.torch.bench", "RepVGG-B1g4", "deploy", config)
    # deploy weights alone: 8.3 M and 36.1 M float32 parameters
    assert small["delta_mib"] >= 8.3e6 * 4 / 2**20 * 0.9
    assert big["delta_mib"] >= 36.1e6 * 4 / 2**20 * 0.9
    assert big["peak_mib"] >= big["baseline_mib"] + big["delta_mib"] - 1e-9
