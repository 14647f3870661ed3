"""OpenVINO as a deploy engine (issue 27): the int8 IR that `reparam quantize --engine openvino`
writes reads back and runs within int8 tolerance of float32, the same bytes on a rerun; every
compile through the project sets the precision explicitly (OpenVINO's CPU default is bf16 on
CPUs with AVX-512 BF16 or AMX, as this one); bad inputs exit 2 and write nothing; the bench's best
int8 figures. No timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import backends.torch as bt
from backends.onnx import openvino as bo
from backends.onnx import quantize_qdq
from reparam_core import get_spec, random_state
from reparam_core.bench.plan import best_int8
from reparam_core.errors import ArgumentError, CheckpointError
from reparam_core.formats import read_raw, to_neutral
from reparam_core.training.digits import load_digits_split
from reparam_core.weights.precision import sqnr_db
from scripts import quantize as qz

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ov = bo.import_openvino()  # telemetry off, as the project imports it

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MINI = os.path.join(ROOT, "assets", "demo", "RepVGG-mini-digits.safetensors")
# Measured (this machine, AVX-512 VNNI): the demo RepVGG-mini's int8 IR, 64 calibration digits,
# read back and run by OpenVINO on the 359 test digits against torch float32: logits SQNR
# 28.7 dB, max |error| / max |logit| 0.135, top-1 agreement 99.44% (200 digits: 29.5 dB, 0.054).
# The float32 graph in OpenVINO with hint f32: 1.0e-6 of torch (bf16, its default here: 5.3e-3).
MIN_SQNR_DB, MAX_REL_ERR, MIN_AGREEMENT, FP32_REL_ERR = 25.0, 0.25, 0.97, 1e-5


def _rel(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def _mini_float32(x: np.ndarray) -> np.ndarray:
    """The demo model's float32 logits on `x`, by torch."""
    raw, fmt = read_raw(MINI)
    state, _, _ = to_neutral(raw, get_spec("RepVGG-mini", 10), fmt, None, source=MINI)
    module = bt.reparameterize(bt.load_state(bt.create_model("RepVGG-mini", num_classes=10), state)).eval()
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


def _quantize(tmp_path, dst, *extra):
    return qz.main([MINI, str(tmp_path / dst), "--model", "RepVGG-mini", *extra])


def test_int8_ir_round_trip(tmp_path, capsys):
    calib = ["--calib", "digits", "--samples", "64", "--eval", "digits", "--engine", "openvino"]
    assert _quantize(tmp_path, "a.xml", *calib, "--json", str(tmp_path / "a.json")) == 0, capsys.readouterr().err
    assert _quantize(tmp_path, "b.xml", *calib) == 0
    for ext in ("xml", "bin"):  # a rerun (same process, other counters inside OpenVINO): same bytes
        assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.json", "a.xml", "b.bin", "b.xml"]  # no temp left
    rep = json.loads((tmp_path / "a.json").read_text())
    assert rep["engine"] == "openvino" and rep["inference_precision_hint"] == "f32"
    assert rep["bytes"]["int8"] == sum(os.path.getsize(tmp_path / f"a.{e}") for e in ("xml", "bin"))
    assert [lr["name"] for lr in rep["layers"]][-1] == "linear" and len(rep["layers"]) == 8  # QDQ math
    x = load_digits_split().x_test
    ref = _mini_float32(x)
    y = bo.run_openvino(bo.compile_model(str(tmp_path / "a.xml")), x)
    assert sqnr_db(ref, y) >= MIN_SQNR_DB and _rel(y, ref) <= MAX_REL_ERR
    assert float((y.argmax(1) == ref.argmax(1)).mean()) >= MIN_AGREEMENT
    # the IR read back is the model the report measured
    assert sqnr_db(ref, y) == pytest.approx(rep["logits_sqnr_db"], abs=0.05)
    assert rep["agreement"] == pytest.approx(float((y.argmax(1) == ref.argmax(1)).mean()))


@pytest.fixture(scope="module")
def a0_graphs(tmp_path_factory):
    """RepVGG-A0's deploy form (random weights) as float32 ONNX at 64x64, its int8 QDQ bytes, an
    input and torch's float32 output."""
    tmp = tmp_path_factory.mktemp("a0")
    module = bt.load_state(bt.create_model("RepVGG-A0"), random_state(get_spec("RepVGG-A0"), "train", 0)).eval()
    x = np.random.default_rng(1).standard_normal((4, 3, 64, 64)).astype(np.float32)
    path = bt.export_onnx(module, str(tmp / "fp32.onnx"), x.shape)
    with torch.inference_mode():
        ref = bt.reparameterize(module)(torch.from_numpy(x)).numpy()
    return path, quantize_qdq(path, x), x, ref


def test_float32_is_float32_on_a_bf16_cpu(a0_graphs):
    path, _, x, ref = a0_graphs
    compiled = bo.compile_model(path, "float32", threads=2)
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 2
    assert _rel(bo.run_openvino(compiled, x), ref) < FP32_REL_ERR
    if bo.has_bf16():  # the trap the hint avoids: OpenVINO's own default on this CPU
        default = bo.ov_core().compile_model(bo.read_model(path), "CPU")
        assert default.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
        assert _rel(bo.run_openvino(default, x), ref) > 1e-4
        bf16 = bo.compile_model(path, "bfloat16")
        assert bf16.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
        assert 1e-4 < _rel(bo.run_openvino(bf16, x), ref) < 0.05


class _Spy:
    """An openvino.Core that records the config of every compile_model and passes it on."""

    def __init__(self, core):
        self.core, self.configs = core, []

    def __getattr__(self, name):
        return getattr(self.core, name)

    def compile_model(self, model, device, config=None):
        self.configs.append(dict(config or {}))
        return self.core.compile_model(model, device, config or {})


def test_every_project_compile_sets_the_precision(monkeypatch, a0_graphs, tmp_path):
    """The bench's OpenVINO paths and `reparam quantize --engine openvino`: each compile names its
    precision (f32 for float32 and int8)."""
    from backends.torch.bench import _openvino_paths

    path, int8, x, ref = a0_graphs
    spy = _Spy(bo.ov_core())
    monkeypatch.setattr(bo, "ov_core", lambda: spy)
    paths = _openvino_paths(path, int8, x, 0.0, 0.0, bf16=True)
    assert _rel(paths["deploy/openvino"].output, ref) < FP32_REL_ERR
    assert _quantize(tmp_path, "q.xml", "--calib", "digits", "--samples", "16", "--engine", "openvino") == 0
    hints = [c.get("INFERENCE_PRECISION_HINT") for c in spy.configs]
    bf16 = ["bf16"] if bo.has_bf16() else []
    assert hints == ["f32", *bf16, "f32", "f32", "f32"]  # bench: fp32, bf16, int8; quantize: fp32, int8
    assert [c.get("INFERENCE_NUM_THREADS") for c in spy.configs[: 2 + len(bf16)]] == [torch.get_num_threads()] * (
        2 + len(bf16)
    )


def test_precision_refusals(monkeypatch):
    with pytest.raises(ArgumentError, match="precision must be one of float32, bfloat16, got 'float16'"):
        bo.compile_config("float16")
    with pytest.raises(ArgumentError, match="threads must be >= 1, got 0"):
        bo.compile_config("float32", threads=0)
    monkeypatch.setattr(bo, "cpu_features", lambda: {"avx512_bf16": False, "amx_bf16": False})
    with pytest.raises(ArgumentError, match="bfloat16 needs a CPU with AVX-512 BF16 or AMX-BF16"):
        bo.compile_config("bfloat16")
    assert bo.compile_config("float32") == {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}


def test_ir_files_and_reads(tmp_path, a0_graphs):
    path, _, _, _ = a0_graphs
    with pytest.raises(ArgumentError, match=r"m\.onnx: an OpenVINO IR is written as DST\.xml"):
        bo.write_ir(bo.read_model(path), tmp_path / "m.onnx")
    xml, weights = bo.write_ir(bo.read_model(path), tmp_path / "m.xml")
    assert (xml, weights) == (str(tmp_path / "m.xml"), str(tmp_path / "m.bin"))
    before = (tmp_path / "m.bin").read_bytes()
    with pytest.raises(CheckpointError, match=r"m\.xml already exists"):
        bo.write_ir(bo.read_model(path), xml)
    assert bo.write_ir(bo.read_model(path), xml, overwrite=True) == (xml, weights)
    assert (tmp_path / "m.bin").read_bytes() == before
    os.unlink(weights)
    with pytest.raises(CheckpointError, match=r"m\.xml: its weights .*m\.bin are missing"):
        bo.read_model(xml)
    with pytest.raises(CheckpointError, match=r"nope\.onnx: no such file"):
        bo.read_model(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(CheckpointError, match=r"junk\.onnx: OpenVINO cannot read it"):
        bo.read_model(tmp_path / "junk.onnx")


def _fails(tmp_path, capsys, pattern, dst, *argv):
    before = sorted(os.listdir(tmp_path))
    try:
        rc = _quantize(tmp_path, dst, *argv)
    except SystemExit as e:  # argparse's own errors (scripts.cli's parser exits 2 with one line)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert pattern in err, err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temp left


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys):
    ov_args = ("--engine", "openvino")
    _fails(tmp_path, capsys, "q.onnx: an OpenVINO IR is written as DST.xml", "q.onnx", "--calib", "digits", *ov_args)
    _fails(tmp_path, capsys, "the following arguments are required: --calib", "q.xml", *ov_args)
    _fails(tmp_path, capsys, "nope: no such directory", "q.xml", "--calib", str(tmp_path / "nope"), *ov_args)
    _fails(tmp_path, capsys, "invalid choice: 'tensorrt'", "q.xml", "--calib", "digits", "--engine", "tensorrt")
    (tmp_path / "q.bin").write_bytes(b"someone else's weights")
    _fails(tmp_path, capsys, "q.bin already exists; pass --overwrite", "q.xml", "--calib", "digits", *ov_args)
    assert (tmp_path / "q.bin").read_bytes() == b"someone else's weights"
    with pytest.raises(ArgumentError, match="unknown engine 'tensorrt'; choose from onnxruntime, openvino"):
        qz.quantize_checkpoint(MINI, str(tmp_path / "q.xml"), "RepVGG-mini", calib="digits", engine="tensorrt")


def test_best_int8_over_both_engines():
    times = {  # seconds per round, two paired rounds
        "deploy/onnxruntime": [4.0, 8.0],
        "deploy/openvino": [3.0, 6.0],
        "deploy/onnxruntime-int8": [2.0, 4.0],
        "deploy/openvino-int8": [1.0, 2.0],
    }
    assert best_int8(times, ["deploy/onnxruntime-int8", "deploy/openvino-int8"]) == {
        "best_int8_path": "deploy/openvino-int8",
        "best_int8_over_ort_fp32": 4.0,
        "best_int8_over_openvino_fp32": 3.0,
    }
    assert best_int8({"deploy/openvino": [2.0], "deploy/openvino-int8": [1.0]}, ["deploy/openvino-int8"]) == {
        "best_int8_path": "deploy/openvino-int8",
        "best_int8_over_openvino_fp32": 2.0,
    }
    assert best_int8(times, []) == {}


def test_openvino_is_imported_without_telemetry():
    """`import openvino` alone would send a usage event (openvino-telemetry, from a forked
    process); through the project openvino binds its no-op stub, and nothing forks."""
    code = (
        "import os, time\n"
        "forks = []\n"
        "fork = os.fork\n"
        "os.fork = lambda: forks.append(1) or fork()\n"
        "from backends.onnx.openvino import ov_core\n"
        "ov_core().get_versions('CPU')\n"
        "time.sleep(0.5)\n"  # the real telemetry sends from a thread pool
        "from openvino.tools.ovc import convert_impl, telemetry_utils\n"
        "import openvino_telemetry\n"  # importable again (NNCF needs it)
        "print(telemetry_utils.tm.__name__, convert_impl.tm.__name__, len(forks))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stub = "openvino.tools.ovc.telemetry_stub"
    assert proc.stdout.split() == [stub, stub, "0"]
