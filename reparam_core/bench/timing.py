"""Side-by-side timing: several callables timed in interleaved rounds (A B C A B C ...).

Background load on a shared machine hits every callable of a round alike, so the ratios (median
of the per-round ratios) hold where absolute times drift. numpy and the standard library only:
used by `reparam demo` and by every backend's benchmark runner, in both environments.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ArgumentError


def interleaved_times(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each callable: `warmup` untimed rounds, then `repeats` timed rounds,
    each calling every callable once in turn. A callable must finish its work before returning
    (synchronise asynchronous frameworks inside it)."""
    if repeats < 1:
        raise ArgumentError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i]: how many times slower `num` is than `den`."""
    return statistics.median(n / d for n, d in zip(num, den))


def summarize(times: Mapping[str, list[float]], batch: int) -> dict[str, dict[str, Any]]:
    """Per callable: median seconds, images/s at `batch` images per call, and every run."""
    return {
        k: {"median_s": statistics.median(v), "images_per_s": batch / statistics.median(v), "runs_s": list(v)}
        for k, v in times.items()
    }


def interleaved_throughput(fns: Mapping[str, Callable[[], Any]], batch: int, repeats: int) -> dict[str, dict[str, Any]]:
    """summarize(interleaved_times(...)), plus `deploy_over_train` (the paired speed-up) when
    callables named `train` and `deploy` are timed."""
    times = interleaved_times(fns, repeats)
    out: dict[str, Any] = summarize(times, batch)
    if "train" in times and "deploy" in times:
        out["deploy_over_train"] = paired_ratio(times["train"], times["deploy"])
    return out


__all__ = ["interleaved_times", "paired_ratio", "summarize", "interleaved_throughput"]
