"""Re-parameterizable blocks as native torch.nn modules, built from reparam_core's block specs.

Every block knows its form (`deploy`, fixed at construction). `reparameterize()` returns a NEW
deploy-form module of the same class whose fused conv is computed by reparam_core.equivalent
(float64 inside) and copied in; on a deploy-form module it returns the module itself.
Module paths equal reparam_core.schema's canonical names, so `state_dict()` keys are the
canonical keys (plus `num_batches_tracked` buffers).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reparam_core import (block_kind, ghost_cheap_kernel_bias, ReparamError, repblock_kernel_bias,
                          repblock_names, RepBlockSpec, RepGhostBottleneckSpec,
                          RepGhostModuleSpec)
from reparam_core.equivalent import custom_l2_penalty
from reparam_core.fusion import identity_kernel

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU,
                                                   "identity": nn.Identity}


def numpy_view(module: nn.Module) -> dict[str, np.ndarray]:
    """The module's CPU state as read-only numpy views (no copy; canonical keys,
    `num_batches_tracked` dropped), for the fusion algebra."""
    out = {}
    for k, v in module.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            a = v.detach().cpu().numpy()
            a.flags.writeable = False
            out[k] = a
    return out


def numpy_state(module: nn.Module) -> dict[str, np.ndarray]:
    """The module's state as float32 numpy copies (canonical keys), `num_batches_tracked` dropped."""
    return {k: v.astype(np.float32) for k, v in numpy_view(module).items()}


def conv_bn(cin: int, cout: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
            dilation: int = 1, groups: int = 1, bias: bool = False, eps: float = 1e-5,
            names: tuple[str, str] = ("conv", "bn")) -> nn.Sequential:
    """Sequential(conv, BN) with the given child names (`conv`/`bn`, or YOLOv7's `0`/`1`)."""
    conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation, groups, bias=bias)
    return nn.Sequential(OrderedDict([(names[0], conv), (names[1], nn.BatchNorm2d(cout, eps=eps))]))


class SqueezeExcite(nn.Module):
    """x * gate(up(relu(down(mean_hw(x))))), with 1x1 convs (bias) under configurable names:
    `down`/`up` with a sigmoid gate (RepVGG), `conv_reduce`/`conv_expand` with a hard sigmoid
    (RepGhostNet)."""

    def __init__(self, channels: int, hidden: int, names: tuple[str, str] = ("down", "up"),
                 gate: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid) -> None:
        super().__init__()
        self._names = names
        self.gate = gate
        self.add_module(names[0], nn.Conv2d(channels, hidden, 1, bias=True))
        self.add_module(names[1], nn.Conv2d(hidden, channels, 1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = (getattr(self, n) for n in self._names)
        s = F.relu(down(x.mean(dim=(2, 3), keepdim=True)))
        return x * self.gate(up(s))


class RepModule(nn.Module):
    """Base of every re-parameterizable module: a spec, a fixed form and `reparameterize()`."""

    def __init__(self, spec: object, deploy: bool) -> None:
        super().__init__()
        self.spec = spec
        self.deploy = bool(deploy)

    def reparameterize(self) -> "RepModule":
        """A new deploy-form module of the same class computing the same function (this module
        itself when already in deploy form). Device, dtype and train/eval mode are kept."""
        if self.deploy:
            return self
        with torch.device("meta"):  # no initialisation: every tensor is assigned below
            new = type(self)(self.spec, deploy=True)
        ref = next(self.parameters())
        state = {k: v.to(device=ref.device, dtype=ref.dtype if v.is_floating_point() else None)
                 for k, v in self._deploy_state_dict(new).items()}
        new.load_state_dict(state, strict=True, assign=True)
        return new.train(self.training)

    def _deploy_state_dict(self, new: "RepModule") -> dict[str, torch.Tensor]:
        """The state_dict of `new` (the deploy form) computing this module's function, in
        tensors of its own (nothing shared with this module: they are assigned to `new`)."""
        raise NotImplementedError


def _with_fused(new: nn.Module, old_state: Mapping[str, torch.Tensor], module: str,
                kernel: np.ndarray, bias: np.ndarray) -> dict[str, torch.Tensor]:
    """`new`'s state_dict with the tensors it shares with `old_state` copied and the conv
    `module` set to the fused (kernel, bias) from reparam_core."""
    out = {k: old_state[k].clone() if k in old_state else v for k, v in new.state_dict().items()}
    out[f"{module}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel, np.float32))
    out[f"{module}.bias"] = torch.from_numpy(np.ascontiguousarray(bias, np.float32))
    return out


class RepVGGBlock(RepModule):
    """RepVGG block: act(SE_pre(dense + 1x1 + identity)) or SE_post(act(...)) in train form,
    act(SE_pre(conv)) / SE_post(act(conv)) in deploy form (`rbr_reparam`, one kxk conv)."""

    spec: RepBlockSpec

    def __init__(self, spec: RepBlockSpec, deploy: bool = False) -> None:
        super().__init__(spec, deploy)
        self._check_spec(spec)
        n = repblock_names(spec)
        geo = dict(stride=spec.stride, dilation=spec.dilation, groups=spec.groups)
        cin, cout = spec.in_channels, spec.out_channels
        if deploy:
            self.rbr_reparam = nn.Conv2d(cin, cout, spec.kernel_size, padding=spec.padding,
                                         bias=True, **geo)
        else:
            names = (n.dense_conv.rsplit(".", 1)[1], n.dense_bn.rsplit(".", 1)[1])
            self.rbr_dense = conv_bn(cin, cout, spec.kernel_size, padding=spec.padding,
                                     bias=spec.conv_bias, eps=spec.eps, names=names, **geo)
            self.rbr_1x1 = conv_bn(cin, cout, 1, padding=spec.padding_1x1, bias=spec.conv_bias,
                                   eps=spec.eps, names=names, **geo)
            self.rbr_identity = nn.BatchNorm2d(cout, eps=spec.eps) if spec.has_identity else None
        if spec.se != "none":
            self.add_module(spec.se_module, SqueezeExcite(cout, spec.se_channels))
        self.act = ACTIVATIONS[spec.act]()

    @classmethod
    def _check_spec(cls, spec: RepBlockSpec) -> None:
        if spec.naming != "repvgg" or spec.se == "post":
            raise ReparamError(f"{cls.__name__} needs naming='repvgg' and se 'none'/'pre', got "
                               f"naming={spec.naming!r}, se={spec.se!r} (use build_block)")

    def _branches(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.rbr_reparam(x)
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        return y if self.rbr_identity is None else y + self.rbr_identity(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._branches(x)
        if self.spec.se == "pre":
            return self.act(self.se(y))
        if self.spec.se == "post":
            return self.post_se(self.act(y))
        return self.act(y)

    def _deploy_state_dict(self, new: RepModule) -> dict[str, torch.Tensor]:
        kernel, bias = repblock_kernel_bias(self.spec, numpy_view(self))
        return _with_fused(new, self.state_dict(), repblock_names(self.spec).reparam, kernel, bias)

    def custom_l2(self) -> torch.Tensor:
        """RepVGGplus custom L2 of this block, identity branch included: the dense kernel's
        squares off the centre tap plus sum(eq^2 / (t3^2 + t1^2 [+ tid^2 on identity taps]))
        with eq = K3_centre t3 + K1 t1 (+ I tid), every t = gamma / sqrt(var + eps) detached."""
        if self.deploy:
            raise ReparamError(f"custom_l2 is defined in train form only; this "
                               f"{type(self).__name__} is in deploy form")
        dense_conv, dense_bn = self.rbr_dense
        one_conv, one_bn = self.rbr_1x1

        def scale(bn: nn.BatchNorm2d) -> torch.Tensor:
            return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().reshape(-1, 1, 1, 1)

        c = self.spec.kernel_size // 2
        k3, k1 = dense_conv.weight, one_conv.weight
        centre = k3[:, :, c:c + 1, c:c + 1]
        t3, t1 = scale(dense_bn), scale(one_bn)
        if self.rbr_identity is None:
            return custom_l2_penalty(k3, centre, k1, t3, t1)
        ident = torch.from_numpy(identity_kernel(self.spec.out_channels, self.spec.groups, 1))
        ident = ident.to(device=k3.device, dtype=k3.dtype)
        return custom_l2_penalty(k3, centre, k1, t3, t1, ident, scale(self.rbr_identity))


class RepConv(RepVGGBlock):
    """YOLOv7's RepConv: the same block with conv/BN pairs named `0`/`1` (`rbr_dense.0`)."""

    @classmethod
    def _check_spec(cls, spec: RepBlockSpec) -> None:
        if spec.naming != "repconv":
            raise ReparamError(f"RepConv needs naming='repconv', got {spec.naming!r} "
                               "(see repconv_spec)")


class RepVGGplusBlock(RepVGGBlock):
    """RepVGGplus block: SE after the activation (module `post_se`, C/4 hidden channels)."""

    @classmethod
    def _check_spec(cls, spec: RepBlockSpec) -> None:
        if spec.naming != "repvgg" or spec.se != "post":
            raise ReparamError(f"RepVGGplusBlock needs naming='repvgg' and se='post', got "
                               f"naming={spec.naming!r}, se={spec.se!r}")


class RepGhostModule(RepModule):
    """RepGhost module: `primary_conv` (1x1 conv, BN, ReLU?), then the depthwise
    `cheap_operation` (conv+BN) plus the BN shortcut `fusion_bn`; ReLU if `spec.relu`.
    Deploy form: `cheap_operation` is one depthwise conv with bias."""

    spec: RepGhostModuleSpec

    def __init__(self, spec: RepGhostModuleSpec, deploy: bool = False) -> None:
        super().__init__(spec, deploy)
        c = spec.out_channels
        self.primary_conv = nn.Sequential(
            nn.Conv2d(spec.in_channels, c, spec.kernel_size, spec.stride, spec.kernel_size // 2,
                      bias=False),
            nn.BatchNorm2d(c, eps=spec.eps),
            nn.ReLU() if spec.relu else nn.Identity())
        dw = dict(padding=spec.dw_size // 2, groups=c)
        if deploy:
            self.cheap_operation = nn.Conv2d(c, c, spec.dw_size, bias=True, **dw)
        else:
            self.cheap_operation = nn.Sequential(nn.Conv2d(c, c, spec.dw_size, bias=False, **dw),
                                                 nn.BatchNorm2d(c, eps=spec.eps))
            self.fusion_bn = (nn.Sequential(nn.BatchNorm2d(c, eps=spec.eps))
                              if spec.reparam_bn else None)
        self.relu = nn.ReLU() if spec.relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        if not self.deploy and self.fusion_bn is not None:
            x2 = x2 + self.fusion_bn(x1)
        return self.relu(x2)

    def _deploy_state_dict(self, new: RepModule) -> dict[str, torch.Tensor]:
        kernel, bias = ghost_cheap_kernel_bias(self.spec, numpy_view(self))
        return _with_fused(new, self.state_dict(), "cheap_operation", kernel, bias)


class RepGhostBottleneck(RepModule):
    """RepGhost bottleneck: ghost1, depthwise stride conv (`conv_dw`/`bn_dw`) when strided,
    optional SE (`se.conv_reduce`/`conv_expand`, hard sigmoid), ghost2, plus the shortcut
    (identity, or depthwise conv+BN, 1x1 conv+BN)."""

    spec: RepGhostBottleneckSpec

    def __init__(self, spec: RepGhostBottleneckSpec, deploy: bool = False) -> None:
        super().__init__(spec, deploy)
        mid, cin = spec.mid_channels, spec.in_channels
        pad = (spec.dw_kernel_size - 1) // 2
        self.ghost1 = RepGhostModule(spec.ghost1, deploy)
        if spec.stride > 1:
            self.conv_dw = nn.Conv2d(mid, mid, spec.dw_kernel_size, spec.stride, pad, groups=mid,
                                     bias=False)
            self.bn_dw = nn.BatchNorm2d(mid, eps=spec.eps)
        self.se = (SqueezeExcite(mid, spec.se_channels, ("conv_reduce", "conv_expand"),
                                 F.hardsigmoid) if spec.se_channels else None)
        self.ghost2 = RepGhostModule(spec.ghost2, deploy)
        if spec.has_conv_shortcut:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cin, spec.dw_kernel_size, spec.stride, pad, groups=cin, bias=False),
                nn.BatchNorm2d(cin, eps=spec.eps),
                nn.Conv2d(cin, spec.out_channels, 1, bias=False),
                nn.BatchNorm2d(spec.out_channels, eps=spec.eps))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ghost1(x)
        if self.spec.stride > 1:
            y = self.bn_dw(self.conv_dw(y))
        if self.se is not None:
            y = self.se(y)
        return self.ghost2(y) + self.shortcut(x)

    def _deploy_state_dict(self, new: RepModule) -> dict[str, torch.Tensor]:
        return fused_state_dict(self, new)


def fused_state_dict(old: nn.Module, new: nn.Module) -> dict[str, torch.Tensor]:
    """`new`'s state_dict (a deploy-form composite) from the train-form `old`: every outermost
    RepModule inside `old` is reparameterized, every other tensor `new` has is copied."""
    fused: dict[str, torch.Tensor] = {}
    inside: list[str] = []
    for name, m in old.named_modules():
        if not name or not isinstance(m, RepModule) or any(name.startswith(p) for p in inside):
            continue
        inside.append(name + ".")
        fused.update({f"{name}.{k}": v for k, v in m.reparameterize().state_dict().items()})
    old_state = old.state_dict()
    return {k: fused[k] if k in fused else old_state[k].clone() for k in new.state_dict()}


def block_class(spec: RepBlockSpec | RepGhostModuleSpec | RepGhostBottleneckSpec) -> type[RepModule]:
    """The module class for a block spec (RepVGGBlock / RepConv / RepVGGplusBlock by naming and
    SE mode; RepGhostModule; RepGhostBottleneck)."""
    return {"RepVGGBlock": RepVGGBlock, "RepConv": RepConv, "RepVGGplusBlock": RepVGGplusBlock,
            "RepGhostModule": RepGhostModule, "RepGhostBottleneck": RepGhostBottleneck}[block_kind(spec)]


def build_block(spec: RepBlockSpec | RepGhostModuleSpec | RepGhostBottleneckSpec, *,
                deploy: bool = False) -> RepModule:
    """A block module from its spec, in train (default) or deploy form."""
    return block_class(spec)(spec, deploy=deploy)
