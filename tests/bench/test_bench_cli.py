"""`reparam bench` end to end on a tiny configuration: every backend in its own process, the
table, the JSON with every figure and the plot. No assertion on any time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--batch", "1", "--size", "32", "--repeats", "2", "--convert-repeats", "1", "--no-compile"]
FAST = {"torch": "deploy/channels_last", "flax": "deploy/jit", "megengine": "deploy/traced"}
FORMS = {  # torch's form: [precision, engine]
    "deploy": ["float32", "torch"],
    "deploy/bf16-autocast": ["bfloat16", "torch"],
    "deploy/onnxruntime": ["float32", "onnxruntime"],
    "deploy/onnxruntime-int8": ["int8", "onnxruntime"],
    "deploy/openvino": ["float32", "openvino"],
    "deploy/openvino-int8": ["int8", "openvino"],
}


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scripts.cli", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_bench_all_backends_writes_json_and_plot(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = _bench("--models", "RepVGG-A0", *TINY, "--json", str(out_json), "--plot", str(out_png))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert report["unavailable"] == {}
    assert set(report["backends"]) == {"torch", "flax", "megengine"}
    for backend, res in report["backends"].items():
        assert res["gemm_gflops"] > 0
        r = res["models"]["RepVGG-A0"]
        assert {"train", "deploy", "plain", FAST[backend]} <= set(r["forms"])
        assert max(r["check_rel_err_vs_deploy"].values()) < 1e-5, (backend, r["check_rel_err_vs_deploy"])
        assert all(len(f["runs_s"]) == 2 for f in r["forms"].values())
        assert r["ratios"]["deploy_over_train"] > 0 and r["ratios"]["deploy_over_plain"] > 0
        assert r["conversion"]["ratio"] > 0
        assert set(r["memory"]) == {"train", "deploy", "plain"}
        # at least the deploy weights (8.3 M float32) are resident in each form's probe
        assert all(m["delta_mib"] > 8.3e6 * 4 / 2**20 * 0.9 for m in r["memory"].values()), r["memory"]
    assert report["best_gemm_gflops"] == max(r["gemm_gflops"] for r in report["backends"].values())
    assert set(report["machine"]["cpu"]["features"]) >= {"AVX2", "AVX-512F", "AMX-TILE"}
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["backend", "model", "deploy/train", "deploy/plain"]
    rows = sum(ln.startswith(("torch ", "flax ", "megengine ")) for ln in lines)
    forms = sum(len(m["forms"]) for r in report["backends"].values() for m in r["models"].values())
    assert rows == 3 + forms  # the headline row of each backend, then every timed form
    # issue 18's paths: torch's deploy form in ONNX Runtime float32 and int8, and bf16 autocast;
    # issue 27's: the same graphs in OpenVINO, the best int8 over both engines' float32
    torch_r = report["backends"]["torch"]["models"]["RepVGG-A0"]
    assert torch_r["ratios"]["int8_over_ort_fp32"] > 0
    assert torch_r["ratios"]["best_int8_over_ort_fp32"] > 0 and torch_r["ratios"]["best_int8_over_openvino_fp32"] > 0
    rows = {ln.split()[2]: ln.split()[3:5] for ln in lines if ln.startswith("torch ")}
    assert {k: rows[k] for k in FORMS} == FORMS
    assert "  best int8  int8/ORT fp32  int8/OV fp32  " in lines[0]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 10_000


def test_model_without_plain_reference(tmp_path: Path) -> None:
    out_json = tmp_path / "ghost.json"
    proc = _bench(
        "--backends", "torch,megengine", "--models", "repghostnet_0_5x", *TINY, "--no-memory", "--json", str(out_json)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for backend, res in json.loads(out_json.read_text())["backends"].items():
        r = res["models"]["repghostnet_0_5x"]
        assert "plain" not in r["forms"] and {"train", "deploy", FAST[backend]} <= set(r["forms"])
        assert "deploy_over_plain" not in r["ratios"] and "memory" not in r
        assert max(r["check_rel_err_vs_deploy"].values()) < 1e-5


def test_conversion_only(tmp_path: Path) -> None:
    out_json = tmp_path / "conv.json"
    proc = _bench(
        "--backends",
        "torch",
        "--models",
        "RepVGG-A0",
        "--conversion-only",
        "--convert-repeats",
        "2",
        "--json",
        str(out_json),
        "--plot",
        str(tmp_path / "x.png"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out_json.read_text())["backends"]["torch"]["models"]["RepVGG-A0"]
    assert set(r) == {"params", "macs", "conversion"}
    assert len(r["conversion"]["runs_s"]["reparameterize"]) == 2
    assert not (tmp_path / "x.png").exists()  # nothing to plot without throughput


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    for args, needle in ((["--models", "RepVGG-A9"], "RepVGG-A0"), (["--backends", "tensorflow"], "tensorflow")):
        proc = _bench(*args, "--json", str(tmp_path / "x.json"))
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "x.json").exists()
