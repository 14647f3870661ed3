"""The description interpreted by Flax NNX: module paths, the walk of one scope, and one apply
rule per node type.

A scope is what one module (a block or model) interprets itself: its body (and a model's
auxiliary heads) down through Rep and Add branches, but not into nested Blocks, which are child
modules interpreting themselves. Every parameterised leaf lives at its dotted name inside the
scope's module (intermediate containers are nnx.Dict, so numbered children like `rbr_dense.0`
are path entries "0"); the parameter of a Scale or Bias node is a bare nnx.Param at its `key`
(on the scope's module itself when the node has no name); a scope with Dropout nodes has one
dropout stream at `dropout`. Activations are NHWC (N x C after a flatten): channels are last.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from reparam_core import SpecError
from reparam_core.blocks.nodes import (
    Act,
    Add,
    AvgPool,
    Bias,
    Block,
    Dropout,
    Flatten,
    GlobalPool,
    Model,
    Node,
    Rep,
    Scale,
    children,
)

from .layers import ACTIVATIONS, CHANNEL_PARAM_TYPES, LEAF_TYPES, Leaf, avg_pool, channel_vector, flatten, global_pool

DROPOUT = "dropout"
Lookup = Callable[[str], Any]
"""A scope's module (or, for a Scale or Bias key, parameter) at a dotted path."""


def module_at(root: nnx.Module, path: str) -> Any:
    """The module (or variable) at a dotted path below `root` (`root` itself for "")."""
    return functools.reduce(getattr, path.split("."), root) if path else root


def set_module(root: nnx.Module, path: str, module: nnx.Module | nnx.Variable[Any]) -> None:
    """Put `module` (or a bare variable) at a dotted path below `root`, creating nnx.Dict
    containers on the way."""
    *parents, name = path.split(".")
    node = root
    for part in parents:
        child = vars(node).get(part)
        if child is None:
            child = nnx.Dict()
            setattr(node, part, child)
        node = child
    setattr(node, name, module)


def scope_body(desc: Model | Block) -> tuple[Node, ...]:
    """The top-level nodes of a module's scope: a block's body, a model's body and aux heads."""
    if isinstance(desc, Model):
        return (*desc.body, *(n for aux in desc.aux for n in aux.body))
    return desc.body


def scope_nodes(body: Iterable[Node]) -> Iterator[Node]:
    """Every node of a scope in forward order, into Rep and Add branches, not into Blocks."""
    for node in body:
        yield node
        if isinstance(node, (Rep, Add)):
            yield from scope_nodes(children(node))


def module_paths(body: Iterable[Node]) -> list[str]:
    """The paths of the modules and parameters that the nodes of `body` read (leaves, blocks,
    Scale and Bias parameters, dropout)."""
    paths: dict[str, None] = {}
    for node in scope_nodes(body):
        if isinstance(node, (*LEAF_TYPES, Block)):
            paths[node.name] = None
        elif isinstance(node, CHANNEL_PARAM_TYPES):
            paths[node.key] = None
        elif isinstance(node, Dropout):
            paths[DROPOUT] = None
    return list(paths)


def run(nodes: Iterable[Node], x: jax.Array, get: Lookup) -> jax.Array:
    """A chain of nodes on x (the empty chain is the identity)."""
    for node in nodes:
        x = apply(node, x, get)
    return x


def _rep(node: Rep, x: jax.Array, get: Lookup) -> jax.Array:
    """[x if residual] + scale(bn(sum_i c_i branch_i(x))) (or the branches concatenated over
    channels, then the BN); a coefficient of 1 multiplies nothing."""
    outs = [run(branch, x, get) for branch in node.branches]
    if node.combine == "concat":
        y = jnp.concatenate(outs, axis=-1)
    else:
        terms = [o if node.coefficient(i) == 1.0 else node.coefficient(i) * o for i, o in enumerate(outs)]
        y = sum(terms[1:], terms[0])
    if node.bn is not None:
        y = _module(node.bn, y, get)
    if node.scale is not None:
        y = _channel(node.scale, y, get)
    return x + y if node.residual else y


def _channel(node: Scale | Bias, x: jax.Array, get: Lookup) -> jax.Array:
    """x * w[c] (Scale) or x + b[c] (Bias) over the last axis, the parameter at `node.key`."""
    v = channel_vector(get(node.key))
    return x * v if isinstance(node, Scale) else x + v


def _add(node: Add, x: jax.Array, get: Lookup) -> jax.Array:
    outs = [run(branch, x, get) for branch in node.branches]
    return sum(outs[1:], outs[0])


def _module(node: Leaf | Block, x: jax.Array, get: Lookup) -> jax.Array:
    return get(node.name)(x)


def apply(node: Node, x: jax.Array, get: Lookup) -> jax.Array:
    """The apply rule of the node's type; parameterised leaves and blocks are `get(name)`."""
    if isinstance(node, (*LEAF_TYPES, Block)):
        return _module(node, x, get)
    if isinstance(node, CHANNEL_PARAM_TYPES):
        return _channel(node, x, get)
    if isinstance(node, Act):
        return ACTIVATIONS[node.fn](x)
    if isinstance(node, AvgPool):
        return avg_pool(x, node)
    if isinstance(node, GlobalPool):
        return global_pool(x)
    if isinstance(node, Flatten):
        return flatten(x)
    if isinstance(node, Dropout):
        return get(DROPOUT)(x, node.p)
    if isinstance(node, Rep):
        return _rep(node, x, get)
    if isinstance(node, Add):
        return _add(node, x, get)
    raise SpecError(f"the flax backend has no apply rule for {type(node).__name__}")


@dataclass(frozen=True)
class Chain:
    """A run of plain nodes as a hashable function of (modules by path, x): a static argument
    of nnx.jit, equal (one compile) for equal runs."""

    nodes: tuple[Node, ...]

    def __call__(self, modules: dict[str, nnx.Module], x: jax.Array) -> jax.Array:
        return run(self.nodes, x, modules.__getitem__)


__all__ = [
    "DROPOUT",
    "Lookup",
    "module_at",
    "set_module",
    "scope_body",
    "scope_nodes",
    "module_paths",
    "run",
    "apply",
    "Chain",
]
