"""The JSON-lines worker, driven as a subprocess with the .venv-mge python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from mge_testutil import BLOCK_RTOL, model_tolerance, rand_input, random_block_params, rel_err

from reparam_core import RepBlockSpec, block_spec_to_dict, get_spec, random_state, reparameterize_state
from reparam_core.blocks import oracle
from reparam_core.blocks.schema import block_schema
from reparam_core.formats.safetensors_io import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def worker():
    proc = subprocess.Popen(
        [sys.executable, "-m", "backends.megengine.worker"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )

    def call(req: dict) -> dict:
        proc.stdin.write(json.dumps(req) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, "worker closed its protocol channel"
        return json.loads(line)  # every protocol line is pure JSON

    yield call
    proc.stdin.close()  # EOF also ends the worker's loop (after a shutdown it has exited)
    assert proc.wait(timeout=60) == 0
    stderr = proc.stderr.read()
    assert "cuda" not in stderr.lower(), stderr


def timed(worker, req: dict) -> dict:
    """One timed request: the reply's `seconds` (the worker's own time for the request) must be
    positive and no more than the round trip measured here around the call (+ rounding slack)."""
    t0 = time.perf_counter()
    reply = worker(req)
    wall = time.perf_counter() - t0
    assert reply.get("ok") is True, reply
    assert 0 < reply["seconds"] <= wall + 1e-3, (reply["seconds"], wall, reply)
    return reply


def test_worker_protocol(worker, tmp_path):
    pong = worker({"op": "ping"})
    assert pong["ok"] is True and pong["megengine"] == "1.13.0" and pong["python"].startswith("3.10")

    # model: train form, reparameterized in the worker, deploy state exported
    spec = get_spec("RepVGG-mini", 10)
    state = random_state(spec, "train", 6)
    x = rand_input((2, 3, 32, 32))
    save_file(state, tmp_path / "state.safetensors")
    save_file({"x": x}, tmp_path / "x.safetensors")
    req = {
        "op": "predict",
        "model": "RepVGG-mini",
        "block": None,
        "num_classes": 10,
        "form": "train",
        "state": str(tmp_path / "state.safetensors"),
        "input": str(tmp_path / "x.safetensors"),
        "output": str(tmp_path / "y.safetensors"),
        "reparameterize": True,
        "export_state": str(tmp_path / "deploy.safetensors"),
    }
    r = timed(worker, req)
    assert r["ok"] is True and r["form"] == "deploy" and "seconds" in r, r
    ref = oracle.forward(spec, state, x, "train")
    assert rel_err(load_file(tmp_path / "y.safetensors")[0]["y"], ref) <= model_tolerance(spec)
    dstate = load_file(tmp_path / "deploy.safetensors")[0]
    expected = reparameterize_state(spec, state)
    assert set(dstate) == set(expected)
    assert all(np.allclose(dstate[k], expected[k], rtol=1e-6, atol=1e-7) for k in expected)

    # block spec, train form, no conversion
    bspec = RepBlockSpec(8, 8, groups=2, se="post", se_channels=2)
    params = random_block_params(block_schema(bspec, "train"), 3)
    xb = rand_input((1, 8, 7, 9))
    save_file(params, tmp_path / "b.safetensors")
    save_file({"x": xb}, tmp_path / "xb.safetensors")
    r = timed(
        worker,
        {
            "op": "predict",
            "model": None,
            "block": block_spec_to_dict(bspec),
            "num_classes": 10,
            "form": "train",
            "state": str(tmp_path / "b.safetensors"),
            "input": str(tmp_path / "xb.safetensors"),
            "output": str(tmp_path / "yb.safetensors"),
            "reparameterize": False,
            "export_state": None,
        },
    )
    assert r["ok"] is True and r["form"] == "train" and "seconds" in r, r
    yb = load_file(tmp_path / "yb.safetensors")[0]["y"]
    assert rel_err(yb, oracle.block_forward(bspec, params, xb, "train")) <= BLOCK_RTOL

    # traced artifact
    art = tmp_path / "mini.mge"
    r = timed(
        worker,
        {
            "op": "export_traced",
            "model": "RepVGG-mini",
            "block": None,
            "num_classes": 10,
            "form": "train",
            "state": str(tmp_path / "state.safetensors"),
            "input": str(tmp_path / "x.safetensors"),
            "artifact": str(art),
            "output": str(tmp_path / "ya.safetensors"),
        },
    )
    assert r["ok"] is True and art.exists() and "seconds" in r, r
    assert rel_err(load_file(tmp_path / "ya.safetensors")[0]["y"], ref) <= model_tolerance(spec)

    # errors are replies, and the worker keeps serving
    bad = worker({**req, "state": str(tmp_path / "deploy.safetensors"), "export_state": None, "reparameterize": False})
    assert bad["ok"] is False and bad["type"] == "CheckpointError" and "deploy" in bad["error"]
    unknown = worker({**req, "model": "RepVGG-Z9"})
    assert unknown["ok"] is False and unknown["type"] == "UnknownModelError"
    assert worker({"op": "nope"})["ok"] is False
    assert worker({"op": "ping"})["ok"] is True
    assert worker({"op": "shutdown"}) == {"ok": True}
