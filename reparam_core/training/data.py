"""The framework-free half of `reparam train`, shared by the PyTorch, Flax and MegEngine
trainers: data
(digits or an image folder, a fixed stratified split, augmentation and normalisation in numpy),
the recipe (SGD + Nesterov, cosine schedule with warm-up, which weights decay), the sample order
of every step on any number of processes, checkpoints, the metrics file and the final neutral
files of both forms.

Augmentation: a random resized crop (area CROP_SCALE, aspect CROP_RATIO, bilinear) per image,
plus a horizontal flip for image folders (not for the digits, which mirroring changes).

Determinism: everything random is a function of (seed, epoch, sample index) or (seed, step), never
of a generator's history, so a resumed run, or a run on W processes (rank r takes the r-th
contiguous part of each global batch), draws exactly what an uninterrupted single-process run
draws.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..blocks.fuse import reparameterize_state
from ..blocks.l2 import l2_terms
from ..blocks.nodes import SpecLike, in_form, join_key, rep_blocks
from ..errors import CheckpointError, ReparamError
from ..families.specs import block_kind
from ..formats import safetensors_io
from ..formats.atomic import atomic_write
from ..weights.state import check_state, strip_ignored
from .imagefolder import DataError, decode_image, scan_image_folder

SPLIT_SEED = 0  # the train/validation split never depends on --seed
VAL_FRACTION = 0.2
AUX_WEIGHT = 0.1  # RepVGGplus: weight of each auxiliary head's loss next to the main head's
DIGITS = "digits"  # --data digits: scikit-learn's bundled 8x8 digits, upsampled
CROP_SCALE = (0.35, 1.0)  # random resized crop: area fraction (small images: not ImageNet's 0.08)
CROP_RATIO = (3 / 4, 4 / 3)
CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
_META_KEY = "reparam_train"


class TrainError(ReparamError, ValueError):
    """Training settings that cannot work (batch too large for the data, bad split, ...)."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (and the output folder). `lr=None` means the
    official linear scaling rule, 0.1 per 256 images of global batch."""

    model: str
    data: str = DIGITS
    out: str = "train-out"
    framework: str = "torch"
    epochs: int = 10
    max_steps: int | None = None
    global_batch: int = 64
    lr: float | None = None
    wd: float = 1e-4
    label_smoothing: float = 0.1
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    ema: float | None = None
    clip: float | None = None
    amp: str | None = None
    sync_bn: bool = False
    seed: int = 0
    augment: bool = True
    image_size: int = 32
    init: str | None = None  # a neutral train-form state to start from (else seeded random init)

    @property
    def base_lr(self) -> float:
        """The peak learning rate: `lr`, or 0.1 * global_batch / 256."""
        return self.lr if self.lr is not None else 0.1 * self.global_batch / 256

    def fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the run that resumes it (all but `out`;
        the number of processes is not a setting: it does not change the weights)."""
        d = asdict(self)
        d.pop("out")
        d["base_lr"] = self.base_lr
        return d


@dataclass(frozen=True)
class Schedule:
    """Steps of a run: `steps_per_epoch` (full global batches), `total` steps, `warmup` steps."""

    steps_per_epoch: int
    total: int
    warmup: int

    @property
    def epochs(self) -> int:
        return math.ceil(self.total / self.steps_per_epoch)


def make_schedule(cfg: TrainConfig, n_train: int) -> Schedule:
    """steps_per_epoch = floor(n_train / B) (the incomplete last batch is dropped so every step
    sees B images, split evenly over the processes); total = max_steps or epochs *
    steps_per_epoch; warmup = min(round(warmup_epochs * steps_per_epoch), total // 10), at least
    1 step when warm-up is on."""
    if cfg.global_batch < 1:
        raise TrainError(f"--global-batch must be >= 1, got {cfg.global_batch}")
    spe = n_train // cfg.global_batch
    if spe < 1:
        raise TrainError(f"--global-batch {cfg.global_batch} is larger than the training split ({n_train} images)")
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * spe
    if total < 1:
        raise TrainError("nothing to train: --epochs and --max-steps must be >= 1")
    warm = min(round(cfg.warmup_epochs * spe), total // 10)
    return Schedule(spe, total, max(warm, 1) if cfg.warmup_epochs > 0 else 0)


def learning_rate(base: float, step: int, sched: Schedule) -> float:
    """The learning rate of step `step` (0-based): linear warm-up, then cosine to 0:

    lr = base * (step + 1) / W                                  for step < W
    lr = base * (1 + cos(pi * (step - W) / (T - W))) / 2        otherwise
    """
    if step < sched.warmup:
        return base * (step + 1) / sched.warmup
    span = max(sched.total - sched.warmup, 1)
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - sched.warmup) / span))


def custom_l2_kernels(spec: SpecLike) -> set[str]:
    """Canonical keys of the kernels RepVGGplus' custom L2 regularises (the kxk and 1x1 conv of
    every re-parameterizable block); empty for models without it (every model but RepVGGplus)."""
    if block_kind(spec) != "RepVGGplus":
        return set()
    out = set()
    for path, block in rep_blocks(in_form(spec, "train")):
        t = l2_terms(block)
        out |= {join_key(join_key(path, t.dense_conv), "weight"), join_key(join_key(path, t.one_conv), "weight")}
    return out


def has_aux_heads(spec: SpecLike) -> bool:
    """Whether the train form has auxiliary classifier heads (RepVGGplus)."""
    return bool(getattr(in_form(spec, "train"), "aux", ()))


def decays(key: str, ndim: int, l2_kernels: set[str]) -> bool:
    """Whether plain weight decay applies to a parameter: not to 1-D tensors (BN scale/shift,
    biases) and not to the kernels the custom L2 regularises instead."""
    return ndim > 1 and key not in l2_kernels


# --------------------------------------------------------------------------- data


@dataclass
class Dataset:
    """Images NHWC float32 in [0, 1] (all `size` x `size`), int64 labels, the split and the
    per-channel mean/std of the training split used to normalise."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    train_idx: np.ndarray
    val_idx: np.ndarray
    mean: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))
    std: np.ndarray = field(default_factory=lambda: np.ones(3, np.float32))
    source: str = ""

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """(x - mean[c]) / std[c], NHWC -> NCHW float32."""
        return np.ascontiguousarray(((images - self.mean) / self.std).transpose(0, 3, 1, 2), np.float32)

    def val(self) -> tuple[np.ndarray, np.ndarray]:
        """The validation split, normalised NCHW, and its labels."""
        return self.normalize(self.images[self.val_idx]), self.labels[self.val_idx]

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "classes": list(self.classes),
            "n_train": int(len(self.train_idx)),
            "n_val": int(len(self.val_idx)),
            "size": self.size,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "split_seed": SPLIT_SEED,
            "val_fraction": VAL_FRACTION,
        }


def crop_resize(image: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Bilinear resampling of the box (top, left, height, width) of an HxWxC image to
    size x size, pixel centres aligned (PyTorch's align_corners=False):

        src = top + (i + 0.5) * height / size - 0.5, clamped to [0, H - 1]
    """
    h, w = image.shape[:2]
    top, left, bh, bw = box

    def taps(start: float, length: float, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip(start + (np.arange(size) + 0.5) * length / size - 0.5, 0, limit - 1)
        lo = np.floor(src).astype(np.int64)
        return lo, np.minimum(lo + 1, limit - 1), (src - lo).astype(np.float32)

    y0, y1, fy = taps(top, bh, h)
    x0, x1, fx = taps(left, bw, w)
    rows = image[y0] * (1 - fy)[:, None, None] + image[y1] * fy[:, None, None]
    out: np.ndarray = (rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]).astype(np.float32)
    return out


def stratified_split(
    labels: np.ndarray, fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: per class, a seeded permutation of its images, the first
    round(fraction * n_class) (at least 1 when the class has 2+ images) to validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(max(round(fraction * len(idx)), 1), len(idx) - 1) if len(idx) > 1 else 0
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def make_dataset(images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], source: str) -> Dataset:
    """A Dataset of NHWC images in [0, 1]: the fixed split, and the per-channel mean and std of
    the training split."""
    train, val = stratified_split(labels)
    if len(val) == 0:
        raise DataError(f"{source}: every class has a single image, nothing left to validate on")
    mean = images[train].mean(axis=(0, 1, 2)).astype(np.float32)
    std = np.maximum(images[train].std(axis=(0, 1, 2)), 1e-6).astype(np.float32)
    return Dataset(images, labels, classes, train, val, mean, std, source)


def load_digits(size: int = 32) -> Dataset:
    """scikit-learn's 1,797 8x8 digits (no download): x / 16, bilinear 8 -> size, gray repeated
    to 3 channels."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    small = (d.images.astype(np.float32) / 16.0)[..., None]
    images = np.stack([crop_resize(im, (0.0, 0.0, 8.0, 8.0), size) for im in small])
    return make_dataset(
        np.repeat(images, 3, axis=3),
        d.target.astype(np.int64),
        tuple(str(i) for i in range(10)),
        "sklearn.datasets.load_digits",
    )


def load_image_folder(root: str | os.PathLike[str], size: int = 32) -> Dataset:
    """Every image of ROOT/<class>/*, decoded to RGB and resized (bilinear) to size x size.
    DataError names the folder or the file at fault (missing folder, empty class, a file that
    does not decode)."""
    folder = scan_image_folder(root)
    images = []
    for path, _ in folder.files:
        im = decode_image(path)
        images.append(crop_resize(im, (0.0, 0.0, float(im.shape[0]), float(im.shape[1])), size))
    labels = np.asarray([c for _, c in folder.files], np.int64)
    return make_dataset(np.stack(images), labels, folder.classes, os.fspath(folder.root))


def load_dataset(data: str, size: int = 32) -> Dataset:
    """`digits` or an image folder."""
    if size < 8:
        raise TrainError(f"--image-size must be >= 8, got {size}")
    return load_digits(size) if data == DIGITS else load_image_folder(data, size)


def sample_box(rng: np.random.Generator, h: int, w: int) -> tuple[float, float, float, float]:
    """A random resized crop's box: area fraction in CROP_SCALE, aspect ratio log-uniform in
    CROP_RATIO, position uniform; the whole image if 10 draws do not fit."""
    for _ in range(10):
        area = h * w * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        bw, bh = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if bw <= w and bh <= h:
            return rng.uniform(0, h - bh), rng.uniform(0, w - bw), bh, bw
    return 0.0, 0.0, float(h), float(w)


def batch(
    data: Dataset, indices: np.ndarray, *, augment: bool, flip: bool, seed: int, epoch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised NCHW images and labels of `indices`; with `augment`, a random resized crop
    (and a horizontal flip with probability 1/2 when `flip`) per image, drawn from
    default_rng([seed, epoch, index]) so the draw does not depend on batching or processes."""
    images = data.images[indices]
    if augment:
        out = np.empty_like(images)
        for j, i in enumerate(indices):
            rng = np.random.default_rng([seed, epoch, int(i)])
            out[j] = crop_resize(images[j], sample_box(rng, data.size, data.size), data.size)
            if flip and rng.random() < 0.5:
                out[j] = out[j, :, ::-1]
        images = out
    return data.normalize(images), data.labels[indices]


def epoch_order(train_idx: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The training indices in the order of epoch `epoch`: a permutation from
    default_rng([seed, epoch])."""
    return train_idx[np.random.default_rng([seed, epoch, 1]).permutation(len(train_idx))]


def rank_indices(order: np.ndarray, step_in_epoch: int, global_batch: int, rank: int, world: int) -> np.ndarray:
    """Rank `rank`'s part of global batch `step_in_epoch`: its r-th contiguous 1/world slice."""
    if global_batch % world:
        raise TrainError(f"--global-batch {global_batch} is not divisible by the {world} processes/devices")
    per = global_batch // world
    start = step_in_epoch * global_batch + rank * per
    return order[start : start + per]


def is_digits(data: str) -> bool:
    return data == DIGITS


def check_supported(cfg: TrainConfig, processes: int) -> None:
    """TrainError naming the setting a framework's trainer does not have: MegEngine trains in
    one process; MegEngine and Flax train in float32 (--amp is PyTorch's)."""
    if cfg.framework == "megengine":
        if processes > 1:
            raise TrainError(
                "--nproc/--nnodes: MegEngine trains in one process here (megengine."
                "distributed takes GPU devices with NCCL/RCCL only; on CPU its process "
                "group refuses to start)"
            )
        if cfg.amp:
            raise TrainError(
                "--amp bf16: the MegEngine trainer runs in float32 (MegEngine's autocast is float16 on CUDA only)"
            )
    if cfg.framework == "flax" and cfg.amp:
        raise TrainError("--amp bf16: the Flax trainer runs in float32 (PyTorch only)")


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


def save_dataset(path: str | os.PathLike[str], data: Dataset) -> None:
    """The whole Dataset (images, labels, split, normalisation) as one safetensors file, for a
    trainer in another interpreter (the MegEngine environment has no scikit-learn or Pillow)."""
    arrays = {
        "images": data.images,
        "labels": data.labels,
        "train_idx": data.train_idx,
        "val_idx": data.val_idx,
        "mean": data.mean,
        "std": data.std,
    }
    save_arrays(path, arrays, {"classes": json.dumps(list(data.classes)), "source": data.source})


def read_dataset(path: str | os.PathLike[str]) -> Dataset:
    """The Dataset written by save_dataset."""
    a, meta = safetensors_io.load_file(path)
    return Dataset(
        a["images"],
        a["labels"],
        tuple(json.loads(meta["classes"])),
        a["train_idx"],
        a["val_idx"],
        a["mean"],
        a["std"],
        meta["source"],
    )


# --------------------------------------------------------------------------- checkpoints, metrics


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


# --------------------------------------------------------------------------- loop bookkeeping


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
    "TrainConfig",
    "TrainError",
    "Schedule",
    "make_schedule",
    "learning_rate",
    "custom_l2_kernels",
    "has_aux_heads",
    "decays",
    "Dataset",
    "crop_resize",
    "stratified_split",
    "make_dataset",
    "load_digits",
    "load_image_folder",
    "load_dataset",
    "sample_box",
    "batch",
    "epoch_order",
    "rank_indices",
    "is_digits",
    "check_supported",
    "initial_state",
    "save_dataset",
    "read_dataset",
    "Resumed",
    "resume_point",
    "is_epoch_end",
    "log_epoch",
    "checkpoint",
    "AUX_WEIGHT",
    "write_bytes",
    "save_arrays",
    "save_checkpoint",
    "load_checkpoint",
    "read_metrics",
    "write_metrics",
    "write_final",
    "StopFlag",
    "EpochSums",
    "steps_of",
    "epoch_record",
    "evaluate",
    "summarize",
    "metadata",
    "CHECKPOINT",
    "METRICS",
    "SPLIT_SEED",
    "VAL_FRACTION",
    "DIGITS",
]
