"""Traced .mge artifacts reproduce predict; no CUDA noise reaches stderr."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mge_testutil import rand_input, rel_err

from backends.megengine import create_model, export_traced, load_state, predict, reparameterize, run_traced
from backends.megengine.quiet import filter_noise
from reparam_core import get_spec, random_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARTIFACT_RTOL = 1e-5


@pytest.mark.parametrize(
    "name,size", [("RepVGG-mini", 32), ("repghostnet_0_5x", 64), ("RepVGG-A0", 32), ("MobileOne-S0", 32)]
)
def test_traced_artifact_matches_predict(tmp_path, name, size):
    spec = get_spec(name, 10)
    model = load_state(create_model(name, num_classes=10), random_state(spec, "train", 1))
    x = rand_input((2, 3, size, size))
    path = export_traced(model, tmp_path / "m.mge", input_shape=x.shape)
    assert os.path.getsize(path) > 0
    assert model.deploy is False  # the input model is not converted in place
    y = predict(reparameterize(model), x)
    y_art = run_traced(path, x)
    err = rel_err(y_art, y)
    assert err <= ARTIFACT_RTOL, err
    print(f"{name}: artifact vs predict {err:.2e}")


def test_filter_noise_keeps_other_lines():
    text = (
        "info: ++++++++++\ninfo: + Failed to load CUDA driver library, MegEngine works +\n"
        "info: + Refer to https://discuss.megengine.org.cn/t/topic/1264 for more. +\n"
        "debug: failed to load cuda func: cuDeviceGetCount\nreal warning here\n"
    )
    assert filter_noise(text) == "real warning here\n"


def test_subprocess_predict_prints_no_cuda_noise():
    code = (
        "import numpy as np\n"
        "from backends.megengine import create_model, predict\n"
        "import sys\n"
        "print('keep-me', file=sys.stderr)\n"
        "y = predict(create_model('RepVGG-mini', num_classes=3), "
        "np.ones((1, 3, 32, 32), np.float32))\n"
        "print(y.shape)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "cuda" not in r.stderr.lower(), r.stderr
    assert "keep-me" in r.stderr
    assert "(1, 3)" in r.stdout
