"""The numpy-only safetensors reader/writer: round trip, determinism, malformed input."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from parity_tests.backend_rule import require_module
from reparam_core import CheckpointError
from reparam_core.formats.safetensors_io import dumps, loads, save_file


def test_round_trip_and_determinism() -> None:
    state = {
        "b": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a": np.ones(3, np.float64),
        "c": np.zeros((0, 2), np.float16),
    }
    data = dumps(state, {"format": "neutral"})
    assert data == dumps(dict(reversed(list(state.items()))), {"format": "neutral"})
    back, meta = loads(data)
    assert meta == {"format": "neutral"}
    for k in state:
        assert back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k])


def test_save_file_writes_the_bytes_of_dumps(tmp_path) -> None:
    """save_file streams tensor by tensor (issue 28: no whole-file copy in memory), same bytes."""
    state = {"b": np.arange(6, dtype=">f4").reshape(2, 3), "a": np.ones((3, 2), np.float64).T}
    save_file(state, tmp_path / "s.safetensors", {"format": "neutral"})
    assert (tmp_path / "s.safetensors").read_bytes() == dumps(state, {"format": "neutral"})


def test_readable_by_the_reference_implementation(pytestconfig) -> None:
    safetensors_numpy = require_module(pytestconfig, "safetensors.numpy")
    state = {"w": np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)}
    assert np.array_equal(safetensors_numpy.load(dumps(state))["w"], state["w"])
    assert np.array_equal(loads(safetensors_numpy.save(state))[0]["w"], state["w"])


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d[:5], "too short"),
        (lambda d: struct.pack("<Q", 10**12) + d[8:], "header declares"),
        (lambda d: d[:8] + b"#" + d[9:], "not JSON"),
        (lambda d: d[:-4], "do not fit"),
    ],
)
def test_malformed_files_are_refused(mutate, match) -> None:
    data = dumps({"w": np.ones((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match=match):
        loads(mutate(data), source="x.safetensors")
