"""UniRepLKNet (AILab-CVC/UniRepLKNet) as data: the block and model specs, their descriptions,
the registry entries `UniRepLKNet-A`, `-F`, `-P`, `-N`, `-T`, the official registry's names
(`unireplknet_a` ...) as aliases, and the official `DilatedReparamBlock` and `UniRepLKNetBlock`
constructors.

DilatedReparamBlock(C, K): a depthwise K x K conv `lk_origin` + BN `origin_bn`, plus for each
(k, r) of its table a depthwise k x k conv of dilation r and padding (r (k - 1) + 1) // 2
(`dil_conv_k{k}_{r}`) + BN (`dil_bn_k{k}_{r}`), all convs without bias, summed; deploy form:
`lk_origin` with bias. The table (kernel -> ((k, r), ...)) is DILATED_BRANCHES.

UniRepLKNetBlock(C, K): x + gamma * pwconv2(act(pwconv1(se(norm(dwconv(x)))))), where dwconv is
a DilatedReparamBlock for K >= 7, a plain depthwise K x K conv without bias for K in (3, 5),
nothing for K = 0 (then no `norm` either); `norm` a BN; `se` an SEBlock (1x1 convs `down`
C -> C // 4 and `up` back, with bias; ReLU, sigmoid); `pwconv1.1` a Linear C -> 4C applied
channels-last (after a permute at `pwconv1.0`); `act.0` GELU, `act.1` a GRN on 4C (gamma, beta
(1, 1, 1, 4C), eps 1e-6); `pwconv2.0` a Linear 4C -> C without bias, `pwconv2.2` a BN;
`gamma` the layer scale (C,). Its deploy form (`reparameterize`) folds norm into the dwconv
(`dwconv.lk_origin` or `dwconv` with bias), drops GRN's beta and `gamma`, and holds `pwconv2.0`
with bias: W' = s W, b' = s (bn_beta + t (W beta - mean)), t = bn_gamma / sqrt(var + eps),
s = gamma t. Every BN has eps 1e-5.

Described here with generic nodes: dwconv + norm is one Rep (its branches, then the BN `norm`
after the sum); GRN's beta is a `Bias` leading the pwconv2 Rep, whose single branch is
Bias, Linear, BN, Scale (gamma) fused into the Linear `pwconv2.0`; the block's residual is an
Add around the whole chain.

The model: `downsample_layers.0` (conv 3 -> C0 / 2, 3x3 stride 2 padding 1 with bias;
channels-first LayerNorm; GELU; conv -> C0 likewise; LayerNorm: indices 0, 1, 3, 4),
`downsample_layers.{1,2,3}` (conv 3x3 stride 2 padding 1 with bias, LayerNorm: indices 0, 1),
each followed by `stages.{i}` of blocks; then the mean over H, W, `norm` (LayerNorm eps 1e-6)
and `head`. Every LayerNorm has eps 1e-6.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..blocks.nodes import (
    BN,
    GRN,
    SE,
    Act,
    Add,
    Bias,
    Block,
    Branch,
    Conv,
    Flatten,
    GlobalPool,
    LayerNorm,
    Linear,
    Model,
    Node,
    Primitive,
    Rep,
    Scale,
    join_key,
    to_deploy,
)
from ..errors import SpecError
from .official_args import positive, require

# DilatedReparamBlock's (kernel, dilation) branches per large kernel, as the official table.
DILATED_BRANCHES: dict[int, tuple[tuple[int, int], ...]] = {
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    7: ((5, 1), (3, 2), (3, 3)),
    5: ((3, 1), (3, 2)),
}
PLAIN_KERNELS = (0, 3, 5)  # UniRepLKNetBlock: no dwconv (0) or a plain depthwise conv
LN_EPS = 1e-6  # every LayerNorm of the model, and GRN's
BN_EPS = 1e-5  # nn.BatchNorm2d's default; the official code passes no other


def dilated_reparam_rep(channels: int, kernel_size: int, prefix: str = "", norm: BN | None = None) -> Rep:
    """The Rep of a DilatedReparamBlock whose modules sit under `prefix`: the K x K branch
    (lk_origin, origin_bn) and one per (k, r) of DILATED_BRANCHES[K] (padding (r (k - 1) + 1) // 2),
    then `norm` after the sum when given; fused into `prefix.lk_origin` with bias."""

    def name(n: str) -> str:
        return join_key(prefix, n)

    c = channels
    branches: list[Branch] = [
        (
            Conv(name("lk_origin"), c, c, kernel_size, padding=kernel_size // 2, groups=c),
            BN(name("origin_bn"), c, BN_EPS),
        )
    ]
    branches += [
        (
            Conv(name(f"dil_conv_k{k}_{r}"), c, c, k, padding=(r * (k - 1) + 1) // 2, dilation=r, groups=c),
            BN(name(f"dil_bn_k{k}_{r}"), c, BN_EPS),
        )
        for k, r in DILATED_BRANCHES[kernel_size]
    ]
    fused = Conv(name("lk_origin"), c, c, kernel_size, padding=kernel_size // 2, groups=c, bias=True)
    return Rep(tuple(branches), fused, norm)


@dataclass(frozen=True)
class DilatedReparamBlockSpec:
    """DilatedReparamBlock(channels, kernel_size): lk_origin + origin_bn plus the dilated
    branches of DILATED_BRANCHES[kernel_size], summed."""

    channels: int
    kernel_size: int

    kind = "DilatedReparamBlock"

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise SpecError(f"DilatedReparamBlock channels must be >= 1, got {self.channels}")
        if self.kernel_size not in DILATED_BRANCHES:
            raise SpecError(
                f"DilatedReparamBlock kernel_size must be one of {sorted(DILATED_BRANCHES)}, got {self.kernel_size}"
            )

    def describe(self) -> Block:
        return Block("", self.kind, (dilated_reparam_rep(self.channels, self.kernel_size),))


@dataclass(frozen=True)
class UniRepLKNetBlockSpec:
    """UniRepLKNetBlock(dim, kernel_size): x + gamma pwconv2(GRN(GELU(pwconv1(se(norm(dwconv(x))))))).

    `layer_scale` False: no `gamma` (the official layer_scale_init_value None or <= 0)."""

    dim: int
    kernel_size: int
    ffn_factor: float = 4
    layer_scale: bool = True

    kind = "UniRepLKNetBlock"

    def __post_init__(self) -> None:
        if self.dim < 4:
            raise SpecError(f"UniRepLKNetBlock dim must be >= 4 (SE hidden dim // 4 >= 1), got {self.dim}")
        if self.kernel_size not in PLAIN_KERNELS and (self.kernel_size < 7 or self.kernel_size not in DILATED_BRANCHES):
            raise SpecError(
                f"UniRepLKNetBlock kernel_size must be 0, 3, 5 or one of "
                f"{sorted(k for k in DILATED_BRANCHES if k >= 7)}, got {self.kernel_size}"
            )
        if self.ffn_dim < 1:
            raise SpecError(f"UniRepLKNetBlock ffn dim int({self.ffn_factor} * {self.dim}) must be >= 1")

    @property
    def ffn_dim(self) -> int:
        return int(self.ffn_factor * self.dim)

    def token_mixer(self) -> tuple[Node, ...]:
        """dwconv + norm as one Rep (nothing for kernel_size 0)."""
        c, k = self.dim, self.kernel_size
        norm = BN("norm", c, BN_EPS)
        if k == 0:
            return ()
        if k in PLAIN_KERNELS:
            dw = Conv("dwconv", c, c, k, padding=k // 2, groups=c)
            return (Rep(((dw,),), replace(dw, bias=True), norm),)
        return (dilated_reparam_rep(c, k, "dwconv", norm),)

    def channel_mixer(self) -> tuple[Node, ...]:
        """pwconv1, GELU, GRN (its beta in the next Rep), then beta + pwconv2 + BN + gamma as one
        Rep fused into the Linear `pwconv2.0` with bias."""
        c, f = self.dim, self.ffn_dim
        branch: tuple[Primitive, ...] = (
            Bias("act.1", f, param="beta", shape=(1, 1, 1, f)),
            Linear("pwconv2.0", f, c, bias=False),
            BN("pwconv2.2", c, BN_EPS),
        )
        if self.layer_scale:
            branch += (Scale("", c, param="gamma"),)
        return (
            Linear("pwconv1.1", c, f),
            Act("gelu"),
            GRN("act.1", f, bias=False, eps=LN_EPS),
            Rep((branch,), Linear("pwconv2.0", f, c, bias=True)),
        )

    def describe(self) -> Block:
        residual = (*self.token_mixer(), SE("se", self.dim, self.dim // 4, "down", "up"), *self.channel_mixer())
        return Block("", self.kind, (Add(((), residual)),))


Kernels = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]
Dims = tuple[int, int, int, int]


@dataclass(frozen=True)
class UniRepLKNetSpec:
    """UniRepLKNet: `downsample_layers.{i}` then `stages.{i}` for i < 4 (stage i holds one block
    per entry of kernel_sizes[i]), mean over H, W, `norm` (LayerNorm), `head`."""

    name: str
    dims: Dims
    kernel_sizes: Kernels
    num_classes: int = 1000
    in_chans: int = 3
    family: Literal["unireplknet"] = "unireplknet"

    def __post_init__(self) -> None:
        if len(self.dims) != 4 or len(self.kernel_sizes) != 4 or min(self.dims) < 4:
            raise SpecError(
                f"UniRepLKNet needs 4 stage dims (each >= 4) and 4 stages of kernel sizes, "
                f"got dims {self.dims}, kernel_sizes {self.kernel_sizes}"
            )

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(len(k) for k in self.kernel_sizes)

    def blocks(self) -> list[tuple[str, UniRepLKNetBlockSpec]]:
        """Every block with its module path, in forward order."""
        return [
            (f"stages.{i}.{j}", UniRepLKNetBlockSpec(self.dims[i], k))
            for i, ks in enumerate(self.kernel_sizes)
            for j, k in enumerate(ks)
        ]

    def downsample(self, i: int) -> tuple[Node, ...]:
        """`downsample_layers.{i}`: the stem (two stride-2 convs) for i = 0, else one."""
        d, pre = self.dims, f"downsample_layers.{i}"

        def conv(index: int, cin: int, cout: int) -> Conv:
            return Conv(f"{pre}.{index}", cin, cout, 3, stride=2, padding=1, bias=True)

        if i > 0:
            return (conv(0, d[i - 1], d[i]), LayerNorm(f"{pre}.1", d[i], LN_EPS))
        half = d[0] // 2
        return (
            conv(0, self.in_chans, half),
            LayerNorm(f"{pre}.1", half, LN_EPS),
            Act("gelu"),
            conv(3, half, d[0]),
            LayerNorm(f"{pre}.4", d[0], LN_EPS),
        )

    def describe(self) -> Model:
        body: list[Node] = []
        for i, kernels in enumerate(self.kernel_sizes):
            body += self.downsample(i)
            body += [
                replace(UniRepLKNetBlockSpec(self.dims[i], k).describe(), name=f"stages.{i}.{j}")
                for j, k in enumerate(kernels)
            ]
        body += [
            GlobalPool(),
            Flatten(),
            LayerNorm("norm", self.dims[-1], LN_EPS),
            Linear("head", self.dims[-1], self.num_classes),
        ]
        return Model(self.name, "UniRepLKNet", tuple(body))


# The official default kernel sizes per stage (depths 2, 2, 6, 2 for A, F, P; 2, 2, 8, 2 for N;
# 3, 3, 18, 3 for T, whose stage 2 alternates 13 and 3).
A_F_P_KERNELS: Kernels = ((3, 3), (13,) * 2, (13,) * 6, (13,) * 2)
N_KERNELS: Kernels = ((3, 3), (13,) * 2, (13,) * 8, (13,) * 2)
T_KERNELS: Kernels = ((3,) * 3, (13,) * 3, (13, 3) * 9, (13,) * 3)

_UNIREPLKNET: dict[str, tuple[Dims, Kernels]] = {
    "UniRepLKNet-A": ((40, 80, 160, 320), A_F_P_KERNELS),
    "UniRepLKNet-F": ((48, 96, 192, 384), A_F_P_KERNELS),
    "UniRepLKNet-P": ((64, 128, 256, 512), A_F_P_KERNELS),
    "UniRepLKNet-N": ((80, 160, 320, 640), N_KERNELS),
    "UniRepLKNet-T": ((80, 160, 320, 640), T_KERNELS),
}


def _entry(name: str, dims: Dims, kernels: Kernels) -> Callable[[int], UniRepLKNetSpec]:
    return lambda num_classes: UniRepLKNetSpec(name, dims, kernels, num_classes)


MODELS: dict[str, Callable[[int], UniRepLKNetSpec]] = {n: _entry(n, *cfg) for n, cfg in _UNIREPLKNET.items()}

# The official file's timm-style registered names (`unireplknet_a` ... `unireplknet_t`); timm
# itself has no UniRepLKNet.
ALIASES: dict[str, str] = {n.replace("UniRepLKNet-", "unireplknet_").lower(): n for n in _UNIREPLKNET}

# No other implementation with other names is known (timm 1.0.31 has none; the official
# MMDetection / MMSegmentation backbone is the same class under `backbone.`, without `norm` and
# `head`, so a different model rather than other names).
KEYMAPS: dict[str, list[tuple[str, str]]] = {}

# ----------------------------------------------------------------------------- official classes


def _flag(cls: str, arg: str, value: Any) -> bool:
    require(cls, isinstance(value, bool), arg, value, "must be a bool")
    return bool(value)


def official_dilated_reparam_block(
    channels: int,
    kernel_size: int,
    deploy: bool,
    use_sync_bn: bool = False,
    attempt_use_lk_impl: bool = True,
) -> DilatedReparamBlockSpec | Block:
    """AILab-CVC/UniRepLKNet `DilatedReparamBlock(...)`: its spec, or with `deploy=True` its
    deploy-form description (`lk_origin` with bias only). `use_sync_bn` (SyncBatchNorm: the same
    tensors) and `attempt_use_lk_impl` (the optional iGEMM depthwise conv, a drop-in for the
    same conv) change nothing here."""
    cls = "DilatedReparamBlock"
    for arg, value in (("deploy", deploy), ("use_sync_bn", use_sync_bn), ("attempt_use_lk_impl", attempt_use_lk_impl)):
        _flag(cls, arg, value)
    positive(cls, channels=channels)
    require(
        cls,
        isinstance(kernel_size, int) and kernel_size in DILATED_BRANCHES,
        "kernel_size",
        kernel_size,
        f"the official block has branches for {sorted(DILATED_BRANCHES)} only",
    )
    spec = DilatedReparamBlockSpec(channels, kernel_size)
    return to_deploy(spec.describe()) if deploy else spec  # type: ignore[return-value]


def official_unireplknet_block(
    dim: int,
    kernel_size: int,
    drop_path: float = 0.0,
    layer_scale_init_value: float | None = 1e-6,
    deploy: bool = False,
    attempt_use_lk_impl: bool = True,
    with_cp: bool = False,
    use_sync_bn: bool = False,
    ffn_factor: float = 4,
) -> UniRepLKNetBlockSpec | Block:
    """AILab-CVC/UniRepLKNet `UniRepLKNetBlock(...)`: its spec, or with `deploy=True` its
    deploy-form description (what `reparameterize` leaves, the keys the official deploy=True
    class holds). `drop_path` (identity in inference), `with_cp`, `use_sync_bn` and
    `attempt_use_lk_impl` change neither the function nor the keys; `layer_scale_init_value`
    None or <= 0 means no `gamma`."""
    cls = "UniRepLKNetBlock"
    for arg, value in (
        ("deploy", deploy),
        ("attempt_use_lk_impl", attempt_use_lk_impl),
        ("with_cp", with_cp),
        ("use_sync_bn", use_sync_bn),
    ):
        _flag(cls, arg, value)
    positive(cls, dim=dim)
    require(cls, dim >= 4, "dim", dim, "the SEBlock's hidden dim // 4 must be >= 1")
    allowed = sorted({*PLAIN_KERNELS, *(k for k in DILATED_BRANCHES if k >= 7)})
    require(
        cls,
        isinstance(kernel_size, int) and kernel_size in allowed,
        "kernel_size",
        kernel_size,
        f"the official block accepts {allowed}",
    )
    require(
        cls,
        isinstance(drop_path, (int, float)) and 0 <= drop_path < 1,
        "drop_path",
        drop_path,
        "must be in [0, 1)",
    )
    require(
        cls,
        isinstance(ffn_factor, (int, float)) and int(ffn_factor * dim) >= 1,
        "ffn_factor",
        ffn_factor,
        "int(ffn_factor * dim) must be >= 1",
    )
    scale = layer_scale_init_value is not None and layer_scale_init_value > 0
    spec = UniRepLKNetBlockSpec(dim, kernel_size, ffn_factor, scale)
    return to_deploy(spec.describe()) if deploy else spec  # type: ignore[return-value]


OFFICIAL = {"DilatedReparamBlock": official_dilated_reparam_block, "UniRepLKNetBlock": official_unireplknet_block}

__all__ = [
    "DILATED_BRANCHES",
    "PLAIN_KERNELS",
    "DilatedReparamBlockSpec",
    "UniRepLKNetBlockSpec",
    "UniRepLKNetSpec",
    "dilated_reparam_rep",
    "MODELS",
    "ALIASES",
    "KEYMAPS",
    "OFFICIAL",
    "official_dilated_reparam_block",
    "official_unireplknet_block",
]
