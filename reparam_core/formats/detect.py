"""Which checkpoint format a file is in: from its first bytes, the extension as a last resort."""

from __future__ import annotations

import os

from ..errors import CheckpointError
from .torch_zip import is_legacy_torch

FORMATS = ("torch", "megengine", "flax", "safetensors")
EXTENSIONS = {
    ".safetensors": "safetensors",
    ".pth": "torch",
    ".pt": "torch",
    ".bin": "torch",
    ".pkl": "megengine",
    ".mge": "megengine",
    ".msgpack": "flax",
    ".flax": "flax",
}


def detect_format(path: str | os.PathLike[str]) -> str:
    """The checkpoint format of a file from its content (extension as a last resort):
    `safetensors`, `torch`, `torch-legacy`, `megengine`, `flax` or `orbax` (a directory).

    Signatures: a zip (`PK\\x03\\x04`) is a torch checkpoint; a pickle (PROTO 2..5) is MegEngine
    unless it opens with the legacy torch magic number; an 8-byte header length followed by `{`
    is safetensors; a msgpack map (fixmap 0x81..0x8f, map16/map32) is Flax."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return "orbax"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch-legacy" if is_legacy_torch(head) else "megengine"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return "flax"
    ext = os.path.splitext(path)[1].lower()
    if ext in EXTENSIONS:
        return EXTENSIONS[ext]
    raise CheckpointError(
        f"cannot tell the format of {path} (not safetensors, a torch zip, a pickle or msgpack); pass --from-format"
    )


def format_from_extension(path: str | os.PathLike[str], default: str = "safetensors") -> str:
    """The format a file name asks for (`EXTENSIONS`), `default` for an unknown extension."""
    return EXTENSIONS.get(os.path.splitext(os.fspath(path))[1].lower(), default)


__all__ = ["FORMATS", "EXTENSIONS", "detect_format", "format_from_extension"]
