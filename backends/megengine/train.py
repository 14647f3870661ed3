"""`reparam train` in MegEngine: one process (run in `.venv-mge` as `python -m
backends.megengine.train`, driven by reparam_core.training.process from the CLI).

The recipe and every framework-free part are reparam_core.training's, as in the PyTorch trainer:
megengine.optimizer.SGD with Nesterov momentum, whose update is torch's

    g <- g + wd * w      (conv and linear weights only, minus the custom-L2 kernels)
    b <- m * b + g       (b starts at 0, so the first step's b is g, as torch's)
    w <- w - lr * (g + m * b)

cross-entropy with label smoothing ((1 - s) one-hot + s / K targets, MegEngine's
`label_smooth`), BN momentum 0.9 in MegEngine's convention (= torch's 0.1, unbiased running
variance). `cfg.init` (a neutral train-form state) gives the same starting weights as the other
trainers; without it the model starts from MegEngine's own initialisation seeded by `cfg.seed`.
Checkpoints hold neutral arrays (canonical keys, OIHW shapes): `model.KEY`, the momentum
buffers `opt.KEY`, the EMA `ema.KEY`.

megengine.distributed is not used: in 1.13 its process group accepts GPU devices (gpu, cuda,
rocm) with NCCL/RCCL only; on CPU `init_process_group` raises "cpu is not a valid distributed
device type" (and "xpu ..." for the default device), so one process trains.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from reparam_core import training as tr
from reparam_core.blocks.schema import TensorInfo
from reparam_core.errors import CheckpointError
from reparam_core.training.process import child_main

from .api import create_model, export_state, load_state, predict
from .blocks import RepModule, live_tensors, module_layout, neutral_array
from .layers import F, Tensor, mge

StepCallback = Callable[[int, int, float, float], None]
EpochCallback = Callable[[dict[str, Any]], None]


def _neutral(values: dict[str, Tensor], schema: dict[str, TensorInfo]) -> dict[str, np.ndarray]:
    """MegEngine tensors in their module layout as neutral arrays (canonical shapes, float32)."""
    return {k: neutral_array(v, schema[k]) for k, v in values.items()}


def _native(arrays: dict[str, np.ndarray], schema: dict[str, TensorInfo]) -> dict[str, Tensor]:
    """Neutral arrays as new MegEngine tensors in the module layout."""
    return {k: mge.tensor(module_layout(v, schema[k])) for k, v in arrays.items()}


def _optimizer(model: RepModule, cfg: tr.TrainConfig, decayed: set[str]) -> tuple[mge.optimizer.SGD, dict[str, Tensor]]:
    """SGD + Nesterov; weight decay on the `decayed` canonical keys only (tr.decayed_keys: by
    role, so a BN scale, (1, C, 1, 1) inside MegEngine, is not decayed). Also returns the
    parameters by canonical key."""
    params = {k: t for k, t in live_tensors(model).items() if isinstance(t, mge.Parameter)}
    groups: dict[bool, list[Tensor]] = {True: [], False: []}
    for key, p in params.items():
        groups[key in decayed].append(p)
    opt = mge.optimizer.SGD(
        [{"params": groups[True], "weight_decay": cfg.wd}, {"params": groups[False], "weight_decay": 0.0}],
        lr=cfg.base_lr,
        momentum=cfg.momentum,
        nesterov=cfg.momentum > 0,
    )
    return opt, params


def _buffers(opt: mge.optimizer.SGD, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The momentum buffers by canonical key (those that exist)."""
    return {
        k: opt._state[p]["momentum_buffer"] for k, p in params.items() if "momentum_buffer" in opt._state.get(p, {})
    }


def _evaluate(model: RepModule, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the validation split, BN running statistics."""
    return tr.evaluate(lambda xb: predict(model, xb), x, y)


def train(
    cfg: tr.TrainConfig,
    data: tr.Dataset,
    *,
    resume: bool = False,
    on_step: StepCallback | None = None,
    on_epoch: EpochCallback | None = None,
) -> dict[str, Any]:
    """Train `cfg.model` (train form) on `data` in one process; same files and summary as
    backends.torch.train.train."""
    tr.check_supported(cfg, 1)
    sched = tr.make_schedule(cfg, len(data.train_idx))
    mge.random.seed(cfg.seed)
    model = create_model(cfg.model, num_classes=len(data.classes))
    model.train()
    spec, schema = model.spec, model.schema()
    init = tr.initial_state(cfg, spec)
    if init is not None:
        load_state(model, init)
    l2_kernels = tr.custom_l2_kernels(spec)
    aux = tr.has_aux_heads(spec)
    opt, params = _optimizer(model, cfg, tr.decayed_keys(spec))
    gm = mge.autodiff.GradManager().attach(list(params.values()))
    ema = {k: F.copy(t) for k, t in live_tensors(model).items()} if cfg.ema else None
    ema_weight = 1.0 - (cfg.ema or 0.0)  # ema <- ema + (1 - decay) (now - ema), as torch's lerp_
    ema_model = create_model(cfg.model, num_classes=len(data.classes)) if cfg.ema else None
    point = tr.resume_point(cfg, sched, resume)
    if resume:
        _restore(point.arrays, model, opt, params, ema)
    start, sums, records = point.start, point.sums, point.records
    x_val, y_val = data.val()
    stop = tr.StopFlag()
    done, stopped = start, False
    try:
        for step, epoch, _, lr, xb, yb, prep_s in tr.local_batches(cfg, sched, data, start, 0, 1):
            t0 = time.perf_counter() - prep_s
            for group in opt.param_groups:
                group["lr"] = lr
            mge.random.seed(cfg.seed * 1_000_003 + step)  # dropout: a function of the step
            x, y = mge.tensor(xb), mge.tensor(yb.astype(np.int32))
            with gm:
                outs = model.forward_with_aux(x) if aux else {"main": model(x)}
                losses = {h: F.nn.cross_entropy(o, y, label_smooth=cfg.label_smoothing) for h, o in outs.items()}
                loss = losses["main"] + tr.AUX_WEIGHT * sum(v for h, v in losses.items() if h != "main")
                if l2_kernels:
                    loss = loss + 0.5 * cfg.wd * model.custom_l2()
                gm.backward(loss)
            if cfg.clip:
                mge.optimizer.clip_grad_norm(list(params.values()), cfg.clip)
            opt.step().clear_grad()
            if ema is not None:
                for key, v in live_tensors(model).items():
                    ema[key] = ema[key] + ema_weight * (v.detach() - ema[key])
            main_loss = float(losses["main"].item())
            sums.add(main_loss, int((outs["main"].numpy().argmax(1) == yb).sum()), len(yb))
            sums.seconds += time.perf_counter() - t0
            done = step + 1
            if on_step:
                on_step(done, sched.total, main_loss, len(yb))
            end_of_epoch = tr.is_epoch_end(sched, step)
            stopped = stop.requested and step < sched.total - 1
            if not (end_of_epoch or stopped):
                continue
            if end_of_epoch:
                val_loss, val_acc = _evaluate(model, x_val, y_val)
                val = {"val_loss": val_loss, "val_acc": val_acc}
                if ema_model is not None and ema is not None:
                    load_state(ema_model, _neutral(ema, schema))
                    val["val_acc_ema"] = _evaluate(ema_model, x_val, y_val)[1]
                tr.log_epoch(cfg, records, tr.epoch_record(epoch, done, sums, lr, val, 1), on_epoch)
            tr.checkpoint(cfg, done, _checkpoint_arrays(model, opt, params, ema), sums, end_of_epoch)
            sums = tr.EpochSums()
            if stopped:
                break
        return tr.summarize(
            cfg,
            data,
            spec,
            "megengine",
            steps=done,
            stopped=stopped,
            rank=0,
            world=1,
            records=records,
            final_state=lambda: _neutral(ema, schema) if ema is not None else export_state(model),
        )
    finally:
        stop.restore()


def _checkpoint_arrays(
    model: RepModule, opt: mge.optimizer.SGD, params: dict[str, Tensor], ema: dict[str, Tensor] | None
) -> dict[str, np.ndarray]:
    schema = model.schema()
    arrays = {f"model.{k}": v for k, v in export_state(model).items()}
    arrays.update({f"opt.{k}": v for k, v in _neutral(_buffers(opt, params), schema).items()})
    arrays.update({f"ema.{k}": v for k, v in _neutral(ema or {}, schema).items()})
    return arrays


def _restore(
    arrays: dict[str, np.ndarray],
    model: RepModule,
    opt: mge.optimizer.SGD,
    params: dict[str, Tensor],
    ema: dict[str, Tensor] | None,
) -> None:
    """Model, momentum buffers and EMA from a checkpoint's neutral arrays."""
    schema = model.schema()
    state = {k[6:]: v for k, v in arrays.items() if k.startswith("model.")}
    if set(state) != set(schema):
        raise CheckpointError("--resume: the checkpoint's model keys differ from the model's")
    load_state(model, state)
    buffers = _native({k[4:]: v for k, v in arrays.items() if k.startswith("opt.")}, schema)
    for key, buf in buffers.items():
        opt._state[params[key]]["momentum_buffer"] = buf
    if ema is not None:
        ema.update(_native({k: arrays[f"ema.{k}"] for k in ema}, schema))


def main(argv: list[str] | None = None) -> int:
    return child_main(train, argv, prog="python -m backends.megengine.train")


if __name__ == "__main__":
    raise SystemExit(main())
