"""The `reparam demo` summary's measured parts (per run results, porting checks, throughput) and
the table printed at the end. Every run is compared with the trained PyTorch model ("torch/train").
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from typing import Any

import numpy as np

from reparam_core.demo.agreement import compare

REFERENCE = "torch/train"
# each check of the port: (name, reference logits, compared logits)
PORTING = (
    ("megengine_train_vs_torch_train", "torch/train", "megengine/train"),
    ("megengine_deploy_vs_torch_deploy", "torch/deploy", "megengine/deploy"),
    ("megengine_loaded_torch_deploy_vs_torch_deploy", "torch/deploy", "megengine/loaded"),
    ("flax_train_vs_torch_train", "torch/train", "flax/train"),
    ("flax_deploy_vs_torch_deploy", "torch/deploy", "flax/deploy"),
    ("flax_loaded_torch_deploy_vs_torch_deploy", "torch/deploy", "flax/loaded"),
)
LABELS = {
    "torch": "PyTorch",
    "megengine": "MegEngine",
    "flax": "Flax",
    "artifact/onnx": "ONNX (onnxruntime)",
    "artifact/mge": "traced .mge",
    "artifact/stablehlo": "StableHLO (jax)",
}
METHOD = (
    "rounds time train then deploy form back to back on the test batch after one warm-up; "
    "images/s from the median time, the ratio is the median of per-round ratios"
)


def results(
    logits: Mapping[str, np.ndarray], labels: np.ndarray, throughput: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per run (FRAMEWORK/FORM or artifact/NAME): agreement with the reference, and images/s."""
    out = {name: compare(logits[REFERENCE], y, labels) for name, y in logits.items()}
    for fw, tp in throughput.items():
        for form in ("train", "deploy"):
            out[f"{fw}/{form}"]["images_per_s"] = tp[form]["images_per_s"]
    return out


def porting(logits: Mapping[str, np.ndarray], labels: np.ndarray) -> dict[str, Any]:
    """The PORTING checks: each port against the PyTorch form it came from."""
    return {name: compare(logits[a], logits[b], labels) for name, a, b in PORTING}


def all_identical(res: Mapping[str, Mapping[str, Any]]) -> dict[str, bool]:
    deploy = [r for k, r in res.items() if k.endswith("/deploy") or k.startswith("artifact/")]
    return {
        "all": all(r["identical"] for r in res.values()),
        "deploy_all_frameworks": all(r["identical"] for r in deploy),
        "frameworks": all(r["identical"] for k, r in res.items() if not k.startswith("artifact/")),
    }


def throughput_entry(tp: Mapping[str, Any], batch: int, repeats: int) -> dict[str, Any]:
    return {
        "batch": batch,
        "repeats": repeats,
        "train_images_per_s": tp["train"]["images_per_s"],
        "deploy_images_per_s": tp["deploy"]["images_per_s"],
        "deploy_over_train": tp["deploy_over_train"],
        "method": METHOD,
        "train_runs_s": tp["train"]["runs_s"],
        "deploy_runs_s": tp["deploy"]["runs_s"],
    }


def environment(mge_info: Mapping[str, Any]) -> dict[str, Any]:
    import flax
    import jax
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "megengine": mge_info.get("megengine"),
        "megengine_python": mge_info.get("python"),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def format_table(summary: Mapping[str, Any]) -> str:
    res = summary["results"]
    rows = [("framework", "form", "test acc", "same pred", "max |dlogit|", "img/s")]
    for key, r in res.items():
        if key.startswith("artifact/"):
            name, form = LABELS[key], "deploy"
        else:
            fw, form = key.split("/")
            name = LABELS[fw]
        ips = r.get("images_per_s")
        rows.append(
            (
                name,
                form,
                f"{r['accuracy']:.2%}",
                f"{r['same_predictions']}/{r['n']}",
                "0 (ref)" if key == REFERENCE else f"{r['max_abs_logit_diff']:.1e}",
                f"{ips:,.0f}" if ips else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    p = summary["params"]
    tp = summary["throughput"]
    speed = ", ".join(f"{LABELS[fw]} x{tp[fw]['deploy_over_train']:.2f}" for fw in tp)
    ok = summary["all_identical"]["all"]
    lines += [
        "",
        f"parameters: {p['train']:,} (train) -> {p['deploy']:,} (deploy); deploy/train throughput: {speed}",
        (
            "identical predictions in every framework, form and artifact"
            if ok
            else "WARNING: some predictions differ from the trained PyTorch model"
        ),
        f"wrote {summary['out']}/: {len(summary['checkpoints'])} checkpoints (checkpoints/), "
        f"3 deploy artifacts (deploy/), summary.json, summary.png; total {summary['seconds']:.1f} s",
    ]
    return "\n".join(lines)


__all__ = [
    "REFERENCE",
    "PORTING",
    "LABELS",
    "results",
    "porting",
    "all_identical",
    "throughput_entry",
    "environment",
    "format_table",
]
