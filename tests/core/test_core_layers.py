"""reparam_core's folders import each other bottom-up only: a module imports its own folder,
`errors`, and the folders before its own in LAYERS, never one after it nor the package root
(whose __init__ re-exports for callers outside the core). Function-local imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "reparam_core"
LAYERS = ("blocks", "families", "weights", "formats", "training", "quant", "bench", "demo")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in a core file, relative imports resolved."""
    module = ["reparam_core", *path.relative_to(CORE).with_suffix("").parts]
    package = module[:-1]  # __init__ included: its package is its own folder
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
            else:
                base = (node.module or "").split(".")
            if base[0] == "reparam_core":
                out += [(node.lineno, ".".join([*base, a.name])) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "reparam_core"]
    return out


def _folder(parts: list[str]) -> str:
    """The concern of `reparam_core.X...`: X for a folder, 'errors' or '' (the root)."""
    return parts[1] if len(parts) > 1 else ""


def test_every_core_folder_is_a_layer() -> None:
    folders = {p.name for p in CORE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYERS)
    assert {p.name for p in CORE.glob("*.py")} == {"__init__.py", "errors.py"}


def test_core_folders_import_bottom_up() -> None:
    wrong = []
    for path in sorted(CORE.rglob("*.py")):
        own = path.relative_to(CORE).parts[0]
        if own not in LAYERS:
            continue  # the root's __init__ and errors.py
        for line, name in _imports(path):
            target = _folder(name.split("."))
            if target == "errors" or target == own:
                continue
            if target not in LAYERS or LAYERS.index(target) > LAYERS.index(own):
                wrong.append(f"{path.relative_to(CORE)}:{line} imports {name}")
    assert wrong == []
