"""Atomic file writes: a temp file in the destination's directory (`.DST.<pid>-<random>.tmp`),
fsync, then rename (or hard link, to never clobber an existing file); on any failure the temp file
is removed and the destination is as it was. Temp files of processes that were killed are removed
by the next write to the same destination. Used by `reparam convert` and the trainer's
checkpoints; numpy-free, framework-free.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO

from ..errors import CheckpointError

_TMP_RE = r"\.{base}\.(\d+)-[A-Za-z0-9_]+\.tmp$"


def temp_name_pattern(dst: str) -> re.Pattern[str]:
    """The names of `dst`'s temp files: `.DST.<pid>-<random>.tmp` in DST's directory."""
    return re.compile(_TMP_RE.replace("{base}", re.escape(os.path.basename(dst))))


def clean_stale_temps(dst: str) -> list[str]:
    """Remove temp files of `dst` left by processes that no longer run (SIGKILL, power
    loss); returns the removed paths. Temps of live processes are left alone."""
    directory = os.path.dirname(os.path.abspath(dst))
    pattern = temp_name_pattern(dst)
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        if pid == os.getpid():
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(os.path.join(directory, name))
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def atomic_write(dst: str, data: bytes, *, overwrite: bool = False, check: Callable[[str], None] | None = None) -> None:
    """Write `data` to `dst` via a temp file in the same directory (fsync, then rename). `check`
    runs on the temp file before it becomes `dst`. Without `overwrite` an existing `dst` is never
    touched; on any failure the temp file is removed and `dst` is as it was."""
    atomic_write_stream(dst, lambda f: f.write(data), overwrite=overwrite, check=check)


def atomic_write_stream(
    dst: str, write: Callable[[BinaryIO], Any], *, overwrite: bool = False, check: Callable[[str], None] | None = None
) -> int:
    """`atomic_write` with a writer callback `write(f)` (f: a seekable binary file); returns the
    number of bytes of `dst`."""
    directory = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(directory):
        raise CheckpointError(f"cannot write {dst}: directory {directory} does not exist")
    if os.path.isdir(dst):
        raise CheckpointError(f"cannot write {dst}: it is a directory")
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it")
    clean_stale_temps(dst)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(dst)}.{os.getpid()}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w+b") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            size = f.seek(0, os.SEEK_END)
        if check is not None:
            check(tmp)
        if overwrite:
            os.replace(tmp, dst)
        else:
            try:
                os.link(tmp, dst)  # fails if dst appeared meanwhile: never clobber it
            except FileExistsError:
                raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it") from None
            except OSError:  # filesystems without hard links
                if os.path.exists(dst):
                    raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it") from None
                os.replace(tmp, dst)
        _fsync_dir(directory)
        return size
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["atomic_write", "atomic_write_stream", "clean_stale_temps", "temp_name_pattern"]
