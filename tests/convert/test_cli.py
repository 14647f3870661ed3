"""`reparam convert` on bad input: a clear message naming the problem, exit 1, no output file."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from backends.dispatch import predict_in
from reparam_core import get_spec, random_state, state_schema
from reparam_core.formats import convert as pipeline
from reparam_core.formats import encode, load_neutral, read_raw, safetensors_io
from reparam_core.formats.convert import convert
from scripts import convert as cv


def save(path, state):
    safetensors_io.save_file(state, path)
    return str(path)


def fails(tmp_path, capsys, argv, pattern, dst="out.safetensors", code=2):
    """Bad input exits 2, a failed --verify 1; either way nothing is written."""
    out = tmp_path / dst
    rc = cv.main([*map(str, argv[:1]), str(out), *argv[1:], "-q"])
    err = capsys.readouterr().err
    assert rc == code, err
    assert pattern.lower() in err.lower(), err
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    return err


def test_unknown_model(tmp_path, capsys, mini_train):
    src = save(tmp_path / "a.safetensors", mini_train)
    err = fails(tmp_path, capsys, [src, "--model", "RepVGG-A9"], "unknown model 'RepVGG-A9'")
    assert "did you mean" in err and "RepVGG-A0" in err


def test_other_architecture_shapes(tmp_path, capsys):
    a1 = random_state(get_spec("RepVGG-A1", 10), "train", 0)
    src = save(tmp_path / "a1.safetensors", a1)
    err = fails(tmp_path, capsys, [src, "--model", "RepVGG-A0"], "wrong shape for RepVGG-A0")
    assert "stage0.rbr_dense.conv.weight (64, 3, 3, 3) != (48, 3, 3, 3)" in err


def test_other_architecture_keys(tmp_path, capsys, mini_train):
    src = save(tmp_path / "mini.safetensors", mini_train)
    err = fails(tmp_path, capsys, [src, "--model", "RepVGG-A0"], "does not match RepVGG-A0")
    assert "missing key(s): stage1.1." in err


def test_missing_and_unexpected_keys(tmp_path, capsys, mini_train):
    state = dict(mini_train)
    del state["stage2.1.rbr_1x1.bn.running_mean"]
    state["stage2.1.extra.weight"] = np.zeros(3, np.float32)
    err = fails(
        tmp_path,
        capsys,
        [save(tmp_path / "a.safetensors", state), "--model", "RepVGG-mini"],
        "1 missing key(s): stage2.1.rbr_1x1.bn.running_mean",
    )
    assert "1 unexpected key(s): stage2.1.extra.weight" in err


def test_wrong_shape(tmp_path, capsys, mini_train):
    state = dict(mini_train)
    state["linear.weight"] = state["linear.weight"][:, :-1].copy()
    fails(
        tmp_path,
        capsys,
        [save(tmp_path / "a.safetensors", state), "--model", "RepVGG-mini"],
        "linear.weight (1000, 255) != (1000, 256)",
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf(tmp_path, capsys, mini_train, bad):
    state = dict(mini_train)
    state["stage1.0.rbr_dense.conv.weight"] = state["stage1.0.rbr_dense.conv.weight"].copy()
    state["stage1.0.rbr_dense.conv.weight"][0, 0, 1, 1] = bad
    fails(
        tmp_path,
        capsys,
        [save(tmp_path / "a.safetensors", state), "--model", "RepVGG-mini"],
        "stage1.0.rbr_dense.conv.weight holds 1 NaN or Inf",
    )


def test_negative_variance(tmp_path, capsys, mini_train):
    state = dict(mini_train)
    state["stage2.1.rbr_identity.running_var"] = state["stage2.1.rbr_identity.running_var"].copy()
    state["stage2.1.rbr_identity.running_var"][3] = -0.5
    fails(
        tmp_path,
        capsys,
        [save(tmp_path / "a.safetensors", state), "--model", "RepVGG-mini"],
        "stage2.1.rbr_identity.running_var is negative at channel 3",
    )


@pytest.mark.parametrize("ext", ["safetensors", "pkl", "pth"])
def test_truncated(tmp_path, capsys, mini_spec, mini_train, ext):
    data = encode(
        mini_spec, mini_train, "train", {"safetensors": "safetensors", "pkl": "megengine", "pth": "torch"}[ext]
    )
    src = tmp_path / f"a.{ext}"
    src.write_bytes(data[: len(data) * 2 // 3])
    fails(tmp_path, capsys, [src, "--model", "RepVGG-mini"], str(src))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    src = tmp_path / "evil.pkl"
    src.write_bytes(pickle.dumps({"stage0.rbr_dense.conv.weight": _RunsCode(str(marker))}))
    fails(tmp_path, capsys, [src, "--model", "RepVGG-mini"], "refusing to load posix.system from")
    assert not marker.exists()


def test_deploy_given_as_train(tmp_path, capsys, mini_deploy):
    src = save(tmp_path / "d.safetensors", mini_deploy)
    fails(
        tmp_path,
        capsys,
        [src, "--model", "RepVGG-mini", "--from-form", "train"],
        "this is a deploy-form checkpoint of RepVGG-mini, but a train-form one was expected",
    )


def test_train_given_as_deploy(tmp_path, capsys, mini_train):
    src = save(tmp_path / "t.safetensors", mini_train)
    fails(
        tmp_path,
        capsys,
        [src, "--model", "RepVGG-mini", "--from-form", "deploy"],
        "this is a train-form checkpoint of RepVGG-mini, but a deploy-form one was expected",
    )


def test_missing_source(tmp_path, capsys):
    fails(tmp_path, capsys, [tmp_path / "nope.pth", "--model", "RepVGG-mini"], "no such file")


def test_num_classes_zero_is_an_error_not_1000(tmp_path, capsys, mini_train):
    src = save(tmp_path / "t.safetensors", mini_train)
    fails(tmp_path, capsys, [src, "--model", "RepVGG-mini", "--num-classes", "0"], "num_classes must be >= 1, got 0")


def test_existing_destination_kept(tmp_path, capsys, mini_train):
    src = save(tmp_path / "t.safetensors", mini_train)
    dst = tmp_path / "out.pkl"
    dst.write_bytes(b"precious")
    rc = cv.main([src, str(dst), "--model", "RepVGG-mini", "-q"])
    assert rc == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert dst.read_bytes() == b"precious"
    assert cv.main([src, str(dst), "--model", "RepVGG-mini", "-q", "--overwrite"]) == 0
    assert dst.read_bytes() != b"precious"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_verify_failure_writes_nothing(tmp_path, capsys, monkeypatch, mini_train):
    src = save(tmp_path / "t.safetensors", mini_train)
    real = pipeline.reparameterize_state

    def broken(spec, state):
        out = real(spec, state)
        out["linear.bias"] = out["linear.bias"] + 1.0
        return out

    monkeypatch.setattr(pipeline, "reparameterize_state", broken)
    fails(tmp_path, capsys, [src, "--model", "RepVGG-mini", "--to-deploy", "--verify"], "verification failed", code=1)


def test_verify_ok_and_report(tmp_path, mini_train):
    src = save(tmp_path / "t.safetensors", mini_train)
    report = convert(src, tmp_path / "d.safetensors", "RepVGG-mini", to_deploy=True, verify=True, predict=predict_in)
    assert (report["from_form"], report["to_form"], report["to_format"]) == ("train", "deploy", "safetensors")
    assert report["verify"]["max_rel_err"] <= 1e-4


def test_module_entry_point(tmp_path, mini_train):
    src = save(tmp_path / "t.safetensors", mini_train)
    bad = subprocess.run(
        [sys.executable, "-m", "scripts.convert", src, str(tmp_path / "o.pth"), "--model", "RepVGG-mni"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert bad.returncode == 2 and "did you mean RepVGG-mini" in bad.stderr
    assert not (tmp_path / "o.pth").exists()
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.convert",
            src,
            str(tmp_path / "o.pth"),
            "--model",
            "RepVGG-mini",
            "--to-deploy",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert ok.returncode == 0, ok.stderr
    assert '"to_form": "deploy"' in ok.stdout and (tmp_path / "o.pth").exists()


def test_unknown_to_scheme(tmp_path, capsys, mini_train):
    src = save(tmp_path / "a.safetensors", mini_train)
    fails(
        tmp_path,
        capsys,
        [src, "--model", "RepVGG-mini", "--to-scheme", "onnx"],
        "RepVGG-mini has no 'onnx' naming scheme; known: canonical, basecls, mmpretrain, timm",
    )


def test_identity_scheme_writes_the_official_names(tmp_path, capsys):
    """timm names RepGhostNet as the official code does, so `--to-scheme timm` is accepted and
    writes the official keys, values unchanged; a scheme the family lacks still exits 2, naming
    the accepted ones."""
    spec = get_spec("repghostnet_0_5x")
    state = random_state(spec, "train", seed=3)
    src = save(tmp_path / "a.safetensors", state)
    dst = tmp_path / "timm.safetensors"
    assert cv.main([src, str(dst), "--model", "repghostnet_0_5x", "--to-scheme", "timm", "-q"]) == 0
    out, _ = safetensors_io.load_file(str(dst))
    assert set(out) == set(state_schema(spec, "train")) and len(out) == len(state)
    assert all(np.array_equal(out[k], state[k]) for k in state)
    fails(
        tmp_path,
        capsys,
        [src, "--model", "repghostnet_0_5x", "--to-scheme", "onnx"],
        "repghostnet_0_5x has no 'onnx' naming scheme; known: canonical, timm",
    )
    fails(
        tmp_path,
        capsys,
        [src, "--model", "repghostnet_0_5x", "--to-scheme", "mmpretrain"],
        "has no 'mmpretrain' naming scheme (mmpretrain does not implement this model's family); known: canonical, timm",
    )


@pytest.mark.parametrize(
    "scheme,fmt,first",
    [
        ("timm", "pth", "stem.conv_kxk.conv.weight"),
        ("mmpretrain", "safetensors", "backbone.stem.branch_3x3.conv.weight"),
        ("basecls", "pkl", "stage0.rbr_dense.conv.weight"),
    ],
)
def test_to_scheme_writes_foreign_names_and_reads_back(tmp_path, mini_spec, mini_train, scheme, fmt, first):
    """canonical -> foreign names on disk (the names another library loads) -> canonical again,
    values unchanged."""
    src = save(tmp_path / "a.safetensors", mini_train)
    dst = tmp_path / f"out.{fmt}"
    assert cv.main([src, str(dst), "--model", "RepVGG-mini", "--to-scheme", scheme, "-q"]) == 0
    raw, _ = read_raw(str(dst), {"pth": "torch", "pkl": "megengine"}.get(fmt, fmt))
    keys = list(raw)
    assert first in keys and "linear.weight" not in keys and "head.fc.weight" in keys
    assert len(keys) == len(mini_train)
    back, form, _, found = load_neutral(str(dst), mini_spec)
    assert form == "train" and found in (scheme, "timm", "mmpretrain")  # basecls == timm here
    assert all(np.array_equal(back[k], mini_train[k]) for k in mini_train)
