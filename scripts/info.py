"""`reparam info NAME`: a spec as a table, with parameters and MACs before and after fusion."""
from __future__ import annotations

import argparse
from collections import Counter

from reparam_core import count_macs, count_params, count_params_folded, get_spec
from reparam_core.specs import ModelSpec, RepGhostNetSpec, RepVGGSpec


def _rows(spec: ModelSpec) -> list[tuple[str, str, str, str, str]]:
    """(stage, blocks, channels, strides, groups) per stage."""
    if isinstance(spec, RepVGGSpec):
        stages = [("stage0", (spec.stem,))] + [(s.name, s.blocks) for s in spec.stages]
        rows = []
        for name, blocks in stages:
            groups = Counter(b.groups for b in blocks)
            rows.append((name, str(len(blocks)), f"{blocks[0].in_channels}->{blocks[-1].out_channels}",
                         ",".join(str(b.stride) for b in blocks),
                         " ".join(f"{g}x{n}" if len(groups) > 1 else str(g) for g, n in groups.items())
                         + (" +SE" if blocks[0].se != "none" else "")))
        return rows
    assert isinstance(spec, RepGhostNetSpec)
    rows = [("stem", "1", f"3->{spec.stem_channels}", "2", "1")]
    for i, stage in enumerate(spec.stages):
        rows.append((f"blocks.{i}", str(len(stage)), f"{stage[0].in_channels}->{stage[-1].out_channels}",
                     ",".join(str(b.stride) for b in stage),
                     "dw" + (" +SE" if any(b.se_channels for b in stage) else "")))
    rows.append((f"blocks.{len(spec.stages)}", "1", f"{spec.last_in_channels}->{spec.last_channels}", "1", "1"))
    return rows


def format_info(name: str, size: int = 224) -> str:
    spec = get_spec(name)
    header = ("stage", "blocks", "channels", "strides", "groups")
    rows = [header] + _rows(spec)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"{spec.name} ({spec.family}, {spec.num_classes} classes)", ""]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    train, deploy = count_params(spec, "train"), count_params(spec, "deploy")
    lines += ["", f"{'':14}{'train form':>14}{'deploy form':>14}",
              f"{'parameters':14}{train / 1e6:>12.2f} M{deploy / 1e6:>12.2f} M",
              f"{'MACs @' + str(size):14}{count_macs(spec, 'train', size) / 1e9:>12.3f} G"
              f"{count_macs(spec, 'deploy', size) / 1e9:>12.3f} G"]
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
