"""Peak memory of `reparam convert --to-deploy` on RepVGG-B3 (train-form safetensors, ~493 MB).

Method: the conversion runs in a fresh subprocess. After importing everything it needs, the child
resets its peak-RSS counter (writing "5" to /proc/self/clear_refs resets VmHWM) and records its
resident size (VmRSS) as the baseline; after convert() returns it reads VmHWM (peak resident set,
anonymous and file-backed pages) from /proc/self/status. Peak minus baseline must be at most 2.5x
the checkpoint's size. The conversion streams (block-by-block fusion, tensor-by-tensor reads and
writes) so this stays near 1x.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from _big import write_train_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = r"""
import json, sys
from reparam_core.formats.convert import convert
from reparam_core import get_spec, state_schema

def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

get_spec("RepVGG-B3"); state_schema(get_spec("RepVGG-B3"), "train")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
base = status("VmRSS")
report = convert(sys.argv[1], sys.argv[2], "RepVGG-B3", to_deploy=True)
print(json.dumps({"baseline": base, "peak": status("VmHWM"), "reset": reset,
                  "bytes": report["bytes"]}))
"""


def test_b3_deploy_conversion_peak_memory(tmp_path):
    src = tmp_path / "b3.safetensors"
    size = write_train_safetensors("RepVGG-B3", src)
    dst = tmp_path / "b3_deploy.safetensors"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(dst)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["reset"], "could not reset VmHWM: the measurement would include start-up"
    extra = m["peak"] - m["baseline"]
    ratio = extra / size
    print(
        f"\nRepVGG-B3 train safetensors {size / 2**20:.1f} MiB -> deploy "
        f"{m['bytes'] / 2**20:.1f} MiB: peak RSS {m['peak'] / 2**20:.1f} MiB, baseline "
        f"{m['baseline'] / 2**20:.1f} MiB, extra {extra / 2**20:.1f} MiB = {ratio:.2f}x the "
        "checkpoint"
    )
    assert ratio <= 2.5
    assert dst.stat().st_size == m["bytes"]
