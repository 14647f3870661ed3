"""Shared pieces of the independent family references (tests/families/test_reference_*.py).

A reference is the official train-form forward of one official block class, written in plain
torch functional code from the official semantics, reading an official-style checkpoint by its
official key names. It never reads the library's description, oracle or fusion. This module
holds only what the references share: the checkpoint (and its trained-like variant, a nested
block's part of it), the eval-mode BN and conv read from it, running the library's train and
deploy forms on that checkpoint and comparing them with a reference, and the description
mutations used to show that a reference notices a family described wrongly (the mutated copy
must disagree with it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import backends.torch as bt
from reparam_core import Block, block_schema, describe, get_spec, official_block
from reparam_core.blocks.nodes import (
    BN,
    SE,
    Add,
    AvgPool,
    Branch,
    Conv,
    Linear,
    Node,
    PadBN,
    Primitive,
    Rep,
    Scale,
    SpecLike,
)

Checkpoint = dict[str, torch.Tensor]
Reference = Callable[..., torch.Tensor]  # reference(ck, x, **official constructor arguments)
Run = tuple[SpecLike, Checkpoint, torch.Tensor, torch.Tensor]  # spec, checkpoint, input, reference output


def official_checkpoint(spec: SpecLike, seed: int) -> Checkpoint:
    """Random float64 tensors for every train-form key of `spec` (keys checked against the
    official ones in test_official_blocks.py): weights N(0, 1) / sqrt(fan-in), BN gamma in
    [0.5, 1.5], beta and running mean N(0, 0.5), running var in [0.5, 2]: far from the defaults,
    so a BN read under the wrong name, or left out, changes the output."""
    g = torch.Generator().manual_seed(seed)
    out: Checkpoint = {}
    for key, arr in sorted(block_schema(spec, "train").items()):
        shape = tuple(arr.shape)
        if key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g, dtype=torch.float64) * 1.5 + 0.5
        elif key.endswith(("running_mean", "bias")):
            out[key] = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
        elif key.endswith("weight") and len(shape) == 1:
            out[key] = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            out[key] = torch.randn(shape, generator=g, dtype=torch.float64) / fan_in**0.5
    return out


def trained_like(ck: Checkpoint) -> Checkpoint:
    """`ck` with every running variance scaled by 1/100 (to [0.005, 0.02]), as trained BNs often
    have: a wrong epsilon then shifts gamma / sqrt(var + eps) by percents, as it does in practice."""
    return {k: v / 100 if k.endswith("running_var") else v for k, v in ck.items()}


def block_prefix(ck: Checkpoint, module: str) -> Checkpoint:
    """The entries of `ck` under the module `module` ('stage1.0', 'ghost1'), keyed relative to it."""
    prefix = f"{module}."
    return {k[len(prefix) :]: v for k, v in ck.items() if k.startswith(prefix)}


def conv(
    ck: Checkpoint,
    key: str,
    x: torch.Tensor,
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    dilation: int = 1,
    *,
    bias: bool | None = None,
) -> torch.Tensor:
    """nn.Conv2d: F.conv2d with `key.weight` and, by default, `key.bias` where the checkpoint has
    one. A reference that states the official conv's `bias` reads it strictly instead: True, the
    bias must be there (a KeyError otherwise); False, none is read (one in the checkpoint then
    makes the library disagree with the reference)."""
    b = ck.get(f"{key}.bias") if bias is None else ck[f"{key}.bias"] if bias else None
    return F.conv2d(x, ck[f"{key}.weight"], b, stride, padding, dilation, groups)


def bn(ck: Checkpoint, prefix: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    """nn.BatchNorm2d in eval mode, its four tensors read from `ck` under `prefix`."""
    return F.batch_norm(
        x,
        ck[f"{prefix}.running_mean"],
        ck[f"{prefix}.running_var"],
        ck[f"{prefix}.weight"],
        ck[f"{prefix}.bias"],
        False,
        0.0,
        eps,
    )


def random_input(channels: int, seed: int = 1, size: tuple[int, int] = (9, 8), batch: int = 2) -> torch.Tensor:
    """A float64 NCHW input (odd and even sides, so stride and padding mistakes show)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *size, generator=g, dtype=torch.float64)


def _train_block(spec: SpecLike, ck: Checkpoint) -> bt.RepModule:
    """The library's torch train-form block loaded with `ck` (strict: every key)."""
    return bt.load_state(bt.build_block(spec), {k: v.numpy().astype(np.float32) for k, v in ck.items()})


def library_train(spec: SpecLike, ck: Checkpoint, x: torch.Tensor) -> np.ndarray:
    """The library's torch train-form block loaded with `ck`, run in eval mode on `x` (float32)."""
    return bt.predict(_train_block(spec, ck), x.numpy().astype(np.float32))


def library_forms(spec: SpecLike, ck: Checkpoint, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The library's torch train-form block loaded with `ck` (strict: every key) and its
    re-parameterized deploy form, both run in eval mode on `x` (float32)."""
    block = _train_block(spec, ck)
    xs = x.numpy().astype(np.float32)
    return bt.predict(block, xs), bt.predict(bt.reparameterize(block), xs)


def official_run(
    cls: str,
    kwargs: dict[str, Any],
    reference: Reference,
    seed: int,
    stats: Callable[[Checkpoint], Checkpoint] = dict,
) -> Run:
    """The registry's block for the official class `cls(**kwargs)`, a random official checkpoint
    for it (`seed`, then `stats` applied, e.g. trained_like), a random input of
    `kwargs["in_channels"]` channels, and the reference's output on them."""
    spec = official_block(cls, **kwargs)
    ck = stats(official_checkpoint(spec, seed))
    x = random_input(kwargs["in_channels"])
    return spec, ck, x, reference(ck, x, **kwargs)


def model_run(name: str, reference: Reference, **kwargs: Any) -> Run:
    """The registry's model `name` (10 classes), a random official checkpoint for it (seed 3),
    one 32 x 32 RGB input (seed 4), and the reference's output on them (`kwargs`: the official
    model arguments the reference takes)."""
    spec = get_spec(name, num_classes=10)
    ck = official_checkpoint(spec, 3)
    x = random_input(3, seed=4, size=(32, 32), batch=1)
    return spec, ck, x, reference(ck, x, **kwargs)


def rel_err(got: np.ndarray, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|."""
    want = ref.detach().numpy()
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def assert_forms_match(
    spec: SpecLike, ck: Checkpoint, x: torch.Tensor, want: torch.Tensor, train_tol: float, deploy_tol: float
) -> None:
    """The library's train form (loaded with `ck`) is within `train_tol` of the reference output
    `want` on `x`, and its deploy form within `deploy_tol` (relative errors, see rel_err)."""
    train, deploy = library_forms(spec, ck, x)
    train_err, deploy_err = rel_err(train, want), rel_err(deploy, want)
    assert train_err <= train_tol and deploy_err <= deploy_tol, (
        f"relative error to the reference: train form {train_err:.3g} (tolerance {train_tol:.3g}), "
        f"deploy form {deploy_err:.3g} (tolerance {deploy_tol:.3g})"
    )


# ----------------------------------------------------------------------------- mutations


def _primitive(node: Node) -> Primitive:
    """`node`, checked to be a primitive (what a Rep branch may hold)."""
    if not isinstance(node, (Conv, BN, PadBN, AvgPool, Scale)):
        raise TypeError(f"a mutation must keep a Rep branch's nodes primitives, got {type(node).__name__}")
    return node


def _map_nodes(node: Node, fn: Callable[[Node], Node]) -> Node:
    """`fn` applied bottom-up to every node under (and including) `node`."""
    if isinstance(node, Block):
        node = replace(node, body=tuple(_map_nodes(n, fn) for n in node.body))
    elif isinstance(node, Rep):
        branches = tuple(tuple(_primitive(_map_nodes(n, fn)) for n in b) for b in node.branches)
        rep_bn = fn(node.bn) if node.bn is not None else None
        if rep_bn is not None and not isinstance(rep_bn, BN):
            raise TypeError(f"a mutation must keep a Rep's BN a BN, got {type(rep_bn).__name__}")
        node = Rep(branches, node.fused, rep_bn, node.combine)
    elif isinstance(node, Add):
        node = Add(tuple(tuple(_map_nodes(n, fn) for n in b) for b in node.branches))
    return fn(node)


def mutate(spec: SpecLike, fn: Callable[[Node], Node]) -> Block:
    """A copy of the block's train-form description with `fn` applied to every node."""
    desc = describe(spec)
    if not isinstance(desc, Block):
        raise TypeError(f"mutate takes a block, got {type(desc).__name__}")
    out = _map_nodes(desc, fn)
    if not isinstance(out, Block):
        raise TypeError("a mutation must keep the block a Block")
    return out


def drop_branches(spec: SpecLike, drop: Callable[[Branch], bool]) -> Block:
    """The block with every Rep branch for which `drop(branch)` holds left out."""

    def fn(node: Node) -> Node:
        if isinstance(node, Rep):
            kept = tuple(b for b in node.branches if not drop(b))
            return Rep(kept, node.fused, node.bn, node.combine)
        return node

    return mutate(spec, fn)


def swap_names(spec: SpecLike, a: str, b: str) -> Block:
    """The block with the nodes named `a` and `b` (same type and shape, e.g. two BNs) swapped:
    each now reads the other's tensors."""

    def fn(node: Node) -> Node:
        if isinstance(node, (Conv, BN, PadBN, Scale, SE, Linear, Block)) and node.name in (a, b):
            return replace(node, name=b if node.name == a else a)
        return node

    return mutate(spec, fn)


def set_eps(spec: SpecLike, name: str, eps: float) -> Block:
    """The block with the BN (or padding-aware BN) named `name` given epsilon `eps`."""

    return set_eps_all(spec, (name,), eps)


def set_eps_all(spec: SpecLike, names: tuple[str, ...], eps: float) -> Block:
    """The block with every BN (or padding-aware BN) named in `names` given epsilon `eps`."""
    return mutate(spec, lambda n: replace(n, eps=eps) if isinstance(n, (BN, PadBN)) and n.name in names else n)


def assert_mutant_caught(
    mutant: Block,
    spec: SpecLike,
    ck: Checkpoint,
    x: torch.Tensor,
    want: torch.Tensor,
    tol: float,
    factor: float = 100,
) -> None:
    """The library's train form of `spec` (loaded with `ck`) is within `tol` of the reference
    output `want` on `x`, and that of the mis-described copy `mutant` (same keys: the mutations
    above keep them) more than `factor` x `tol` away: the reference tells the two apart."""
    err = rel_err(library_train(spec, ck, x), want)
    assert err <= tol, f"the unmutated train form is {err:.3g} from the reference (tolerance {tol:.3g})"
    mutant_err = rel_err(library_train(mutant, ck, x), want)
    assert mutant_err > factor * tol, (
        f"the mutant is only {mutant_err:.3g} from the reference, not above {factor:g} x {tol:.3g} "
        f"(unmutated: {err:.3g})"
    )
