"""Half-precision deploy weights: fuse in float64, then round once to float16 or bfloat16.

BN folding multiplies a kernel by gamma / sqrt(var + eps); with a tiny variance that factor is
huge and the fused value can exceed the target type's range (float16 max 65504). Such values are
reported with a warning naming the key, never silently turned into inf.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import ReparamError

HalfDtype = Literal["float16", "bfloat16"]
MAX_FINITE = {"float16": float(np.finfo(np.float16).max), "bfloat16": 3.3895313892515355e38}


class PrecisionWarning(UserWarning):
    """A fused value does not fit the target dtype."""


@dataclass(frozen=True)
class CastReport:
    dtype: HalfDtype
    max_rel_error: float  # max over tensors of max|cast - x| / max|x|
    overflowed: tuple[str, ...]


def round_bfloat16(a: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even), returned as float32.

    bfloat16 keeps float32's top 16 bits: add 0x7FFF plus the lowest kept bit, then truncate."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    out = rounded.view(np.float32)
    return np.where(np.isnan(a), np.float32(np.nan), out)


def cast_state(state: Mapping[str, np.ndarray], dtype: HalfDtype) -> tuple[dict[str, np.ndarray], CastReport]:
    """Cast a (float64 or float32) state to half precision; float16 arrays for "float16",
    bfloat16-rounded float32 arrays for "bfloat16" (numpy has no bfloat16 type).
    Warns (PrecisionWarning) naming every key whose values overflow the target range."""
    if dtype not in MAX_FINITE:
        raise ReparamError(f"unsupported half dtype {dtype!r}; choose float16 or bfloat16")
    out: dict[str, np.ndarray] = {}
    overflow: list[str] = []
    worst = 0.0
    for key, a in state.items():
        a64 = np.asarray(a, np.float64)
        if np.any(np.abs(a64) > MAX_FINITE[dtype]):
            overflow.append(key)
        with np.errstate(over="ignore"):
            cast = a64.astype(np.float16) if dtype == "float16" else round_bfloat16(a64.astype(np.float32))
        out[key] = cast
        finite = np.isfinite(cast)
        if finite.any():
            scale = max(np.abs(a64[finite]).max(), 1e-300)
            worst = max(worst, float(np.abs(cast[finite].astype(np.float64) - a64[finite]).max() / scale))
    if overflow:
        warnings.warn(
            f"{len(overflow)} tensor(s) overflow {dtype} (max {MAX_FINITE[dtype]:.4g}) after "
            f"fusion: {', '.join(overflow[:5])}",
            PrecisionWarning,
            stacklevel=2,
        )
    return out, CastReport(dtype, worst, tuple(overflow))


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB, in float64:
    SQNR = 10 log10( sum(reference^2) / sum((test - reference)^2) ).

    inf when the two are identical; ReparamError when the shapes differ or the reference is all
    zeros (no signal to compare against)."""
    ref = np.asarray(reference, np.float64)
    noise = np.asarray(test, np.float64) - ref if np.shape(test) == ref.shape else None
    if noise is None:
        raise ReparamError(f"SQNR of arrays of shapes {ref.shape} and {np.shape(test)}")
    signal = float(np.sum(ref * ref))
    if signal == 0.0:
        raise ReparamError("SQNR of an all-zero reference")
    power = float(np.sum(noise * noise))
    return float("inf") if power == 0.0 else 10.0 * float(np.log10(signal / power))
