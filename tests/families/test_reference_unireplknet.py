"""An independent reference for UniRepLKNet (AILab-CVC/UniRepLKNet): the official forward, in eval
mode, of `DilatedReparamBlock`, `UniRepLKNetBlock` (train form and the deploy=True form) and of
the `UniRepLKNet` model, written in plain float64 torch functional code from the official
semantics, reading an official-style checkpoint by its official key names only; and the
official `reparameterize` algebra, written from the same semantics. The library's float64
oracle must agree with it in train form, and in deploy form on the state that
`reparameterize_state` gives, which must also equal the official algebra's tensors; copies of
the library's description mis-described on purpose (a dilated branch left out, a wrong BN
epsilon, GRN's beta or the layer scale forgotten) must not agree.

The library's torch train and deploy forms (float32) are held to the same reference here too;
every backend against the oracle is in tests/backends.

Official facts used (read from the source, not from the library):
- DilatedReparamBlock(C, K): origin_bn(lk_origin(x)) + sum over (k, r) of
  dil_bn_k{k}_{r}(dil_conv_k{k}_{r}(x)); lk_origin: depthwise K x K, padding K // 2, no bias
  (bias in deploy form, where it is the only module); dil_conv: depthwise k x k, dilation r,
  padding (r (k - 1) + 1) // 2, no bias; every BN nn.BatchNorm2d (eps 1e-5). (k, r) per K:
  17: (5,1) (9,2) (3,4) (3,5) (3,7); 15: (5,1) (7,2) (3,3) (3,5) (3,7); 13: (5,1) (7,2) (3,3)
  (3,4) (3,5); 11: (5,1) (5,2) (3,3) (3,4) (3,5); 9: (5,1) (5,2) (3,3) (3,4); 7: (5,1) (3,2)
  (3,3); 5: (3,1) (3,2). Re-parameterized: each branch's BN folded into its conv, the dilated
  kernel spread on the dense grid (r - 1 zeros between taps), zero-padded to K and added.
- UniRepLKNetBlock(C, K): x + gamma * pwconv2(act(pwconv1(se(norm(dwconv(x)))))), dwconv a
  DilatedReparamBlock for K >= 7, a depthwise K x K conv (padding K // 2, bias only in deploy
  form) for K = 3, 5, identity for K = 0; norm a BN (identity for K = 0 and in deploy form);
  se: x * sigmoid(up(relu(down(mean_HW(x))))), 1x1 convs with bias, hidden C // 4; pwconv1:
  NHWC, then Linear(C, 4C); act: exact GELU, then GRN on NHWC: G = ||x||_2 over H, W,
  N = G / (mean_C G + 1e-6), (gamma N + 1) x + beta (no beta in deploy form); pwconv2: Linear(4C,
  C) without bias (with bias in deploy form), back to NCHW, BN (train form only); gamma (C,)
  in train form only (absent when layer_scale_init_value is None). `reparameterize`: norm folded
  into the dwconv; W2' = W2 s[:, None], b2' = (bn_b + (W2 beta - bn_mean) t) gamma, where
  t = bn_w / sqrt(bn_var + eps), s = t gamma.
- UniRepLKNet: for i < 4, downsample_layers[i] then stages[i]; downsample_layers[0] = conv(3,
  C0 / 2, 3, stride 2, padding 1, bias), channels-first LayerNorm (eps 1e-6, biased variance),
  GELU, conv(C0 / 2, C0, same), LayerNorm; downsample_layers[i > 0] = conv(C_{i-1}, C_i, same),
  LayerNorm; then nn.LayerNorm `norm` (eps 1e-6) on the mean over H, W, and `head`.
  UniRepLKNet-A: dims (40, 80, 160, 320), kernel sizes (3, 3), (13, 13), (13,) * 6, (13, 13).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from family_reference import (
    Checkpoint,
    assert_forms_match,
    block_prefix,
    bn,
    conv,
    model_run,
    official_checkpoint,
    random_input,
    trained_like,
)

from reparam_core import official_block, reparameterize_state
from reparam_core.blocks.nodes import Add, Bias, Block, Node, Rep, Scale, SpecLike, describe
from reparam_core.blocks.oracle import forward

EPS = 1e-5  # nn.BatchNorm2d's default; the official code passes no other
LN_EPS = 1e-6  # the official LayerNorms and GRN's constant
TABLE = {
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    7: ((5, 1), (3, 2), (3, 3)),
    5: ((3, 1), (3, 2)),
}

# Float64 on both sides. Measured (max over the cases; relative to the output's largest
# magnitude): train form 6.6e-16, deploy form 6.7e-16, the reference's deploy form on the
# library's deploy state 7.5e-16; the deploy tensors against the official algebra 2.9e-16;
# UniRepLKNet-A (12 blocks, one 32x32 input) 1.2e-15.
TOL = 1e-12


# ----------------------------------------------------------------------------- the reference


def dilated_reparam_block(
    ck: Checkpoint, x: torch.Tensor, channels: int, kernel_size: int, deploy: bool, prefix: str = ""
) -> torch.Tensor:
    """DilatedReparamBlock: origin_bn(lk_origin(x)) + sum_(k, r) dil_bn(dil_conv(x)), or lk_origin
    with bias in deploy form."""

    def key(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    if deploy:
        return conv(ck, key("lk_origin"), x, padding=kernel_size // 2, groups=channels, bias=True)
    y = bn(
        ck, key("origin_bn"), conv(ck, key("lk_origin"), x, padding=kernel_size // 2, groups=channels, bias=False), EPS
    )
    for k, r in TABLE[kernel_size]:
        pad = (r * (k - 1) + 1) // 2
        branch = conv(ck, key(f"dil_conv_k{k}_{r}"), x, padding=pad, groups=channels, dilation=r, bias=False)
        y = y + bn(ck, key(f"dil_bn_k{k}_{r}"), branch, EPS)
    return y


def grn_nhwc(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
    """GRNwithNHWC on N x H x W x C."""
    g = torch.linalg.vector_norm(x, 2, dim=(1, 2), keepdim=True)
    n = g / (g.mean(dim=-1, keepdim=True) + LN_EPS)
    y = (gamma * n + 1) * x
    return y if beta is None else y + beta


def unireplknet_block(
    ck: Checkpoint,
    x: torch.Tensor,
    dim: int,
    kernel_size: int,
    drop_path: float = 0.0,
    layer_scale_init_value: float | None = 1e-6,
    deploy: bool = False,
    ffn_factor: float = 4,
) -> torch.Tensor:
    """UniRepLKNetBlock in eval mode (drop path is the identity)."""
    if kernel_size >= 7:
        y = dilated_reparam_block(ck, x, dim, kernel_size, deploy, "dwconv")
    elif kernel_size in (3, 5):
        y = conv(ck, "dwconv", x, padding=kernel_size // 2, groups=dim, bias=deploy)
    else:
        y = x
    if kernel_size and not deploy:
        y = bn(ck, "norm", y, EPS)
    s = F.relu(conv(ck, "se.down", y.mean(dim=(2, 3), keepdim=True), bias=True))
    y = y * torch.sigmoid(conv(ck, "se.up", s, bias=True))
    t = F.linear(y.permute(0, 2, 3, 1), ck["pwconv1.1.weight"], ck["pwconv1.1.bias"])
    t = grn_nhwc(F.gelu(t), ck["act.1.gamma"], None if deploy else ck["act.1.beta"])
    t = F.linear(t, ck["pwconv2.0.weight"], ck["pwconv2.0.bias"] if deploy else None).permute(0, 3, 1, 2)
    if not deploy:
        t = bn(ck, "pwconv2.2", t, EPS)
        if layer_scale_init_value is not None and layer_scale_init_value > 0:
            t = ck["gamma"].view(1, -1, 1, 1) * t
    return x + t


def layer_norm_channels_first(ck: Checkpoint, key: str, x: torch.Tensor) -> torch.Tensor:
    u = x.mean(1, keepdim=True)
    v = (x - u).pow(2).mean(1, keepdim=True)
    return ck[f"{key}.weight"][:, None, None] * (x - u) / torch.sqrt(v + LN_EPS) + ck[f"{key}.bias"][:, None, None]


def unireplknet_model(
    ck: Checkpoint, x: torch.Tensor, dims: tuple[int, ...], kernel_sizes: tuple[tuple[int, ...], ...], deploy: bool
) -> torch.Tensor:
    """UniRepLKNet (logits mode)."""

    def down(i: int, index: int, y: torch.Tensor) -> torch.Tensor:
        return conv(ck, f"downsample_layers.{i}.{index}", y, stride=2, padding=1, bias=True)

    for i in range(4):
        if i == 0:
            x = layer_norm_channels_first(ck, "downsample_layers.0.1", down(0, 0, x))
            x = layer_norm_channels_first(ck, "downsample_layers.0.4", down(0, 3, F.gelu(x)))
        else:
            x = layer_norm_channels_first(ck, f"downsample_layers.{i}.1", down(i, 0, x))
        for j, k in enumerate(kernel_sizes[i]):
            x = unireplknet_block(block_prefix(ck, f"stages.{i}.{j}"), x, dims[i], k, deploy=deploy)
    x = F.layer_norm(x.mean(dim=(2, 3)), (dims[-1],), ck["norm.weight"], ck["norm.bias"], LN_EPS)
    return F.linear(x, ck["head.weight"], ck["head.bias"])


# ----------------------------------------------------------------------------- the official algebra


def fold_bn(ck: Checkpoint, prefix: str, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, b) followed by the BN at `prefix` as one conv."""
    t = ck[f"{prefix}.weight"] / torch.sqrt(ck[f"{prefix}.running_var"] + EPS)
    return w * t.view(-1, 1, 1, 1), ck[f"{prefix}.bias"] + (b - ck[f"{prefix}.running_mean"]) * t


def on_dense_grid(w: torch.Tensor, r: int, size: int) -> torch.Tensor:
    """A k x k kernel of dilation r as the size x size dense kernel (centred) it equals."""
    span = r * (w.shape[-1] - 1) + 1
    dense = torch.zeros(*w.shape[:2], span, span, dtype=w.dtype)
    dense[..., ::r, ::r] = w
    pad = (size - span) // 2
    return F.pad(dense, [pad] * 4)


def reparameterize_block(ck: Checkpoint, dim: int, kernel_size: int, layer_scale: bool = True) -> Checkpoint:
    """The state the official UniRepLKNetBlock.reparameterize() leaves."""
    out = dict(ck)
    zero = torch.zeros(dim, dtype=torch.float64)
    if kernel_size >= 7:
        w, b = fold_bn(ck, "dwconv.origin_bn", ck["dwconv.lk_origin.weight"], zero)
        del out["dwconv.lk_origin.weight"]
        for f in ("weight", "bias", "running_mean", "running_var"):
            del out[f"dwconv.origin_bn.{f}"]
        for k, r in TABLE[kernel_size]:
            wb, bb = fold_bn(ck, f"dwconv.dil_bn_k{k}_{r}", ck[f"dwconv.dil_conv_k{k}_{r}.weight"], zero)
            w, b = w + on_dense_grid(wb, r, kernel_size), b + bb
            del out[f"dwconv.dil_conv_k{k}_{r}.weight"]
            for f in ("weight", "bias", "running_mean", "running_var"):
                del out[f"dwconv.dil_bn_k{k}_{r}.{f}"]
        w, b = fold_bn(ck, "norm", w, b)
        out["dwconv.lk_origin.weight"], out["dwconv.lk_origin.bias"] = w, b
    elif kernel_size:
        out["dwconv.weight"], out["dwconv.bias"] = fold_bn(ck, "norm", ck["dwconv.weight"], zero)
    for f in ("weight", "bias", "running_mean", "running_var"):
        out.pop(f"norm.{f}", None)
    scale = out.pop("gamma") if layer_scale else torch.ones(dim, dtype=torch.float64)
    beta = out.pop("act.1.beta").reshape(-1)
    w2 = ck["pwconv2.0.weight"]
    t = ck["pwconv2.2.weight"] / torch.sqrt(ck["pwconv2.2.running_var"] + EPS)
    out["pwconv2.0.weight"] = w2 * (t * scale)[:, None]
    out["pwconv2.0.bias"] = (ck["pwconv2.2.bias"] + (w2 @ beta - ck["pwconv2.2.running_mean"]) * t) * scale
    for f in ("weight", "bias", "running_mean", "running_var"):
        del out[f"pwconv2.2.{f}"]
    return out


# ----------------------------------------------------------------------------- running the library


def as_numpy(ck: Checkpoint) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in ck.items()}


def rel(got: np.ndarray, want: torch.Tensor) -> float:
    w = want.detach().numpy()
    assert got.shape == w.shape, f"shape {got.shape}, the reference's {w.shape}"
    return float(np.abs(got - w).max() / max(np.abs(w).max(), 1e-30))


def oracle_forms(spec: SpecLike, ck: Checkpoint, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, Checkpoint]:
    """The oracle's train form on `ck`, its deploy form on reparameterize_state(ck), and that
    deploy state (as torch tensors)."""
    state = as_numpy(ck)
    deploy = reparameterize_state(spec, state)
    xs = x.numpy()
    train_y = forward(spec, state, xs, "train")
    deploy_y = forward(spec, deploy, xs, "deploy")
    return train_y, deploy_y, {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in deploy.items()}


def max_tensor_err(got: Checkpoint, want: Checkpoint) -> float:
    assert set(got) == set(want), f"keys: extra {set(got) - set(want)}, missing {set(want) - set(got)}"
    return max(float((got[k] - want[k]).abs().max() / max(want[k].abs().max(), 1e-30)) for k in want)


BLOCK_CASES: list[dict[str, Any]] = [
    dict(dim=8, kernel_size=13),
    dict(dim=8, kernel_size=3),
    dict(dim=8, kernel_size=5),
    dict(dim=8, kernel_size=7),
    dict(dim=8, kernel_size=9),
    dict(dim=12, kernel_size=11),
    dict(dim=8, kernel_size=15),
    dict(dim=4, kernel_size=17),
    dict(dim=8, kernel_size=0),
    dict(dim=8, kernel_size=13, layer_scale_init_value=None),
    dict(dim=8, kernel_size=7, ffn_factor=2),
]


def case_id(kw: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("kwargs", BLOCK_CASES, ids=[case_id(c) for c in BLOCK_CASES])
def test_block_forms_match_the_reference(kwargs: dict[str, Any]) -> None:
    spec = official_block("UniRepLKNetBlock", **kwargs)
    ck = official_checkpoint(spec, 0)
    x = random_input(kwargs["dim"], size=(17, 16))
    want = unireplknet_block(ck, x, **kwargs)
    train_y, deploy_y, deploy = oracle_forms(spec, ck, x)
    assert rel(train_y, want) <= TOL
    assert rel(deploy_y, want) <= TOL
    # the library's deploy state is the official deploy=True block's, with the official algebra's values
    assert rel(deploy_y, unireplknet_block(deploy, x, **kwargs, deploy=True)) <= TOL
    scale = kwargs.get("layer_scale_init_value", 1e-6) is not None
    assert max_tensor_err(deploy, reparameterize_block(ck, kwargs["dim"], kwargs["kernel_size"], scale)) <= TOL


@pytest.mark.parametrize("kernel", sorted(TABLE))
def test_dilated_reparam_block_forms_match_the_reference(kernel: int) -> None:
    spec = official_block("DilatedReparamBlock", 6, kernel, False)
    ck = official_checkpoint(spec, 1)
    x = random_input(6, size=(19, 18))
    want = dilated_reparam_block(ck, x, 6, kernel, False)
    train_y, deploy_y, deploy = oracle_forms(spec, ck, x)
    assert rel(train_y, want) <= TOL
    assert rel(deploy_y, want) <= TOL
    assert set(deploy) == {"lk_origin.weight", "lk_origin.bias"}
    assert rel(deploy_y, dilated_reparam_block(deploy, x, 6, kernel, True)) <= TOL


def test_unireplknet_a_matches_the_reference() -> None:
    dims = (40, 80, 160, 320)
    kernels = ((3, 3), (13, 13), (13,) * 6, (13, 13))
    spec, ck, x, want = model_run("UniRepLKNet-A", unireplknet_model, dims=dims, kernel_sizes=kernels, deploy=False)
    train_y, deploy_y, deploy = oracle_forms(spec, ck, x)
    assert rel(train_y, want) <= TOL
    assert rel(deploy_y, want) <= TOL
    assert rel(deploy_y, unireplknet_model(deploy, x, dims, kernels, deploy=True)) <= TOL


# Measured (float32 torch forms against the float64 reference, max over BLOCK_CASES): train
# form 2.5e-7, deploy form 4.0e-7; UniRepLKNet-A: 2.9e-7, 3.2e-7.
TORCH_TOL = 2e-6


@pytest.mark.parametrize("kwargs", BLOCK_CASES, ids=[case_id(c) for c in BLOCK_CASES])
def test_torch_block_forms_match_the_reference(kwargs: dict[str, Any]) -> None:
    spec = official_block("UniRepLKNetBlock", **kwargs)
    ck = official_checkpoint(spec, 0)
    x = random_input(kwargs["dim"], size=(17, 16))
    assert_forms_match(spec, ck, x, unireplknet_block(ck, x, **kwargs), TORCH_TOL, TORCH_TOL)


def test_torch_unireplknet_a_matches_the_reference() -> None:
    dims, kernels = (40, 80, 160, 320), ((3, 3), (13, 13), (13,) * 6, (13, 13))
    spec, ck, x, want = model_run("UniRepLKNet-A", unireplknet_model, dims=dims, kernel_sizes=kernels, deploy=False)
    assert_forms_match(spec, ck, x, want, TORCH_TOL, TORCH_TOL)


# ----------------------------------------------------------------------------- mutations


def map_reps(node: Node, fn: Callable[[Rep], Rep]) -> Node:
    """`node` with `fn` applied to every Rep inside it (through blocks and residual sums)."""
    if isinstance(node, Block):
        return replace(node, body=tuple(map_reps(n, fn) for n in node.body))
    if isinstance(node, Add):
        return Add(tuple(tuple(map_reps(n, fn) for n in b) for b in node.branches))
    return fn(node) if isinstance(node, Rep) else node


def _named(node: Node, name: str) -> bool:
    return getattr(node, "name", None) == name


def without_branch(conv_name: str) -> Callable[[Rep], Rep]:
    return lambda r: replace(r, branches=tuple(b for b in r.branches if not any(_named(n, conv_name) for n in b)))


def without(kind: type) -> Callable[[Rep], Rep]:
    return lambda r: replace(r, branches=tuple(tuple(n for n in b if not isinstance(n, kind)) for b in r.branches))


def norm_eps(eps: float) -> Callable[[Rep], Rep]:
    return lambda r: replace(r, bn=replace(r.bn, eps=eps)) if r.bn is not None and _named(r.bn, "norm") else r


MUTANTS: list[tuple[str, Callable[[Rep], Rep]]] = [
    ("dilated-branch-k3-r5-left-out", without_branch("dwconv.dil_conv_k3_5")),
    ("dilated-branch-k7-r2-left-out", without_branch("dwconv.dil_conv_k7_2")),
    ("norm-eps-1e-3", norm_eps(1e-3)),
    ("grn-beta-left-out", without(Bias)),
    ("layer-scale-left-out", without(Scale)),
]


@pytest.mark.parametrize("label,mutation", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_reference_rejects_a_mis_described_unireplknet_block(label: str, mutation: Callable[[Rep], Rep]) -> None:
    spec = official_block("UniRepLKNetBlock", 8, 13)
    ck = trained_like(official_checkpoint(spec, 2))
    x = random_input(8, size=(17, 16))
    want = unireplknet_block(ck, x, 8, 13)
    state, xs = as_numpy(ck), x.numpy()
    assert rel(forward(spec, state, xs, "train"), want) <= TOL
    mutant = map_reps(describe(spec), mutation)
    assert isinstance(mutant, Block) and mutant != describe(spec)
    # measured mutant errors: branch k3 r5 left out 0.61, k7 r2 0.37, norm eps 1e-3 4.2e-2, beta
    # left out 4.1e-4 (small next to the trained-like BNs' outputs, still 4e8 x TOL), gamma 2.1
    assert rel(forward(mutant, state, xs, "train"), want) > 100 * TOL
