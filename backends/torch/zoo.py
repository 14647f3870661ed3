"""The one way this project imports the model-zoo libraries (timm, ultralytics, mmpretrain) and
torchvision under them (issue 25).

Why torchvision needs a helper: the registry's only torchvision for torch 2.13 (0.28.0) is a CUDA
build. Next to the CPU torch pinned in requirements/main.lock its C extension `_C.so` does not load
(it links CUDA torch's libraries), torchvision then treats its C++ ops as absent, but its
`_meta_registrations.py` still calls `torch.library.register_fake("torchvision::nms")` (and
`qnms`) unconditionally at import, which raises "operator torchvision::nms does not exist" and so
breaks `import torchvision`, and with it timm, ultralytics and mmpretrain.

`import_torchvision()` first does what torchvision itself does (load `_C`). Only if that fails, and
only if the two ops are not already defined, it defines their schemas with `torch.library` (the same
signatures as torchvision's C++ `TORCH_LIBRARY_FRAGMENT`), schemas only, no kernels: that is all
torchvision's import needs. Its pure-Python parts (models, transforms, ops.boxes helpers such as
box_iou / box_convert, ops.misc) then work; its C++ ops (nms, roi_align, deform_conv2d, ...) stay
unavailable and raise torchvision's own "Couldn't load custom C++ ops" error when called, since
torchvision.extension._has_ops() is False. (So ultralytics' `predict` post-processing, which calls
torchvision.ops.nms once torchvision is imported, does not work; a model's forward does, and that is
all the fusers need.) With a torchvision whose extension loads (a CPU wheel, a source build) this
module does nothing but import it.

Nothing here downloads anything; models are built with random weights by the callers.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

import torch

__all__ = ["import_mmpretrain", "import_timm", "import_torchvision", "import_ultralytics", "torchvision_ops_shimmed"]

_INSTALL_HINT = "install the zoo pins: scripts/setup_envs.sh (requirements/zoo.lock, pip --no-deps)"
_lib: torch.library.Library | None = None  # keeps the shim's registrations alive
_shimmed = False


def _op_defined(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _load_extension() -> bool:
    """Load torchvision's `_C` the way torchvision.extension does, without importing the package."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"torchvision is not installed ({_INSTALL_HINT})")
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "_C" + suffix)
            if os.path.exists(path):
                try:
                    torch.ops.load_library(path)
                    return True
                except (ImportError, OSError):
                    return False
    return False


def _shim_ops() -> None:
    global _lib, _shimmed
    lib = torch.library.Library("torchvision", "FRAGMENT")  # kept alive in _lib
    for name in ("nms", "qnms"):
        if not _op_defined(name):
            lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib = lib
    _shimmed = True


def torchvision_ops_shimmed() -> bool:
    """True when import_torchvision() had to define torchvision's op schemas itself."""
    return _shimmed


def import_torchvision() -> ModuleType:
    """`import torchvision`, working around a torchvision whose C extension cannot load (see module doc)."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    if not _load_extension() and not (_op_defined("nms") and _op_defined("qnms")):
        _shim_ops()
    return importlib.import_module("torchvision")


def _import(name: str) -> ModuleType:
    import_torchvision()
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"{name} cannot be imported ({_INSTALL_HINT}): {type(e).__name__}: {e}") from e


def import_timm() -> ModuleType:
    return _import("timm")


def import_ultralytics() -> ModuleType:
    """ultralytics, kept offline: no update checks, no telemetry, no hub."""
    os.environ.setdefault("YOLO_OFFLINE", "True")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    return _import("ultralytics")


def import_mmpretrain() -> ModuleType:
    """mmpretrain with mmengine + mmcv-lite (no compiled mmcv ops), its models registered."""
    mod = _import("mmpretrain")
    importlib.import_module("mmpretrain.models")
    return mod
