"""What the CPU can do for low-precision inference, read from /proc/cpuinfo (Linux; empty
elsewhere): the instruction sets that decide int8 and bf16 speed and int8 exactness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# cpuinfo flag -> the name a report prints
FEATURES = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512F",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "amx_tile": "AMX-TILE",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
}


def _first_processor(cpuinfo: str | None) -> dict[str, str]:
    """The `key: value` fields of the first processor of /proc/cpuinfo (or of the given text)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The flags of the first processor."""
    return set(_first_processor(cpuinfo).get("flags", "").split())


def cpu_features(cpuinfo: str | None = None) -> dict[str, bool]:
    """Which of FEATURES (by cpuinfo flag) the CPU has."""
    flags = cpu_flags(cpuinfo)
    return {flag: flag in flags for flag in FEATURES}


def has_int8_dot(cpuinfo: str | None = None) -> bool:
    """Whether int8 dot products accumulate exactly in hardware (VNNI or AMX). Without them x86
    kernels multiply u8 x s8 pairs into saturating 16-bit sums, so 8-bit weights can overflow
    and 7-bit weights (ONNX Runtime's reduce_range) are the exact choice."""
    f = cpu_features(cpuinfo)
    return f["avx512_vnni"] or f["avx_vnni"] or f["amx_int8"]


def cpu_model(cpuinfo: str | None = None) -> str:
    """The first processor's model name ('unknown' where cpuinfo has none)."""
    return _first_processor(cpuinfo).get("model name", "unknown")


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """`{"model_name": ..., "features": {report name: bool}}` for a benchmark's JSON."""
    return {"model_name": cpu_model(cpuinfo), "features": {FEATURES[f]: v for f, v in cpu_features(cpuinfo).items()}}


__all__ = ["FEATURES", "cpu_flags", "cpu_features", "has_int8_dot", "cpu_model", "cpu_info"]
