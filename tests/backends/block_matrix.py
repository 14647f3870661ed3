"""The block matrix of the backend-parametrised suite: every block kind over groups 1/2/4/
depthwise, stride 1/2 on odd AND even sizes (Flax 'SAME' pads stride-2 convs (0, 1) where torch
pads (1, 1): every backend must give torch's output size), in != out, dilation 2, kernel 5, conv
bias, SE pre/post, activations, no identity branch, RepConv naming and eps, RepGhost modules and
bottlenecks (identity and conv shortcut, SE, dw kernel 5).

It is the union of the matrices the per-backend block tests used (tests/torch/test_blocks.py,
tests/flax/test_flax_blocks.py, tests/megengine/test_mge_blocks.py), exact duplicates (same spec,
same input size) listed once; each entry keeps the name it had where it first appeared."""

from __future__ import annotations

from dataclasses import dataclass

from reparam_core import RepBlockSpec, RepGhostBottleneckSpec, RepGhostModuleSpec, official_block, repconv_spec

R, G, B = RepBlockSpec, RepGhostModuleSpec, RepGhostBottleneckSpec
ODD, SQUARE = (7, 9), (15, 15)  # the two sizes of the MegEngine matrix


@dataclass(frozen=True)
class BlockCase:
    name: str
    spec: object
    hw: tuple[int, int]

    @property
    def id(self) -> str:
        return f"{self.name}-{self.hw[0]}x{self.hw[1]}"


# (name, spec, input H x W) from tests/torch/test_blocks.py
_TORCH = [
    ("repvgg-same", R(8, 8), (15, 15)),
    ("repvgg-in-ne-out-s2", R(8, 16, stride=2), (7, 9)),
    ("repvgg-g2", R(8, 8, groups=2), (15, 15)),
    ("repvgg-g4-s2", R(8, 16, stride=2, groups=4), (7, 9)),
    ("repvgg-g4-in-ne-out-s1", R(8, 16, groups=4), (7, 9)),
    ("repvgg-depthwise", R(8, 8, groups=8), (15, 15)),
    ("repvgg-depthwise-s2", R(8, 8, stride=2, groups=8), (7, 9)),
    ("repvgg-dilation2", R(8, 8, dilation=2), (15, 15)),
    ("repvgg-dilation2-g4", R(8, 8, dilation=2, groups=4), (7, 9)),
    ("repvgg-dilation2-s2", R(8, 12, stride=2, dilation=2), (15, 15)),
    ("repvgg-k5", R(8, 8, kernel_size=5), (7, 9)),
    ("repvgg-conv-bias", R(8, 8, conv_bias=True), (7, 9)),
    ("repvgg-conv-bias-g2-s2", R(8, 16, stride=2, groups=2, conv_bias=True), (15, 15)),
    ("repvgg-se-pre", R(8, 8, se="pre", se_channels=2), (7, 9)),
    ("repvgg-se-pre-s2", R(8, 16, stride=2, se="pre", se_channels=4), (15, 15)),
    ("repvgg-se-post", R(8, 8, se="post", se_channels=2), (7, 9)),
    ("repvgg-se-post-g4-dil2", R(8, 8, groups=4, dilation=2, se="post", se_channels=2), (15, 15)),
    ("repvgg-silu", R(8, 8, act="silu"), (7, 9)),
    ("repvgg-no-act-eps1e-3", R(8, 8, act="identity", eps=1e-3), (7, 9)),
    ("repconv", repconv_spec(8, 8), (15, 15)),
    ("repconv-s2-g2", repconv_spec(8, 16, stride=2, groups=2), (7, 9)),
    ("repconv-relu-dw", repconv_spec(8, 8, groups=8, act="relu"), (7, 9)),
    ("ghost-module-relu", G(8, 12), (7, 9)),
    ("ghost-module-linear", G(8, 12, relu=False), (15, 15)),
    ("ghost-module-dw5", G(12, 8, dw_size=5), (7, 9)),
    ("ghost-module-k3-s2", G(8, 8, kernel_size=3, stride=2), (15, 15)),
    ("ghost-module-no-reparam-bn", G(8, 8, reparam_bn=False), (7, 9)),
    ("bottleneck-identity-shortcut", B(8, 16, 8), (15, 15)),
    ("bottleneck-s2-se-k5", B(8, 24, 12, dw_kernel_size=5, stride=2, se_channels=8), (15, 15)),
    ("bottleneck-in-ne-out-s1", B(8, 16, 12), (7, 9)),
    ("bottleneck-se-s1", B(12, 20, 12, se_channels=4), (7, 9)),
    ("bottleneck-s2-k3", B(8, 16, 8, stride=2), (7, 9)),
]

# from tests/flax/test_flax_blocks.py (the even sizes are the 'SAME'-padding trap)
_FLAX = [
    ("repvgg-identity", R(8, 8), (7, 9)),
    ("repvgg-in-ne-out-s2", R(8, 16, stride=2), (7, 9)),
    ("repvgg-in-ne-out-s2-even", R(8, 16, stride=2), (8, 8)),
    ("repvgg-s2-even-wide", R(8, 8, stride=2), (16, 16)),
    ("repvgg-g2", R(8, 8, groups=2), (15, 15)),
    ("repvgg-g4-s2-even", R(8, 16, stride=2, groups=4), (8, 10)),
    ("repvgg-g4-s2-odd", R(8, 8, stride=2, groups=4), (15, 15)),
    ("repvgg-depthwise", R(8, 8, groups=8), (7, 9)),
    ("repvgg-depthwise-s2-even", R(8, 8, stride=2, groups=8), (16, 16)),
    ("repvgg-depthwise-s2-odd", R(8, 8, stride=2, groups=8), (15, 15)),
    ("repvgg-dilation2", R(8, 8, dilation=2), (15, 15)),
    ("repvgg-dilation2-s2-g2-even", R(8, 16, stride=2, dilation=2, groups=2), (14, 14)),
    ("repvgg-k5", R(8, 8, kernel_size=5), (9, 7)),
    ("repvgg-conv-bias", R(8, 8, conv_bias=True), (7, 9)),
    ("repvgg-conv-bias-s2-even", R(8, 16, stride=2, conv_bias=True), (8, 8)),
    ("repvgg-se-pre", R(8, 8, se="pre", se_channels=2), (7, 9)),
    ("repvgg-se-post", R(8, 8, se="post", se_channels=2), (7, 9)),
    ("repvgg-se-post-s2-even", R(8, 16, stride=2, se="post", se_channels=4), (8, 8)),
    ("repvgg-silu", R(8, 8, act="silu"), (7, 9)),
    ("repvgg-identity-act-in-ne-out", R(8, 16, act="identity"), (7, 9)),
    ("repvgg-no-identity", R(8, 8, use_identity=False), (7, 9)),
    ("repconv", repconv_spec(8, 8), (7, 9)),
    ("repconv-s2-g2-even", repconv_spec(8, 16, stride=2, groups=2), (8, 8)),
    ("ghost-module-relu-8to16", G(8, 16), (7, 9)),
    ("ghost-module-linear-even", G(8, 12, relu=False), (8, 8)),
    ("ghost-module-no-reparam-bn", G(8, 8, reparam_bn=False), (7, 9)),
    ("ghost-module-dw5", G(8, 8, dw_size=5), (9, 9)),
    ("ghost-module-k3-s2-even", G(8, 16, kernel_size=3, stride=2), (8, 8)),
    ("ghost-module-k3-s2-odd", G(8, 16, kernel_size=3, stride=2), (15, 15)),
    ("bottleneck-identity-shortcut", B(8, 16, 8), (7, 9)),
    ("bottleneck-identity-se", B(16, 32, 16, se_channels=8), (7, 9)),
    ("bottleneck-conv-shortcut-s1", B(8, 16, 12), (7, 9)),
    ("bottleneck-s2-even-se", B(8, 24, 16, 3, 2, se_channels=8), (8, 8)),
    ("bottleneck-s2-odd-k5", B(8, 24, 16, 5, 2), (15, 15)),
    ("bottleneck-s2-even-k5-se", B(8, 24, 8, 5, 2, se_channels=4), (16, 16)),
]

# from tests/megengine/test_mge_blocks.py: every spec at both sizes
_MGE_SPECS = [
    ("repvgg-g1", R(8, 8)),
    ("repvgg-g2", R(8, 8, groups=2)),
    ("repvgg-g4-in-ne-out", R(8, 12, groups=4)),
    ("repvgg-depthwise6", R(6, 6, groups=6)),
    ("repvgg-stride2", R(8, 8, stride=2)),
    ("repvgg-stride2-g2", R(4, 8, stride=2, groups=2)),
    ("repvgg-in-ne-out-3to10", R(3, 10)),
    ("repvgg-dilation2", R(8, 8, dilation=2)),
    ("repvgg-dilation2-g4-s2", R(8, 8, stride=2, dilation=2, groups=4)),
    ("repvgg-k5-4ch", R(4, 4, kernel_size=5)),
    ("repvgg-bias", R(8, 8, conv_bias=True)),
    ("repvgg-bias-g2", R(4, 6, groups=2, conv_bias=True)),
    ("repvgg-se-pre", R(8, 8, se="pre", se_channels=2)),
    ("repvgg-se-post4", R(8, 8, se="post", se_channels=4)),
    ("repvgg-se-post-s2-g2", R(8, 16, stride=2, groups=2, se="post", se_channels=4)),
    ("repvgg-silu", R(8, 8, act="silu")),
    ("repvgg-identity-act-eps1e-3", R(8, 8, act="identity", eps=1e-3)),
    ("repconv", repconv_spec(8, 8)),
    ("repconv-g2-s2", repconv_spec(8, 16, stride=2, groups=2)),
    ("ghost-module-8to12", G(8, 12)),
    ("ghost-module-linear-dw5", G(6, 6, relu=False, dw_size=5)),
    ("ghost-module-no-reparam-bn-4to8", G(4, 8, reparam_bn=False)),
    ("bottleneck-identity", B(8, 16, 8)),
    ("bottleneck-s2", B(8, 24, 12, stride=2)),
    ("bottleneck-k5-se", B(12, 24, 12, dw_kernel_size=5, se_channels=8)),
    ("bottleneck-k5-s2-se", B(6, 12, 10, dw_kernel_size=5, stride=2, se_channels=4)),
]
_MGE = [(name, spec, hw) for name, spec in _MGE_SPECS for hw in (ODD, SQUARE)]


def _union(*lists: list[tuple[str, object, tuple[int, int]]]) -> list[BlockCase]:
    seen: dict[tuple[object, tuple[int, int]], BlockCase] = {}
    for entries in lists:
        for name, spec, hw in entries:
            seen.setdefault((spec, hw), BlockCase(name, spec, hw))
    cases = list(seen.values())
    ids = [c.id for c in cases]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise ValueError(f"block matrix: two different cases share the ids {duplicated}")
    return cases


# MobileOne blocks from the official constructor (apple/ml-mobileone MobileOneBlock): the stem
# (stride 2, no identity), a depthwise block with 4 conv branches + scale + identity + SE, a
# depthwise stride-2 one on an even size, a pointwise one with identity and 2 branches.
_MOBILEONE = [
    ("mobileone-stem-s2", official_block("MobileOneBlock", 3, 16, 3, stride=2, padding=1), (15, 15)),
    (
        "mobileone-dw-4br-se",
        official_block("MobileOneBlock", 16, 16, 3, padding=1, groups=16, use_se=True, num_conv_branches=4),
        (7, 9),
    ),
    (
        "mobileone-dw-s2-even",
        official_block("MobileOneBlock", 8, 8, 3, stride=2, padding=1, groups=8, num_conv_branches=2),
        (16, 16),
    ),
    ("mobileone-pw-2br", official_block("MobileOneBlock", 8, 8, 1, num_conv_branches=2), (7, 9)),
    ("mobileone-pw-in-ne-out-se", official_block("MobileOneBlock", 8, 16, 1, use_se=True), (7, 9)),
]

BLOCK_MATRIX = _union(_TORCH, _FLAX, _MGE, _MOBILEONE)
