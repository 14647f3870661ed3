"""Speed of `backends.torch.fuse(train model)` against the library's hand-written deploy form
(`backends.torch.reparameterize`) of the same model: interleaved rounds, median of per-round
ratios (reparam_core/bench/timing.py). A benchmark, not a test.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/fuse_speed.py [--model RepVGG-A0] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import backends.torch as bt
from reparam_core import get_spec, random_state
from reparam_core.bench.timing import interleaved_times, paired_ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="RepVGG-A0")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    with torch.device("meta"):
        model = bt.create_model(a.model)
    model = bt.load_state(model.to_empty(device="cpu"), random_state(get_spec(a.model), "train", 0)).eval()
    x = torch.randn(a.batch, 3, a.size, a.size)
    fused = bt.fuse(model, x[:1]).eval()
    deploy = bt.reparameterize(model).eval()
    times = interleaved_times({"fuse": lambda: fused(x), "deploy": lambda: deploy(x)}, a.repeats)
    ratio = paired_ratio(times["fuse"], times["deploy"])
    print(
        f"{a.model} batch {a.batch} {a.size}x{a.size}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {a.repeats} interleaved rounds"
    )
    for k, v in times.items():
        print(f"  {k:7s} median {statistics.median(v) * 1e3:8.1f} ms")
    print(f"  fuse / deploy time ratio (median of per-round ratios): {ratio:.3f}")


if __name__ == "__main__":
    main()
