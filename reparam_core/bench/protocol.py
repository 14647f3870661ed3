"""The child side of a JSON-lines protocol over stdout (the MegEngine worker, the benchmark
children): the protocol keeps the process's original stdout, and everything else that writes to
fd 1 (frameworks' C++ logging, stray prints) goes to stderr instead, so it cannot corrupt a reply.
Standard library only."""

from __future__ import annotations

import os
import sys
from typing import TextIO


def open_protocol() -> TextIO:
    """The original stdout as a line-buffered text stream; fd 1 and `sys.stdout` now point to
    stderr."""
    sys.stdout.flush()
    proto_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(proto_fd, "w", buffering=1, encoding="utf-8")
