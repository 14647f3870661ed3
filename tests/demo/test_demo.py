"""`reparam demo` end to end: one-epoch runs into temporary directories (~15 s each on 2 cores).
The test split is reparam_core.training's fixed split of the digits (359 images).

Checks every file the demo writes (checkpoints read back in their own frameworks, deploy
artifacts run in their own runtimes), that all frameworks, forms and artifacts predict the same
classes as the trained PyTorch model, and that two runs with the same seed are identical.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reparam_core import count_params, get_spec
from reparam_core.formats.safetensors_io import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
MODEL = "RepVGG-mini"
FORMS = ("train", "deploy")
CKPT_EXT = {"torch": ".pth", "megengine": ".pkl", "flax": ".msgpack", "safetensors": ".safetensors"}
RESULT_KEYS = (
    "torch/train",
    "torch/deploy",
    "megengine/train",
    "megengine/deploy",
    "flax/train",
    "flax/deploy",
    "artifact/onnx",
    "artifact/mge",
    "artifact/stablehlo",
)
LOGIT_ATOL = 1e-4  # float32 logits of the same weights in different frameworks (|logit| ~ 10)


def _run_demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "demo", "--out", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two identical one-epoch runs (default seed) into separate directories."""
    out = []
    for i in range(2):
        d = tmp_path_factory.mktemp(f"demo{i}")
        proc = _run_demo(d, "--epochs", "1")
        with open(d / "summary.json") as f:
            out.append((d, json.load(f), proc.stdout))
    return out


@pytest.fixture(scope="module")
def run(runs):
    return runs[0]


@pytest.fixture(scope="module")
def data():
    from reparam_core.training.digits import load_digits_split

    return load_digits_split()


# --------------------------------------------------------------------------- summary / table


def test_summary_figures(run):
    d, s, _ = run
    spec = get_spec(MODEL, 10)
    assert s["model"] == MODEL and s["data"]["n_test"] == 359 and s["data"]["n_train"] == 1438
    assert s["params"] == {"train": count_params(spec, "train"), "deploy": count_params(spec, "deploy")}
    assert s["params"]["deploy"] < s["params"]["train"]
    assert set(s["results"]) == set(RESULT_KEYS)
    assert len(s["training"]["history"]) == 1 and s["training"]["epochs"] == 1
    for fw in ("torch", "megengine", "flax"):
        tp = s["throughput"][fw]
        assert tp["repeats"] >= 5 and len(tp["train_runs_s"]) == len(tp["deploy_runs_s"]) == tp["repeats"]
        assert tp["batch"] == s["data"]["n_test"] == 359
        # every figure recomputed here from the raw per-round timings, with the test's own median
        for form in FORMS:
            runs_s = tp[f"{form}_runs_s"]
            assert all(t > 0 for t in runs_s), (fw, form, runs_s)
            ips = 359 / statistics.median(runs_s)
            assert tp[f"{form}_images_per_s"] == pytest.approx(ips, rel=1e-12), (fw, form)
            assert s["results"][f"{fw}/{form}"]["images_per_s"] == pytest.approx(ips, rel=1e-12)
        ratios = sorted(t / d for t, d in zip(tp["train_runs_s"], tp["deploy_runs_s"]))
        mid = len(ratios) // 2
        median_ratio = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
        assert tp["deploy_over_train"] == pytest.approx(median_ratio, rel=1e-12), fw
    # one epoch already learns something (10 classes: chance is 10%)
    assert s["results"]["torch/train"]["accuracy"] > 0.5


def test_throughput_figures_from_a_fixed_clock(monkeypatch):
    """reparam_core/bench/timing.py (the demo's throughput figures) on known per-call times: a fake clock
    that each callable advances by a scripted amount. Medians worked out by hand; the per-round
    ratio median (3.0) differs from the ratio of the medians (5 / 2 = 2.5) and from the mean
    ratio (2.95), so a helper computing either of those fails."""
    from types import SimpleNamespace

    from reparam_core.bench import timing

    clock = [0.0]
    calls: list[str] = []
    # the first call of each is the untimed warm-up round
    durations = {"train": [100.0, 3.0, 10.0, 5.0, 4.0, 8.0], "deploy": [100.0, 1.0, 4.0, 4.0, 1.0, 2.0]}

    def fn(name):
        def call():
            calls.append(name)
            clock[0] += durations[name][calls.count(name) - 1]

        return call

    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    out = timing.interleaved_throughput({"train": fn("train"), "deploy": fn("deploy")}, batch=8, repeats=5)
    assert calls == ["train", "deploy"] * 6  # interleaved rounds, warm-up included
    assert out["train"] == {"median_s": 5.0, "images_per_s": 1.6, "runs_s": [3.0, 10.0, 5.0, 4.0, 8.0]}
    assert out["deploy"] == {"median_s": 2.0, "images_per_s": 4.0, "runs_s": [1.0, 4.0, 4.0, 1.0, 2.0]}
    assert out["deploy_over_train"] == 3.0  # round ratios 3, 2.5, 1.25, 4, 4


def test_all_predictions_identical(run):
    _, s, _ = run
    for key in RESULT_KEYS:
        r = s["results"][key]
        assert r["n"] == 359
        assert r["same_predictions"] == 359 and r["identical"], key
        assert r["accuracy"] == s["results"]["torch/train"]["accuracy"], key
        assert r["max_abs_logit_diff"] < LOGIT_ATOL, key
    assert s["all_identical"] == {"all": True, "deploy_all_frameworks": True, "frameworks": True}
    for name, cmp in s["porting"].items():
        if isinstance(cmp, dict) and "identical" in cmp:
            assert cmp["identical"] and cmp["max_abs_logit_diff"] < LOGIT_ATOL, name
    fused = s["porting"]["fused_state_max_diff"]
    assert fused["megengine_vs_torch"] < 1e-5 and fused["flax_vs_torch"] < 1e-5


def test_terminal_table(run):
    _, s, stdout = run
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("framework"))
    rows = lines[header + 2 : header + 2 + len(RESULT_KEYS)]
    for row, name in zip(
        rows, ("PyTorch", "PyTorch", "MegEngine", "MegEngine", "Flax", "Flax", "ONNX", "traced .mge", "StableHLO")
    ):
        assert row.startswith(name) and "359/359" in row
    acc = f"{s['results']['torch/train']['accuracy']:.2%}"
    assert all(acc in row for row in rows)
    assert "identical predictions in every framework" in stdout


def test_determinism(runs):
    (d1, s1, _), (d2, s2, _) = runs
    assert s1["training"]["history"] == s2["training"]["history"]
    for key in RESULT_KEYS:
        assert s1["results"][key]["accuracy"] == s2["results"][key]["accuracy"]
    a = (d1 / "checkpoints" / f"{MODEL}-train.safetensors").read_bytes()
    b = (d2 / "checkpoints" / f"{MODEL}-train.safetensors").read_bytes()
    assert a == b, "same seed, different trained weights"


# --------------------------------------------------------------------------- files


def test_every_file_written(run):
    d, s, _ = run
    expected = [d / "summary.json", d / "summary.png"]
    expected += [d / "checkpoints" / f"{MODEL}-{form}{ext}" for form in FORMS for ext in CKPT_EXT.values()]
    expected += [d / "deploy" / f"{MODEL}{ext}" for ext in (".onnx", ".mge", ".stablehlo")]
    for p in expected:
        assert p.is_file() and p.stat().st_size > 1000, p
    assert len(s["checkpoints"]) == 8 and all(c["read_back_exact"] for c in s["checkpoints"].values())


def test_png_is_a_real_figure(run):
    import matplotlib.image as mpimg

    d, _, _ = run
    with open(d / "summary.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(d / "summary.png")
    assert img.shape[0] >= 600 and img.shape[1] >= 1000
    assert img[..., :3].std() > 0.05  # not blank


@pytest.fixture(scope="module")
def reference(run, data):
    """The trained model (torch, from the .pth) and its logits on the first test images."""
    import torch

    from backends.torch import create_model, load_state, predict, reparameterize

    d, _, _ = run
    sd = torch.load(d / "checkpoints" / f"{MODEL}-train.pth", weights_only=True)
    state = {k: v.numpy() for k, v in sd.items()}
    model = load_state(create_model(MODEL, num_classes=10), state)
    x = data.x_test[:32]
    return {"state": state, "x": x, "train": predict(model, x), "deploy": predict(reparameterize(model), x)}


def test_checkpoints_load_back(run, reference):
    from reparam_core.formats import load_neutral

    d, _, _ = run
    spec = get_spec(MODEL, 10)
    neutral = {form: load_file(d / "checkpoints" / f"{MODEL}-{form}.safetensors")[0] for form in FORMS}
    assert all(np.array_equal(neutral["train"][k], v) for k, v in reference["state"].items())
    for form in FORMS:
        for fmt, ext in CKPT_EXT.items():
            state, found, fmt_found, _ = load_neutral(str(d / "checkpoints" / f"{MODEL}-{form}{ext}"), spec)
            assert found == form and fmt_found == fmt
            assert set(state) == set(neutral[form])
            assert all(np.array_equal(state[k], neutral[form][k]) for k in state), (fmt, form)


def test_checkpoints_run_in_their_frameworks(run, reference):
    """.pth in torch (done by `reference`), .msgpack in Flax, .pkl in MegEngine (worker)."""
    import msgpack  # noqa: F401 - the flax format needs it
    from flax import serialization

    from backends.flax import empty_model, load_native_state
    from backends.flax import predict as flax_predict
    from backends.megengine.remote import shared
    from reparam_core.blocks.schema import state_schema
    from reparam_core.formats import load_neutral
    from reparam_core.weights.layouts import flax_key

    d, _, _ = run
    spec = get_spec(MODEL, 10)
    x = reference["x"]
    for form in FORMS:
        # Flax: the msgpack is a real flax.serialization file with Flax keys
        tree = serialization.msgpack_restore((d / "checkpoints" / f"{MODEL}-{form}.msgpack").read_bytes())
        flat: dict[str, np.ndarray] = {}

        def walk(node, prefix=""):
            for k, v in node.items():
                key = f"{prefix}.{k}" if prefix else str(k)
                if isinstance(v, dict):
                    walk(v, key)
                else:
                    flat[key] = np.asarray(v)

        walk(tree)
        assert set(flat) == {flax_key(k, i) for k, i in state_schema(spec, form).items()}
        model = load_native_state(empty_model(MODEL, num_classes=10, deploy=form == "deploy"), flat)
        np.testing.assert_allclose(flax_predict(model, x), reference[form], atol=LOGIT_ATOL)
        # MegEngine: the .pkl through the worker
        state, _, _, _ = load_neutral(str(d / "checkpoints" / f"{MODEL}-{form}.pkl"), spec)
        y = shared().predict(model=MODEL, num_classes=10, form=form, state=state, x=x)
        np.testing.assert_allclose(y, reference[form], atol=LOGIT_ATOL)


def test_artifacts_run(run, reference, tmp_path):
    import onnx
    import onnxruntime as ort

    from backends.flax import load_stablehlo
    from backends.megengine.remote import mge_python

    d, _, _ = run
    x, ref = reference["x"], reference["deploy"]
    # ONNX: a plain graph (no BatchNormalization left), batch 1
    path = d / "deploy" / f"{MODEL}.onnx"
    graph = onnx.load(path)
    onnx.checker.check_model(graph)
    assert not any(n.op_type == "BatchNormalization" for n in graph.graph.node)
    assert sum(n.op_type == "Conv" for n in graph.graph.node) == len(get_spec(MODEL, 10).blocks())
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i : i + 1]})[0] for i in range(4)])
    np.testing.assert_allclose(y, ref[:4], atol=LOGIT_ATOL)
    # StableHLO: batch 1
    fn = load_stablehlo(d / "deploy" / f"{MODEL}.stablehlo")
    np.testing.assert_allclose(np.concatenate([fn(x[i : i + 1]) for i in range(4)]), ref[:4], atol=LOGIT_ATOL)
    # traced .mge: in the MegEngine environment
    save_file({"x": x}, tmp_path / "x.safetensors")
    code = (
        "import sys, numpy as np\n"
        "from backends.megengine import run_traced\n"
        "from reparam_core.formats.safetensors_io import load_file, save_file\n"
        "x = load_file(sys.argv[2])[0]['x']\n"
        "save_file({'y': run_traced(sys.argv[1], x)}, sys.argv[3])\n"
    )
    proc = subprocess.run(
        [
            str(mge_python()),
            "-c",
            code,
            str(d / "deploy" / f"{MODEL}.mge"),
            str(tmp_path / "x.safetensors"),
            str(tmp_path / "y.safetensors"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(load_file(tmp_path / "y.safetensors")[0]["y"], ref, atol=LOGIT_ATOL)


# --------------------------------------------------------------------------- shipped checkpoint / CLI


def test_shipped_checkpoint(data):
    """assets/demo holds a trained train-form checkpoint that `--no-train` uses: >= 95% on the
    fixed test split, and small."""
    from backends.torch import create_model, load_state, predict

    path = ROOT / "assets" / "demo" / f"{MODEL}-digits.safetensors"
    assert path.is_file() and path.stat().st_size < 4 * 2**20
    state, meta = load_file(path)
    assert meta["model"] == MODEL and meta["form"] == "train"
    assert json.loads(meta["data"])["split_seed"] == data.describe()["split_seed"]
    model = load_state(create_model(MODEL, num_classes=10), state)
    acc = float((predict(model, data.x_test).argmax(1) == data.y_test).mean())
    assert acc >= 0.95
    assert acc == pytest.approx(float(meta["test_accuracy"]), abs=1e-6)


def test_split_is_fixed_and_disjoint(data):
    from reparam_core.training.digits import load_digits_split

    assert len(set(data.train_idx) & set(data.test_idx)) == 0
    assert len(data.train_idx) + len(data.test_idx) == 1797
    assert np.array_equal(load_digits_split().test_idx, data.test_idx)
    assert data.x_test.shape == (359, 3, 32, 32) and data.x_test.dtype == np.float32
    assert sorted(np.bincount(data.y_test))[0] >= 35  # stratified: every class ~36 times


def test_cli_arguments():
    from scripts import cli

    args = cli.build_parser().parse_args(
        ["demo", "--out", "x", "--epochs", "3", "--model", MODEL, "--seed", "5", "--no-train"]
    )
    assert (args.out, args.epochs, args.model, args.seed, args.no_train) == ("x", 3, MODEL, 5, True)
    args = cli.build_parser().parse_args(["demo"])
    assert (args.out, args.model, args.seed, args.no_train) == ("demo-out", MODEL, 0, False)


def test_bad_arguments_are_one_line_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "demo", "--model", "nope", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown model" in proc.stderr and "Traceback" not in proc.stderr


def test_quantize_mode_compares_both_models_at_both_granularities(tmp_path: Path) -> None:
    """`reparam demo --quantize` (one epoch): RepVGG-mini and QARepVGG-mini, trained with the same
    recipe, each quantized per channel and per tensor; the table, quantize.json, summary.png and
    the int8 graphs. Accuracy figures of a one-epoch model are not asserted beyond sanity."""
    proc = _run_demo(tmp_path, "--quantize", "--epochs", "1")
    results = json.loads((tmp_path / "quantize.json").read_text())
    assert list(results) == ["RepVGG-mini", "QARepVGG-mini"]
    for model, by_g in results.items():
        assert list(by_g) == ["per-channel", "per-tensor"]
        for g, r in by_g.items():
            assert r["weights"] == g and r["n_eval"] == 359 and r["calibration"]["samples"] == 200
            assert 0.5 <= r["agreement"] <= 1 and np.isfinite(r["logits_sqnr_db"])
            assert len(r["layers"]) == 8  # 7 convs and the linear of the mini layout
            assert (tmp_path / "int8" / f"{model}-{g}.onnx").stat().st_size < r["bytes"]["fp32"] / 3
            # the same QDQ graph as an OpenVINO IR, measured in OpenVINO beside ONNX Runtime
            ov = r["openvino"]
            assert ov["engine"] == "openvino" and 0.5 <= ov["agreement"] <= 1 and np.isfinite(ov["logits_sqnr_db"])
            assert ov["bytes"]["int8"] == sum(
                (tmp_path / "int8" / f"{model}-{g}.{ext}").stat().st_size for ext in ("xml", "bin")
            )
        # both granularities quantize the same trained checkpoint: one float32 accuracy
        assert by_g["per-channel"]["fp32_top1"] == by_g["per-tensor"]["fp32_top1"]
    rows = [ln.split()[:2] for ln in proc.stdout.splitlines() if ln.startswith(("RepVGG", "QARep"))]
    assert rows == [[m, g] for m in results for g in ("per-channel", "per-tensor")]
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
