"""Helpers of the `reparam train` tests: run the command in a subprocess, read its outputs,
compare two trained states."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from reparam_core.formats.safetensors_io import load_file

ROOT = Path(__file__).resolve().parents[2]
MODEL = "RepVGG-mini"
# from an --init state: 2 steps without augmentation (recipe lr with warm-up, weight decay, label
# smoothing, Nesterov momentum, EMA)
INIT_STEPS = ("--max-steps", "2", "--global-batch", "16", "--no-augment", "--ema", "0.5")


def command(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "scripts.cli", "train", "--model", MODEL, "--out", str(out), *args]


def env(**extra: str) -> dict[str, str]:
    """The subprocesses' environment: one OpenMP thread per process (scripts/test.sh runs the
    MegEngine suite beside this one on 2 cores: oversubscribed OpenMP threads spin for ages)."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    e.pop("TORCHELASTIC_RUN_ID", None)
    return e


def run_train(
    out: Path, *args: str, timeout: float = 300, check: bool = True, **env_extra: str
) -> subprocess.CompletedProcess:
    """`reparam train --model MODEL --out OUT ARGS` in a subprocess; asserts exit 0 unless
    check=False."""
    proc = subprocess.run(
        command(out, *args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env(**env_extra)
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def trained(out: Path, form: str = "train") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    return load_file(out / f"{MODEL}-{form}.safetensors")


def metrics(out: Path) -> list[dict]:
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def max_rel_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, str]:
    """The largest per-tensor max|a - b| / max|b| (absolute where b is all zeros) and its key."""
    assert set(a) == set(b)
    worst, key = 0.0, ""
    for k in a:
        d = float(np.abs(a[k].astype(np.float64) - b[k]).max())
        scale = float(np.abs(b[k]).max())
        rel = d / scale if scale > 0 else d
        if rel > worst:
            worst, key = rel, k
    return worst, key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
