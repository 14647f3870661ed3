"""Image folders as arrays: `ROOT/<class>/<image>` (one subfolder per class, PNG/JPEG/BMP/WebP),
read into NCHW float32 with per-channel normalisation. Pillow decodes the files (imported when a
folder is read); nothing here imports a deep-learning framework.

Every problem names what is at fault: a folder that does not exist, no class subfolder, an empty
class, a file that does not decode, an image of another size than the first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ReparamError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ReparamError, ValueError):
    """A data folder or image that cannot be used."""


@dataclass(frozen=True)
class ImageFolder:
    """The files of an image folder: (path, class index) in a fixed order, and the class names
    (sorted subfolder names)."""

    root: Path
    classes: tuple[str, ...]
    files: tuple[tuple[Path, int], ...]


def scan_image_folder(root: str | os.PathLike[str]) -> ImageFolder:
    """The classes and image files of `root`, sorted by name (deterministic on every machine)."""
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"{path}: no such directory (expected one subfolder of images per class)")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{path}: no class subfolders (expected {path}/<class>/<image>.png)")
    files: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        images = sorted(p for p in (path / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"{path / name}: class {name!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [(p, index) for p in images]
    return ImageFolder(path, tuple(classes), tuple(files))


def decode_image(path: Path) -> np.ndarray:
    """One image as HxWx3 float32 in [0, 1]; DataError naming the file if it does not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return np.asarray(rgb, np.float32) / 255.0


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(x - mean[c]) / std[c] per channel of NHWC images in [0, 1], returned NCHW float32."""
    m = np.asarray(mean, np.float32).reshape(1, 1, 1, -1)
    s = np.asarray(std, np.float32).reshape(1, 1, 1, -1)
    return np.ascontiguousarray(((images - m) / s).transpose(0, 3, 1, 2), np.float32)


def read_image_folder(
    root: str | os.PathLike[str],
    *,
    limit: int | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(x NCHW float32 normalised, labels int64, class names) of an image folder.

    `limit` keeps the first `limit` images of a fixed interleaving of the classes (image i of
    every class before image i + 1 of any), so a small sample covers every class. All images
    must have the size of the first: DataError naming the file that differs."""
    folder = scan_image_folder(root)
    per_class: dict[int, list[Path]] = {}
    for p, c in folder.files:
        per_class.setdefault(c, []).append(p)
    order = [
        (per_class[c][i], c)
        for i in range(max(map(len, per_class.values())))
        for c in sorted(per_class)
        if i < len(per_class[c])
    ]
    if limit is not None:
        if limit < 1:
            raise DataError(f"the number of images must be >= 1, got {limit}")
        order = order[:limit]
    images: list[np.ndarray] = []
    for p, _ in order:
        im = decode_image(p)
        if images and im.shape != images[0].shape:
            raise DataError(
                f"{p}: image of size {im.shape[1]}x{im.shape[0]}, the others are "
                f"{images[0].shape[1]}x{images[0].shape[0]}: resize the folder "
                "to one size"
            )
        images.append(im)
    labels = np.asarray([c for _, c in order], np.int64)
    return normalize(np.stack(images), mean, std), labels, folder.classes


__all__ = [
    "DataError",
    "ImageFolder",
    "scan_image_folder",
    "decode_image",
    "normalize",
    "read_image_folder",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
