"""Fuzzing every checkpoint reader (and reparam_core.formats.convert.convert) with mutated files.

The cases run in a subprocess (tests/reliability/fuzz_driver.py) under RLIMIT_AS (its
start-up virtual size + 1.5 GiB) and a per-case SIGALRM time limit, so a memory blow-up or a
hang shows up as a recorded failure instead of taking pytest down. Case counts scale with the
hypothesis profile: settings.default.max_examples (300 in "ci", 3000 in "slow" / --slow) x 25/6
per format, x 1/2 for convert -> 5,150 cases in CI and 51,500 with --slow.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from hypothesis import settings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def test_fuzz_readers_never_crash_hang_or_blow_up(tmp_path):
    base = settings.default.max_examples
    per_format = math.ceil(base * 25 / 6)
    n_convert = max(base // 2, 20)
    out = tmp_path / "fuzz.json"
    cmd = [
        sys.executable,
        os.path.join(HERE, "fuzz_driver.py"),
        "--per-format",
        str(per_format),
        "--convert",
        str(n_convert),
        "--out",
        str(out),
    ]
    if settings.default.derandomize:
        cmd.append("--derandomize")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(600, per_format * 0.2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    print(
        f"\nfuzz: {result['total_cases']} cases {result['cases']} in {result['seconds']} s; "
        f"outcomes {result['outcomes']}; slowest call {result['slowest_call_s']} s; "
        f"peak RSS {result['peak_rss_kib'] // 1024} MiB"
    )
    assert not result["failures"], json.dumps(result["failures"][:5], indent=1)
    assert result["total_cases"] >= 4 * per_format + n_convert
    assert result["total_cases"] >= 2000
    for fmt in ("safetensors", "torch", "megengine", "flax"):
        outcomes = result["outcomes"][fmt]
        # both valid files and refusals are exercised, and nothing unexpected happened
        assert outcomes.get("result", 0) > 0 and outcomes.get("CheckpointError", 0) > 0, outcomes
        assert all(k == "result" or k.endswith("Error") and not k.startswith("UNEXPECTED") for k in outcomes), outcomes
