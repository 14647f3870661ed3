"""Weights between implementations, as neutral numpy states (canonical names, OIHW, float32).

- `keymaps`: other implementations' names (timm, mmpretrain, basecls) <-> canonical, as data.
- `layouts`: kernel layouts, PyTorch OIHW <-> MegEngine 5-D grouped and Flax HWIO.
- `state`: the neutral state checked against a model (keys, shapes, finiteness, BN variance),
  and random states for tests.
- `precision`: fused weights rounded once to float16 or bfloat16.
"""
