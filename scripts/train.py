"""`reparam train`: train the multi-branch (train) form on the bundled digits or an image folder,
in PyTorch (one process, or torch.distributed.run with --nproc / --nnodes), Flax (data
parallel over the local devices) or MegEngine (one process, in .venv-mge), then write the neutral
safetensors of both forms.

    reparam train --model RepVGG-mini --data digits|DIR --out DIR [--framework torch|flax|megengine]
        [--epochs N | --max-steps N] [--global-batch B] [--lr LR] [--wd WD]
        [--label-smoothing S] [--warmup-epochs E] [--ema DECAY] [--clip NORM] [--amp bf16]
        [--sync-bn] [--seed S] [--no-augment] [--image-size S] [--init STATE] [--nproc N]
        [--nnodes N --node-rank R --rdzv-endpoint HOST:PORT] [--resume]

OUT gets checkpoint.safetensors (each epoch end and on SIGTERM; --resume continues from it),
metrics.jsonl (one line per epoch), metrics.png, MODEL-train.safetensors and
MODEL-deploy.safetensors. The data is read (and every image checked) before anything is written
or any process is started: a bad folder or image is a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from reparam_core import get_spec
from reparam_core import training as tr

ROOT = Path(__file__).resolve().parent.parent
_LAUNCHER_ENV = "TORCHELASTIC_RUN_ID"  # set by torch.distributed.run in every worker
EXIT_STOPPED = 143  # 128 + SIGTERM: stopped early, checkpoint written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = tr.TrainConfig(model="")
    a = parser.add_argument
    a("--model", required=True, metavar="NAME", help="registry model (reparam list)")
    a(
        "--data",
        default=tr.DIGITS,
        metavar="digits|DIR",
        help="'digits' (bundled) or an image folder DIR/<class>/<image>",
    )
    a("--out", required=True, metavar="DIR", help="output folder (created)")
    a("--framework", choices=("torch", "flax", "megengine"), default="torch")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=int, default=d.epochs, metavar="N")
    steps.add_argument("--max-steps", type=int, default=None, metavar="N", help="stop after N optimizer steps instead")
    a(
        "--global-batch",
        type=int,
        default=d.global_batch,
        metavar="B",
        help="images per step over all processes/devices",
    )
    a("--lr", type=float, default=None, help="peak learning rate (default 0.1 * B / 256)")
    a("--wd", type=float, default=d.wd, help="weight decay (conv and linear weights only, not norms, scales, biases)")
    a("--label-smoothing", type=float, default=d.label_smoothing, metavar="S")
    a("--warmup-epochs", type=float, default=d.warmup_epochs, metavar="E")
    a("--ema", type=float, default=None, metavar="DECAY", help="EMA of the weights (e.g. 0.999)")
    a("--clip", type=float, default=None, metavar="NORM", help="clip the gradient's global norm")
    a("--amp", choices=("bf16",), default=None, help="bfloat16 autocast (PyTorch)")
    a("--sync-bn", action="store_true", help="BN statistics over the global batch (PyTorch DDP)")
    a("--seed", type=int, default=d.seed)
    a("--no-augment", action="store_true", help="no random resized crop / flip")
    a("--image-size", type=int, default=d.image_size, metavar="S")
    a("--init", default=None, metavar="STATE", help="start from this neutral train-form safetensors (every framework)")
    a("--nproc", type=int, default=1, metavar="N", help="processes per node (torchrun)")
    a("--nnodes", type=int, default=1, metavar="N")
    a("--node-rank", type=int, default=0, metavar="R")
    a("--rdzv-endpoint", default=None, metavar="HOST:PORT")
    a("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")


def config(args: argparse.Namespace) -> tr.TrainConfig:
    """The TrainConfig of the parsed arguments (paths made absolute)."""
    data = args.data if args.data == tr.DIGITS else os.path.abspath(args.data)
    return tr.TrainConfig(
        model=get_spec(args.model, 10).name,
        data=data,
        out=os.path.abspath(args.out),
        framework=args.framework,
        epochs=args.epochs,
        max_steps=args.max_steps,
        global_batch=args.global_batch,
        lr=args.lr,
        wd=args.wd,
        label_smoothing=args.label_smoothing,
        warmup_epochs=args.warmup_epochs,
        ema=args.ema,
        clip=args.clip,
        amp=args.amp,
        sync_bn=args.sync_bn,
        seed=args.seed,
        augment=not args.no_augment,
        image_size=args.image_size,
        init=os.path.abspath(args.init) if args.init else None,
    )


def worker_argv(cfg: tr.TrainConfig, resume: bool) -> list[str]:
    """The `reparam train` arguments of one torchrun worker (no launcher flags)."""
    argv = [
        "--model",
        cfg.model,
        "--data",
        cfg.data,
        "--out",
        cfg.out,
        "--framework",
        "torch",
        "--global-batch",
        str(cfg.global_batch),
        "--wd",
        repr(cfg.wd),
        "--label-smoothing",
        repr(cfg.label_smoothing),
        "--warmup-epochs",
        repr(cfg.warmup_epochs),
        "--seed",
        str(cfg.seed),
        "--image-size",
        str(cfg.image_size),
    ]
    argv += ["--max-steps", str(cfg.max_steps)] if cfg.max_steps is not None else ["--epochs", str(cfg.epochs)]
    for flag, value in (
        ("--lr", cfg.lr),
        ("--ema", cfg.ema),
        ("--clip", cfg.clip),
        ("--amp", cfg.amp),
        ("--init", cfg.init),
    ):
        if value is not None:
            argv += [flag, str(value)]
    argv += [
        flag for flag, on in (("--sync-bn", cfg.sync_bn), ("--no-augment", not cfg.augment), ("--resume", resume)) if on
    ]
    return argv


def _child_env() -> dict[str, str]:
    """This environment with the repository on PYTHONPATH (for torchrun's workers and the
    MegEngine trainer)."""
    path = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def torchrun_command(args: argparse.Namespace, cfg: tr.TrainConfig) -> list[str]:
    """`python -m torch.distributed.run ... -m scripts.cli train ...` for --nproc/--nnodes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}", f"--nnodes={args.nnodes}"]
    if args.nnodes > 1:
        if not args.rdzv_endpoint:
            raise tr.TrainError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT")
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}", f"--node-rank={args.node_rank}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "scripts.cli", "train", *worker_argv(cfg, args.resume)]


class _Bar:
    """tqdm with images/s on an interactive stderr; one line per epoch otherwise."""

    def __init__(self, desc: str) -> None:
        self.bar: Any = None
        self.desc = desc
        self.tty = sys.stderr.isatty()

    def step(self, done: int, total: int, loss: float, images: float) -> None:
        if not self.tty:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done - 1, desc=self.desc, unit="step", file=sys.stderr)
        self.bar.update(1)
        rate = self.bar.format_dict.get("rate") or 0.0
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate * images:,.0f}", refresh=False)

    def epoch(self, r: dict) -> None:
        line = (
            f"epoch {r['epoch']}: loss {r['train_loss']:.4f}  train acc {r['train_acc']:.2%}  "
            f"val acc {r['val_acc']:.2%}  {r['images_per_s'] or 0:,.0f} img/s"
        )
        (self.bar.write if self.bar is not None else print)(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    cfg = config(args)
    data = tr.load_dataset(cfg.data, cfg.image_size)  # every image decoded: bad input -> exit 2
    tr.make_schedule(cfg, len(data.train_idx))
    if cfg.global_batch % max(args.nproc * args.nnodes, 1):
        raise tr.TrainError(
            f"--global-batch {cfg.global_batch} is not divisible by {args.nproc * args.nnodes} processes"
        )
    tr.check_supported(cfg, args.nproc * args.nnodes)
    tr.initial_state(cfg, get_spec(cfg.model, len(data.classes)))  # a bad --init: exit 2 here
    if args.resume:  # a missing checkpoint or one of other settings: exit 2 before starting
        tr.load_checkpoint(Path(cfg.out) / tr.CHECKPOINT, cfg)
    distributed = args.nproc > 1 or args.nnodes > 1
    if cfg.framework == "torch" and distributed and _LAUNCHER_ENV not in os.environ:
        return subprocess.run(torchrun_command(args, cfg), cwd=ROOT, env=_child_env()).returncode
    if cfg.framework == "flax" and args.nproc > 1:
        raise tr.TrainError(
            "--nproc: Flax uses every local device in one process "
            "(XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU)"
        )
    backend: Any
    if cfg.framework == "flax":
        from backends.flax import train as backend

        if args.nnodes > 1:
            backend.initialize_hosts(args.rdzv_endpoint or "", args.nnodes, args.node_rank)
    elif cfg.framework == "megengine":
        from backends.megengine.remote import mge_python
        from reparam_core.training.process import ProcessTrainer

        backend = ProcessTrainer(mge_python(), "backends.megengine.train", ROOT, _child_env())
    else:
        from backends.torch import train as backend
    if os.environ.get("RANK", str(args.node_rank)) == "0":  # rank 0 / host 0 writes
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    bar = _Bar(f"train {cfg.model}")
    try:
        summary = backend.train(cfg, data, resume=args.resume, on_step=bar.step, on_epoch=bar.epoch)
    finally:
        bar.close()
    if summary["rank"] != 0:
        return EXIT_STOPPED if summary["stopped"] else 0
    if summary["stopped"]:
        print(
            f"stopped at step {summary['steps']} (SIGTERM); checkpoint in {cfg.out}; continue with --resume",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    from scripts.train_plot import plot_metrics

    plot_metrics(tr.read_metrics(Path(cfg.out) / tr.METRICS), Path(cfg.out) / "metrics.png", cfg.model)
    last = summary["records"][-1] if summary["records"] else {}
    print(
        f"trained {cfg.model} ({cfg.framework}, {summary['world']} process(es)/device(s)) for "
        f"{summary['steps']} steps: val acc {last.get('val_acc', float('nan')):.2%}"
    )
    for form, path in summary["files"].items():
        print(f"{form}: {path}")
    return 0
