"""scikit-learn's digits as arrays for evaluation: the dataset `reparam train` trains on
(reparam_core.training.data.load_digits: x / 16, bilinear 8 -> 32, gray repeated to 3 channels, the
fixed stratified split, normalised with the training split's mean and std), without
augmentation. Its held-out split (the trainer's validation split) is called `test` here: `reparam
demo` and `reparam quantize --eval digits` score on it, and nothing trains on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import Dataset, load_digits


@dataclass(frozen=True)
class DigitsSplit:
    """Normalised NCHW float32 images and int64 labels of both splits; `train_idx`/`test_idx`
    index sklearn's 1,797 digits."""

    dataset: Dataset
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def train_idx(self) -> np.ndarray:
        return self.dataset.train_idx

    @property
    def test_idx(self) -> np.ndarray:
        return self.dataset.val_idx

    def describe(self) -> dict[str, Any]:
        """The dataset's description (source, sizes, split seed, mean/std) with the test split's
        size as `n_test` and the input shape."""
        d = self.dataset
        return {**d.describe(), "n_test": int(len(self.y_test)), "stratified": True, "input_shape": [3, d.size, d.size]}


def load_digits_split(size: int = 32) -> DigitsSplit:
    """The digits at `size` x `size` with both splits as arrays (no augmentation)."""
    d = load_digits(size)
    x_test, y_test = d.val()
    return DigitsSplit(d, d.normalize(d.images[d.train_idx]), d.labels[d.train_idx], x_test, y_test)


__all__ = ["DigitsSplit", "load_digits_split"]
