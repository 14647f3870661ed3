"""The restricted unpickler: numpy state dicts load, anything that imports code is refused."""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from reparam_core.errors import CheckpointError, UnsafeFileError
from reparam_core.formats import read_raw
from reparam_core.formats.pickle_safe import rebuild_tensor, safe_loads


class _RunsCode:
    """Unpickling this would run os.system(touch MARKER)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evals:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_numpy_state_dicts_load():
    state = collections.OrderedDict(
        a=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.float64(2.5), c=np.zeros((0, 4), np.float32)
    )
    for proto in (2, 4, 5):
        out = safe_loads(pickle.dumps({"state_dict": state}, protocol=proto))
        assert np.array_equal(out["state_dict"]["a"], state["a"])
        assert out["state_dict"]["b"] == 2.5
        assert out["state_dict"]["c"].shape == (0, 4)


def test_os_system_refused_and_not_run(tmp_path):
    marker = tmp_path / "PWNED"
    data = pickle.dumps({"w": _RunsCode(str(marker))})
    with pytest.raises(UnsafeFileError, match=r"refusing to load (posix|os|nt)\.system from evil\.pkl"):
        safe_loads(data, "evil.pkl")
    assert not marker.exists()


def test_builtins_eval_refused():
    with pytest.raises(UnsafeFileError, match=r"builtins\.eval"):
        safe_loads(pickle.dumps(_Evals()))


def test_malicious_file_via_reader(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"stage0.x": _RunsCode(str(marker))}, protocol=4))
    with pytest.raises(UnsafeFileError, match=r"system from .*model\.pkl"):
        read_raw(path)
    assert not marker.exists()


def test_malicious_torch_zip(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "model.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(_RunsCode(str(marker)), protocol=2))
        zf.writestr("archive/byteorder", b"little")
    with pytest.raises(UnsafeFileError, match=r"refusing to load .*system"):
        read_raw(path)
    assert not marker.exists()


def test_persistent_id_in_plain_pickle_refused():
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return "ext" if isinstance(obj, str) and obj == "x" else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"a": "x"})
    with pytest.raises(UnsafeFileError, match="persistent id"):
        safe_loads(buf.getvalue())


@pytest.mark.parametrize("cut", [1, 10, 40])
def test_truncated_pickle(cut):
    data = pickle.dumps({"a": np.ones(4, np.float32)}, protocol=4)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        safe_loads(data[:cut])


def test_rebuild_tensor_bounds():
    storage = np.arange(10, dtype=np.float32)
    assert np.array_equal(rebuild_tensor(storage, 2, (2, 3), (3, 1)), np.arange(2, 8, dtype=np.float32).reshape(2, 3))
    assert np.array_equal(rebuild_tensor(storage, 0, (3, 2), (1, 3)), np.arange(6, dtype=np.float32).reshape(2, 3).T)
    with pytest.raises(CheckpointError, match="past the end"):
        rebuild_tensor(storage, 5, (2, 3), (3, 1))
    with pytest.raises(CheckpointError, match="malformed"):
        rebuild_tensor(storage, 0, (2, 3), (3,))


def test_memo_index_beyond_the_file_refused():
    """A LONG_BINPUT whose 4-byte index is larger than the file would make the C unpickler grow
    its memo table to gigabytes (an empty MemoryError): refused by the prescan, naming it."""
    data = pickle.dumps({"a": [1, 2]}, protocol=2)
    at = data.index(b"q")  # BINPUT, 1-byte index
    bad = data[:at] + b"r" + (3_000_000_000).to_bytes(4, "little") + data[at + 2 :]
    with pytest.raises(CheckpointError, match="memo index 3000000000 at byte 3 is larger than the file"):
        safe_loads(bad, "case.pkl")
    assert safe_loads(data, "case.pkl") == {"a": [1, 2]}
