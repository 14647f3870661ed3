"""Torch-specific block checks (the block matrix against the oracle runs for every backend in
tests/backends)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import backends.torch as bt


def test_repconv_uses_yolov7_names_silu_and_spec_eps() -> None:
    block = bt.build_block(bt.repconv_spec(8, 8))
    assert {"rbr_dense.0.weight", "rbr_dense.1.running_var", "rbr_1x1.0.weight", "rbr_identity.weight"} <= set(
        block.state_dict()
    )
    assert block.rbr_dense[1].eps == 1e-3 and block.rbr_identity.eps == 1e-3
    deploy = block.reparameterize()
    assert set(deploy.state_dict()) == {"rbr_reparam.weight", "rbr_reparam.bias"}
    # the activation is SiLU: the deploy block is exactly silu(rbr_reparam(x))
    x = torch.randn(2, 8, 7, 9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), F.silu(deploy.rbr_reparam(x)), rtol=0, atol=0)
