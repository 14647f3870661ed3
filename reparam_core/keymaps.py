"""Key maps from other RepVGG implementations to the canonical (official PyTorch) names, as data.

Each scheme is an ordered list of `(regex, replacement)` rules applied one after another with
`re.sub` to every key; a key is mapped when the result is a key of the model's schema (either
form). `to_canonical` tries every scheme and keeps the one that maps the most keys (ties go to
the earlier scheme: a basecls checkpoint without SE is also mapped fully by the mmpretrain and
timm rules, which only add prefixes basecls does not use).

Names were checked against the sources (facts only):
- timm `byobnet.py` (`repvgg_a0` ... `repvgg_d2se`, `stem_type='rep'`): the stem is a RepVggBlock
  `stem`; stages are `stages.{0..3}.{j}` with the official depths (A: 2,4,14,1; B: 4,6,16,1;
  D2: 8,14,24,1), stride 2 on each stage's first block and the same channels, so the mapping is
  1:1 -- `stem` -> `stage0`, `stages.N.j` -> `stage{N+1}.j`. timm groups blocks with an odd index
  *within* the stage, the official code even *global* layer indices from 1; with the even stage
  depths of every grouped model the two coincide (checked by shape anyway). Inside a block:
  `conv_kxk.{conv,bn}` -> `rbr_dense.{conv,bn}`, `conv_1x1` -> `rbr_1x1`, `identity` ->
  `rbr_identity` (a BatchNormAct2d: same fields), `reparam_conv` -> `rbr_reparam`, SE `attn.fc1`/
  `attn.fc2` -> `se.down`/`se.up` (applied before the activation, as RepVGG-D2se), `head.fc` ->
  `linear`. No `final_conv` (num_features 0).
- mmpretrain `RepVGG` backbone inside an ImageClassifier: `backbone.stem`, `backbone.stage_{1..4}.j`
  (1:1 with `stage{1..4}.j`), `branch_3x3.{conv,norm}`, `branch_1x1.{conv,norm}`, `branch_norm`
  (identity BN), `branch_reparam`, SE `se_layer.conv1.conv`/`se_layer.conv2.conv`, head
  `head.fc` (LinearClsHead).
- basecls (megvii-research, MegEngine): the official block names (`stage0`, `stage{1..4}.j`,
  `rbr_dense.{conv,bn}` from ConvBn2d, `rbr_1x1`, `rbr_identity`, `rbr_reparam`), SE as
  `se.f_ex.0` / `se.f_ex.2` (1x1 convs with bias), head `head.fc` (ClsHead without conv).
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from .errors import CheckpointError
from .schema import FORMS, state_schema
from .specs import ModelSpec

Rules = list[tuple[str, str]]

# Rules applied inside any block, after the prefix rules (anchored on dots).
_TIMM_BLOCK: Rules = [
    (r"(^|\.)conv_kxk\.conv\.", r"\1rbr_dense.conv."),
    (r"(^|\.)conv_kxk\.bn\.", r"\1rbr_dense.bn."),
    (r"(^|\.)conv_1x1\.conv\.", r"\1rbr_1x1.conv."),
    (r"(^|\.)conv_1x1\.bn\.", r"\1rbr_1x1.bn."),
    (r"(^|\.)identity\.", r"\1rbr_identity."),
    (r"(^|\.)reparam_conv\.", r"\1rbr_reparam."),
    (r"(^|\.)attn\.fc1\.", r"\1se.down."),
    (r"(^|\.)attn\.fc2\.", r"\1se.up."),
]

SCHEMES: dict[str, Rules] = {
    # Already canonical: the official RepVGG / RepVGGplus / RepGhostNet / YOLOv7 names.
    "canonical": [],
    "basecls": [
        (r"^head\.fc\.", "linear."),
        (r"\.se\.f_ex\.0\.", ".se.down."),
        (r"\.se\.f_ex\.2\.", ".se.up."),
    ],
    "mmpretrain": [
        (r"^backbone\.stem\.", "stage0."),
        (r"^backbone\.stage_([1-4])\.(\d+)\.", r"stage\1.\2."),
        (r"^head\.fc\.", "linear."),
        (r"\.branch_3x3\.conv\.", ".rbr_dense.conv."),
        (r"\.branch_3x3\.norm\.", ".rbr_dense.bn."),
        (r"\.branch_1x1\.conv\.", ".rbr_1x1.conv."),
        (r"\.branch_1x1\.norm\.", ".rbr_1x1.bn."),
        (r"\.branch_norm\.", ".rbr_identity."),
        (r"\.branch_reparam\.", ".rbr_reparam."),
        (r"\.se_layer\.conv1\.conv\.", ".se.down."),
        (r"\.se_layer\.conv2\.conv\.", ".se.up."),
    ],
    "timm": [
        (r"^stem\.", "stage0."),
        (r"^stages\.0\.(\d+)\.", r"stage1.\1."),
        (r"^stages\.1\.(\d+)\.", r"stage2.\1."),
        (r"^stages\.2\.(\d+)\.", r"stage3.\1."),
        (r"^stages\.3\.(\d+)\.", r"stage4.\1."),
        (r"^head\.fc\.", "linear."),
        *_TIMM_BLOCK,
    ],
}


def map_key(key: str, rules: Rules) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def apply_scheme(state: Mapping[str, np.ndarray], rules: Rules) -> dict[str, np.ndarray]:
    return {map_key(k, rules): v for k, v in state.items()}


def to_canonical(state: Mapping[str, np.ndarray], spec: ModelSpec,
                 source: str = "checkpoint") -> tuple[dict[str, np.ndarray], str]:
    """(state with canonical keys, scheme name). The scheme mapping the most keys onto the
    model's schema wins (ties go to the earlier scheme, `canonical` first). Unmapped keys are
    kept so that `check_state` can report them; CheckpointError when no scheme maps any key."""
    known: set[str] = set()
    for form in FORMS:
        known |= set(state_schema(spec, form))
    keys = [k for k in state if not k.endswith("num_batches_tracked")]
    best, best_score = "canonical", -1
    for name, rules in SCHEMES.items():
        score = sum(map_key(k, rules) in known for k in keys)
        if score > best_score:
            best, best_score = name, score
    if keys and best_score == 0:
        sample = ", ".join(keys[:5])
        raise CheckpointError(
            f"{source}: no key maps onto {spec.name} under any known naming scheme "
            f"({', '.join(SCHEMES)}); first unmapped keys: {sample}")
    mapped = apply_scheme(state, SCHEMES[best])
    if len(mapped) != len(state):
        raise CheckpointError(f"{source}: keys collide after mapping with the {best} scheme")
    return mapped, best


__all__ = ["SCHEMES", "map_key", "apply_scheme", "to_canonical"]
