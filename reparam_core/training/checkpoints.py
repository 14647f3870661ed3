"""The files of a training run: its checkpoint (model, optimizer and EMA arrays with the
progress, refused for other settings), the metrics file (JSON lines), the final neutral files of
both forms, and the `--init` state; every file written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..blocks.fuse import reparameterize_state
from ..blocks.nodes import SpecLike, in_form
from ..errors import CheckpointError
from ..formats import safetensors_io
from ..formats.atomic import atomic_write
from ..weights.state import check_state, strip_ignored
from .recipe import TrainConfig

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
_META_KEY = "reparam_train"


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` with `data` atomically (temp file, fsync, rename), with the umask's mode
    (atomic_write's temp files are private)."""
    atomic_write(os.fspath(path), data, overwrite=True)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_arrays(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> None:
    """A safetensors file written atomically, replacing `path`."""
    write_bytes(path, safetensors_io.dumps(arrays, meta))


def save_checkpoint(
    path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], progress: Mapping[str, Any]
) -> None:
    """The training state (`arrays`: model, optimizer, EMA; `progress`: step, config
    fingerprint, partial-epoch sums) as one safetensors file, written atomically."""
    save_arrays(path, arrays, {_META_KEY: json.dumps(progress, sort_keys=True)})


def load_checkpoint(path: str | os.PathLike[str], cfg: TrainConfig) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, progress) of a checkpoint written by save_checkpoint for the same settings;
    CheckpointError when there is none or it was made with other settings."""
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume: no checkpoint at {path}")
    arrays, meta = safetensors_io.load_file(path)
    if _META_KEY not in meta:
        raise CheckpointError(f"{path}: not a reparam train checkpoint")
    progress = json.loads(meta[_META_KEY])
    want = json.loads(json.dumps(cfg.fingerprint()))
    if progress.get("config") != want:
        diff = sorted(k for k in want if progress.get("config", {}).get(k) != want[k])
        raise CheckpointError(f"--resume: {path} was written with other settings ({', '.join(diff)})")
    return arrays, progress


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics file (JSON lines); [] when it does not exist."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_metrics(path: str | os.PathLike[str], records: list[dict[str, Any]]) -> None:
    """Replace the metrics file atomically with `records`, one JSON object per line."""
    write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())


def write_final(out: Path, spec: SpecLike, state: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> dict[str, str]:
    """`MODEL-train.safetensors` (the trained neutral state) and `MODEL-deploy.safetensors`
    (re-parameterized by the core, float64 algebra); returns their paths by form."""
    name = in_form(spec, "train").name
    paths = {form: os.fspath(out / f"{name}-{form}.safetensors") for form in ("train", "deploy")}
    train = {k: np.asarray(v, np.float32) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    save_arrays(paths["train"], train, {**meta, "form": "train"})
    save_arrays(paths["deploy"], reparameterize_state(spec, train), {**meta, "form": "deploy"})
    return paths


def initial_state(cfg: TrainConfig, spec: SpecLike) -> dict[str, np.ndarray] | None:
    """The neutral train-form state of `cfg.init` (canonical keys, OIHW), checked against the
    model's schema (CheckpointError / ShapeMismatchError name the file), or None without --init.
    The same file gives every framework the same starting weights (seeded initialisations
    differ between frameworks)."""
    if cfg.init is None:
        return None
    if not os.path.isfile(cfg.init):
        raise CheckpointError(f"--init: no file {cfg.init}")
    state = strip_ignored(safetensors_io.load_file(cfg.init)[0])
    check_state(spec, state, "train", source=f"--init {cfg.init}")
    return state


__all__ = [
    "CHECKPOINT",
    "METRICS",
    "write_bytes",
    "save_arrays",
    "save_checkpoint",
    "load_checkpoint",
    "read_metrics",
    "write_metrics",
    "write_final",
    "initial_state",
]
