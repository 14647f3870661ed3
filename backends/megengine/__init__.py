"""The MegEngine backend of reparam: native megengine.module layers built from reparam_core's
block descriptions (one generic RepModule, thin classes under the official names).

MegEngine is imported on first use of a name below (`from backends.megengine import RepVGG`), with
its CUDA-probing noise kept off stderr (quiet.py), so that `backends.megengine.remote` (the client
that drives the MegEngine worker process from the main environment) imports without MegEngine.

BN momentum is 0.9 in MegEngine's convention, which equals torch's momentum 0.1.
"""

from __future__ import annotations

import importlib
from typing import Any

from reparam_core import repconv_spec  # the YOLOv7 RepConv spec, re-exported

# public name -> submodule that defines it (imported, with MegEngine, on first access)
_HOME = {
    **dict.fromkeys(
        ["build_block", "create_model", "export_state", "load_state", "model_from_spec", "predict", "reparameterize"],
        "api",
    ),
    **dict.fromkeys(
        [
            "RepConv",
            "RepGhostBottleneck",
            "RepGhostModule",
            "RepModule",
            "RepVGGBlock",
            "RepVGGplusBlock",
            "block_class",
        ],
        "blocks",
    ),
    **dict.fromkeys(["TracedGraph", "export_traced", "run_traced"], "export"),
    "fastrun": "profiling",
    "BN_MOMENTUM": "layers",
    **dict.fromkeys(["RepGhostNet", "RepVGG", "RepVGGplus"], "models"),
    **dict.fromkeys(["quiet_fd2", "import_megengine"], "quiet"),
}

__all__ = ["repconv_spec", *_HOME]


def __getattr__(name: str) -> Any:
    """Resolve a public name lazily: import its submodule (and so MegEngine) on first access."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
