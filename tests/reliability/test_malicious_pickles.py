"""No code execution: a corpus of malicious pickles (protocols 0-5, plain and inside a torch zip
as data.pkl) is refused by every reader and by the CLI, nothing runs (a marker file is never
created) and the error names what the file tried to load (`module.name`)."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import subprocess
import sys
import zipfile

import pytest

from reparam_core.errors import UnsafeFileError
from reparam_core.formats import read_raw
from reparam_core.formats.convert import convert
from reparam_core.formats.megengine_pickle import read_pickle
from reparam_core.formats.pickle_safe import safe_loads
from reparam_core.formats.torch_zip import read_torch
from scripts import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Call:
    """Pickles as `fn(*args)`; callable so that it can itself be the function of another Call."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)

    def __call__(self, *a):  # pragma: no cover - only pickled, never called here
        raise AssertionError("never called")


def attacks(marker: str) -> dict[str, tuple[object, str]]:
    """name -> (object whose pickle runs `touch marker`, the module.name the error must show)."""
    import subprocess as sp

    shell = f"touch {marker}"
    py = f"__import__('os').system({shell!r})"
    return {
        "os.system": (Call(os.system, shell), f"{os.system.__module__}.system"),
        "eval": (Call(builtins.eval, py), "builtins.eval"),
        "exec": (Call(builtins.exec, py), "builtins.exec"),
        "popen": (Call(sp.Popen, ["touch", marker]), "subprocess.Popen"),
        "getattr-chain": (
            Call(Call(builtins.getattr, Call(builtins.__import__, "os"), "system"), shell),
            "builtins.getattr",
        ),
        "import": (Call(builtins.__import__, "os"), "builtins.__import__"),
        "compile-exec": (Call(builtins.exec, Call(builtins.compile, py, "x", "exec")), "builtins.exec"),
    }


def wrap(obj, how: str):
    if how == "bare":
        return obj
    if how == "dict":
        return {"stage0.rbr_dense.conv.weight": obj}
    return {"epoch": 1, "state_dict": {"a": {"b": [1, {"c": obj}]}}}


def corpus(tmp_path, marker):
    files = []
    for name, (obj, expect) in attacks(str(marker)).items():
        for proto in range(0, 6):
            for how in ("bare", "dict", "nested"):
                data = pickle.dumps(wrap(obj, how), protocol=proto)
                files.append((f"{name}-p{proto}-{how}", data, expect))
    return files


def torch_zip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/byteorder", b"little")
        zf.writestr("archive/version", b"3\n")
    return buf.getvalue()


def _expected(expect: str, proto: int) -> list[str]:
    # protocol <= 2 writes builtins as __builtin__ (mapped back) and os.system as posix.system
    return [expect, expect.replace("builtins.", "__builtin__.")]


def test_corpus_refused_by_every_reader(tmp_path):
    marker = tmp_path / "MARKER"
    n = 0
    for label, data, expect in corpus(tmp_path, marker):
        pkl = tmp_path / f"{label}.pkl"
        pkl.write_bytes(data)
        pth = tmp_path / f"{label}.pth"
        pth.write_bytes(torch_zip(data))
        calls = [
            ("safe_loads", lambda: safe_loads(data, str(pkl))),
            ("read_raw(pkl)", lambda: read_raw(pkl)),
            ("read_pickle", lambda: read_pickle(pkl)),
            ("read_raw(pkl, torch)", lambda: read_raw(pkl, "torch")),
            ("read_any(pkl)", lambda: read_raw(str(pkl))),
            ("read_raw(pth)", lambda: read_raw(pth)),
            ("read_torch", lambda: read_torch(pth)),
            ("read_any(pth)", lambda: read_raw(str(pth))),
            ("convert(pkl)", lambda: convert(pkl, tmp_path / "o.safetensors", "RepVGG-mini")),
            ("convert(pth)", lambda: convert(pth, tmp_path / "o.pkl", "RepVGG-mini", to_deploy=True)),
        ]
        for name, fn in calls:
            with pytest.raises(UnsafeFileError) as e:
                fn()
            msg = str(e.value)
            assert any(f"refusing to load {x}" in msg for x in _expected(expect, 0)), (label, name, msg)
            n += 1
        assert not marker.exists(), label
        assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o.pkl").exists()
    assert n >= 7 * 6 * 3 * 10


@pytest.mark.parametrize("attack", ["os.system", "eval", "popen", "getattr-chain"])
def test_cli_runs_nothing(tmp_path, attack):
    marker = tmp_path / "MARKER"
    obj, expect = attacks(str(marker))[attack]
    src = tmp_path / "evil.pkl"
    src.write_bytes(pickle.dumps(wrap(obj, "dict"), protocol=2))
    dst = tmp_path / "out.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "convert", str(src), str(dst), "--model", "RepVGG-mini", "--to-deploy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert any(f"refusing to load {x}" in proc.stderr for x in _expected(expect, 2)), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists() and not dst.exists()


def test_reparam_console_script_on_torch_zip(tmp_path):
    marker = tmp_path / "MARKER"
    obj, expect = attacks(str(marker))["os.system"]
    src = tmp_path / "evil.pth"
    src.write_bytes(torch_zip(pickle.dumps(wrap(obj, "nested"), protocol=4)))
    exe = os.path.join(os.path.dirname(sys.executable), "reparam")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "scripts.cli"]
    proc = subprocess.run(
        [*cmd, "convert", str(src), str(tmp_path / "o.pth"), "--model", "RepVGG-mini"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and f"refusing to load {expect}" in proc.stderr, proc.stderr
    assert not marker.exists() and not (tmp_path / "o.pth").exists()


def test_in_process_cli_main(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    for attack, (obj, expect) in attacks(str(marker)).items():
        src = tmp_path / f"{attack}.pkl"
        src.write_bytes(pickle.dumps(wrap(obj, "bare"), protocol=5))
        rc = cli.main(["convert", str(src), str(tmp_path / "o.safetensors"), "--model", "RepVGG-mini", "-q"])
        err = capsys.readouterr().err
        assert rc != 0 and f"refusing to load {expect}" in err, err
    assert not marker.exists()


def test_sanity_unrestricted_pickle_would_run_the_attack(tmp_path):
    """The corpus is real: plain pickle.loads does create the marker."""
    marker = tmp_path / "MARKER"
    obj, _ = attacks(str(marker))["os.system"]
    pickle.loads(pickle.dumps(obj))
    assert marker.exists()
