"""`reparam`'s exit codes, decided once in scripts/cli.py: every subcommand answers bad input with
exit 2 and one line on stderr naming the file, key or value at fault, no traceback, and no output
file left behind. Each case fails on argument or file validation (no training, no benchmark), so
the file runs in seconds; a subcommand without a case here fails test_every_command_has_a_case."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from reparam_core import get_spec, random_state
from reparam_core.formats.safetensors_io import save_file
from reparam_core.weights.keymaps import from_canonical
from scripts.cli import build_parser, main

# (command, argv builder given a scratch folder, texts the message must quote, paths that must not
# exist afterwards)
Case = tuple[str, Callable[[Path], list[str]], tuple[str, ...], tuple[str, ...]]


def _timm_checkpoint(tmp: Path) -> str:
    """RepVGG-mini's train form in timm's names, one key renamed as a user's file might have it."""
    state = from_canonical(random_state(get_spec("RepVGG-mini"), "train", seed=0), get_spec("RepVGG-mini"), "timm")
    state["stem.conv_kxk.0.weight"] = state.pop("stem.conv_kxk.conv.weight")
    save_file(state, tmp / "timm.safetensors")
    return str(tmp / "timm.safetensors")


def _mini_checkpoint(tmp: Path) -> str:
    save_file(random_state(get_spec("RepVGG-mini"), "train", seed=0), tmp / "mini.safetensors")
    return str(tmp / "mini.safetensors")


def _garbage(tmp: Path, name: str) -> str:
    (tmp / name).write_bytes(b"not a model\n")
    return str(tmp / name)


CASES: list[Case] = [
    ("list", lambda t: ["list", "--bogus"], ("--bogus",), ()),
    ("info", lambda t: ["info", "repvgg_a9"], ("'repvgg_a9'", "RepVGG-A0"), ()),
    ("info", lambda t: ["info", "RepVGG-A0", "--size", "0"], ("size", "0"), ()),
    (
        "convert",
        lambda t: ["convert", str(t / "missing.pt"), str(t / "out.safetensors"), "-m", "RepVGG-mini"],
        ("missing.pt",),
        ("out.safetensors",),
    ),
    (
        "convert",
        lambda t: ["convert", _timm_checkpoint(t), str(t / "out.safetensors"), "-m", "RepVGG-mini"],
        ("timm.safetensors", "stem.conv_kxk.0.weight", "stem.conv_kxk.conv.weight"),
        ("out.safetensors",),
    ),
    (
        "convert",
        lambda t: ["convert", _timm_checkpoint(t), str(t / "out.safetensors"), "-m", "RepVGG-Z0"],
        ("'RepVGG-Z0'",),
        ("out.safetensors",),
    ),
    ("verify", lambda t: ["verify", "--backends", "tf", "--json", str(t / "v.json")], ("'tf'",), ("v.json",)),
    (
        "verify",
        lambda t: ["verify", "--models", "nosuch", "--no-blocks", "--json", str(t / "v.json")],
        ("'nosuch'",),
        ("v.json",),
    ),
    (
        "bench",
        lambda t: ["bench", "--models", "RepVGG-A0,nosuch", "--backends", "torch", "--json", str(t / "b.json")],
        ("'nosuch'",),
        ("b.json",),
    ),
    ("bench", lambda t: ["bench", "--batch", "0", "--backends", "torch"], ("--batch", "0"), ()),
    (
        "quantize",
        lambda t: ["quantize", str(t / "missing.pt"), str(t / "q.onnx"), "-m", "RepVGG-mini", "--calib", "digits"],
        ("missing.pt",),
        ("q.onnx",),
    ),
    (
        "quantize",
        lambda t: [
            "quantize",
            _mini_checkpoint(t),
            str(t / "q.onnx"),
            "-m",
            "RepVGG-mini",
            "--calib",
            str(t / "no-images"),
        ],
        ("no-images",),
        ("q.onnx",),
    ),
    ("demo", lambda t: ["demo", "--model", "nosuch", "--out", str(t / "demo")], ("'nosuch'",), ("demo",)),
    ("demo", lambda t: ["demo", "--epochs", "0", "--out", str(t / "demo")], ("--epochs",), ("demo",)),
    (
        "demo",
        lambda t: ["demo", "--model", "repvgg_a0", "--no-train", "--out", str(t / "demo")],
        ("RepVGG-A0", "--no-train"),
        ("demo",),
    ),  # only RepVGG-mini's checkpoint is shipped
    ("fuse", lambda t: ["fuse", _garbage(t, "g.onnx"), str(t / "fused.onnx")], ("g.onnx",), ("fused.onnx",)),
    ("fuse", lambda t: ["fuse", str(t / "missing.onnx"), str(t / "fused.onnx")], ("missing.onnx",), ("fused.onnx",)),
    (
        "train",
        lambda t: ["train", "--model", "nosuch", "--out", str(t / "run"), "--max-steps", "1"],
        ("'nosuch'",),
        ("run",),
    ),
    (
        "train",
        lambda t: [
            "train",
            "--model",
            "RepVGG-mini",
            "--data",
            str(t / "no-images"),
            "--out",
            str(t / "run"),
            "--max-steps",
            "1",
        ],
        ("no-images",),
        ("run",),
    ),
]


def _reparam(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `reparam ARGV` run in this process."""
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own errors exit from parse_args
        status = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


def _subcommands() -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_every_command_has_a_case() -> None:
    assert _subcommands() <= {c[0] for c in CASES}


@pytest.mark.parametrize(
    ("command", "argv", "quoted", "absent"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_bad_input_exits_2_with_one_line(command, argv, quoted, absent, tmp_path, capsys) -> None:
    args = argv(tmp_path)
    before = set(tmp_path.iterdir())
    status, _, err = _reparam(capsys, args)
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    # argparse reports arguments no subcommand takes as the top-level parser (`reparam: error:`)
    assert lines[0].startswith((f"reparam {command}: error: ", "reparam: error: unrecognized arguments"))
    assert "Traceback" not in err
    for text in quoted:
        assert text in lines[0], lines[0]
    for name in absent:
        assert not (tmp_path / name).exists(), name
    assert set(tmp_path.iterdir()) == before  # nothing else written either


def test_aliases_work_and_unknown_names_suggest_close_ones(capsys) -> None:
    status, out, _ = _reparam(capsys, ["info", "repvgg_a0"])
    assert status == 0 and out.startswith("RepVGG-A0 ")
    status, _, err = _reparam(capsys, ["info", "RepVGG_A3"])
    assert status == 2 and "did you mean" in err and "RepVGG-A2" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "{t}/missing.pt", "{t}/out.safetensors", "-m", "repvgg_a0"],
        ["quantize", "{t}/missing.pt", "{t}/q.onnx", "-m", "repvgg_a0", "--calib", "digits"],
        ["train", "--model", "repvgg_a0", "--data", "{t}/no-images", "--out", "{t}/run"],
        ["bench", "--models", "repvgg_a0,repghostnet_100,nosuch", "--backends", "torch"],
    ],
    ids=lambda a: a[0],
)
def test_every_model_argument_takes_aliases(argv, tmp_path, capsys) -> None:
    """The alias gets past the model check: the error is about the next thing checked."""
    status, _, err = _reparam(capsys, [a.format(t=tmp_path) for a in argv])
    assert status == 2 and "Traceback" not in err
    assert "repvgg_a0" not in err and "repghostnet_100" not in err
    assert "missing.pt" in err or "no-images" in err or "'nosuch'" in err, err


def test_verification_failure_exits_1(tmp_path, capsys, monkeypatch) -> None:
    """A check that ran and failed is 1, not 2, with the same one-line message."""
    import scripts.convert as cv
    from reparam_core.errors import VerificationError

    def fail(*args, **kwargs):
        raise VerificationError("outputs differ: max relative error 1 > 1e-4")

    monkeypatch.setattr(cv, "convert", fail)
    src = tmp_path / "a.safetensors"
    save_file({"x": np.zeros(1, np.float32)}, src)
    status, _, err = _reparam(
        capsys, ["convert", str(src), str(tmp_path / "b.safetensors"), "-m", "RepVGG-mini", "--verify"]
    )
    assert status == 1 and err.strip() == "reparam convert: error: outputs differ: max relative error 1 > 1e-4"


def test_fuse_verification_failure_exits_1_without_output(tmp_path, capsys, monkeypatch) -> None:
    import onnx
    from onnx import TensorProto, helper

    import backends.onnx as bo

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
    )
    src = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    monkeypatch.setattr(bo, "verify", lambda a, b: 0.5)
    status, out, err = _reparam(capsys, ["fuse", str(src), str(tmp_path / "fused.onnx"), "--verify"])
    assert status == 1 and "verify: max relative error 0.5" in out
    assert err.strip().splitlines() == [
        f"reparam fuse: error: {tmp_path / 'fused.onnx'} not written: the fused "
        "graph's max relative error 0.5 is above 1e-05"
    ]
    assert not (tmp_path / "fused.onnx").exists()


def test_verify_above_tolerance_exits_1_after_the_table(tmp_path, capsys, monkeypatch) -> None:
    import scripts.verify as vf
    from parity_tests.harness import CaseResult

    monkeypatch.setattr(
        vf,
        "run_case",
        lambda case, runners, artifacts=False: CaseResult(
            case, tolerance=1e-5, oracle_seconds=0.0, errors={("torch", "train"): 0.5}
        ),
    )
    status, out, err = _reparam(
        capsys,
        ["verify", "--models", "RepVGG-mini", "--no-blocks", "--backends", "torch", "--json", str(tmp_path / "v.json")],
    )
    assert status == 1 and "RepVGG-mini" in out and (tmp_path / "v.json").exists()
    assert err.strip().splitlines()[-1] == (
        "reparam verify: error: 1 of 1 case(s) failed or exceed their tolerance: RepVGG-mini"
    )


def test_bench_with_a_backend_unavailable_exits_2(capsys, monkeypatch) -> None:
    import scripts.bench as bench
    from reparam_core.errors import BackendUnavailableError

    def unavailable(backend, config, bar):
        raise BackendUnavailableError(f"{backend} is not installed here")

    monkeypatch.setattr(bench, "run_backend", unavailable)
    status, _, err = _reparam(capsys, ["bench", "--models", "RepVGG-mini", "--backends", "torch"])
    assert status == 2 and "torch: unavailable: torch is not installed here" in err
    assert err.strip().splitlines()[-1] == (
        "reparam bench: error: not benchmarked in torch (unavailable here; the reason is above)"
    )
