"""What the CPU can do for low-precision inference, read from /proc/cpuinfo (Linux; empty
elsewhere): the instruction sets that decide int8 and bf16 speed and int8 exactness."""
from __future__ import annotations

from pathlib import Path

# feature -> cpuinfo flag
FEATURES = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512_vnni": "avx512_vnni",
            "avx_vnni": "avx_vnni", "avx512_bf16": "avx512_bf16", "amx_bf16": "amx_bf16",
            "amx_int8": "amx_int8"}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The flags of the first processor in /proc/cpuinfo (or of the given text)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_features(cpuinfo: str | None = None) -> dict[str, bool]:
    """Which of FEATURES the CPU has."""
    flags = cpu_flags(cpuinfo)
    return {name: flag in flags for name, flag in FEATURES.items()}


def has_int8_dot(cpuinfo: str | None = None) -> bool:
    """Whether int8 dot products accumulate exactly in hardware (VNNI or AMX). Without them x86
    kernels multiply u8 x s8 pairs into saturating 16-bit sums, so 8-bit weights can overflow
    and 7-bit weights (ONNX Runtime's reduce_range) are the exact choice."""
    f = cpu_features(cpuinfo)
    return f["avx512_vnni"] or f["avx_vnni"] or f["amx_int8"]


def cpu_model(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


__all__ = ["FEATURES", "cpu_flags", "cpu_features", "has_int8_dot", "cpu_model"]
