"""The core is numpy and the standard library only: importing every one of its modules, in a
fresh interpreter, loads no framework (and no plotting library: plots import it when called)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FRAMEWORKS = ("torch", "jax", "flax", "megengine", "orbax", "onnx", "onnxruntime", "optax", "matplotlib")


def test_every_core_module_imports_without_a_framework() -> None:
    code = (
        "import importlib, pkgutil, sys, reparam_core\n"
        "names = [m.name for m in pkgutil.walk_packages(reparam_core.__path__, 'reparam_core.')]\n"
        "for n in names: importlib.import_module(n)\n"
        f"print(len(names), sorted(k for k in {FRAMEWORKS!r} if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    count, loaded = out.stdout.split(" ", 1)
    assert int(count) >= 55  # every concern's folder (blocks/, families/, formats/, ...) and its modules
    assert loaded.strip() == "[]"
