"""--ema, --clip and --amp bf16 together (PyTorch): the run trains, the metrics carry the EMA
model's accuracy, and the final files hold the EMA weights (not the last step's)."""

from __future__ import annotations

import numpy as np
from train_testutil import metrics, run_train, trained

from reparam_core.formats.safetensors_io import load_file


def test_ema_clip_amp(tmp_path) -> None:
    out = tmp_path / "ema"
    run_train(out, "--max-steps", "4", "--global-batch", "16", "--ema", "0.5", "--clip", "1.0", "--amp", "bf16")
    record = metrics(out)[0]
    assert 0.0 <= record["val_acc_ema"] <= 1.0 and record["step"] == 4
    final, _ = trained(out)
    ckpt, _ = load_file(out / "checkpoint.safetensors")
    key = "stage2.1.rbr_dense.conv.weight"
    np.testing.assert_array_equal(final[key], ckpt[f"ema.{key}"])
    np.testing.assert_array_equal(
        final["stage1.0.rbr_dense.bn.running_var"], ckpt["ema.stage1.0.rbr_dense.bn.running_var"]
    )
    assert np.abs(ckpt[f"ema.{key}"] - ckpt[f"model.{key}"]).max() > 0  # EMA lags the weights
    assert any(k.startswith("opt.") for k in ckpt)  # momentum buffers are checkpointed
