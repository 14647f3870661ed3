"""Re-parameterizable blocks as native megengine.module layers, built from reparam_core specs.

Every block knows its form (`deploy`, fixed at construction). `reparameterize()` returns a NEW
deploy-form module of the same class: the fused conv comes from reparam_core.equivalent (float64
inside) and is written with `param[...] = value` (MegEngine has no `.data`; assigning one is a
silent no-op), every unfused tensor is copied the same way. The source module is left untouched.

Module paths equal reparam_core.schema's canonical names, so `state_dict()` keys are exactly the
canonical keys; tensors are in MegEngine's own shapes (grouped conv weights 5-D
`[g, O/g, I/g, kh, kw]`, conv bias `(1, C, 1, 1)`, BN flat `(C,)` in `state_dict()`).

BatchNorm momentum: MegEngine's BN updates `running = momentum * running + (1 - momentum) * batch`,
the opposite convention of torch, so every BN here is built with `momentum=0.9`, which equals
torch's default `momentum=0.1`. MegEngine's running_var uses the UNBIASED batch variance (measured:
n/(n-1) correction), exactly as torch does, so running statistics match torch's step for step.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import numpy as np

from .quiet import import_megengine

mge = import_megengine()
import megengine.functional as F  # noqa: E402
import megengine.module as M  # noqa: E402

from reparam_core import (RepBlockSpec, RepGhostBottleneckSpec, RepGhostModuleSpec,  # noqa: E402
                          ReparamError, ShapeMismatchError, TensorInfo, ghost_cheap_kernel_bias,
                          repblock_kernel_bias, repblock_names)
from reparam_core.equivalent import custom_l2_penalty  # noqa: E402
from reparam_core.fusion import identity_kernel  # noqa: E402
from reparam_core.layouts import from_megengine, oihw_to_megengine, to_megengine  # noqa: E402
from reparam_core.schema import (Form, ghost_module_schema, repblock_schema,  # noqa: E402
                                 bottleneck_schema)

BN_MOMENTUM = 0.9  # MegEngine convention: 0.9 here == torch momentum 0.1


def batch_norm(channels: int, eps: float) -> M.BatchNorm2d:
    """BatchNorm2d with torch-equivalent momentum (MegEngine 0.9 == torch 0.1)."""
    return M.BatchNorm2d(channels, eps=eps, momentum=BN_MOMENTUM)


def conv_bn(cin: int, cout: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
            dilation: int = 1, groups: int = 1, bias: bool = False, eps: float = 1e-5,
            names: tuple[str, str] = ("conv", "bn")) -> M.Sequential:
    """Sequential(conv, BN) with the given child names (`conv`/`bn`, or YOLOv7's `0`/`1`)."""
    conv = M.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, dilation=dilation,
                    groups=groups, bias=bias)
    return M.Sequential(OrderedDict([(names[0], conv), (names[1], batch_norm(cout, eps))]))


def global_pool(x):
    return F.mean(x, axis=(2, 3), keepdims=True)


def hard_sigmoid(x):
    return F.relu6(x + 3.0) / 6.0


_ACTIVATIONS = {"relu": M.ReLU, "silu": M.SiLU, "identity": M.Identity}


class SqueezeExcite(M.Module):
    """x * gate(up(relu(down(mean_hw(x))))) with 1x1 convs (bias) under configurable names:
    `down`/`up` + sigmoid (RepVGG) or `conv_reduce`/`conv_expand` + hard sigmoid (RepGhostNet)."""

    def __init__(self, channels: int, hidden: int, names: tuple[str, str] = ("down", "up"),
                 hard: bool = False) -> None:
        super().__init__()
        self._names = tuple(names)
        self._hard = bool(hard)
        setattr(self, names[0], M.Conv2d(channels, hidden, 1, bias=True))
        setattr(self, names[1], M.Conv2d(hidden, channels, 1, bias=True))

    def forward(self, x):
        down, up = (getattr(self, n) for n in self._names)
        s = up(F.relu(down(global_pool(x))))
        return x * (hard_sigmoid(s) if self._hard else F.sigmoid(s))


# --------------------------------------------------------------------------- state helpers

def named_tensors(module: M.Module) -> dict:
    """Every parameter and buffer of the module by its state_dict name (the live tensors)."""
    out = dict(module.named_parameters())
    out.update(dict(module.named_buffers()))
    return out


def native_to_neutral(module: M.Module, schema: Mapping[str, TensorInfo]) -> dict[str, np.ndarray]:
    """The module's state_dict() as a neutral state (canonical keys, OIHW, float32)."""
    sd = module.state_dict()
    if set(sd) != set(schema):
        missing = sorted(set(schema) - set(sd))[:3]
        extra = sorted(set(sd) - set(schema))[:3]
        raise ReparamError(f"{type(module).__name__}: native keys differ from the schema "
                           f"(missing {missing}, unexpected {extra})")
    return {k: np.ascontiguousarray(from_megengine(np.asarray(sd[k], np.float32), info),
                                    dtype=np.float32)
            for k, info in schema.items()}


def write_tensor(tensor, value: np.ndarray, info: TensorInfo, key: str = "") -> None:
    """Write a canonical (OIHW) value into a live MegEngine tensor in place (`t[...] = v`).

    Conv weights/biases have the same shape in the module and in `state_dict()`, so the
    layouts.to_megengine result fits the tensor directly."""
    v = np.ascontiguousarray(to_megengine(np.asarray(value, np.float32), info), dtype=np.float32)
    if tuple(v.shape) != tuple(tensor.shape):
        raise ShapeMismatchError(f"{key or info.kind}: value of shape {tuple(v.shape)} does not fit "
                                 f"the MegEngine tensor of shape {tuple(tensor.shape)}")
    tensor[...] = v


def copy_matching(src: M.Module, dst: M.Module) -> None:
    """Copy every tensor of `src` into the tensor of `dst` with the same name and shape."""
    s = named_tensors(src)
    for name, t in named_tensors(dst).items():
        if name in s and tuple(s[name].shape) == tuple(t.shape):
            t[...] = s[name].numpy()


class Reparameterizable(M.Module):
    """Base of every block and model: a spec, a fixed form, and `reparameterize()`."""

    spec: object
    deploy: bool

    def schema(self) -> dict[str, TensorInfo]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _write_fused(self, dst: "Reparameterizable") -> None:
        """Write this train-form block's fused conv(s) into the deploy-form `dst` (leaf blocks)."""

    def reparameterize(self) -> "Reparameterizable":
        """A NEW deploy-form module computing the same function (itself when already deploy)."""
        if self.deploy:
            return self
        dst = type(self)(self.spec, deploy=True)
        copy_matching(self, dst)
        dst_modules = dict(dst.named_modules())
        for name, m in self.named_modules():
            if isinstance(m, _FUSABLE):
                m._write_fused(dst_modules[name])
        dst.train(self.training)
        return dst


# --------------------------------------------------------------------------- RepVGG-style blocks

class _RepBlock(Reparameterizable):
    """act(SE_pre(dense + 1x1 + identity)) or SE_post(act(...)); one kxk conv in deploy form."""

    def __init__(self, spec: RepBlockSpec, deploy: bool = False) -> None:
        super().__init__()
        self._check_spec(spec)
        self.spec = spec
        self.deploy = bool(deploy)
        n = repblock_names(spec)
        geo = dict(stride=spec.stride, dilation=spec.dilation, groups=spec.groups)
        cin, cout = spec.in_channels, spec.out_channels
        if self.deploy:
            self.rbr_reparam = M.Conv2d(cin, cout, spec.kernel_size, padding=spec.padding,
                                        bias=True, **geo)
        else:
            names = (n.dense_conv.split(".")[-1], n.dense_bn.split(".")[-1])
            self.rbr_dense = conv_bn(cin, cout, spec.kernel_size, padding=spec.padding,
                                     bias=spec.conv_bias, eps=spec.eps, names=names, **geo)
            self.rbr_1x1 = conv_bn(cin, cout, 1, padding=spec.padding_1x1, bias=spec.conv_bias,
                                   eps=spec.eps, names=names, **geo)
            if spec.has_identity:
                self.rbr_identity = batch_norm(cout, spec.eps)
        if spec.se != "none":
            setattr(self, spec.se_module, SqueezeExcite(cout, spec.se_channels))
        self.nonlinearity = _ACTIVATIONS[spec.act]()

    @classmethod
    def _check_spec(cls, spec: RepBlockSpec) -> None:
        if not isinstance(spec, RepBlockSpec):
            raise ReparamError(f"{cls.__name__} needs a RepBlockSpec, got {type(spec).__name__}")

    def schema(self, prefix: str = "") -> dict[str, TensorInfo]:
        return repblock_schema(self.spec, prefix, "deploy" if self.deploy else "train")

    def forward(self, x):
        if self.deploy:
            y = self.rbr_reparam(x)
        else:
            y = self.rbr_dense(x) + self.rbr_1x1(x)
            if self.spec.has_identity:
                y = y + self.rbr_identity(x)
        if self.spec.se == "pre":
            return self.nonlinearity(self.se(y))
        if self.spec.se == "post":
            return self.post_se(self.nonlinearity(y))
        return self.nonlinearity(y)

    def fused_kernel_bias(self) -> tuple[np.ndarray, np.ndarray]:
        """The equivalent (kernel OIHW, bias) of this block, via reparam_core.equivalent."""
        params = native_to_neutral(self, self.schema())
        if self.deploy:
            r = repblock_names(self.spec).reparam
            return params[f"{r}.weight"], params[f"{r}.bias"]
        return repblock_kernel_bias(self.spec, params)

    def _write_fused(self, dst: "_RepBlock") -> None:
        kernel, bias = self.fused_kernel_bias()
        schema = dst.schema()
        r = repblock_names(self.spec).reparam
        write_tensor(dst.rbr_reparam.weight, kernel, schema[f"{r}.weight"], f"{r}.weight")
        write_tensor(dst.rbr_reparam.bias, bias, schema[f"{r}.bias"], f"{r}.bias")

    def custom_l2_term(self):
        """RepVGGplus custom L2 of this block, identity branch included (train form only)."""
        if self.deploy:
            raise ReparamError("custom_l2: the penalty is defined on the train form only; "
                               "this block is in deploy form")
        n = repblock_names(self.spec)
        dconv, dbn = n.dense_conv.split(".")[-1], n.dense_bn.split(".")[-1]
        k3 = getattr(self.rbr_dense, dconv).weight
        k1 = getattr(self.rbr_1x1, dconv).weight
        lead = tuple(k3.shape[:-3])  # (O,) or (g, O/g): MegEngine's kernel layout
        c = self.spec.kernel_size // 2

        def scale(bn):
            t = bn.weight / F.sqrt(bn.running_var + bn.eps)
            return F.reshape(t.detach(), lead + (1, 1, 1))

        t3 = scale(getattr(self.rbr_dense, dbn))
        t1 = scale(getattr(self.rbr_1x1, dbn))
        centre = k3[..., c:c + 1, c:c + 1]
        if not self.spec.has_identity:
            return custom_l2_penalty(k3, centre, k1, t3, t1)
        eye = identity_kernel(self.spec.out_channels, self.spec.groups, 1, np.float32)
        eye = mge.tensor(oihw_to_megengine(eye, self.spec.groups))
        return custom_l2_penalty(k3, centre, k1, t3, t1, eye, scale(self.rbr_identity))


class RepVGGBlock(_RepBlock):
    """RepVGG block (`rbr_dense.conv/.bn`, `rbr_1x1`, `rbr_identity`; SE `se` before the act)."""

    @classmethod
    def _check_spec(cls, spec: RepBlockSpec) -> None:
        super()._check_spec(spec)
        if spec.naming != "repvgg" or spec.se == "post":
            raise ReparamError(f"{cls.__name__} needs naming='repvgg' and se 'none'/'pre', got "
                               f"naming={spec.naming!r}, se={spec.se!r} (use build_block)")


class RepConv(_RepBlock):
    """YOLOv7's RepConv: the same block with conv/BN pairs named `0`/`1` (`rbr_dense.0`)."""

    @classmethod
    def _check_spec(cls, spec: RepBlockSpec) -> None:
        super()._check_spec(spec)
        if spec.naming != "repconv":
            raise ReparamError(f"RepConv needs naming='repconv', got {spec.naming!r} "
                               "(see repconv_spec)")


class RepVGGplusBlock(_RepBlock):
    """RepVGGplus block: SE after the activation (module `post_se`)."""

    @classmethod
    def _check_spec(cls, spec: RepBlockSpec) -> None:
        super()._check_spec(spec)
        if spec.naming != "repvgg" or spec.se != "post":
            raise ReparamError(f"RepVGGplusBlock needs naming='repvgg' and se='post', got "
                               f"naming={spec.naming!r}, se={spec.se!r}")


# --------------------------------------------------------------------------- RepGhost

class RepGhostModule(Reparameterizable):
    """RepGhost module: `primary_conv` (1x1 conv, BN, ReLU?), then the depthwise
    `cheap_operation` (conv+BN) plus the BN shortcut `fusion_bn`; ReLU if `spec.relu`.
    Deploy form: `cheap_operation` is one depthwise conv with bias."""

    def __init__(self, spec: RepGhostModuleSpec, deploy: bool = False) -> None:
        super().__init__()
        if not isinstance(spec, RepGhostModuleSpec):
            raise ReparamError(f"RepGhostModule needs a RepGhostModuleSpec, got {type(spec).__name__}")
        self.spec = spec
        self.deploy = bool(deploy)
        cin, c = spec.in_channels, spec.out_channels
        self.primary_conv = M.Sequential(
            M.Conv2d(cin, c, spec.kernel_size, stride=spec.stride, padding=spec.kernel_size // 2,
                     bias=False),
            batch_norm(c, spec.eps),
            M.ReLU() if spec.relu else M.Identity())
        dw = dict(padding=spec.dw_size // 2, groups=c)
        if self.deploy:
            self.cheap_operation = M.Conv2d(c, c, spec.dw_size, bias=True, **dw)
        else:
            self.cheap_operation = M.Sequential(M.Conv2d(c, c, spec.dw_size, bias=False, **dw),
                                                batch_norm(c, spec.eps))
            if spec.reparam_bn:
                self.fusion_bn = M.Sequential(batch_norm(c, spec.eps))

    def schema(self, prefix: str = "") -> dict[str, TensorInfo]:
        return ghost_module_schema(self.spec, prefix, "deploy" if self.deploy else "train")

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        if not self.deploy and self.spec.reparam_bn:
            x2 = x2 + self.fusion_bn(x1)
        return F.relu(x2) if self.spec.relu else x2

    def fused_kernel_bias(self) -> tuple[np.ndarray, np.ndarray]:
        params = native_to_neutral(self, self.schema())
        if self.deploy:
            return params["cheap_operation.weight"], params["cheap_operation.bias"]
        return ghost_cheap_kernel_bias(self.spec, params)

    def _write_fused(self, dst: "RepGhostModule") -> None:
        kernel, bias = self.fused_kernel_bias()
        schema = dst.schema()
        write_tensor(dst.cheap_operation.weight, kernel, schema["cheap_operation.weight"],
                     "cheap_operation.weight")
        write_tensor(dst.cheap_operation.bias, bias, schema["cheap_operation.bias"],
                     "cheap_operation.bias")


class RepGhostBottleneck(Reparameterizable):
    """ghost1 -> (depthwise stride conv + BN) -> (SE, hard sigmoid) -> ghost2, plus the identity
    or the conv shortcut (`shortcut.0..3`: dw conv, BN, 1x1 conv, BN)."""

    def __init__(self, spec: RepGhostBottleneckSpec, deploy: bool = False) -> None:
        super().__init__()
        if not isinstance(spec, RepGhostBottleneckSpec):
            raise ReparamError("RepGhostBottleneck needs a RepGhostBottleneckSpec, got "
                               f"{type(spec).__name__}")
        self.spec = spec
        self.deploy = bool(deploy)
        pad = (spec.dw_kernel_size - 1) // 2
        mid = spec.mid_channels
        self.ghost1 = RepGhostModule(spec.ghost1, deploy)
        if spec.stride > 1:
            self.conv_dw = M.Conv2d(mid, mid, spec.dw_kernel_size, stride=spec.stride,
                                    padding=pad, groups=mid, bias=False)
            self.bn_dw = batch_norm(mid, spec.eps)
        if spec.se_channels:
            self.se = SqueezeExcite(mid, spec.se_channels, ("conv_reduce", "conv_expand"), hard=True)
        self.ghost2 = RepGhostModule(spec.ghost2, deploy)
        if spec.has_conv_shortcut:
            cin, cout = spec.in_channels, spec.out_channels
            self.shortcut = M.Sequential(
                M.Conv2d(cin, cin, spec.dw_kernel_size, stride=spec.stride, padding=pad,
                         groups=cin, bias=False),
                batch_norm(cin, spec.eps),
                M.Conv2d(cin, cout, 1, bias=False),
                batch_norm(cout, spec.eps))

    def schema(self, prefix: str = "") -> dict[str, TensorInfo]:
        return bottleneck_schema(self.spec, prefix, "deploy" if self.deploy else "train")

    def forward(self, x):
        y = self.ghost1(x)
        if self.spec.stride > 1:
            y = self.bn_dw(self.conv_dw(y))
        if self.spec.se_channels:
            y = self.se(y)
        y = self.ghost2(y)
        return y + (self.shortcut(x) if self.spec.has_conv_shortcut else x)


_FUSABLE = (_RepBlock, RepGhostModule)


def block_form(module: Reparameterizable) -> Form:
    return "deploy" if module.deploy else "train"


__all__ = ["RepVGGBlock", "RepConv", "RepVGGplusBlock", "RepGhostModule", "RepGhostBottleneck",
           "SqueezeExcite", "Reparameterizable", "conv_bn", "batch_norm",
           "BN_MOMENTUM", "native_to_neutral", "write_tensor", "copy_matching", "named_tensors"]
