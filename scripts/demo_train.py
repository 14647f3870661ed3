"""The demo's trained model: RepVGG-mini (or --model) trained on the digits by `reparam train`'s
PyTorch trainer in this process, or the checkpoint shipped in assets/demo/ (`--no-train`).

The recipe is `reparam train`'s (SGD with Nesterov momentum 0.9, linear warm-up for one epoch then
cosine to 0, weight decay 1e-4 on conv/linear weights, label smoothing 0.1, random resized crops)
with RECIPE's global batch and peak learning rate: 98-99% on the test split in 10 epochs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from reparam_core import training as tr
from reparam_core.errors import CheckpointError
from reparam_core.formats.safetensors_io import load_file, save_file
from reparam_core.training.digits import DigitsSplit

ROOT = Path(__file__).resolve().parent.parent
ASSET_DIR = ROOT / "assets" / "demo"
# seed 0, 10 epochs, final test accuracy (2026-12-02): batch 32 / lr 0.05 98.6%; batch 32 / lr 0.03
# or 0.1 97.5% / 96.9%; batch 64 / lr 0.1 97.8% (the trainer's default lr 0.025 needs ~25 epochs)
RECIPE: dict[str, Any] = {"global_batch": 32, "lr": 0.05}
NUM_CLASSES = 10


def asset_path(model: str) -> Path:
    return ASSET_DIR / f"{model}-digits.safetensors"


def train_model(
    model: str, data: DigitsSplit, out: Path, *, epochs: int, seed: int, quiet: bool = False
) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """Train with `reparam train`'s PyTorch trainer (one process) into `out` (its checkpoint,
    metrics and final neutral files); returns (the trained train-form torch module in eval mode,
    the history: one {epoch, loss, train_acc, test_acc, lr} per epoch, the training info)."""
    import torch

    from backends import torch as bt
    from backends.torch.train import train

    cfg = tr.TrainConfig(model=model, out=os.fspath(out), epochs=epochs, seed=seed, **RECIPE)
    out.mkdir(parents=True, exist_ok=True)

    def report(r: dict[str, Any]) -> None:
        print(
            f"epoch {r['epoch']}/{epochs}: loss {r['train_loss']:.4f}  train acc {r['train_acc']:.2%}  "
            f"test acc {r['val_acc']:.2%}",
            file=sys.stderr,
            flush=True,
        )

    t0 = time.perf_counter()
    result = train(cfg, data.dataset, on_epoch=None if quiet else report)
    seconds = time.perf_counter() - t0
    module = bt.load_state(bt.create_model(model, num_classes=NUM_CLASSES), load_file(result["files"]["train"])[0])
    history = [
        {
            "epoch": r["epoch"],
            "loss": r["train_loss"],
            "train_acc": r["train_acc"],
            "test_acc": r["val_acc"],
            "lr": r["lr"],
        }
        for r in result["records"]
    ]
    info = {
        "trainer": "reparam train (backends.torch.train, one process)",
        "framework": "torch " + torch.__version__,
        "optimizer": "SGD+Nesterov",
        "lr": cfg.base_lr,
        "schedule": f"linear warm-up ({cfg.warmup_epochs:g} epoch), cosine to 0",
        "weight_decay": cfg.wd,
        "label_smoothing": cfg.label_smoothing,
        "batch_size": cfg.global_batch,
        "epochs": epochs,
        "seed": seed,
        "augmentation": "random resized crop per image (area {:g}-{:g})".format(*tr.CROP_SCALE),
        "config": cfg.fingerprint(),
        "out": os.fspath(out),
        "seconds": seconds,
        "torch_threads": torch.get_num_threads(),
    }
    return module.eval(), history, info


def load_asset(model: str) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """The shipped checkpoint of `model` as (torch module in eval mode, its history, info)."""
    from backends import torch as bt

    path = asset_path(model)
    if not path.exists():
        raise CheckpointError(f"no shipped checkpoint for {model} ({path}); run without --no-train")
    state, meta = load_file(path)
    info = {"loaded_from": os.path.relpath(path, ROOT), "trained_with": json.loads(meta.get("train_info", "{}"))}
    module = bt.load_state(bt.create_model(model, num_classes=NUM_CLASSES), state)
    return module.eval(), json.loads(meta.get("history", "[]")), info


def save_asset(model: str, module: Any, data: DigitsSplit, history: list[dict[str, Any]], info: dict[str, Any]) -> Path:
    """Replace the shipped checkpoint of `model` with `module`'s state, its test accuracy,
    history, training info and data description in the metadata."""
    from backends import torch as bt

    path = asset_path(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    acc = float((bt.predict(module, data.x_test).argmax(1) == data.y_test).mean())
    save_file(
        bt.export_state(module),
        path,
        {
            "model": model,
            "form": "train",
            "format": "pt",
            "producer": "reparam demo",
            "test_accuracy": f"{acc:.6f}",
            "history": json.dumps(history),
            "train_info": json.dumps({k: v for k, v in info.items() if k != "out"}),
            "data": json.dumps(data.describe()),
        },
    )
    return path


__all__ = ["RECIPE", "asset_path", "train_model", "load_asset", "save_asset"]
