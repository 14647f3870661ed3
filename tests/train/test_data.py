"""Image folders: a folder of PNGs written here trains (both frameworks read it the same way);
a missing folder, an empty class, a corrupt or truncated image each give a one-line error that
names the folder or file, exit status 2, and no output folder."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from train_testutil import metrics, run_train, trained

from reparam_core import training as tr
from reparam_core.training.imagefolder import DataError

CLASSES = ("circle", "cross", "square")


def _shape(kind: str, rng: np.random.Generator, size: int = 20) -> np.ndarray:
    """A white shape on dark noise, at a random offset (RGB uint8)."""
    img = rng.integers(0, 60, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(7, size - 7, 2)
    if kind == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
    elif kind == "cross":
        mask = (np.abs(yy - cy) <= 1) & (np.abs(xx - cx) <= 6) | (np.abs(xx - cx) <= 1) & (np.abs(yy - cy) <= 6)
    else:
        mask = (np.abs(yy - cy) <= 4) & (np.abs(xx - cx) <= 4)
    img[mask] = 255
    return img.astype(np.uint8)


def _folder(root, per_class: int = 8):
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(_shape(c, rng)).save(root / c / f"{i:02d}.png")
    return root


def test_image_folder_trains(tmp_path) -> None:
    data_dir = _folder(tmp_path / "shapes")
    data = tr.load_dataset(str(data_dir), 32)
    assert data.classes == CLASSES and data.images.shape == (24, 32, 32, 3)
    assert (len(data.train_idx), len(data.val_idx)) == (18, 6)  # 2 of 8 per class validate
    out = tmp_path / "out"
    run_train(out, "--data", str(data_dir), "--epochs", "2", "--global-batch", "6")
    records = metrics(out)
    assert [r["epoch"] for r in records] == [1, 2] and all(r["images"] == 18 for r in records)
    state, meta = trained(out)
    assert json.loads(meta["data"])["classes"] == list(CLASSES)
    assert state["linear.weight"].shape == (3, 256)
    deploy, _ = trained(out, "deploy")
    assert not any("rbr_1x1" in k for k in deploy)
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bad_inputs(tmp_path):
    """(data folder, path the message must name) for each kind of bad input."""
    missing = tmp_path / "nowhere"
    empty = _folder(tmp_path / "empty", per_class=2)
    (empty / "zebra").mkdir()
    corrupt = _folder(tmp_path / "corrupt", per_class=2)
    (corrupt / "cross" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    truncated = _folder(tmp_path / "truncated", per_class=2)
    buf = io.BytesIO()
    Image.fromarray(_shape("square", np.random.default_rng(1))).save(buf, format="PNG")
    (truncated / "square" / "cut.png").write_bytes(buf.getvalue()[:60])
    return {
        "missing folder": (missing, missing),
        "empty class": (empty, empty / "zebra"),
        "corrupt image": (corrupt, corrupt / "cross" / "bad.png"),
        "truncated image": (truncated, truncated / "square" / "cut.png"),
    }


def test_bad_inputs_exit_2_naming_the_file(tmp_path) -> None:
    for name, (data_dir, culprit) in _bad_inputs(tmp_path).items():
        with pytest.raises(DataError, match=str(culprit)):
            tr.load_dataset(str(data_dir))
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        proc = run_train(out, "--data", str(data_dir), "--nproc", "2", check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert len(lines) == 1 and str(culprit) in lines[0], (name, lines)
        assert lines[0].startswith("reparam train: error:") and "Traceback" not in proc.stderr
        assert not out.exists(), name  # nothing written, no process started
