"""A `reparam train` trainer run in another interpreter (the MegEngine one lives in `.venv-mge`,
Python 3.10, without scikit-learn or Pillow).

The parent reads the data (so bad input fails before anything starts), writes it as one
safetensors file (training.data.save_dataset) and starts `PYTHON -m MODULE --config JSON --dataset
FILE [--resume]`. The child (`child_main`) trains and reports on stdout, one line per event,
each `EVENT_PREFIX` + a JSON object: `step` (done, total, loss, images), `epoch` (the metrics
record), `summary` (the trainer's summary) or `error` (a ReparamError: its class name and
message). Other lines of its stdout are passed on to the parent's stderr. SIGTERM sent to the
parent is forwarded to the child, which writes its checkpoint and stops as an in-process trainer
does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from .. import errors
from .data import Dataset, read_dataset, save_dataset
from .imagefolder import DataError
from .recipe import TrainConfig, TrainError

EVENT_PREFIX = "@reparam-train "
StepCallback = Callable[[int, int, float, float], None]
EpochCallback = Callable[[dict[str, Any]], None]
TrainFunction = Callable[..., dict[str, Any]]


class EventWriter:
    """The child's side: events as prefixed JSON lines on `stream`, flushed at once."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def emit(self, event: str, **payload: Any) -> None:
        self.stream.write(EVENT_PREFIX + json.dumps({"event": event, **payload}) + "\n")
        self.stream.flush()

    def step(self, done: int, total: int, loss: float, images: float) -> None:
        self.emit("step", done=done, total=total, loss=loss, images=images)

    def epoch(self, record: dict[str, Any]) -> None:
        self.emit("epoch", record=record)


def child_main(train: TrainFunction, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The entry of a trainer module: `--config JSON` (a TrainConfig's fields), `--dataset FILE`
    (training.data.save_dataset), `--resume`. Exit 0 (done), 143 (stopped by SIGTERM, checkpoint
    written) or 2 (a ReparamError, reported as an `error` event)."""
    p = argparse.ArgumentParser(prog=prog, description="one reparam train process (see reparam_core.training.process)")
    p.add_argument("--config", required=True, metavar="JSON", help="TrainConfig fields as JSON")
    p.add_argument("--dataset", required=True, metavar="FILE", help="training.data.save_dataset file")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    events = EventWriter(sys.stdout)
    try:
        cfg = TrainConfig(**json.loads(args.config))
        summary = train(cfg, read_dataset(args.dataset), resume=args.resume, on_step=events.step, on_epoch=events.epoch)
    except errors.ReparamError as e:
        events.emit("error", type=type(e).__name__, message=str(e))
        return 2
    events.emit("summary", summary=summary)
    return 143 if summary["stopped"] else 0


def _error_class(name: str) -> type[errors.ReparamError]:
    known = {c.__name__: c for c in (TrainError, DataError)}
    cls = known.get(name, getattr(errors, name, None))
    return cls if isinstance(cls, type) and issubclass(cls, errors.ReparamError) else TrainError


class ProcessTrainer:
    """The parent's side: `train(cfg, data, resume=, on_step=, on_epoch=)` as the in-process
    trainers, run by `python -m module` in another interpreter."""

    def __init__(
        self,
        python: str | os.PathLike[str],
        module: str,
        cwd: str | os.PathLike[str],
        env: dict[str, str] | None = None,
    ) -> None:
        self.python, self.module, self.cwd, self.env = Path(python), module, cwd, env

    def command(self, cfg: TrainConfig, dataset: str, resume: bool) -> list[str]:
        cmd = [os.fspath(self.python), "-m", self.module, "--config", json.dumps(vars(cfg)), "--dataset", dataset]
        return cmd + (["--resume"] if resume else [])

    def train(
        self,
        cfg: TrainConfig,
        data: Dataset,
        *,
        resume: bool = False,
        on_step: StepCallback | None = None,
        on_epoch: EpochCallback | None = None,
    ) -> dict[str, Any]:
        if not self.python.exists():
            raise errors.BackendUnavailableError(
                f"{self.python} not found; create the environment with `bash scripts/setup_envs.sh`"
            )
        with tempfile.TemporaryDirectory(prefix="reparam-train-") as tmp:
            dataset = os.path.join(tmp, "dataset.safetensors")
            save_dataset(dataset, data)
            proc = subprocess.Popen(
                self.command(cfg, dataset, resume),
                cwd=self.cwd,
                env=self.env,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
            previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
            try:
                final = self._follow(proc.stdout, on_step, on_epoch)
            finally:
                rc = proc.wait()
                signal.signal(signal.SIGTERM, previous)
        if final.get("event") == "error":
            raise _error_class(final["type"])(final["message"])
        if final.get("event") != "summary":
            raise errors.BackendUnavailableError(
                f"the {self.module} process exited with status {rc} without a summary (its messages are above)"
            )
        summary: dict[str, Any] = final["summary"]
        return summary

    @staticmethod
    def _follow(stream: IO[str] | None, on_step: StepCallback | None, on_epoch: EpochCallback | None) -> dict[str, Any]:
        """Dispatch the child's events until its stdout closes; the last summary or error."""
        final: dict[str, Any] = {}
        for line in stream or ():
            if not line.startswith(EVENT_PREFIX):
                sys.stderr.write(line)
                continue
            event = json.loads(line[len(EVENT_PREFIX) :])
            if event["event"] == "step" and on_step:
                on_step(event["done"], event["total"], event["loss"], event["images"])
            elif event["event"] == "epoch" and on_epoch:
                on_epoch(event["record"])
            elif event["event"] in ("summary", "error"):
                final = event
        return final


__all__ = ["EVENT_PREFIX", "EventWriter", "child_main", "ProcessTrainer"]
