"""Every registry model through both graph passes, in train form, against the library's own
deploy form: op counts of the ONNX graph before and after `reparam fuse`'s pass and of the deploy
form's export, convs after `backends.torch.fuse`, and each result's relative error against the
float64 oracle (random weights and BN statistics, 1x3x32x32, 10 classes). A report, not a test
(tests/graphfuse asserts the same on the fast models, and on all with --slow).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/fuse_registry.py [--models A,B] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings

import numpy as np
import onnxruntime as ort
import torch

import backends.onnx as bo
import backends.torch as bt
from parity_tests.tolerance import model_tolerance, rel_err
from reparam_core import get_spec, list_models, random_state
from reparam_core.blocks import oracle


def _convs(m: torch.nn.Module) -> int:
    return sum(isinstance(c, torch.nn.Conv2d) for c in m.modules())


def _ort(model: bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def model_row(name: str, tmp: str) -> dict:
    spec = get_spec(name, 10)
    state = random_state(spec, "train", 0)
    model = bt.load_state(bt.empty_model(name, num_classes=10), state).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    want = oracle.forward(spec, state, x, "train")
    train_path = os.path.join(tmp, f"{name}-train.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(x),),
            train_path,
            input_names=["input"],
            output_names=["output"],
            opset_version=17,
            dynamo=False,
        )
    train = bo.load(train_path)
    deploy = bo.load(bt.export_onnx(model, os.path.join(tmp, f"{name}-deploy.onnx"), x.shape))
    fused, report = bo.fuse_model(train)
    torch_fused = bt.fuse(model, torch.from_numpy(x))
    with torch.no_grad():
        y_torch = torch_fused(torch.from_numpy(x)).double().numpy()
    return {
        "model": name,
        "ops_train": sum(bo.op_histogram(train).values()),
        "ops_fused": sum(bo.op_histogram(fused).values()),
        "ops_deploy": sum(bo.op_histogram(deploy).values()),
        "same_histogram": bo.op_histogram(fused) == bo.op_histogram(deploy),
        "onnx_sums_fused": len(report.fused),
        "onnx_left": len(report.left),
        "onnx_rel_err": rel_err(_ort(fused.SerializeToString(), x), want),
        "torch_convs": _convs(torch_fused),
        "deploy_convs": _convs(bt.reparameterize(model)),
        "torch_rel_err": rel_err(y_torch, want),
        "tolerance": model_tolerance(spec),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=list_models())
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    rows = []
    print(
        "| model | ONNX ops train -> fused (deploy export) | same histogram | sums fused / left "
        "| ONNX rel err | torch convs fused (deploy) | torch rel err | tolerance |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="reparam-fuse-") as tmp:
        for name in a.models:
            r = model_row(name, tmp)
            rows.append(r)
            print(
                f"| {name} | {r['ops_train']} -> {r['ops_fused']} ({r['ops_deploy']}) | "
                f"{'yes' if r['same_histogram'] else 'NO'} | {r['onnx_sums_fused']} / "
                f"{r['onnx_left']} | {r['onnx_rel_err']:.1e} | {r['torch_convs']} "
                f"({r['deploy_convs']}) | {r['torch_rel_err']:.1e} | {r['tolerance']:.0e} |",
                flush=True,
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
