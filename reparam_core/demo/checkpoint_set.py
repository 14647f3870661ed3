"""A model's states written in every checkpoint format, each file read back and checked.

`write_every_format(spec, {"train": s, "deploy": t}, folder)` writes `NAME-FORM.EXT` for every
form and every format (torch .pth, MegEngine .pkl, Flax .msgpack, .safetensors) atomically with
the umask's mode, then reads each file back through the format detection and key mapping that
`reparam convert` uses: the state read must be the state written, bit for bit, with the same form
and format (CheckpointError otherwise). numpy and the standard library only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..blocks.schema import Form
from ..errors import CheckpointError
from ..families.specs import ModelSpec
from ..formats import encode, load_neutral
from ..training.checkpoints import write_bytes

SUFFIX = {"torch": ".pth", "megengine": ".pkl", "flax": ".msgpack", "safetensors": ".safetensors"}


def write_every_format(
    spec: ModelSpec, states: Mapping[Form, Mapping[str, np.ndarray]], folder: str | os.PathLike[str]
) -> dict[str, dict[str, Any]]:
    """Every form of `states` (form -> neutral state) in every format of SUFFIX under `folder`;
    returns {"FORMAT/FORM": {path, format, form, bytes, read_back_exact}}."""
    out: dict[str, dict[str, Any]] = {}
    for form, state in states.items():
        for fmt, suffix in SUFFIX.items():
            path = Path(folder) / f"{spec.name}-{form}{suffix}"
            write_bytes(path, encode(spec, dict(state), form, fmt))
            back, back_form, back_fmt, _ = load_neutral(path, spec)
            exact = (
                back_form == form
                and back_fmt == fmt
                and set(back) == set(state)
                and all(np.array_equal(back[k], state[k]) for k in state)
            )
            if not exact:
                raise CheckpointError(f"{path}: reading it back does not give the state written")
            out[f"{fmt}/{form}"] = {
                "path": os.fspath(path),
                "format": fmt,
                "form": form,
                "bytes": path.stat().st_size,
                "read_back_exact": exact,
            }
    return out


__all__ = ["SUFFIX", "write_every_format"]
