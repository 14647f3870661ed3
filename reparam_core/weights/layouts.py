"""Kernel layouts: PyTorch OIHW (canonical) <-> MegEngine 5-D grouped and Flax HWIO.

- MegEngine: a grouped conv weight is `[g, O/g, I/g, kh, kw]` (4-D OIHW when g == 1); a conv
  bias is `(1, O, 1, 1)`; BN tensors (BatchNorm1d's too) appear flat `(C,)` in `state_dict()`;
  linear as torch; every other tensor (Scale/Bias in their stored shape, layer norm, GRN
  `(1, 1, 1, C)`) in its canonical shape.
- Flax: conv kernel HWIO with I = in / groups; linear kernel `(in, out)`; BN `scale`, `bias`,
  `mean`, `var`; layer norm `scale`, `bias`; every other tensor (per-channel scales and biases,
  GRN) under its canonical name and shape.
Every conversion is a pure reshape/transpose, so round trips are exact.
"""

from __future__ import annotations

import numpy as np

from ..blocks.schema import TensorInfo
from ..errors import ShapeMismatchError


def oihw_to_megengine(w: np.ndarray, groups: int) -> np.ndarray:
    """OIHW -> [g, O/g, I/g, kh, kw] for groups > 1 (unchanged for groups == 1)."""
    if w.ndim != 4:
        raise ShapeMismatchError(f"expected a 4-D OIHW kernel, got shape {tuple(w.shape)}")
    if groups == 1:
        return w
    o, i, kh, kw = w.shape
    if o % groups:
        raise ShapeMismatchError(f"kernel {tuple(w.shape)}: {o} outputs not divisible by groups={groups}")
    return w.reshape(groups, o // groups, i, kh, kw)


def megengine_to_oihw(w: np.ndarray) -> np.ndarray:
    """[g, O/g, I/g, kh, kw] -> OIHW (4-D input passes through)."""
    if w.ndim == 4:
        return w
    if w.ndim != 5:
        raise ShapeMismatchError(f"expected a 4-D or 5-D MegEngine kernel, got shape {tuple(w.shape)}")
    g, og, i, kh, kw = w.shape
    return w.reshape(g * og, i, kh, kw)


def oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    if w.ndim != 4:
        raise ShapeMismatchError(f"expected a 4-D OIHW kernel, got shape {tuple(w.shape)}")
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def hwio_to_oihw(w: np.ndarray) -> np.ndarray:
    if w.ndim != 4:
        raise ShapeMismatchError(f"expected a 4-D HWIO kernel, got shape {tuple(w.shape)}")
    return np.ascontiguousarray(w.transpose(3, 2, 0, 1))


def to_megengine(a: np.ndarray, info: TensorInfo) -> np.ndarray:
    """One canonical tensor in MegEngine's `state_dict()` shape."""
    if info.kind == "conv.weight":
        return oihw_to_megengine(a, info.groups)
    if info.kind == "conv.bias":
        return a.reshape(1, -1, 1, 1)
    return a


def from_megengine(a: np.ndarray, info: TensorInfo) -> np.ndarray:
    if info.kind == "conv.weight":
        return megengine_to_oihw(a)
    return a.reshape(info.shape)


_FLAX_FIELD = {
    "conv.weight": "kernel",
    "linear.weight": "kernel",
    "bn.weight": "scale",
    "bn.running_mean": "mean",
    "bn.running_var": "var",
    "layernorm.weight": "scale",
}


def flax_key(key: str, info: TensorInfo) -> str:
    """Canonical key -> the key of the same tensor in a Flax NNX state (last field renamed)."""
    field = _FLAX_FIELD.get(info.kind)
    return f"{key.rsplit('.', 1)[0]}.{field}" if field else key


def to_flax(a: np.ndarray, info: TensorInfo) -> np.ndarray:
    if info.kind == "conv.weight":
        return oihw_to_hwio(a)
    if info.kind == "linear.weight":
        return np.ascontiguousarray(a.T)
    return a


def from_flax(a: np.ndarray, info: TensorInfo) -> np.ndarray:
    if info.kind == "conv.weight":
        return hwio_to_oihw(a)
    if info.kind == "linear.weight":
        return np.ascontiguousarray(a.T)
    return a
