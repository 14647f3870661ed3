"""The measurement behind backends.flax.layers.conv_path: XLA's grouped convolution against the
shifted multiply-add and per-group dense formulations, under jit, NHWC float32, batch 8.

    PYTHONPATH=. .venv/bin/python -m benchmarks.conv_paths
"""

from __future__ import annotations

import time

import jax
import numpy as np

from backends.flax.layers import NHWC_HWIO, shifted_conv, split_conv

# (size, channels, kernel, stride, groups)
CASES = [
    (56, 120, 3, 1, 120),
    (28, 240, 3, 2, 240),
    (14, 480, 5, 1, 480),
    (7, 960, 3, 1, 960),
    (28, 128, 3, 1, 64),
    (28, 128, 3, 1, 32),
    (28, 128, 3, 1, 16),
    (28, 128, 3, 1, 8),
    (56, 64, 3, 1, 4),
    (56, 64, 3, 1, 2),
    (14, 256, 1, 1, 4),
]


def median_ms(fn, *args, repeats: int = 5) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main() -> None:
    rng = np.random.default_rng(0)
    print("size channels k stride groups | xla ms | shift ms | split ms")
    for size, c, k, s, g in CASES:
        x = rng.standard_normal((8, size, size, c), dtype=np.float32)
        w = rng.standard_normal((k, k, c // g, c), dtype=np.float32)
        args = ((s, s), ((k // 2, k // 2),) * 2, (1, 1), g)
        xla = jax.jit(
            lambda x, w, a=args, g=g: jax.lax.conv_general_dilated(
                x, w, a[0], a[1], dimension_numbers=NHWC_HWIO, feature_group_count=g
            )
        )
        row = [median_ms(xla, x, w)]
        row.append(median_ms(lambda x, w, a=args: shifted_conv(x, w, *a), x, w) if c // g <= 16 else None)
        row.append(median_ms(lambda x, w, a=args: split_conv(x, w, *a), x, w) if g <= 16 else None)
        cells = " | ".join("-" if v is None else f"{v:.2f}" for v in row)
        print(f"{size} {c} {k} {s} {g} | {cells}", flush=True)


if __name__ == "__main__":
    main()
