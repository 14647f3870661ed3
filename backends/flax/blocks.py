"""Re-parameterizable blocks as Flax NNX modules, built from reparam_core's block specs.

Every block knows its form (`deploy`, fixed at construction). `reparameterize()` returns a NEW
deploy-form module of the same class, built abstractly (nnx.eval_shape, nothing initialised) and
filled with the fused weights from reparam_core.equivalent (float64 inside); on a deploy-form
module it returns the module itself. Attribute names mirror the canonical (official PyTorch)
module paths, numbered children are nnx.List items, so the NNX state path of every tensor joined
with "." is reparam_core.layouts.flax_key(canonical key): `rbr_dense.conv.kernel`,
`rbr_dense.0.kernel` (RepConv), `cheap_operation.1.scale`, ...

Inputs are NHWC inside (the api's `predict` takes NCHW).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reparam_core import (block_kind, ghost_cheap_kernel_bias, ReparamError, reparameterize_state,
                          repblock_kernel_bias, repblock_names, RepBlockSpec,
                          RepGhostBottleneckSpec, RepGhostModuleSpec, RepGhostNetSpec, RepVGGSpec)
from reparam_core.equivalent import custom_l2_penalty
from reparam_core.fusion import identity_kernel
from reparam_core.layouts import to_flax
from reparam_core.schema import TensorInfo

from .layers import ACTIVATIONS, BatchNorm, ConvBN, SqueezeExcite, _rngs, conv
from .state import (export_state, fresh_state, load_state, module_schema, other_variables,
                    seed_from, variables)

_MODE_ATTRS = ("use_running_average", "deterministic")


def _sub(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


def fused_neutral_state(spec: object, state: Mapping[str, np.ndarray],
                        deploy_keys: list[str]) -> dict[str, np.ndarray]:
    """The deploy-form neutral state (keys `deploy_keys`) of a train-form neutral state; every
    fused kernel comes from reparam_core.equivalent."""
    if isinstance(spec, (RepVGGSpec, RepGhostNetSpec)):
        out = reparameterize_state(spec, state)
        return {k: np.asarray(out[k], np.float32) for k in deploy_keys}
    fused: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if isinstance(spec, RepBlockSpec):
        fused[repblock_names(spec).reparam] = repblock_kernel_bias(spec, state)
    elif isinstance(spec, RepGhostModuleSpec):
        fused["cheap_operation"] = ghost_cheap_kernel_bias(spec, state)
    elif isinstance(spec, RepGhostBottleneckSpec):
        for name, m in (("ghost1", spec.ghost1), ("ghost2", spec.ghost2)):
            fused[f"{name}.cheap_operation"] = ghost_cheap_kernel_bias(m, _sub(state, name))
    else:
        raise ReparamError(f"not a block spec: {type(spec).__name__}")
    out: dict[str, np.ndarray] = {}
    for key in deploy_keys:
        module, field = key.rsplit(".", 1)
        if module in fused:
            k, b = fused[module]
            out[key] = np.asarray(k if field == "weight" else b, np.float32)
        else:
            out[key] = np.asarray(state[key], np.float32)
    return out


def _modes(module: nnx.Module) -> dict[tuple, dict[str, bool]]:
    out = {}
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Module):
            attrs = {a: getattr(node, a) for a in _MODE_ATTRS if hasattr(node, a)}
            if attrs:
                out[tuple(path)] = attrs
    return out


class RepModule(nnx.Module):
    """Base of every re-parameterizable module: a spec, a fixed form and `reparameterize()`."""

    def __init__(self, spec: object, deploy: bool) -> None:
        self.spec = spec
        self.deploy = bool(deploy)

    def reparameterize(self) -> "RepModule":
        """A new deploy-form module of the same class computing the same function (this module
        itself when already in deploy form). Its weights are fresh arrays (the input is not
        touched); train/eval attributes and RNG streams (dropout) are carried over."""
        if self.deploy:
            return self
        spec, cls = self.spec, type(self)
        new = nnx.eval_shape(lambda: cls(spec, deploy=True, rngs=nnx.Rngs(0)))
        deploy_keys = list(module_schema(new))
        load_state(new, fused_neutral_state(spec, export_state(self), deploy_keys), validate=False)
        old_other = other_variables(self)
        for key, var in other_variables(new).items():
            if key not in old_other:
                raise ReparamError(f"reparameterize: no value for {key} in the train-form module")
            var.set_value(jax.tree.map(lambda a: a, old_other[key].get_value()))
        old_modes = _modes(self)
        for path, node in nnx.iter_graph(new):
            if isinstance(node, nnx.Module) and tuple(path) in old_modes:
                for a, v in old_modes[tuple(path)].items():
                    if hasattr(node, a):
                        setattr(node, a, v)
        return new


class RepVGGBlock(RepModule):
    """RepVGG block: act(SE_pre(dense + 1x1 + identity)) or SE_post(act(...)) in train form,
    act(SE_pre(conv)) / SE_post(act(conv)) in deploy form (`rbr_reparam`, one kxk conv)."""

    spec: RepBlockSpec

    def __init__(self, spec: RepBlockSpec, deploy: bool = False, *,
                 rngs: nnx.Rngs | None = None) -> None:
        super().__init__(spec, deploy)
        self._check_spec(spec)
        rngs = _rngs(rngs)
        geo = dict(stride=spec.stride, dilation=spec.dilation, groups=spec.groups)
        cin, cout = spec.in_channels, spec.out_channels
        if deploy:
            self.rbr_reparam = conv(cin, cout, spec.kernel_size, padding=spec.padding, bias=True,
                                    rngs=rngs, **geo)
        else:
            self.rbr_dense = self._pair(
                conv(cin, cout, spec.kernel_size, padding=spec.padding, bias=spec.conv_bias,
                     rngs=rngs, **geo), BatchNorm(cout, eps=spec.eps))
            self.rbr_1x1 = self._pair(
                conv(cin, cout, 1, padding=spec.padding_1x1, bias=spec.conv_bias, rngs=rngs, **geo),
                BatchNorm(cout, eps=spec.eps))
            self.rbr_identity = BatchNorm(cout, eps=spec.eps) if spec.has_identity else None
        if spec.se != "none":
            setattr(self, spec.se_module, SqueezeExcite(cout, spec.se_channels, rngs=rngs))

    def _pair(self, c: nnx.Conv, bn: BatchNorm) -> nnx.Module:
        return nnx.List([c, bn]) if self.spec.naming == "repconv" else ConvBN(c, bn)

    @staticmethod
    def _conv_bn(pair: nnx.Module) -> tuple[nnx.Conv, BatchNorm]:
        return (pair[0], pair[1]) if isinstance(pair, nnx.List) else (pair.conv, pair.bn)

    @classmethod
    def _check_spec(cls, spec: RepBlockSpec) -> None:
        if not isinstance(spec, RepBlockSpec):
            raise ReparamError(f"{cls.__name__} needs a RepBlockSpec, got {type(spec).__name__}")
        if spec.naming != "repvgg" or spec.se == "post":
            raise ReparamError(f"{cls.__name__} needs naming='repvgg' and se 'none'/'pre', got "
                               f"naming={spec.naming!r}, se={spec.se!r} (use build_block)")

    def _branches(self, x: jax.Array) -> jax.Array:
        if self.deploy:
            return self.rbr_reparam(x)
        c3, b3 = self._conv_bn(self.rbr_dense)
        c1, b1 = self._conv_bn(self.rbr_1x1)
        y = b3(c3(x)) + b1(c1(x))
        return y if self.rbr_identity is None else y + self.rbr_identity(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self._branches(x)
        act = ACTIVATIONS[self.spec.act]
        if self.spec.se == "pre":
            return act(self.se(y))
        if self.spec.se == "post":
            return self.post_se(act(y))
        return act(y)

    def custom_l2(self) -> jax.Array:
        """RepVGGplus custom L2 of this block, identity branch included: the dense kernel's
        squares off the centre tap plus sum(eq^2 / (t3^2 + t1^2 [+ tid^2 on identity taps]))
        with eq = K3_centre t3 + K1 t1 (+ I tid), every t = gamma / sqrt(var + eps) detached.
        Kernels are HWIO here, so t broadcasts over the last (output) axis."""
        if self.deploy:
            raise ReparamError(f"custom_l2 is defined in train form only; this "
                               f"{type(self).__name__} is in deploy form")
        c3, b3 = self._conv_bn(self.rbr_dense)
        c1, b1 = self._conv_bn(self.rbr_1x1)

        def scale(bn: BatchNorm) -> jax.Array:
            return jax.lax.stop_gradient(bn.scale[...] / jnp.sqrt(bn.var[...] + bn.eps))

        c = self.spec.kernel_size // 2
        k3, k1 = c3.kernel[...], c1.kernel[...]
        centre = k3[c:c + 1, c:c + 1]
        t3, t1 = scale(b3), scale(b1)
        if self.rbr_identity is None:
            return custom_l2_penalty(k3, centre, k1, t3, t1)
        s = self.spec
        ident_oihw = identity_kernel(s.out_channels, s.groups, 1, dtype=np.float32)
        info = TensorInfo(ident_oihw.shape, "conv.weight", s.groups)
        ident = jnp.asarray(to_flax(ident_oihw, info), dtype=k3.dtype)
        return custom_l2_penalty(k3, centre, k1, t3, t1, ident, scale(self.rbr_identity))


class RepConv(RepVGGBlock):
    """YOLOv7's RepConv: the same block with conv/BN pairs named `0`/`1` (`rbr_dense.0`)."""

    @classmethod
    def _check_spec(cls, spec: RepBlockSpec) -> None:
        if not isinstance(spec, RepBlockSpec) or spec.naming != "repconv":
            raise ReparamError("RepConv needs a RepBlockSpec with naming='repconv' "
                               "(see repconv_spec)")


class RepVGGplusBlock(RepVGGBlock):
    """RepVGGplus block: SE after the activation (module `post_se`)."""

    @classmethod
    def _check_spec(cls, spec: RepBlockSpec) -> None:
        if not isinstance(spec, RepBlockSpec) or spec.naming != "repvgg" or spec.se != "post":
            raise ReparamError("RepVGGplusBlock needs a RepBlockSpec with naming='repvgg' and "
                               "se='post'")





class RepGhostModule(RepModule):
    """RepGhost module: `primary_conv` (1x1 conv `0`, BN `1`, ReLU?), then the depthwise
    `cheap_operation` (conv `0` + BN `1`) plus the BN shortcut `fusion_bn.0`; ReLU if
    `spec.relu`. Deploy form: `cheap_operation` is one depthwise conv with bias."""

    spec: RepGhostModuleSpec

    def __init__(self, spec: RepGhostModuleSpec, deploy: bool = False, *,
                 rngs: nnx.Rngs | None = None) -> None:
        super().__init__(spec, deploy)
        if not isinstance(spec, RepGhostModuleSpec):
            raise ReparamError(f"RepGhostModule needs a RepGhostModuleSpec, got {type(spec).__name__}")
        rngs = _rngs(rngs)
        c = spec.out_channels
        self.primary_conv = nnx.List([
            conv(spec.in_channels, c, spec.kernel_size, stride=spec.stride,
                 padding=spec.kernel_size // 2, rngs=rngs),
            BatchNorm(c, eps=spec.eps)])
        dw = dict(padding=spec.dw_size // 2, groups=c)
        if deploy:
            self.cheap_operation = conv(c, c, spec.dw_size, bias=True, rngs=rngs, **dw)
        else:
            self.cheap_operation = nnx.List([conv(c, c, spec.dw_size, rngs=rngs, **dw),
                                             BatchNorm(c, eps=spec.eps)])
            self.fusion_bn = nnx.List([BatchNorm(c, eps=spec.eps)]) if spec.reparam_bn else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x1 = self.primary_conv[1](self.primary_conv[0](x))
        if self.spec.relu:
            x1 = jax.nn.relu(x1)
        if self.deploy:
            x2 = self.cheap_operation(x1)
        else:
            x2 = self.cheap_operation[1](self.cheap_operation[0](x1))
            if self.fusion_bn is not None:
                x2 = x2 + self.fusion_bn[0](x1)
        return jax.nn.relu(x2) if self.spec.relu else x2


class RepGhostBottleneck(RepModule):
    """RepGhost bottleneck: ghost1, depthwise stride conv (`conv_dw`/`bn_dw`) when strided,
    optional SE (`se.conv_reduce`/`conv_expand`, hard sigmoid), ghost2, plus the shortcut
    (identity, or `shortcut.0..3`: depthwise conv, BN, 1x1 conv, BN)."""

    spec: RepGhostBottleneckSpec

    def __init__(self, spec: RepGhostBottleneckSpec, deploy: bool = False, *,
                 rngs: nnx.Rngs | None = None) -> None:
        super().__init__(spec, deploy)
        if not isinstance(spec, RepGhostBottleneckSpec):
            raise ReparamError(f"RepGhostBottleneck needs a RepGhostBottleneckSpec, got "
                               f"{type(spec).__name__}")
        rngs = _rngs(rngs)
        mid, cin, k = spec.mid_channels, spec.in_channels, spec.dw_kernel_size
        pad = (k - 1) // 2
        self.ghost1 = RepGhostModule(spec.ghost1, deploy, rngs=rngs)
        if spec.stride > 1:
            self.conv_dw = conv(mid, mid, k, stride=spec.stride, padding=pad, groups=mid, rngs=rngs)
            self.bn_dw = BatchNorm(mid, eps=spec.eps)
        self.se = (SqueezeExcite(mid, spec.se_channels, ("conv_reduce", "conv_expand"),
                                 "hard_sigmoid", rngs=rngs) if spec.se_channels else None)
        self.ghost2 = RepGhostModule(spec.ghost2, deploy, rngs=rngs)
        if spec.has_conv_shortcut:
            self.shortcut = nnx.List([
                conv(cin, cin, k, stride=spec.stride, padding=pad, groups=cin, rngs=rngs),
                BatchNorm(cin, eps=spec.eps),
                conv(cin, spec.out_channels, 1, rngs=rngs),
                BatchNorm(spec.out_channels, eps=spec.eps)])
        else:
            self.shortcut = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.ghost1(x)
        if self.spec.stride > 1:
            y = self.bn_dw(self.conv_dw(y))
        if self.se is not None:
            y = self.se(y)
        y = self.ghost2(y)
        if self.shortcut is None:
            return y + x
        s = x
        for layer in self.shortcut:
            s = layer(s)
        return y + s


def block_class(spec: object) -> type[RepModule]:
    """The module class for a block spec (RepVGGBlock / RepConv / RepVGGplusBlock by naming and
    SE mode; RepGhostModule; RepGhostBottleneck)."""
    return {"RepVGGBlock": RepVGGBlock, "RepConv": RepConv, "RepVGGplusBlock": RepVGGplusBlock,
            "RepGhostModule": RepGhostModule, "RepGhostBottleneck": RepGhostBottleneck}[block_kind(spec)]


def empty_block(spec: RepBlockSpec | RepGhostModuleSpec | RepGhostBottleneckSpec, *,
                deploy: bool = False) -> RepModule:
    """A block built abstractly (nnx.eval_shape: nothing initialised) for `load_state` to fill."""
    cls = block_class(spec)
    return nnx.eval_shape(lambda: cls(spec, deploy=deploy, rngs=nnx.Rngs(0)))


def build_block(spec: RepBlockSpec | RepGhostModuleSpec | RepGhostBottleneckSpec, *,
                deploy: bool = False, rngs: nnx.Rngs | None = None) -> RepModule:
    """A block module from its spec, in train (default) or deploy form, with fresh weights
    (built abstractly and filled by state.fresh_state seeded from `rngs`, like create_model)."""
    block = empty_block(spec, deploy=deploy)
    return load_state(block, fresh_state(module_schema(block), seed_from(rngs)), validate=False)


__all__ = ["RepModule", "RepVGGBlock", "RepConv", "RepVGGplusBlock", "RepGhostModule",
           "RepGhostBottleneck", "block_class", "build_block", "empty_block",
           "fused_neutral_state", "variables"]
