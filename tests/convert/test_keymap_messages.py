"""Errors about a checkpoint in another naming scheme quote keys as the user's file spells them:
an unexpected key exactly as in the file (not half-renamed by the key map), a missing key in the
file's scheme (timm's `stem.conv_kxk.conv.weight`, not the canonical `stage0.rbr_dense...`)."""

from __future__ import annotations

import numpy as np
import pytest

from reparam_core import CheckpointError, ShapeMismatchError, check_state, get_spec, random_state
from reparam_core.formats import to_neutral
from reparam_core.weights.keymaps import from_canonical, key_names, to_canonical

MODEL = "RepVGG-mini"


@pytest.fixture()
def timm_state() -> dict[str, np.ndarray]:
    spec = get_spec(MODEL)
    state = from_canonical(random_state(spec, "train", seed=0), spec, "timm")
    assert "stem.conv_kxk.conv.weight" in state and "stages.0.0.conv_1x1.bn.bias" in state
    return state


def _check(state: dict[str, np.ndarray]) -> None:
    """What reading a file does: map its keys, then check them, naming keys as the file does."""
    spec = get_spec(MODEL)
    mapped, scheme = to_canonical(state, spec, source="model.safetensors")
    assert scheme == "timm"
    check_state(spec, mapped, source="model.safetensors", names=key_names(state, spec, scheme))


def test_renamed_key_is_quoted_as_in_the_file(timm_state) -> None:
    timm_state["stem.conv_kxk.0.weight"] = timm_state.pop("stem.conv_kxk.conv.weight")
    with pytest.raises(CheckpointError) as e:
        _check(timm_state)
    msg = str(e.value)
    assert "1 unexpected key(s): stem.conv_kxk.0.weight" in msg
    assert "1 missing key(s): stem.conv_kxk.conv.weight" in msg
    assert "stage0." not in msg and "rbr_" not in msg


def test_missing_key_is_named_in_the_files_scheme(timm_state) -> None:
    del timm_state["stages.0.0.conv_1x1.bn.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): stages\.0\.0\.conv_1x1\.bn\.bias$"):
        _check(timm_state)


def test_wrong_shape_is_named_as_in_the_file(timm_state) -> None:
    timm_state["head.fc.weight"] = np.zeros((3, 7), np.float32)
    with pytest.raises(ShapeMismatchError, match=r"head\.fc\.weight \(3, 7\) != "):
        _check(timm_state)


def test_reading_a_timm_file_reports_its_own_names(timm_state) -> None:
    """The path every reader takes (reparam_core.formats.to_neutral, as `reparam convert` and the
    backends' load_state do)."""
    timm_state["stem.conv_kxk.0.weight"] = timm_state.pop("stem.conv_kxk.conv.weight")
    with pytest.raises(CheckpointError) as e:
        to_neutral(timm_state, get_spec(MODEL), "safetensors", source="timm.safetensors")
    msg = str(e.value)
    assert msg.startswith("timm.safetensors ")
    assert "stem.conv_kxk.0.weight" in msg and "stem.conv_kxk.conv.weight" in msg
    assert "stage0." not in msg
