"""Shared pieces of the independent family references (tests/families/test_reference_*.py).

A reference is the official train-form forward of one official block class, written in plain
torch functional code from the official semantics, reading an official-style checkpoint by its
official key names. It never reads the library's description, oracle or fusion. This module
holds only what every reference shares: the checkpoint, the eval-mode BN, running the library's
train and deploy forms on that checkpoint, and the description mutations used to show that a
reference notices a family described wrongly (the mutated copy must disagree with it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

import backends.torch as bt
from reparam_core import Block, block_schema, describe
from reparam_core.blocks.nodes import BN, Add, Branch, Node, PadBN, Rep, SpecLike

Checkpoint = dict[str, torch.Tensor]


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


def library_forms(spec: SpecLike, ck: Checkpoint, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The library's torch train-form block loaded with `ck` (strict: every key) and its
    re-parameterized deploy form, both run in eval mode on `x` (float32)."""
    block = bt.load_state(bt.build_block(spec), {k: v.numpy().astype(np.float32) for k, v in ck.items()})
    xs = x.numpy().astype(np.float32)
    return bt.predict(block, xs), bt.predict(bt.reparameterize(block), xs)


def rel_err(got: np.ndarray, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|."""
    want = ref.detach().numpy()
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


# ----------------------------------------------------------------------------- mutations


def _map_nodes(node: Node, fn: Callable[[Node], Node]) -> Node:
    """`fn` applied bottom-up to every node under (and including) `node`."""
    if isinstance(node, Block):
        node = replace(node, body=tuple(_map_nodes(n, fn) for n in node.body))
    elif isinstance(node, Rep):
        branches = tuple(tuple(_map_nodes(n, fn) for n in b) for b in node.branches)
        rep_bn = fn(node.bn) if node.bn is not None else None
        node = Rep(branches, node.fused, rep_bn, node.combine)  # type: ignore[arg-type]
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
        name = getattr(node, "name", None)
        if name == a:
            return replace(node, name=b)  # type: ignore[type-var]
        if name == b:
            return replace(node, name=a)  # type: ignore[type-var]
        return node

    return mutate(spec, fn)


def set_eps(spec: SpecLike, name: str, eps: float) -> Block:
    """The block with the BN (or padding-aware BN) named `name` given epsilon `eps`."""

    def fn(node: Node) -> Node:
        if isinstance(node, (BN, PadBN)) and node.name == name:
            return replace(node, eps=eps)
        return node

    return mutate(spec, fn)


def mutant_train_output(mutant: Block, ck: Checkpoint, x: torch.Tensor) -> np.ndarray:
    """The library's train form of a mutated description on the same checkpoint (its keys must
    be the original's: the mutations above keep them)."""
    return library_forms(mutant, ck, x)[0]
