"""`reparam train` in PyTorch: one process, or one of many started by torch.distributed.run
(gloo on CPU, NCCL on GPU; DistributedDataParallel averages the gradients).

The framework-free parts (data, split, augmentation, sample order, schedule, checkpoint and
metrics files) are reparam_core.training; this module runs the steps. With `sync_bn` every
BatchNorm (2d, and 1d on N x C) computes its batch statistics over the global batch (DistBatchNorm2d/1d:
torch's own SyncBatchNorm refuses CPU tensors). Checkpoints and the metrics file are written by
rank 0 only, at each epoch end and on SIGTERM.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from reparam_core import training as tr
from reparam_core.errors import CheckpointError

from .api import export_state, load_state
from .blocks import RepModule
from .layers import PadBatchNorm
from .models import create_model

Tensor = torch.Tensor
StepCallback = Callable[[int, int, float, float], None]
EpochCallback = Callable[[dict[str, Any]], None]


class _SumAllReduce(torch.autograd.Function):
    """Sum over processes, differentiable: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _DistBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics cover the batch of every process (two-pass:
    mean = sum x / N, var = sum (x - mean)^2 / N over all processes and every axis but 1, N the
    global count; the sums in float64, as torch's CPU batch norm accumulates); running statistics
    as torch (unbiased variance, `momentum`). One process or eval mode: the plain BatchNorm."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        count, momentum = self.num_batches_tracked, self.momentum
        if self.running_mean is None or self.running_var is None or count is None or momentum is None:
            raise tr.TrainError(
                "--sync-bn: a BatchNorm without running statistics or with a cumulative "
                "average (momentum None) has no synchronised version here"
            )
        self._check_input_dim(x)
        axes = (0, *range(2, x.ndim))
        per_channel = (1, -1) + (1,) * (x.ndim - 2)
        n = x.numel() // x.shape[1] * dist.get_world_size()
        mean = _SumAllReduce.apply(x.sum(axes, dtype=torch.float64)) / n
        centred = x - mean.to(x.dtype).view(per_channel)
        var = _SumAllReduce.apply(centred.double().square().sum(axes)) / n
        with torch.no_grad():
            count.add_(1)
            self.running_mean.lerp_(mean.to(x.dtype), momentum)
            self.running_var.lerp_((var * (n / max(n - 1, 1))).to(x.dtype), momentum)
        scale = self.weight * torch.rsqrt(var + self.eps).to(x.dtype)
        return centred * scale.view(per_channel) + self.bias.view(per_channel)


class DistBatchNorm2d(_DistBatchNorm, nn.BatchNorm2d):
    """The synchronised nn.BatchNorm2d (N x C x H x W)."""


class DistBatchNorm1d(_DistBatchNorm, nn.BatchNorm1d):
    """The synchronised nn.BatchNorm1d (N x C, e.g. RepViT's classifier BN)."""


_SYNCED: dict[type[nn.Module], type[_DistBatchNorm]] = {
    nn.BatchNorm2d: DistBatchNorm2d,
    nn.BatchNorm1d: DistBatchNorm1d,
}


def convert_sync_bn(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm2d / nn.BatchNorm1d (not subclasses with other semantics) by its
    synchronised version holding the same tensors, in place; PadBatchNorm (DBB) is refused."""
    for name, child in list(module.named_children()):
        if isinstance(child, PadBatchNorm):
            raise tr.TrainError(
                f"--sync-bn: {name} is a padded BatchNorm (DBB), which has no synchronised version here"
            )
        synced = _SYNCED.get(type(child))
        if synced is not None and isinstance(child, nn.modules.batchnorm._BatchNorm):
            new = synced(child.num_features, child.eps, child.momentum)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_sync_bn(child)
    return module


class _Forward(nn.Module):
    """What DDP wraps: the model's outputs by head ("main", and the auxiliary heads)."""

    def __init__(self, model: RepModule, aux: bool) -> None:
        super().__init__()
        self.model = model
        self.aux = aux

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.model.forward_with_aux(x) if self.aux else {"main": self.model(x)}


def _setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device), initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def _reduce(values: list[float], world: int) -> list[float]:
    """Sum of `values` over the processes."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _optimizer(model: nn.Module, cfg: tr.TrainConfig, decayed: set[str]) -> torch.optim.SGD:
    """SGD + Nesterov momentum; weight decay on the `decayed` parameters only (tr.decayed_keys:
    conv and linear weights minus the custom-L2 kernels; parameter names are canonical keys)."""
    groups: dict[bool, list[nn.Parameter]] = {True: [], False: []}
    for name, p in model.named_parameters():
        groups[name in decayed].append(p)
    return torch.optim.SGD(
        [{"params": groups[True], "weight_decay": cfg.wd}, {"params": groups[False], "weight_decay": 0.0}],
        lr=cfg.base_lr,
        momentum=cfg.momentum,
        nesterov=cfg.momentum > 0,
    )


def _float_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}


def _evaluate(
    model: RepModule, x: np.ndarray, y: np.ndarray, device: torch.device, batch: int = 256
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the validation split, BN running statistics."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(y), batch):
            out = model(torch.from_numpy(x[i : i + batch]).to(device))
            target = torch.from_numpy(y[i : i + batch]).to(device)
            loss += float(F.cross_entropy(out, target, reduction="sum"))
            correct += int((out.argmax(1) == target).sum())
    model.train()
    return loss / len(y), correct / len(y)


def _checkpoint_arrays(model: nn.Module, opt: torch.optim.SGD, ema: dict[str, Tensor] | None) -> dict[str, np.ndarray]:
    arrays = {f"model.{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                arrays[f"opt.{names[id(p)]}"] = buf.detach().cpu().numpy()
    for k, v in (ema or {}).items():
        arrays[f"ema.{k}"] = v.cpu().numpy()
    return arrays


def _restore(
    arrays: dict[str, np.ndarray],
    model: nn.Module,
    opt: torch.optim.SGD,
    ema: dict[str, Tensor] | None,
    device: torch.device,
) -> None:
    sd = {k[6:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("model.")}
    if set(sd) != set(model.state_dict()):
        raise CheckpointError("--resume: the checkpoint's model keys differ from the model's")
    model.load_state_dict(sd)
    for name, p in model.named_parameters():
        if f"opt.{name}" in arrays:
            opt.state[p]["momentum_buffer"] = torch.from_numpy(arrays[f"opt.{name}"]).to(device)
    if ema is not None:
        for k, v in ema.items():
            v.copy_(torch.from_numpy(arrays[f"ema.{k}"]))


def _final_state(model: RepModule, ema: dict[str, Tensor] | None) -> dict[str, np.ndarray]:
    """The trained neutral state: the model's, with the EMA's weights and statistics under --ema."""
    final = copy.deepcopy(model)
    if ema is not None:
        final.load_state_dict({**final.state_dict(), **ema})
    return export_state(final)


def train(
    cfg: tr.TrainConfig,
    data: tr.Dataset,
    *,
    resume: bool = False,
    on_step: StepCallback | None = None,
    on_epoch: EpochCallback | None = None,
) -> dict[str, Any]:
    """Train `cfg.model` (train form) on `data`; returns a summary (rank 0 writes the files in
    cfg.out: checkpoint, metrics, final neutral states of both forms). `stopped` is True when
    SIGTERM ended the run early (a checkpoint was written; continue with resume=True)."""
    rank, world, device = _setup()
    sched = tr.make_schedule(cfg, len(data.train_idx))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=len(data.classes)).to(device).train()
    spec = model.spec
    init = tr.initial_state(cfg, spec)
    if init is not None:
        load_state(model, init)
    if cfg.sync_bn and world > 1:
        convert_sync_bn(model)
    l2_kernels = tr.custom_l2_kernels(spec)
    forward: nn.Module = _Forward(model, tr.has_aux_heads(spec))
    if world > 1:
        forward = nn.parallel.DistributedDataParallel(forward)
    opt = _optimizer(model, cfg, tr.decayed_keys(spec))
    ema = _float_state(model) if cfg.ema else None
    ema_weight = 1.0 - (cfg.ema or 0.0)  # ema <- ema + (1 - decay) (now - ema)
    ema_model = copy.deepcopy(model) if cfg.ema else None
    point = tr.resume_point(cfg, sched, resume)
    if resume:
        _restore(point.arrays, model, opt, ema, device)
    start, records = point.start, point.records
    sums = point.sums if rank == 0 else tr.EpochSums()  # the partial epoch's sums are rank 0's
    x_val, y_val = data.val()
    stop = tr.StopFlag()
    done, stopped = start, False
    try:
        for step, epoch, _, lr, xb, yb, prep_s in tr.local_batches(cfg, sched, data, start, rank, world):
            t0 = time.perf_counter() - prep_s
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = torch.from_numpy(xb).to(device), torch.from_numpy(yb).to(device)
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout: a function of the step
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                outs = forward(x)
                losses = {
                    h: F.cross_entropy(o.float(), y, label_smoothing=cfg.label_smoothing) for h, o in outs.items()
                }
            loss = losses["main"] + tr.AUX_WEIGHT * sum(v for h, v in losses.items() if h != "main")
            if l2_kernels:
                loss = loss + 0.5 * cfg.wd * model.custom_l2()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for key, v in model.state_dict().items():
                        if key in ema:
                            ema[key].lerp_(v.float(), ema_weight)
            main_loss = float(losses["main"].detach())
            sums.add(main_loss, int((outs["main"].argmax(1) == y).sum()), len(yb))
            sums.seconds += time.perf_counter() - t0
            done = step + 1
            if rank == 0 and on_step:
                on_step(done, sched.total, main_loss, len(yb) * world)
            end_of_epoch = tr.is_epoch_end(sched, step)
            stopped = bool(_reduce([float(stop.requested)], world)[0]) and step < sched.total - 1
            if end_of_epoch or stopped:
                loss_s, correct, seen = _reduce([sums.loss, sums.correct, sums.seen], world)
                glob = tr.EpochSums(loss_s, int(correct), int(seen), sums.seconds)
                if rank == 0 and end_of_epoch:
                    val_loss, val_acc = _evaluate(model, x_val, y_val, device)
                    val = {"val_loss": val_loss, "val_acc": val_acc}
                    if ema_model is not None and ema is not None:
                        ema_model.load_state_dict({**ema_model.state_dict(), **ema})
                        val["val_acc_ema"] = _evaluate(ema_model, x_val, y_val, device)[1]
                    tr.log_epoch(cfg, records, tr.epoch_record(epoch, step + 1, glob, lr, val, world), on_epoch)
                if rank == 0:
                    tr.checkpoint(cfg, step + 1, _checkpoint_arrays(model, opt, ema), glob, end_of_epoch)
                sums = tr.EpochSums()
                if world > 1:
                    dist.barrier()
                if stopped:
                    break
        return tr.summarize(
            cfg,
            data,
            spec,
            "torch",
            steps=done,
            stopped=stopped,
            rank=rank,
            world=world,
            records=records,
            final_state=lambda: _final_state(model, ema),
        )
    finally:
        stop.restore()
        torch.use_deterministic_algorithms(previous)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["train", "DistBatchNorm2d", "DistBatchNorm1d", "convert_sync_bn"]
