"""Helpers for the tests that need a large checkpoint (RepVGG-B1 / B3): written tensor by tensor
so the test process never holds a second copy."""

from __future__ import annotations

import os

from reparam_core import get_spec, random_state
from reparam_core.formats import safetensors_io


def write_train_safetensors(model: str, path: str | os.PathLike, seed: int = 0) -> int:
    state = random_state(get_spec(model), "train", seed=seed)
    entries = [(k, "F32", a.shape) for k, a in state.items()]
    head, pos = safetensors_io.plan(entries, {"producer": "test"})
    with open(path, "wb") as f:
        f.write(head)
        for k in list(state):
            safetensors_io.write_tensor_at(f, pos[k][0], k, state.pop(k))
    return os.path.getsize(path)
