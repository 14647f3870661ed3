"""Keep MegEngine's CUDA probing noise off the user's terminal.

On a machine without a usable CUDA driver MegEngine writes a banner ("info: + Failed to load CUDA
driver library ...") and `debug: failed to load cuda func: ...` lines straight to file descriptor 2
(from C++, so `sys.stderr` redirection cannot catch them) at import and at the first operation.
`quiet_fd2()` captures fd 2 at the OS level around a code region and re-emits every captured line
except that CUDA noise; `import_megengine()` imports MegEngine and runs one tiny op inside it, so
the noise is spent before any user code runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

# The CUDA banner and probe lines. The banner's frame lines are "info: +++++..." and
# "info: + <text> +"; the text lines mention CUDA/NVIDIA or point to the help forum.
_NOISE = re.compile(r"cuda|nvidia|discuss\.megengine|^\s*(info|debug|warn|warning):\s*\+[+\s]*$", re.IGNORECASE)


def is_noise(line: str) -> bool:
    """True for a line of MegEngine's CUDA-probing output (banner frame included)."""
    stripped = line.strip()
    if not stripped:
        return False
    if _NOISE.search(stripped):
        return True
    # banner body lines: "info: + ... +"
    return bool(re.match(r"^(info|debug):\s*\+.*\+$", stripped))


def filter_noise(text: str) -> str:
    """`text` without the CUDA noise lines (other lines kept, in order)."""
    return "".join(line for line in text.splitlines(keepends=True) if not is_noise(line))


@contextlib.contextmanager
def quiet_fd2() -> Iterator[None]:
    """Capture fd 2 (C and Python writes alike) for the block, then write everything except the
    CUDA noise back to the real stderr. Nested use is harmless."""
    try:
        sys.stderr.flush()
    except Exception:  # pragma: no cover - closed/odd stderr
        pass
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except Exception:  # pragma: no cover
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = filter_noise(tmp.read().decode("utf-8", "replace"))
            if kept:
                os.write(2, kept.encode("utf-8", "replace"))


_READY = False


def import_megengine() -> Any:
    """Import MegEngine and run its first op with the CUDA noise swallowed; returns the module
    (Any: MegEngine is untyped to mypy, and `mge.optimizer.SGD` and the like serve as types)."""
    global _READY
    if _READY:
        import megengine

        return megengine
    with quiet_fd2():
        import megengine
        import megengine.functional as F  # noqa: F401
        import megengine.module

        (megengine.tensor([1.0]) + 1).numpy()
    _READY = True
    return megengine


__all__ = ["quiet_fd2", "import_megengine", "filter_noise", "is_noise"]
