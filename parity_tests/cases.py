"""The cases of the parity matrix: every registered model, the block matrix, random blocks."""

from __future__ import annotations

from hypothesis import strategies as st

from reparam_core import RepBlockSpec, RepGhostBottleneckSpec, RepGhostModuleSpec, list_models, official_block

from .harness import Case


def model_cases(size: int = 64) -> list[Case]:
    """Every model in the registry at 1x3xSxS (RepVGG-mini at 32, its design size)."""
    return [
        Case(name, (1, 3, 32, 32) if name == "RepVGG-mini" else (1, 3, size, size), model=name)
        for name in list_models()
    ]


def block_matrix() -> list[Case]:
    """RepVGGBlock, RepConv, RepGhost blocks over groups 1/2/4/depthwise, stride 1/2, in != out,
    dilation, odd and even sizes, conv bias, SE."""
    cases: list[Case] = []
    for groups in (1, 2, 4, 8):
        for stride in (1, 2):
            for cout in (8, 16):
                b = RepBlockSpec(8, cout, stride=stride, groups=groups)
                cases.append(Case(f"repvgg-g{groups}-s{stride}-o{cout}", (2, 8, 9, 7), block=b))
    cases += [
        Case("repvgg-dilation2", (1, 8, 11, 11), block=RepBlockSpec(8, 8, dilation=2)),
        Case("repvgg-dilation2-g4-s2", (1, 8, 12, 10), block=RepBlockSpec(8, 16, stride=2, dilation=2, groups=4)),
        Case("repvgg-bias", (1, 8, 15, 15), block=RepBlockSpec(8, 8, conv_bias=True)),
        Case("repvgg-se-pre", (2, 16, 8, 8), block=RepBlockSpec(16, 16, se="pre", se_channels=4)),
        Case("repvgg-se-post-s2", (1, 16, 9, 9), block=RepBlockSpec(16, 32, stride=2, se="post", se_channels=8)),
        Case("repvgg-k5-pad", (1, 4, 10, 10), block=RepBlockSpec(4, 4, kernel_size=5)),
        Case("repvgg-k3-extra-pad", (1, 4, 6, 6), block=RepBlockSpec(4, 4, padding=2)),
        Case("repvgg-stride2-even", (1, 8, 16, 16), block=RepBlockSpec(8, 8, stride=2)),
        Case("repconv-silu", (1, 8, 9, 9), block=RepBlockSpec(8, 8, act="silu", naming="repconv", eps=1e-3)),
        Case(
            "repconv-g2-s2",
            (1, 8, 13, 11),
            block=RepBlockSpec(8, 16, stride=2, groups=2, act="silu", naming="repconv", eps=1e-3),
        ),
        Case("repconv-depthwise", (1, 8, 7, 7), block=RepBlockSpec(8, 8, groups=8, act="silu", naming="repconv")),
        Case("ghost-module", (1, 8, 9, 9), block=RepGhostModuleSpec(8, 12)),
        Case("ghost-module-linear", (1, 8, 8, 8), block=RepGhostModuleSpec(8, 8, relu=False)),
        Case("ghost-bottleneck-s1", (1, 8, 9, 9), block=RepGhostBottleneckSpec(8, 16, 8)),
        Case("ghost-bottleneck-s2-se", (1, 8, 11, 11), block=RepGhostBottleneckSpec(8, 24, 16, 5, 2, 8)),
        Case("ghost-bottleneck-s2-even", (1, 8, 12, 12), block=RepGhostBottleneckSpec(8, 16, 12, 3, 2)),
    ]
    cases += [c for c in official_cases() if c.name in PARITY_OFFICIAL]
    return cases


# Blocks from their official constructors (reparam_core.official_block): (case name, class,
# constructor arguments, input N x C x H x W). Groups, stride 2, in != out, kernel 5, the
# optional parts (SE, last BN, kept post-BN, identity-based 1x1, depthwise DBB).
OFFICIAL_BLOCKS: list[tuple[str, str, dict, tuple[int, int, int, int]]] = [
    ("official-repvgg", "RepVGGBlock", dict(in_channels=8, out_channels=8, kernel_size=3, padding=1), (2, 8, 9, 7)),
    (
        "official-repvgg-se-g2-s2",
        "RepVGGBlock",
        dict(in_channels=16, out_channels=32, kernel_size=3, stride=2, padding=1, groups=2, use_se=True),
        (1, 16, 10, 10),
    ),
    ("official-repconv", "RepConv", dict(c1=8, c2=8), (1, 8, 9, 9)),
    ("official-repconv-s2-g4-noact", "RepConv", dict(c1=8, c2=16, s=2, g=4, act=False), (1, 8, 11, 8)),
    ("official-repghost", "RepGhostModule", dict(inp=8, oup=12), (1, 8, 9, 9)),
    (
        "official-repghost-identity-dw5-s2",
        "RepGhostModule",
        dict(inp=8, oup=8, kernel_size=3, dw_size=5, stride=2, relu=False, reparam_identity=True),
        (1, 8, 12, 12),
    ),
    (
        "official-qarepvgg-v2",
        "QARepVGGBlockV2",
        dict(in_channels=8, out_channels=8, kernel_size=3, padding=1),
        (2, 8, 9, 7),
    ),
    (
        "official-qarepvgg-v2-g2-s2",
        "QARepVGGBlockV2",
        dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=1, groups=2),
        (1, 8, 11, 11),
    ),
    ("official-yolov6-qarep", "yolov6.QARepVGGBlock", dict(in_channels=8, out_channels=8, groups=4), (1, 8, 9, 9)),
    (
        "official-yolov6-qarep-keep-bn-s2",
        "yolov6.QARepVGGBlock",
        dict(in_channels=8, out_channels=12, stride=2, keep_post_bn=True),
        (1, 8, 10, 10),
    ),
    ("official-yolov6-qarep-v2", "yolov6.QARepVGGBlockV2", dict(in_channels=8, out_channels=8), (2, 8, 9, 7)),
    (
        "official-yolov6-qarep-v2-keep-bn-g2",
        "yolov6.QARepVGGBlockV2",
        dict(in_channels=8, out_channels=8, groups=2, keep_post_bn=True),
        (1, 8, 8, 8),
    ),
    ("official-dbb", "DiverseBranchBlock", dict(in_channels=8, out_channels=8, kernel_size=3, padding=1), (2, 8, 9, 7)),
    (
        "official-dbb-k5-s2-g2",
        "DiverseBranchBlock",
        dict(in_channels=8, out_channels=16, kernel_size=5, stride=2, padding=2, groups=2),
        (1, 8, 12, 11),
    ),
    (
        "official-dbb-depthwise-relu",
        "DiverseBranchBlock",
        dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8, nonlinear="relu"),
        (1, 8, 9, 9),
    ),
    (
        "official-dbb-internal-s2",
        "DiverseBranchBlock",
        dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1, internal_channels_1x1_3x3=6),
        (1, 4, 10, 10),
    ),
    ("official-acb", "ACBlock", dict(in_channels=8, out_channels=8, kernel_size=3, padding=1), (2, 8, 9, 7)),
    (
        "official-acb-k5-s2-g4-pad3",
        "ACBlock",
        dict(in_channels=8, out_channels=16, kernel_size=5, stride=2, padding=3, groups=4),
        (1, 8, 11, 12),
    ),
    (
        "official-acb-last-bn",
        "ACBlock",
        dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, use_last_bn=True),
        (1, 8, 9, 9),
    ),
]
# The ones the parity matrix runs: one per class.
PARITY_OFFICIAL = (
    "official-repvgg",
    "official-repconv",
    "official-repghost-identity-dw5-s2",
    "official-qarepvgg-v2",
    "official-yolov6-qarep-keep-bn-s2",
    "official-yolov6-qarep-v2",
    "official-dbb-k5-s2-g2",
    "official-acb-k5-s2-g4-pad3",
)


def official_cases() -> list[Case]:
    """Every OFFICIAL_BLOCKS entry as a parity Case (the spec official_block returns)."""
    return [
        Case(name, shape, block=official_block(cls, **kwargs))  # type: ignore[arg-type]
        for name, cls, kwargs, shape in OFFICIAL_BLOCKS
    ]


@st.composite
def random_block_cases(draw) -> Case:
    """Random RepVGG-style block geometries for the cross-backend matrix."""
    groups = draw(st.sampled_from([1, 2, 4, 0]))
    cin = 4 * draw(st.integers(1, 3)) if groups else draw(st.integers(1, 12))
    g = groups or cin
    cout = cin if draw(st.booleans()) else g * draw(st.integers(1, 4))
    k = draw(st.sampled_from([1, 3, 5]))
    d = draw(st.integers(1, 2)) if k > 1 else 1
    se = draw(st.sampled_from(["none", "none", "pre", "post"]))
    spec = RepBlockSpec(
        cin,
        cout,
        k,
        draw(st.sampled_from([1, 2])),
        d,
        g,
        padding=d * (k - 1) // 2 + draw(st.sampled_from([0, 0, 1])),
        se=se,
        se_channels=draw(st.integers(1, 4)) if se != "none" else 0,
        conv_bias=draw(st.booleans()),
        act=draw(st.sampled_from(["relu", "silu"])),
        eps=draw(st.sampled_from([1e-5, 1e-3])),
        naming=draw(st.sampled_from(["repvgg", "repconv"])),
    )
    h, w = draw(st.integers(d * (k - 1) + 1, 12)), draw(st.integers(d * (k - 1) + 1, 12))
    return Case("random", (draw(st.integers(1, 2)), cin, h, w), block=spec, seed=draw(st.integers(0, 2**16)))
