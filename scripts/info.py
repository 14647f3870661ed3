"""`reparam info NAME`: a spec as a table, with parameters and MACs before and after fusion."""

from __future__ import annotations

import argparse
from collections import Counter

from reparam_core import count_macs, count_params, count_params_folded, get_spec
from reparam_core.blocks.nodes import SE, Add, Block, Conv, GlobalPool, Linear, Node, Rep, describe, walk


def _stage(path: str) -> str:
    """`stage1.0` -> `stage1`, `stage1.blocks.0` -> `stage1`, `blocks.3.0` -> `blocks.3`."""
    head, _, last = path.rpartition(".")
    if not last.isdigit():
        return path
    return head[: -len(".blocks")] if head.endswith(".blocks") else head


Layer = Conv | Linear


def _main_layers(node: Node) -> list[Layer]:
    """The convs and linears on a node's main path (a Rep counts as its fused layer; of an Add's
    chains, the one with the most layers, so a residual's identity or shortcut is not it)."""
    if isinstance(node, (Conv, Linear)):
        return [node]
    if isinstance(node, Rep):
        return [node.fused]
    if isinstance(node, Add):
        return max(([c for n in chain for c in _main_layers(n)] for chain in node.branches), key=len)
    if isinstance(node, Block):
        return [c for n in node.body for c in _main_layers(n)]
    return []


def _channels(layer: Layer) -> tuple[int, int]:
    """(in, out) channels of a conv or a linear."""
    if isinstance(layer, Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def _stride(layer: Layer) -> int:
    return 1 if isinstance(layer, Linear) else layer.stride[0]


def _group(layer: Layer) -> str:
    """`dw` for a depthwise conv, else the conv's group count (1 for a linear)."""
    if isinstance(layer, Linear):
        return "1"
    return "dw" if layer.groups == layer.out_channels > 1 else str(layer.groups)


def _modules(spec: object) -> list[tuple[str, Node]]:
    """(module, node) of the blocks and convs of the body, up to the global pool."""
    found: list[tuple[str, Node]] = []
    for node in describe(spec).body:  # type: ignore[arg-type]
        if isinstance(node, GlobalPool):
            break
        if isinstance(node, (Block, Conv)):
            module = node.name.rpartition(".")[0] if isinstance(node, Conv) else node.name
            found.append((module or node.name, node))
    return found


def _stages(spec: object) -> list[tuple[str, list[Node]]]:
    """Consecutive runs of nodes of one stage, named by it. A node whose stage would be the parent
    of other stages is a stage itself (FastViT's `network.1` between `network.0.*` and
    `network.2.*`); a stage that comes back after another is named by its run's first module
    (UniRepLKNet's `downsample_layers.1` between `stages.0` and `stages.1`)."""
    modules = _modules(spec)
    keys = {_stage(m) for m, _ in modules}
    runs: list[tuple[str, str, list[Node]]] = []
    for module, node in modules:
        stage = _stage(module)
        key = module if any(k.startswith(stage + ".") for k in keys) else stage
        if runs and runs[-1][0] == key:
            runs[-1][2].append(node)
        else:
            runs.append((key, module, [node]))
    recurring = Counter(key for key, _, _ in runs)
    return [(first if recurring[key] > 1 else key, nodes) for key, first, nodes in runs]


def _rows(spec: object) -> list[tuple[str, str, str, str, str]]:
    """(stage, blocks, channels, strides, groups) per stage of the body, up to the global pool."""
    rows = []
    for name, nodes in _stages(spec):
        layers = [ls for ls in (_main_layers(n) for n in nodes) if ls]
        if not layers:
            continue
        groups = Counter(_group(ls[0]) for ls in layers)
        strides = ",".join(str(max(_stride(layer) for layer in ls)) for ls in layers)
        se = any(isinstance(n, SE) for node in nodes for _, n in walk(node))
        rows.append(
            (
                name,
                str(len(nodes)),
                f"{_channels(layers[0][0])[0]}->{_channels(layers[-1][-1])[1]}",
                strides,
                " ".join(f"{g}x{n}" if len(groups) > 1 else g for g, n in groups.items()) + (" +SE" if se else ""),
            )
        )
    return rows


def format_info(name: str, size: int = 224) -> str:
    spec = get_spec(name)
    header = ("stage", "blocks", "channels", "strides", "groups")
    rows = [header] + _rows(spec)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"{spec.name} ({describe(spec).kind}, {spec.num_classes} classes)", ""]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    train, deploy = count_params(spec, "train"), count_params(spec, "deploy")
    lines += [
        "",
        f"{'':14}{'train form':>14}{'deploy form':>14}",
        f"{'parameters':14}{train / 1e6:>12.2f} M{deploy / 1e6:>12.2f} M",
        f"{'MACs @' + str(size):14}{count_macs(spec, 'train', size) / 1e9:>12.3f} G"
        f"{count_macs(spec, 'deploy', size) / 1e9:>12.3f} G",
    ]
    folded = count_params_folded(spec)
    if folded != deploy:
        lines.append(f"deploy form with every remaining conv+BN folded too: {folded / 1e6:.2f} M parameters")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="model name (see `reparam list`)")
    parser.add_argument("--size", type=int, default=224, help="input size for MACs (default 224)")


def run(args: argparse.Namespace) -> int:
    print(format_info(args.name, args.size))
    return 0
