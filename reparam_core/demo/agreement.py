"""How closely two runs of one model agree: the classes and logits they give on a labelled set,
and two states tensor by tensor. numpy only; `reparam demo` measures every framework, form and
deploy artifact against the trained PyTorch model with these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import CheckpointError


def compare(ref: np.ndarray, out: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Logits `out` (N, C) against reference logits `ref` (N, C) on `labels` (N,):

    accuracy           = mean_i [argmax out_i == labels_i]
    same_predictions   = #{i : argmax out_i == argmax ref_i}   (identical: all N)
    max_abs_logit_diff = max_ij |ref_ij - out_ij|              (in float64)
    """
    same = int((ref.argmax(1) == out.argmax(1)).sum())
    return {
        "accuracy": float((out.argmax(1) == labels).mean()),
        "same_predictions": same,
        "n": int(len(labels)),
        "identical": same == len(labels),
        "max_abs_logit_diff": float(np.abs(ref.astype(np.float64) - out).max()),
    }


def max_state_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """max over keys k and elements of |a[k] - b[k]| (float64); CheckpointError when the two
    states do not have the same keys."""
    if set(a) != set(b):
        raise CheckpointError(f"state keys differ: {sorted(set(a) ^ set(b))[:5]}")
    return max(float(np.abs(np.asarray(a[k], np.float64) - b[k]).max()) for k in a)


def gallery(
    labels: np.ndarray, predictions: Mapping[str, np.ndarray], dataset_index: np.ndarray, *, reference: str, k: int
) -> dict[str, Any]:
    """k examples of a labelled set to show, and what every run predicted for them: every image
    the `reference` run gets wrong (up to k // 2), then the first image of each class, then the
    next ones in order. `predictions`: run name -> predicted classes (N,); `dataset_index`: each
    position's index in the whole dataset (to find the original image)."""
    ref = predictions[reference]
    chosen = [int(i) for i in np.flatnonzero(ref != labels)][: k // 2]
    for c in np.unique(labels):
        first = next((int(i) for i in np.flatnonzero(labels == c) if int(i) not in chosen), None)
        if first is not None:
            chosen.append(first)
    chosen += [i for i in range(len(labels)) if i not in chosen][: max(k - len(chosen), 0)]
    chosen = chosen[:k]
    return {
        "test_positions": chosen,
        "dataset_indices": [int(dataset_index[i]) for i in chosen],
        "labels": [int(labels[i]) for i in chosen],
        "predictions": {name: [int(p[i]) for i in chosen] for name, p in predictions.items()},
        "all_agree": [len({int(p[i]) for p in predictions.values()}) == 1 for i in chosen],
    }


__all__ = ["compare", "max_state_diff", "gallery"]
