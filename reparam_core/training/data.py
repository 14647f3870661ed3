"""Training data as numpy arrays: digits or an image folder, the fixed stratified split,
normalisation, augmentation, and the samples of every step on any number of processes.

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..formats import safetensors_io
from .checkpoints import save_arrays
from .imagefolder import DataError, decode_image, scan_image_folder
from .recipe import DIGITS, TrainError

SPLIT_SEED = 0  # the train/validation split never depends on --seed
VAL_FRACTION = 0.2
CROP_SCALE = (0.35, 1.0)  # random resized crop: area fraction (small images: not ImageNet's 0.08)
CROP_RATIO = (3 / 4, 4 / 3)


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


__all__ = [
    "SPLIT_SEED",
    "VAL_FRACTION",
    "CROP_SCALE",
    "CROP_RATIO",
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
    "save_dataset",
    "read_dataset",
]
