"""The description interpreted by Flax NNX: module paths, the walk of one scope, and one apply
rule per node type.

A scope is what one module (a block or model) interprets itself: its body (and a model's
auxiliary heads) down through Rep and Add branches, but not into nested Blocks, which are child
modules interpreting themselves. Every parameterised leaf lives at its dotted name inside the
scope's module (intermediate containers are nnx.Dict, so numbered children like `rbr_dense.0`
are path entries "0"); a scope with Dropout nodes has one dropout stream at `dropout`.
Activations are NHWC.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from reparam_core import SpecError
from reparam_core.blocks.nodes import Act, Add, AvgPool, Block, Dropout, Flatten, GlobalPool, Model, Node, Rep, children

from .layers import ACTIVATIONS, LEAF_TYPES, Leaf, avg_pool, flatten, global_pool

DROPOUT = "dropout"
Lookup = Callable[[str], nnx.Module]


def module_at(root: nnx.Module, path: str) -> nnx.Module:
    """The module at a dotted path below `root` (`root` itself for "")."""
    return functools.reduce(getattr, path.split("."), root) if path else root


def set_module(root: nnx.Module, path: str, module: nnx.Module) -> None:
    """Put `module` at a dotted path below `root`, creating nnx.Dict containers on the way."""
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
    """The paths of the modules that the nodes of `body` read (leaves, blocks, dropout)."""
    paths: dict[str, None] = {}
    for node in scope_nodes(body):
        if isinstance(node, (*LEAF_TYPES, Block)):
            paths[node.name] = None
        elif isinstance(node, Dropout):
            paths[DROPOUT] = None
    return list(paths)


def run(nodes: Iterable[Node], x: jax.Array, get: Lookup) -> jax.Array:
    """A chain of nodes on x (the empty chain is the identity)."""
    for node in nodes:
        x = apply(node, x, get)
    return x


def _rep(node: Rep, x: jax.Array, get: Lookup) -> jax.Array:
    outs = [run(branch, x, get) for branch in node.branches]
    y = jnp.concatenate(outs, axis=-1) if node.combine == "concat" else sum(outs[1:], outs[0])
    return y if node.bn is None else _module(node.bn, y, get)


def _add(node: Add, x: jax.Array, get: Lookup) -> jax.Array:
    outs = [run(branch, x, get) for branch in node.branches]
    return sum(outs[1:], outs[0])


def _module(node: Leaf | Block, x: jax.Array, get: Lookup) -> jax.Array:
    return get(node.name)(x)


def apply(node: Node, x: jax.Array, get: Lookup) -> jax.Array:
    """The apply rule of the node's type; parameterised leaves and blocks are `get(name)`."""
    if isinstance(node, (*LEAF_TYPES, Block)):
        return _module(node, x, get)
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
