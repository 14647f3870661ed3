"""The cases of the parity matrix: every registered model, the block matrix, random blocks."""
from __future__ import annotations

from hypothesis import strategies as st

from reparam_core import (RepBlockSpec, RepGhostBottleneckSpec, RepGhostModuleSpec, list_models)

from .harness import Case


def model_cases(size: int = 64) -> list[Case]:
    """Every model in the registry at 1x3xSxS (RepVGG-mini at 32, its design size)."""
    return [Case(name, (1, 3, 32, 32) if name == "RepVGG-mini" else (1, 3, size, size), model=name)
            for name in list_models()]


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
        Case("repconv-g2-s2", (1, 8, 13, 11), block=RepBlockSpec(8, 16, stride=2, groups=2, act="silu",
                                                                 naming="repconv", eps=1e-3)),
        Case("repconv-depthwise", (1, 8, 7, 7), block=RepBlockSpec(8, 8, groups=8, act="silu", naming="repconv")),
        Case("ghost-module", (1, 8, 9, 9), block=RepGhostModuleSpec(8, 12)),
        Case("ghost-module-linear", (1, 8, 8, 8), block=RepGhostModuleSpec(8, 8, relu=False)),
        Case("ghost-bottleneck-s1", (1, 8, 9, 9), block=RepGhostBottleneckSpec(8, 16, 8)),
        Case("ghost-bottleneck-s2-se", (1, 8, 11, 11), block=RepGhostBottleneckSpec(8, 24, 16, 5, 2, 8)),
        Case("ghost-bottleneck-s2-even", (1, 8, 12, 12), block=RepGhostBottleneckSpec(8, 16, 12, 3, 2)),
    ]
    return cases


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
    spec = RepBlockSpec(cin, cout, k, draw(st.sampled_from([1, 2])), d, g,
                        padding=d * (k - 1) // 2 + draw(st.sampled_from([0, 0, 1])), se=se,
                        se_channels=draw(st.integers(1, 4)) if se != "none" else 0,
                        conv_bias=draw(st.booleans()), act=draw(st.sampled_from(["relu", "silu"])),
                        eps=draw(st.sampled_from([1e-5, 1e-3])),
                        naming=draw(st.sampled_from(["repvgg", "repconv"])))
    h, w = draw(st.integers(d * (k - 1) + 1, 12)), draw(st.integers(d * (k - 1) + 1, 12))
    return Case("random", (draw(st.integers(1, 2)), cin, h, w), block=spec,
                seed=draw(st.integers(0, 2**16)))
