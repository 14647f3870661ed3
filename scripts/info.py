"""`reparam info NAME`: a spec as a table, with parameters and MACs before and after fusion."""

from __future__ import annotations

import argparse
from collections import Counter

from reparam_core import count_macs, count_params, count_params_folded, get_spec
from reparam_core.blocks.nodes import SE, Add, Block, Conv, GlobalPool, Node, Rep, describe, walk


def _stage(path: str) -> str:
    """`stage1.0` -> `stage1`, `stage1.blocks.0` -> `stage1`, `blocks.3.0` -> `blocks.3`."""
    head, _, last = path.rpartition(".")
    if not last.isdigit():
        return path
    return head[: -len(".blocks")] if head.endswith(".blocks") else head


def _main_convs(node: Node) -> list[Conv]:
    """The convs on a node's main path (a Rep counts as its fused conv)."""
    if isinstance(node, Conv):
        return [node]
    if isinstance(node, Rep):
        return [node.fused]
    if isinstance(node, Add):
        return [c for n in node.branches[0] for c in _main_convs(n)]
    if isinstance(node, Block):
        return [c for n in node.body for c in _main_convs(n)]
    return []


def _rows(spec: object) -> list[tuple[str, str, str, str, str]]:
    """(stage, blocks, channels, strides, groups) per stage of the body, up to the global pool."""
    stages: dict[str, list[Node]] = {}
    for node in describe(spec).body:  # type: ignore[arg-type]
        if isinstance(node, GlobalPool):
            break
        if isinstance(node, (Block, Conv)):
            module = node.name.rpartition(".")[0] if isinstance(node, Conv) else node.name
            stages.setdefault(_stage(module or node.name), []).append(node)
    rows = []
    for name, nodes in stages.items():
        convs = [_main_convs(n) for n in nodes]
        groups = Counter("dw" if c[0].groups == c[0].out_channels > 1 else str(c[0].groups) for c in convs)
        strides = ",".join(str(max(cv.stride[0] for cv in c)) for c in convs)
        se = any(isinstance(n, SE) for node in nodes for _, n in walk(node))
        rows.append(
            (
                name,
                str(len(nodes)),
                f"{convs[0][0].in_channels}->{convs[-1][-1].out_channels}",
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
