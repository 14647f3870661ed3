"""A tiny stage progress reporter: a tqdm bar on an interactive stderr, silent otherwise.

    with Progress(["read", "convert", "write"], enabled=None) as p:
        p.stage("read"); ...

`enabled=None` means "when stderr is a TTY"; tqdm is optional (a plain line per stage without it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO


class Progress:
    def __init__(
        self, stages: Sequence[str], enabled: bool | None = None, stream: TextIO | None = None, desc: str = "convert"
    ) -> None:
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.stages = list(stages)
        self.done: list[str] = []
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=len(self.stages), desc=desc, file=self.stream, leave=False)
            except ImportError:
                self._bar = None

    def stage(self, name: str) -> None:
        """Mark the start of stage `name` (the previous stage is complete)."""
        self.done.append(name)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(name)
            if len(self.done) > 1:
                self._bar.update(1)
        else:
            print(f"[{len(self.done)}/{len(self.stages)}] {name}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._bar.total - self._bar.n)
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Progress"]
