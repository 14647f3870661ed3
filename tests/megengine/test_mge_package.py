"""`backends.megengine` resolves its public names lazily (MegEngine is imported on first use, so
that the worker client `backends.megengine.remote` imports in the main environment): every name
in `__all__` is the object it names, also after every submodule has been imported."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import backends.megengine as bm

ROOT = Path(__file__).resolve().parents[2]


def test_public_names_are_objects_not_submodules() -> None:
    for info in pkgutil.iter_modules(bm.__path__):
        importlib.import_module(f"backends.megengine.{info.name}")
    for name in bm.__all__:
        value = getattr(bm, name)
        assert not isinstance(value, types.ModuleType), name
    assert callable(bm.fastrun) and callable(bm.create_model) and bm.BN_MOMENTUM == 0.9


def test_client_imports_without_megengine() -> None:
    code = "import sys, backends.megengine.remote as r; print('megengine' in sys.modules, callable(r.MgeWorker))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "True"]
