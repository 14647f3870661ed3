"""Interop with real torch files (needs torch: the .venv environment)."""

from __future__ import annotations

import numpy as np


def test_torch_save_read_without_torch_code(tmp_path):
    import torch

    from reparam_core.formats import read_raw

    x = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {
        "t": x.t(),
        "s": x[1:, 2:],
        "d": torch.ones(3, dtype=torch.float64),
        "n": torch.tensor(7),
        "p": torch.nn.Parameter(torch.full((2,), 0.5)),
    }
    torch.save({"model": sd}, tmp_path / "a.pt")
    raw, fmt = read_raw(tmp_path / "a.pt")
    assert fmt == "torch"
    for k, v in sd.items():
        assert np.array_equal(raw[k], v.detach().numpy()), k


def test_framework_free_zip_loads_in_torch(tmp_path, mini_train):
    import torch

    from reparam_core.formats.torch_zip import torch_zip_bytes

    (tmp_path / "m.pth").write_bytes(torch_zip_bytes(mini_train))
    loaded = torch.load(tmp_path / "m.pth", weights_only=True)
    assert list(loaded) == list(mini_train)
    assert all(np.array_equal(loaded[k].numpy(), v) for k, v in mini_train.items())


def test_verify_torch_against_oracle(tmp_path, mini_spec, mini_train):
    import torch

    from backends.dispatch import predict_in
    from reparam_core.formats.convert import convert

    torch.save({k: torch.from_numpy(v) for k, v in mini_train.items()}, tmp_path / "m.pth")
    report = convert(
        tmp_path / "m.pth", tmp_path / "d.safetensors", "RepVGG-mini", to_deploy=True, verify=True, predict=predict_in
    )
    assert report["verify"]["source"] == "torch/train"
    assert report["verify"]["max_rel_err"] <= 1e-4
