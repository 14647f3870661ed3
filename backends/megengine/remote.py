"""Client of the MegEngine worker: MegEngine lives in `.venv-mge` (Python 3.10, numpy < 2), so the
orchestration in `.venv` drives it as a child process (`python -m backends.megengine.worker`),
started once and reused. Requests are JSON lines; arrays travel as safetensors files in a private
temporary directory. The worker speaks neutral states and NCHW arrays only.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from reparam_core import errors
from reparam_core.families.specs import BlockSpec, block_spec_to_dict
from reparam_core.formats.safetensors_io import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]


def mge_python() -> Path:
    """The interpreter of the MegEngine environment (REPARAM_MGE_PYTHON overrides)."""
    return Path(os.environ.get("REPARAM_MGE_PYTHON", ROOT / ".venv-mge" / "bin" / "python"))


class MgeWorker:
    """One MegEngine worker process. Use as a context manager, or `shared()` for a reused one."""

    def __init__(self, python: str | os.PathLike[str] | None = None) -> None:
        exe = Path(python) if python else mge_python()
        if not exe.exists():
            raise errors.BackendUnavailableError(
                f"MegEngine environment not found ({exe}); create it with `bash scripts/setup_envs.sh`"
            )
        self._tmp = tempfile.TemporaryDirectory(prefix="reparam-mge-")
        self._stderr = open(Path(self._tmp.name) / "worker.log", "w+b")
        self._proc = subprocess.Popen(
            [str(exe), "-m", "backends.megengine.worker"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self._ids = itertools.count()
        self.info = self.request(op="ping")

    # -- protocol
    def request(self, **req: Any) -> dict[str, Any]:
        if self._proc.poll() is not None:
            raise errors.BackendUnavailableError(f"MegEngine worker has exited: {self._log_tail()}")
        stdin, stdout = self._proc.stdin, self._proc.stdout
        if stdin is None or stdout is None:  # never: Popen above made both pipes
            raise errors.BackendUnavailableError("MegEngine worker has no stdin/stdout pipe")
        stdin.write(json.dumps(req) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise errors.BackendUnavailableError(f"MegEngine worker died: {self._log_tail()}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            cls = getattr(errors, reply.get("type", ""), None)
            if not (isinstance(cls, type) and issubclass(cls, errors.ReparamError)):
                cls = errors.ReparamError
            raise cls(f"MegEngine worker: {reply.get('type')}: {reply.get('error')}")
        return reply

    def _log_tail(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-2000:]

    def _path(self, stem: str) -> str:
        return str(Path(self._tmp.name) / f"{stem}-{next(self._ids)}.safetensors")

    def _put(self, stem: str, arrays: Mapping[str, np.ndarray]) -> str:
        path = self._path(stem)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}, path)
        return path

    @staticmethod
    def _target(model: str | None, block: BlockSpec | None, num_classes: int) -> dict[str, Any]:
        if (model is None) == (block is None):
            raise errors.ArgumentError("give exactly one of model= and block=")
        return {
            "model": model,
            "num_classes": num_classes,
            "block": block_spec_to_dict(block) if block is not None else None,
        }

    # -- operations
    def predict(
        self,
        *,
        state: Mapping[str, np.ndarray],
        x: np.ndarray,
        form: str = "train",
        model: str | None = None,
        block: BlockSpec | None = None,
        num_classes: int = 1000,
        reparameterize: bool = False,
        return_state: bool = False,
        fastrun: bool = False,
    ) -> Any:
        """Build the module in `form`, load `state`, optionally re-parameterize, predict on x
        (`fastrun`: with MegEngine's profiled kernels). Returns y, or (y, exported neutral state
        of the final module) with return_state."""
        out, exported = self._path("y"), (self._path("state") if return_state else None)
        self.request(
            op="predict",
            form=form,
            reparameterize=reparameterize,
            fastrun=fastrun,
            state=self._put("in-state", state),
            input=self._put("x", {"x": x}),
            output=out,
            export_state=exported,
            **self._target(model, block, num_classes),
        )
        y = load_file(out)[0]["y"]
        return (y, load_file(exported)[0]) if exported is not None else y

    def export_traced(
        self,
        *,
        state: Mapping[str, np.ndarray],
        x: np.ndarray,
        artifact: str | os.PathLike[str],
        form: str = "train",
        model: str | None = None,
        block: BlockSpec | None = None,
        num_classes: int = 1000,
        fastrun: bool = False,
    ) -> np.ndarray:
        """Trace the deploy form into a `.mge` file and return the artifact's output on x (run
        with MegEngine's profiled kernels when `fastrun`)."""
        out = self._path("y")
        self.request(
            op="export_traced",
            form=form,
            fastrun=fastrun,
            state=self._put("in-state", state),
            input=self._put("x", {"x": x}),
            artifact=str(artifact),
            output=out,
            **self._target(model, block, num_classes),
        )
        return load_file(out)[0]["y"]

    def run_traced(self, artifact: str | os.PathLike[str], x: np.ndarray, *, fastrun: bool = False) -> np.ndarray:
        """The output of a traced `.mge` artifact on NCHW x (any batch)."""
        out = self._path("y")
        self.request(
            op="run_traced", artifact=os.fspath(artifact), input=self._put("x", {"x": x}), output=out, fastrun=fastrun
        )
        return load_file(out)[0]["y"]

    def time_forms(
        self,
        *,
        state: Mapping[str, np.ndarray],
        x: np.ndarray,
        repeats: int,
        model: str | None = None,
        block: BlockSpec | None = None,
        num_classes: int = 1000,
        warmup: int = 1,
        fastrun: bool = False,
    ) -> dict[str, list[float]]:
        """Seconds per call of the train form (loaded with the train-form `state`) and of its
        deploy form (re-parameterized in MegEngine), each predicting on x, timed in `repeats`
        interleaved rounds after `warmup` untimed ones: {"train": [...], "deploy": [...]}."""
        reply = self.request(
            op="time",
            form="train",
            repeats=repeats,
            warmup=warmup,
            fastrun=fastrun,
            state=self._put("in-state", state),
            input=self._put("x", {"x": x}),
            **self._target(model, block, num_classes),
        )
        return {k: [float(t) for t in v] for k, v in reply["times"].items()}

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self.request(op="shutdown")
                self._proc.wait(timeout=10)
            except Exception:
                self._proc.kill()
        self._stderr.close()
        self._tmp.cleanup()

    def __enter__(self) -> MgeWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SHARED: MgeWorker | None = None


def shared() -> MgeWorker:
    """A process-wide worker, started on first use and closed at exit."""
    global _SHARED
    if _SHARED is None or _SHARED._proc.poll() is not None:
        _SHARED = MgeWorker()
        atexit.register(_SHARED.close)
    return _SHARED
