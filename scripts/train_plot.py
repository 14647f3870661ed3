"""The figure of `reparam train`: loss (train, validation) and accuracy (train, validation, EMA)
per epoch, from the metrics file's records, written atomically as a PNG."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from reparam_core.training.checkpoints import write_bytes


def plot_metrics(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Two panels (loss, accuracy) against the epoch; an empty figure has no points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    ax_loss.plot(epochs, [r["train_loss"] for r in records], "o-", label="train (smoothed targets)")
    ax_loss.plot(epochs, [r["val_loss"] for r in records], "s-", label="validation")
    ax_acc.plot(epochs, [r["train_acc"] for r in records], "o-", label="train")
    ax_acc.plot(epochs, [r["val_acc"] for r in records], "s-", label="validation")
    if records and "val_acc_ema" in records[0]:
        ax_acc.plot(epochs, [r["val_acc_ema"] for r in records], "^-", label="validation (EMA)")
    for ax, name in ((ax_loss, "cross-entropy"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"reparam train: {title}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes(path, buf.getvalue())
