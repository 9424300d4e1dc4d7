"""An image-folder tree: one sub-folder per class, PNG/JPEG files, resized to a fixed shape.

Layout (torchvision's ImageFolder): ``root/<class>/<image>``, or ``root/train/<class>/...``
with ``root/test/<class>/...`` for a test set of its own. Classes are the sub-folder names
in sorted order. Images are decoded with Pillow, converted to RGB (or grayscale), resized
to `size` and held in memory as float32 in [0, 1].
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Callable, List, Literal, Optional, Sequence

import numpy as np
import torch

from ..config import Each, Ge, Gt
from ..errors import DataError
from ..rng import numpy_rng
from ..registry import DATA_SOURCES
from .base import SourceContext, SourceData
from .sources import split_train_test

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
LAYOUT = ("one sub-folder per class holding PNG/JPEG images: {root}/<class>/<image>, or {root}/train/<class>/... "
          "and {root}/test/<class>/...")


def list_images(folder: Path, classes: list[str] | None, layout: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """Returns (image paths, class ids, class names) under `folder`/<class>/; `classes` fixes
    the class names (a test tree must use the training tree's). Raises DataError when empty."""
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    names = classes if classes is not None else found
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DataError(f"{folder}: class folder {unknown[0]!r} is not among the training classes ({', '.join(names)})")
    paths, labels = [], []
    for i, name in enumerate(names):
        sub = folder / name
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in EXTENSIONS) if sub.is_dir() else []
        paths += files
        labels += [i] * len(files)
    if not paths:
        raise DataError(f"no images in {folder}: put {layout}")
    return paths, np.asarray(labels, dtype=np.int64), names


def decode(paths: Sequence[Path | bytes], size: tuple[int, int], mode: str,
           where: Callable[[int], str] | None = None) -> np.ndarray:
    """Returns [n, C, H, W] float32 in [0, 1] of image files or encoded image bytes; raises
    DataError naming an unreadable image (its path, or `where(i)` for the i-th item)."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("decoding images needs Pillow: pip install pillow") from None
    h, w = size
    out = np.empty((len(paths), 3 if mode == "RGB" else 1, h, w), dtype=np.float32)
    for i, path in enumerate(paths):
        try:
            with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as img:
                arr = np.asarray(img.convert(mode).resize((w, h)), dtype=np.float32) / 255.0
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{where(i) if where else path}: not a readable image ({exc})") from None
        out[i] = arr.transpose(2, 0, 1) if arr.ndim == 3 else arr[None]
    return out


@DATA_SOURCES.register("image_folder")
def image_folder(
    ctx: SourceContext,
    root: str = "data/images",
    size: Annotated[List[int], Each(Ge(1))] = (32, 32),
    color: Literal["rgb", "gray"] = "rgb",
    max_memory_mb: Annotated[Optional[float], Gt(0)] = None,
    cache_dir: Optional[str] = None,
) -> SourceData:
    """Images in one sub-folder per class (torchvision's ImageFolder layout), resized to `size`.

    With root/train/ and root/test/ the test tree is the test set; otherwise a seeded,
    class-stratified `data.test_fraction` of the images is. Images are decoded at start-up
    ([C, H, W] float32 in [0, 1]) into memory, or, when they exceed `max_memory_mb`, once
    into a cache file in `cache_dir` that is memory-mapped (each job reads its own samples).

    Args:
        root: The folder holding the class sub-folders (or train/ and test/ with class sub-folders).
        size: [height, width] every image is resized to.
        color: 'rgb' (3 channels) or 'gray' (1 channel).
        max_memory_mb: Decoded images larger than this many MiB (train and test sets apiece) are
            memory-mapped from a cache file instead of held in memory (None: always in memory).
        cache_dir: The folder for that cache (written once, reused while the images are unchanged);
            never the data folder. Needed when max_memory_mb is exceeded.
    """
    if len(size) != 2:
        raise ValueError(f"size: give [height, width] (got {list(size)})")
    base = Path(root)
    layout = LAYOUT.format(root=base)
    if not base.is_dir():
        raise DataError(f"image folder {base} does not exist: put {layout}")
    mode = "RGB" if color == "rgb" else "L"
    shape = (int(size[0]), int(size[1]))
    if (base / "train").is_dir() and (base / "test").is_dir():
        paths, y, names = list_images(base / "train", None, layout)
        tpaths, ty, _ = list_images(base / "test", names, layout)
    else:
        every, labels, names = list_images(base, None, layout)
        tr, te = split_train_test(len(labels), ctx.test_fraction, numpy_rng(ctx.seed, "image_folder/split"), labels)
        paths, y, tpaths, ty = [every[i] for i in tr], labels[tr], [every[i] for i in te], labels[te]
    from .image_cache import images, over_bound  # it decodes with decode() above

    load = lambda items, part: images(items, shape, mode, name=f"image_folder-{part}",  # noqa: E731
                                      max_memory_mb=max_memory_mb, cache_dir=cache_dir)
    mapped = over_bound(len(paths), shape, mode, max_memory_mb) or over_bound(len(tpaths), shape, mode, max_memory_mb)
    return SourceData(load(paths, "train"), torch.from_numpy(y), load(tpaths, "test"), torch.from_numpy(ty),
                      num_classes=max(len(names), 2), info={"classes": names, "memory_mapped": mapped})


__all__ = ["image_folder"]
