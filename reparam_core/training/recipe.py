"""The training recipe of `reparam train`: the settings that decide the trained weights
(`TrainConfig`), the step schedule, the learning rate (linear warm-up, then cosine to 0), which
weights decay (conv and linear weights, by role; RepVGGplus' custom L2 replaces plain decay on
its kernels), and the settings a framework's trainer does not have.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..blocks.l2 import l2_terms
from ..blocks.nodes import SpecLike, in_form, join_key, rep_blocks
from ..blocks.schema import state_schema
from ..errors import ReparamError
from ..families.specs import block_kind

AUX_WEIGHT = 0.1  # RepVGGplus: weight of each auxiliary head's loss next to the main head's
DIGITS = "digits"  # --data digits: scikit-learn's bundled 8x8 digits, upsampled


class TrainError(ReparamError, ValueError):
    """Training settings that cannot work (batch too large for the data, bad split, ...)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (and the output folder). `lr=None` means the
    official linear scaling rule, 0.1 per 256 images of global batch."""

    model: str
    data: str = DIGITS
    out: str = "train-out"
    framework: str = "torch"
    epochs: int = 10
    max_steps: int | None = None
    global_batch: int = 64
    lr: float | None = None
    wd: float = 1e-4
    label_smoothing: float = 0.1
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    ema: float | None = None
    clip: float | None = None
    amp: str | None = None
    sync_bn: bool = False
    seed: int = 0
    augment: bool = True
    image_size: int = 32
    init: str | None = None  # a neutral train-form state to start from (else seeded random init)

    @property
    def base_lr(self) -> float:
        """The peak learning rate: `lr`, or 0.1 * global_batch / 256."""
        return self.lr if self.lr is not None else 0.1 * self.global_batch / 256

    def fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the run that resumes it (all but `out`;
        the number of processes is not a setting: it does not change the weights)."""
        d = asdict(self)
        d.pop("out")
        d["base_lr"] = self.base_lr
        return d


@dataclass(frozen=True)
class Schedule:
    """Steps of a run: `steps_per_epoch` (full global batches), `total` steps, `warmup` steps."""

    steps_per_epoch: int
    total: int
    warmup: int

    @property
    def epochs(self) -> int:
        return math.ceil(self.total / self.steps_per_epoch)


def make_schedule(cfg: TrainConfig, n_train: int) -> Schedule:
    """steps_per_epoch = floor(n_train / B) (the incomplete last batch is dropped so every step
    sees B images, split evenly over the processes); total = max_steps or epochs *
    steps_per_epoch; warmup = min(round(warmup_epochs * steps_per_epoch), total // 10), at least
    1 step when warm-up is on."""
    if cfg.global_batch < 1:
        raise TrainError(f"--global-batch must be >= 1, got {cfg.global_batch}")
    spe = n_train // cfg.global_batch
    if spe < 1:
        raise TrainError(f"--global-batch {cfg.global_batch} is larger than the training split ({n_train} images)")
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * spe
    if total < 1:
        raise TrainError("nothing to train: --epochs and --max-steps must be >= 1")
    warm = min(round(cfg.warmup_epochs * spe), total // 10)
    return Schedule(spe, total, max(warm, 1) if cfg.warmup_epochs > 0 else 0)


def learning_rate(base: float, step: int, sched: Schedule) -> float:
    """The learning rate of step `step` (0-based): linear warm-up, then cosine to 0:

    lr = base * (step + 1) / W                                  for step < W
    lr = base * (1 + cos(pi * (step - W) / (T - W))) / 2        otherwise
    """
    if step < sched.warmup:
        return base * (step + 1) / sched.warmup
    span = max(sched.total - sched.warmup, 1)
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - sched.warmup) / span))


def custom_l2_kernels(spec: SpecLike) -> set[str]:
    """Canonical keys of the kernels RepVGGplus' custom L2 regularises (the kxk and 1x1 conv of
    every re-parameterizable block); empty for models without it (every model but RepVGGplus)."""
    if block_kind(spec) != "RepVGGplus":
        return set()
    out = set()
    for path, block in rep_blocks(in_form(spec, "train")):
        t = l2_terms(block)
        out |= {join_key(join_key(path, t.dense_conv), "weight"), join_key(join_key(path, t.one_conv), "weight")}
    return out


def has_aux_heads(spec: SpecLike) -> bool:
    """Whether the train form has auxiliary classifier heads (RepVGGplus)."""
    return bool(getattr(in_form(spec, "train"), "aux", ()))


DECAYED_KINDS = ("conv.weight", "linear.weight")  # schema roles that plain weight decay applies to


def decayed_keys(spec: SpecLike) -> set[str]:
    """Canonical keys that plain weight decay applies to: by role, not by stored shape, the
    weights of convs and linears (SE's, attention's qkv and proj too), minus the kernels the
    custom L2 regularises instead. Never BN/LayerNorm/GRN parameters, layer scales, Bias nodes or
    biases, whatever their official shape (GRN's (1, 1, 1, C), FastViT's layer scale (C, 1, 1)):
    the three trainers use this one set, so they decay the same tensors."""
    decayed = {k for k, t in state_schema(spec, "train").items() if t.kind in DECAYED_KINDS}
    return decayed - custom_l2_kernels(spec)


def check_supported(cfg: TrainConfig, processes: int) -> None:
    """TrainError naming the setting a framework's trainer does not have: MegEngine trains in
    one process; MegEngine and Flax train in float32 (--amp is PyTorch's)."""
    if cfg.framework == "megengine":
        if processes > 1:
            raise TrainError(
                "--nproc/--nnodes: MegEngine trains in one process here (megengine."
                "distributed takes GPU devices with NCCL/RCCL only; on CPU its process "
                "group refuses to start)"
            )
        if cfg.amp:
            raise TrainError(
                "--amp bf16: the MegEngine trainer runs in float32 (MegEngine's autocast is float16 on CUDA only)"
            )
    if cfg.framework == "flax" and cfg.amp:
        raise TrainError("--amp bf16: the Flax trainer runs in float32 (PyTorch only)")


__all__ = [
    "AUX_WEIGHT",
    "DIGITS",
    "TrainError",
    "TrainConfig",
    "Schedule",
    "make_schedule",
    "learning_rate",
    "custom_l2_kernels",
    "has_aux_heads",
    "DECAYED_KINDS",
    "decayed_keys",
    "check_supported",
]
