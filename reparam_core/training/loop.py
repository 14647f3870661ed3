"""The bookkeeping of a trainer's loop, the same for every framework: the SIGTERM flag, the
steps and their batches, where a resumed run continues, epoch records and the metrics file, the
checkpoint after a step, evaluation, and the summary with the final files.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..blocks.nodes import SpecLike
from .checkpoints import CHECKPOINT, METRICS, load_checkpoint, read_metrics, save_checkpoint, write_final, write_metrics
from .data import Dataset, batch, epoch_order, is_digits, rank_indices
from .recipe import Schedule, TrainConfig, learning_rate


class StopFlag:
    """Set by SIGTERM (the handler only records it): the trainer checks it after each step,
    writes a checkpoint and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


@dataclass
class EpochSums:
    """Running sums of the current epoch: loss * images, correct predictions, images, seconds."""

    loss: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0

    def add(self, loss: float, correct: int, n: int) -> None:
        self.loss += loss * n
        self.correct += correct
        self.seen += n


def steps_of(sched: Schedule, start: int) -> Iterator[tuple[int, int, int]]:
    """(step, epoch, step_in_epoch) from `start` to the end of the run."""
    for step in range(start, sched.total):
        yield step, step // sched.steps_per_epoch, step % sched.steps_per_epoch


def local_batches(
    cfg: TrainConfig, sched: Schedule, data: Dataset, start: int, part: int, parts: int
) -> Iterator[tuple[int, int, int, float, np.ndarray, np.ndarray, float]]:
    """Every step from `start` as (step, epoch, step_in_epoch, lr, x, y, prep_s): this part's
    share (rank_indices) of the global batch in the epoch's sample order (epoch_order: a function
    of seed and epoch), augmented (NCHW float32 x, int y), the step's learning rate, and the
    seconds spent preparing the batch (counted in the step's time by the trainers)."""
    flip = not is_digits(cfg.data)
    order_epoch, order = -1, np.empty(0, np.int64)
    for step, epoch, k in steps_of(sched, start):
        if epoch != order_epoch:
            order_epoch, order = epoch, epoch_order(data.train_idx, cfg.seed, epoch)
        t0 = time.perf_counter()
        idx = rank_indices(order, k, cfg.global_batch, part, parts)
        x, y = batch(data, idx, augment=cfg.augment, flip=flip, seed=cfg.seed, epoch=epoch)
        yield step, epoch, k, learning_rate(cfg.base_lr, step, sched), x, y, time.perf_counter() - t0


@dataclass
class Resumed:
    """Where a run continues: the checkpoint's arrays (empty for a fresh run), the first step,
    the partial epoch's sums and the metrics records of the finished epochs."""

    arrays: dict[str, np.ndarray]
    start: int = 0
    sums: EpochSums = field(default_factory=EpochSums)
    records: list[dict[str, Any]] = field(default_factory=list)


def resume_point(cfg: TrainConfig, sched: Schedule, resume: bool) -> Resumed:
    """The checkpoint of OUT (load_checkpoint: same settings) and the metrics lines of the
    epochs it has finished, when `resume`; a fresh start otherwise."""
    if not resume:
        return Resumed({})
    out = Path(cfg.out)
    arrays, progress = load_checkpoint(out / CHECKPOINT, cfg)
    start = int(progress["step"])
    records = [r for r in read_metrics(out / METRICS) if r["epoch"] <= start // sched.steps_per_epoch]
    return Resumed(arrays, start, EpochSums(**progress["sums"]), records)


def is_epoch_end(sched: Schedule, step: int) -> bool:
    """Whether step `step` (0-based) ends an epoch (or the run)."""
    return (step + 1) % sched.steps_per_epoch == 0 or step == sched.total - 1


def log_epoch(
    cfg: TrainConfig,
    records: list[dict[str, Any]],
    record: dict[str, Any],
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> None:
    """Append an epoch's record, rewrite the metrics file, report it."""
    records.append(record)
    write_metrics(Path(cfg.out) / METRICS, records)
    if on_epoch:
        on_epoch(record)


def checkpoint(
    cfg: TrainConfig, steps_done: int, arrays: Mapping[str, np.ndarray], sums: EpochSums, end_of_epoch: bool
) -> None:
    """OUT/checkpoint.safetensors after `steps_done` steps; the epoch's sums are kept when the
    checkpoint is written mid-epoch (SIGTERM), so the resumed epoch's figures cover all of it."""
    kept = EpochSums() if end_of_epoch else sums
    save_checkpoint(
        Path(cfg.out) / CHECKPOINT, arrays, {"step": steps_done, "config": cfg.fingerprint(), "sums": vars(kept)}
    )


def epoch_record(
    epoch: int, step: int, sums: EpochSums, lr: float, val: Mapping[str, float], world: int
) -> dict[str, Any]:
    """One line of the metrics file (train loss/accuracy over the epoch's images on every
    process, validation figures, throughput of the epoch)."""
    return {
        "epoch": epoch + 1,
        "step": step,
        "lr": lr,
        "train_loss": sums.loss / max(sums.seen, 1),
        "train_acc": sums.correct / max(sums.seen, 1),
        **dict(val),
        "images": sums.seen,
        "seconds": sums.seconds,
        "images_per_s": sums.seen / sums.seconds if sums.seconds > 0 else None,
        "processes": world,
    }


def evaluate(
    predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray, batch: int = 256
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the logits `predict` gives for x (N, C, H, W), in
    batches of `batch`, against labels y (N,): with z = logits - max, log p = z - log sum exp z
    (float64), loss = -mean log p[i, y_i]."""
    logits = np.concatenate([predict(x[i : i + batch]) for i in range(0, len(x), batch)])
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean()), float((logits.argmax(1) == y).mean())


def summarize(
    cfg: TrainConfig,
    data: Dataset,
    spec: SpecLike,
    framework: str,
    *,
    steps: int,
    stopped: bool,
    rank: int,
    world: int,
    records: list[dict[str, Any]],
    final_state: Callable[[], Mapping[str, np.ndarray]],
) -> dict[str, Any]:
    """What a trainer returns: `steps` done, `stopped` (by SIGTERM), this process' `rank`, the
    `world` size, the metrics `records`; rank 0 of a finished run also writes the final neutral
    files (write_final of final_state(), the trained weights: the EMA's with --ema) and lists
    them under `files`."""
    summary: dict[str, Any] = {"steps": steps, "stopped": stopped, "rank": rank, "world": world, "records": records}
    if rank == 0 and not stopped:
        summary["files"] = write_final(Path(cfg.out), spec, final_state(), metadata(cfg, data, framework))
    return summary


def metadata(cfg: TrainConfig, data: Dataset, framework: str) -> dict[str, str]:
    """The metadata of the final neutral files."""
    return {
        "model": cfg.model,
        "format": "pt",
        "producer": f"reparam train ({framework})",
        "num_classes": str(len(data.classes)),
        "data": json.dumps(data.describe()),
        "config": json.dumps(cfg.fingerprint(), sort_keys=True),
    }


__all__ = [
    "StopFlag",
    "EpochSums",
    "steps_of",
    "local_batches",
    "Resumed",
    "resume_point",
    "is_epoch_end",
    "log_epoch",
    "checkpoint",
    "epoch_record",
    "evaluate",
    "summarize",
    "metadata",
]
