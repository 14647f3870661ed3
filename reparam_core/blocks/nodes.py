"""The block description: re-parameterizable blocks and models as plain typed data.

A block is a chain of nodes. A `Rep` node is the re-parameterizable part: a sum (or a channel
concatenation) of branches that read the same input, each branch a short chain of primitives
(conv, BN, padding-aware BN, average pool, per-channel scale; the empty chain is the identity),
optionally followed by one BN after the sum. Its deploy form is the single conv `Rep.fused`
(with bias) that computes the same function. Plain nodes (conv, BN, activation, SE, linear,
pooling, dropout, a non-fusable residual `Add`) stay as they are in both forms. `Block` scopes
the names of what it holds and names the official class it stands for; `Model` is a chain of
blocks and plain layers plus auxiliary heads that exist in train form only.

Every parameterised node carries its module name relative to the innermost enclosing `Block`
(dotted paths allowed: `rbr_dense.conv`), so the state keys of every form are the official
PyTorch names. Everything that reads a description (schema, oracle, counts, fusion, every
backend's builder) walks these types; nothing else describes a topology.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, TypedDict

from ..errors import FusionError

Pair = tuple[int, int]
ActFn = Literal["relu", "silu", "identity", "sigmoid", "hard_sigmoid", "gelu"]
"""`gelu` is the exact (erf) form x * Phi(x), torch.nn.GELU's default."""
Gate = Literal["sigmoid", "hard_sigmoid"]


class Geometry(TypedDict, total=False):
    """Conv arguments that the branches of one re-parameterizable block share."""

    stride: int | Pair
    dilation: int | Pair
    groups: int


def pair(v: int | tuple[int, int]) -> Pair:
    """An int or a pair as an (h, w) pair."""
    if isinstance(v, int):
        return (v, v)
    h, w = v
    return (int(h), int(w))


def join_key(prefix: str, name: str) -> str:
    """`prefix.name`, or just the non-empty one of the two."""
    if not prefix:
        return name
    return f"{prefix}.{name}" if name else prefix


# --------------------------------------------------------------------------- primitives


@dataclass(frozen=True, init=False)
class Conv:
    """2-D convolution, torch semantics: symmetric zero padding, weight OIHW, I = in / groups.

    `plus_identity`: the conv applies its stored weight PLUS the identity kernel of its groups
    (1 at [o, o mod (C/g), centre], see reparam_core.blocks.fusion.identity_offset), so the stored
    weight is the difference from the identity (Diverse Branch Block's IdentityBasedConv1x1);
    it needs in == out channels and odd kernel sides."""

    name: str
    in_channels: int
    out_channels: int
    kernel: Pair
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int
    bias: bool
    plus_identity: bool

    def __init__(
        self,
        name: str,
        in_channels: int,
        out_channels: int,
        kernel: int | Pair = 1,
        stride: int | Pair = 1,
        padding: int | Pair = 0,
        dilation: int | Pair = 1,
        groups: int = 1,
        bias: bool = False,
        plus_identity: bool = False,
    ) -> None:
        """Sizes given as an int mean the same on both sides; they are stored as (h, w) pairs."""
        values = {
            "name": name,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "kernel": pair(kernel),
            "stride": pair(stride),
            "padding": pair(padding),
            "dilation": pair(dilation),
            "groups": groups,
            "bias": bias,
            "plus_identity": plus_identity,
        }
        for key, value in values.items():
            object.__setattr__(self, key, value)
        self._check()

    def _check(self) -> None:
        if (
            min(self.in_channels, self.out_channels, self.groups, *self.kernel, *self.stride, *self.dilation) < 1
            or min(self.padding) < 0
        ):
            raise FusionError(
                f"conv {self.name!r}: channels, kernel, stride, dilation and groups "
                f"must be >= 1 and padding >= 0, got {self}"
            )
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise FusionError(
                f"conv {self.name!r}: channels {self.in_channels} -> "
                f"{self.out_channels} are not divisible by groups={self.groups}"
            )
        if self.plus_identity and (self.in_channels != self.out_channels or not all(k % 2 for k in self.kernel)):
            raise FusionError(
                f"conv {self.name!r}: plus_identity needs in == out channels and odd "
                f"kernel sides, got {self.in_channels} -> {self.out_channels}, "
                f"kernel {self.kernel}"
            )


def conv2d_arguments(conv: Conv) -> dict[str, Any]:
    """The keyword arguments of the framework conv module for `conv` (torch.nn.Conv2d and
    megengine.module.Conv2d take the same names); `plus_identity` is the builder's business."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias,
    }


@dataclass(frozen=True)
class BN:
    """Batch norm in inference mode over axis 1: gamma (x - mean) / sqrt(var + eps) + beta.

    `dims` 2: BatchNorm2d on N x C x H x W (the default); 1: BatchNorm1d on N x C (a classifier's
    BN before its Linear). Parameters `weight`, `bias`, `running_mean`, `running_var`, all (C,)."""

    name: str
    channels: int
    eps: float = 1e-5
    dims: Literal[1, 2] = 2


@dataclass(frozen=True)
class PadBN:
    """BN, then `pad` pixels of padding on every side filled with BN(0) (Diverse Branch Block's
    BNAndPadLayer): the conv after it, unpadded, sees what it would see on a zero-padded input."""

    name: str
    channels: int
    pad: int
    eps: float = 1e-5


@dataclass(frozen=True)
class AvgPool:
    """k x k average pooling, zero padding counted (count_include_pad)."""

    kernel: int
    stride: int = 1
    padding: int = 0


class ChannelVector:
    """What Scale and Bias share: one parameter of C values at key `name.param` (just `param`
    when `name` is empty), stored with `shape` (default (C,))."""

    name: str
    channels: int
    param: str
    shape: tuple[int, ...] | None

    @property
    def key(self) -> str:
        """The parameter's key relative to the enclosing block."""
        return join_key(self.name, self.param)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return (self.channels,) if self.shape is None else self.shape


@dataclass(frozen=True)
class Scale(ChannelVector):
    """Per-channel scale over axis 1, y[:, c] = w[c] x[:, c] (layer scale), parameter `weight`
    by default (the official shapes differ: FastViT's `layer_scale` is (C, 1, 1))."""

    name: str
    channels: int
    param: str = "weight"
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Bias(ChannelVector):
    """Per-channel constant added over axis 1, y[:, c] = x[:, c] + b[c], parameter `bias` by
    default. UniRepLKNet's GRN `beta`, which its deploy form folds into the Linear after it, is
    one."""

    name: str
    channels: int
    param: str = "bias"
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Act:
    """A parameter-free activation."""

    fn: ActFn = "relu"


@dataclass(frozen=True)
class SE:
    """Squeeze-excite: x * gate(expand(relu(reduce(mean_hw(x))))), 1x1 convs with bias named
    `name.reduce` and `name.expand` (the official child names, e.g. `down`/`up`)."""

    name: str
    channels: int
    hidden: int
    reduce: str = "down"
    expand: str = "up"
    gate: Gate = "sigmoid"


@dataclass(frozen=True)
class Linear:
    """y = x W^T + b over axis 1: on N x C a classifier, on N x C x H x W a pointwise layer (a
    1x1 conv stored as torch.nn.Linear, UniRepLKNet's `pwconv1`). Parameters `weight` (O, I) and,
    when `bias`, `bias` (O,)."""

    name: str
    in_features: int
    out_features: int
    bias: bool = True


@dataclass(frozen=True)
class LayerNorm:
    """Layer norm over axis 1 (the channels: "channels first" on N x C x H x W, plain on N x C),
    biased variance: weight (x - mean_c) / sqrt(var_c + eps) + bias; parameters `weight`,
    `bias` (C,). torch.nn.LayerNorm on channels-last data computes the same."""

    name: str
    channels: int
    eps: float = 1e-6


@dataclass(frozen=True)
class GRN:
    """Global response normalisation (ConvNeXt-V2, UniRepLKNet) on N x C x H x W:
    G[n, c] = sqrt(sum_hw x^2), N = G / (mean_c G + eps), y = gamma N x + x (+ beta when `bias`).
    Parameters `gamma` and `beta`, stored (1, 1, 1, C) as the official channels-last module."""

    name: str
    channels: int
    bias: bool = True
    eps: float = 1e-6

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return (1, 1, 1, self.channels)


@dataclass(frozen=True)
class Attention:
    """Multi-head self-attention over the H x W positions of N x C x H x W (FastViT's
    `Attention`): tokens t = x as N x HW x C; q, k, v = split(t W_qkv^T (+ b_qkv)) into `heads`
    heads of C / heads; y = softmax(q k^T / sqrt(C / heads)) v, heads concatenated, then
    `proj` (Linear with bias); back to N x C x H x W. Linears at `name.qkv` ((3C, C), bias when
    `qkv_bias`) and `name.proj`."""

    name: str
    dim: int
    heads: int
    qkv_bias: bool = False
    qkv: str = "qkv"
    proj: str = "proj"

    def __post_init__(self) -> None:
        if self.heads < 1 or self.dim % self.heads:
            raise FusionError(f"attention {self.name!r}: dim {self.dim} is not divisible by heads={self.heads}")


@dataclass(frozen=True)
class GlobalPool:
    """Mean over H and W, kept as N x C x 1 x 1."""


@dataclass(frozen=True)
class Flatten:
    """N x C x 1 x 1 -> N x C."""


@dataclass(frozen=True)
class Dropout:
    """Dropout with probability p in training mode; identity in inference."""

    p: float


Primitive = Conv | BN | PadBN | AvgPool | Scale | Bias | Linear
Leaf = (
    Conv
    | BN
    | PadBN
    | AvgPool
    | Scale
    | Bias
    | Act
    | SE
    | Linear
    | LayerNorm
    | GRN
    | Attention
    | GlobalPool
    | Flatten
    | Dropout
)
Branch = tuple[Primitive, ...]

# --------------------------------------------------------------------------- composites


@dataclass(frozen=True)
class Rep:
    """A re-parameterizable sum: branches on one input, summed (or concatenated over channels),
    then optionally one BN; in deploy form the single conv `fused` (with bias).

    In full, with a sum: y = [x if residual] + scale(bn(sum_i c_i branch_i(x))), where c_i are
    `coefficients` (default all 1; FastViT's RepMixer x + s (mixer(x) - norm(x)) has +1 on the
    mixer's branches, -1 on the norm's, `scale` s and `residual`; averaged heads have 1/n each).
    A `Linear` in a branch is a 1x1 conv stored (O, I); `fused` is a Linear where the sum is one
    (a classifier's heads, UniRepLKNet's `pwconv2` with its BN and layer scale)."""

    branches: tuple[Branch, ...]
    fused: Conv | Linear
    bn: BN | None = None
    combine: Literal["sum", "concat"] = "sum"
    coefficients: tuple[float, ...] | None = None
    scale: Scale | None = None
    residual: bool = False

    def __post_init__(self) -> None:
        from .fuse import check_rep  # the alignment rules live with the fusion

        check_rep(self)

    @property
    def deploy_conv(self) -> Conv | Linear:
        return replace(self.fused, bias=True)

    def coefficient(self, index: int) -> float:
        """c_i of branch `index` (1 when the Rep has no coefficients)."""
        return 1.0 if self.coefficients is None else self.coefficients[index]


@dataclass(frozen=True)
class Add:
    """A plain (non-fusable) sum of chains on one input, e.g. a residual shortcut; the empty
    chain is the identity."""

    branches: tuple[tuple[Node, ...], ...]


@dataclass(frozen=True)
class Block:
    """A named scope (`name` is its module path in the parent) that stands for the official
    class `kind`; what it holds is named relative to it."""

    name: str
    kind: str
    body: tuple[Node, ...]


@dataclass(frozen=True)
class Aux:
    """An auxiliary head (train form only) reading the output of the block named `tap`."""

    name: str
    tap: str
    body: tuple[Node, ...]


Node = Leaf | Rep | Add | Block


@dataclass(frozen=True)
class Model:
    """A model: its forward chain, and the auxiliary heads of its train form."""

    name: str
    kind: str
    body: tuple[Node, ...]
    aux: tuple[Aux, ...] = field(default=())


Description = Model | Block


class Describable(Protocol):
    """A spec that knows its train-form description (a family's constructor data)."""

    def describe(self) -> Description: ...


# --------------------------------------------------------------------------- walking


def describe(spec: Describable | Description) -> Description:
    """The train-form description of a spec (a description is returned as it is)."""
    if isinstance(spec, (Model, Block)):
        return spec
    describe_fn = getattr(spec, "describe", None)
    if describe_fn is None:
        raise FusionError(f"not a block or model description, nor a spec that has one: {type(spec).__name__}")
    out = describe_fn()
    if not isinstance(out, (Model, Block)):
        raise FusionError(f"{type(spec).__name__}.describe() returned {type(out).__name__}, not a Model or Block")
    return out


def to_deploy(node: Node | Model) -> Node | Model:
    """The deploy-form rewrite: every Rep becomes its fused conv, auxiliary heads are dropped."""
    if isinstance(node, Rep):
        return node.deploy_conv
    if isinstance(node, Block):
        return replace(node, body=tuple(to_deploy(n) for n in node.body))  # type: ignore[misc]
    if isinstance(node, Add):
        return Add(tuple(tuple(to_deploy(n) for n in b) for b in node.branches))  # type: ignore[misc]
    if isinstance(node, Model):
        return replace(node, body=tuple(to_deploy(n) for n in node.body), aux=())  # type: ignore[misc]
    return node


SpecLike = Describable | Description  # what in_form accepts: a family's spec or a description


def in_form(spec: SpecLike, form: str) -> Description:
    """The description of `spec` in form 'train' or 'deploy'."""
    if form not in ("train", "deploy"):
        raise FusionError(f"form must be 'train' or 'deploy', got {form!r}")
    desc = describe(spec)
    out = desc if form == "train" else to_deploy(desc)
    return out  # type: ignore[return-value]


def children(node: Node | Model | Aux) -> Iterator[Node]:
    """The nodes directly inside a composite node, in forward order."""
    if isinstance(node, (Block, Model, Aux)):
        yield from node.body
        if isinstance(node, Model):
            yield from node.aux  # type: ignore[misc]
    elif isinstance(node, Rep):
        for branch in node.branches:
            yield from branch
        if node.bn is not None:
            yield node.bn
        if node.scale is not None:
            yield node.scale
    elif isinstance(node, Add):
        for path in node.branches:
            yield from path


def walk(node: Node | Model | Aux, prefix: str = "") -> Iterator[tuple[str, Node]]:
    """Every node under `node` with the name prefix in force there (block scopes joined), depth
    first in forward order; `Block` nodes are yielded with their parent's prefix."""
    for child in children(node):
        yield prefix, child
        inner = join_key(prefix, child.name) if isinstance(child, Block) else prefix
        if isinstance(child, (Block, Rep, Add, Aux)):
            yield from walk(child, inner)


def blocks(node: Node | Model, prefix: str = "") -> list[tuple[str, Block]]:
    """Every Block (full module path, block), outermost first, in forward order."""
    return [(join_key(p, n.name), n) for p, n in walk(node, prefix) if isinstance(n, Block)]


def reps(node: Node | Model, prefix: str = "") -> list[tuple[str, Rep]]:
    """Every Rep with the prefix of its block, in forward order."""
    return [(p, n) for p, n in walk(node, prefix) if isinstance(n, Rep)]


def rep_blocks(node: Node | Model, prefix: str = "") -> list[tuple[str, Block]]:
    """The innermost blocks that hold a Rep directly (the re-parameterizable units)."""
    return [(path, b) for path, b in blocks(node, prefix) if any(isinstance(n, Rep) for n in b.body)]


__all__ = [
    "conv2d_arguments",
    "Pair",
    "pair",
    "join_key",
    "Conv",
    "BN",
    "PadBN",
    "AvgPool",
    "Scale",
    "Bias",
    "Act",
    "SE",
    "Linear",
    "LayerNorm",
    "GRN",
    "Attention",
    "GlobalPool",
    "Flatten",
    "Dropout",
    "Primitive",
    "Leaf",
    "Branch",
    "Rep",
    "Add",
    "Block",
    "Aux",
    "Node",
    "Model",
    "Description",
    "Describable",
    "SpecLike",
    "describe",
    "to_deploy",
    "in_form",
    "children",
    "walk",
    "blocks",
    "reps",
    "rep_blocks",
]
