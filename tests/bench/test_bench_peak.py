"""`reparam bench`'s peak: CPU features read from /proc/cpuinfo text, and every form's
conv-equivalent GFLOP/s divided by the best GEMM rate of any backend of the run."""

from __future__ import annotations

import pytest

from reparam_core.bench.report import add_peak
from reparam_core.quant.hardware import cpu_info

CPUINFO = """processor\t: 0
model name\t: Example Xeon
flags\t\t: fpu sse avx avx2 fma avx512f avx512_vnni amx_tile amx_bf16

processor\t: 1
model name\t: Other
flags\t\t: fpu avx512_bf16
"""


def test_cpu_info_reads_the_first_processor() -> None:
    info = cpu_info(CPUINFO)
    assert info["model_name"] == "Example Xeon"
    on = {k for k, v in info["features"].items() if v}
    assert on == {"AVX2", "FMA", "AVX-512F", "AVX-512 VNNI", "AMX-TILE", "AMX-BF16"}


def test_add_peak_divides_by_the_best_gemm_of_the_run() -> None:
    report = {
        "backends": {
            "torch": {"gemm_gflops": 180.0, "models": {"m": {"conv_equiv_gflops": {"deploy": 360.0}}}},
            "flax": {"gemm_gflops": 300.0, "models": {"m": {"conv_equiv_gflops": {"deploy/jit": 150.0}}}},
            "megengine": {"gemm_gflops": 45.0, "models": {"m": {"conversion": {}}}},
        }
    }
    add_peak(report)
    assert (report["best_gemm_gflops"], report["best_gemm_backend"]) == (300.0, "flax")
    assert report["backends"]["torch"]["models"]["m"]["of_best_gemm"] == {"deploy": pytest.approx(1.2)}
    assert report["backends"]["flax"]["models"]["m"]["of_best_gemm"] == {"deploy/jit": pytest.approx(0.5)}
    assert "of_best_gemm" not in report["backends"]["megengine"]["models"]["m"]
