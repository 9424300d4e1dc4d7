"""Hugging Face datasets from disk: a ``save_to_disk`` folder or a ``.parquet`` file.

Needs the optional extra ``pip install 'fedsim[hf]'`` (the ``datasets`` package); nothing is
downloaded, and nothing is written next to the data (parquet files are read into memory
with pyarrow, not through the datasets cache). A column mapping names the input column(s),
the label column and optionally a user-id column:

* an image column (the ``datasets.Image`` feature) is decoded with Pillow, converted to RGB
  or grayscale and resized to `size` → ``[C, H, W]`` float32 in [0, 1];
* one column of equal-length integer lists (token ids) stays int64, ``[n, L]``;
* any other numeric columns (scalars or fixed-shape arrays) are flattened and put side by
  side as float32 features (one column keeps its own shape).

Labels are a ``ClassLabel`` column, integer class ids, or strings numbered in sorted order.
With a user column every distinct user (in order of first appearance) is one client of the
natural partition, and its test rows are its own test set. Everything is held in memory,
except images larger than `max_memory_mb` (see fedsim.data.image_cache).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, List, Literal, Optional

import numpy as np
import torch

from ..config import Each, Ge, Gt
from ..errors import ConfigError, DataError
from ..registry import DATA_SOURCES
from .arrays import class_ids, from_arrays
from .base import SourceContext, SourceData
from .image_cache import images, over_bound

LAYOUT = ("a folder written by datasets' Dataset.save_to_disk or DatasetDict.save_to_disk (splits {train!r} and "
          "optionally {test!r}), or a .parquet file (Dataset.to_parquet)")


def require_datasets() -> Any:
    """Returns the `datasets` module; raises ConfigError at `data.name` naming the extra when absent."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.name", "the 'hf' source needs the Hugging Face datasets package: "
                          "pip install 'fedsim[hf]'") from None
    return datasets


def open_split(path: Path, split: str, key: str, split_key: str, layout: str, required: bool = True) -> Any:
    """Returns the `datasets.Dataset` at `path` (for a DatasetDict folder: its `split`, None when
    that split is absent and not `required`); raises DataError naming `path` and the config key."""
    datasets = require_datasets()
    if not path.exists():
        raise DataError(f"{path} does not exist ({key}): give {layout}")
    if path.is_file():
        if path.suffix.lower() != ".parquet":
            raise DataError(f"{path} ({key}): not a .parquet file or a save_to_disk folder; give {layout}")
        import pyarrow.parquet as pq
        from datasets.table import InMemoryTable

        try:
            return datasets.Dataset(InMemoryTable(pq.read_table(path)))
        except Exception as exc:  # noqa: BLE001 - pyarrow's ArrowInvalid, OSError: not readable parquet
            raise DataError(f"{path} ({key}): not a readable parquet file ({type(exc).__name__}: {exc})") from None
    try:
        found = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - FileNotFoundError, ValueError, JSON errors: not a saved dataset
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path} ({key}): not a folder written by save_to_disk ({first}); give {layout}") from None
    if isinstance(found, datasets.DatasetDict):
        if split not in found:
            if not required:
                return None
            raise DataError(f"{path}: no split {split!r} ({split_key}; has {', '.join(found) or 'none'})")
        return found[split]
    return found


def column_names(ds: Any, names: List[str], key: str, where: Path) -> None:
    """Raises DataError naming the file and config key of the first of `names` not in `ds`."""
    for name in names:
        if name not in ds.column_names:
            raise DataError(f"{where}: no column {name!r} ({key}; has {', '.join(ds.column_names)})")


def image_column(ds: Any, name: str, size: tuple[int, int], mode: str, where: Path, part: str,
                 memory: tuple[Optional[float], Optional[str]]) -> torch.Tensor:
    """Returns the images of column `name` decoded to [n, C, H, W] float32 in [0, 1], in memory
    or memory-mapped (`memory`: max_memory_mb and cache_dir; `part` names the cache file)."""
    from datasets import Image

    cells = ds.cast_column(name, Image(decode=False))[name]
    items: list[Path | bytes] = []
    for i, cell in enumerate(cells):
        if cell is None or (cell.get("bytes") is None and not cell.get("path")):
            raise DataError(f"{where}: row {i} of image column {name!r} is empty")
        items.append(cell["bytes"] if cell.get("bytes") is not None else Path(cell["path"]))
    return images(items, size, mode, name=f"hf-{part}", max_memory_mb=memory[0], cache_dir=memory[1],
                  where=lambda i: f"{where}: row {i} of image column {name!r}")


def numeric_column(ds: Any, name: str, where: Path) -> np.ndarray:
    """Returns column `name` as a numeric numpy array [n, ...]; raises DataError for text or
    rows of different lengths."""
    values = ds.with_format("numpy")[name]
    if not isinstance(values, np.ndarray) or values.dtype == object:  # rows of arrays, or of other things
        if any(isinstance(v, str) for v in values):
            raise DataError(f"{where}: column {name!r} (data.inputs) holds text; give token ids "
                            "(a column of equal-length integer lists)")
        try:
            values = np.stack([np.asarray(v) for v in values])
        except ValueError:
            raise DataError(f"{where}: column {name!r} (data.inputs) has rows of different lengths; "
                            "pad them to one length") from None
    arr = values
    if arr.dtype.kind in "US":
        raise DataError(f"{where}: column {name!r} (data.inputs) holds text; give token ids "
                        "(a column of equal-length integer lists)")
    if arr.dtype.kind not in "iufb":
        raise DataError(f"{where}: column {name!r} (data.inputs) holds {arr.dtype}, not numbers")
    return arr


def read_inputs(ds: Any, inputs: List[str], size: tuple[int, int], mode: str, where: Path, part: str,
                memory: tuple[Optional[float], Optional[str]]) -> np.ndarray | torch.Tensor:
    """Returns the inputs of `ds`: decoded images (a tensor, see `image_column`), int64 token
    ids or float32 features."""
    from datasets import Image

    found = [c for c in inputs if isinstance(ds.features[c], Image)]
    if found:
        if len(inputs) > 1:
            raise DataError(f"{where}: image column {found[0]!r} must be the only one in data.inputs")
        return image_column(ds, found[0], size, mode, where, part, memory)
    cols = [numeric_column(ds, c, where) for c in inputs]
    if len(cols) == 1:
        x = cols[0]
        return x.astype(np.int64) if x.ndim >= 2 and x.dtype.kind in "iu" else x.astype(np.float32)
    return np.concatenate([c.reshape(len(c), -1).astype(np.float32) for c in cols], axis=1)


def read_labels(ds: Any, label: str, where: Path) -> tuple[np.ndarray | list[str], int | None, list[str] | None]:
    """Returns (labels, number of classes or None, class names or None) of column `label`:
    ClassLabel ids, integer ids, or strings (numbered later, with the test labels)."""
    from datasets import ClassLabel

    feature = ds.features[label]
    values = ds.with_format("numpy")[label]
    y = values if isinstance(values, np.ndarray) else np.asarray(values)
    if isinstance(feature, ClassLabel):
        return y.astype(np.int64), feature.num_classes, list(feature.names)
    if y.dtype.kind in "iub":
        return y.astype(np.int64), None, None
    if y.dtype.kind in "UO" and all(isinstance(v, str) for v in y.tolist()):
        return [str(v) for v in y.tolist()], None, None
    raise DataError(f"{where}: column {label!r} (data.label_column) holds {y.dtype}, not integer class ids, "
                    "class names or a ClassLabel")


@DATA_SOURCES.register("hf")
def hf(
    ctx: SourceContext,
    path: str = "data/hf",
    test_path: Optional[str] = None,
    inputs: List[str] = ("image",),
    label_column: str = "label",
    user_column: Optional[str] = None,
    train_split: str = "train",
    test_split: str = "test",
    size: Annotated[List[int], Each(Ge(1))] = (32, 32),
    color: Literal["rgb", "gray"] = "rgb",
    num_classes: Annotated[Optional[int], Ge(2)] = None,
    max_memory_mb: Annotated[Optional[float], Gt(0)] = None,
    cache_dir: Optional[str] = None,
) -> SourceData:
    """A Hugging Face dataset saved to disk (save_to_disk folder or .parquet file), with a column mapping.

    Needs `pip install 'fedsim[hf]'`. The test set is the `test_split` of a DatasetDict
    folder, or `test_path`, or else a seeded `data.test_fraction` (of each user's rows when
    there is a user column). Image columns are decoded and resized to `size`; one column of
    equal-length integer lists stays int64 (token ids); other numeric columns become float32
    features side by side. Everything is held in memory, except images larger than
    `max_memory_mb`: those are memory-mapped from a cache file in `cache_dir`.

    Args:
        path: A folder written by save_to_disk (a Dataset, or a DatasetDict with `train_split`) or a .parquet file.
        test_path: A test set in the same forms (None: the folder's `test_split`, else hold out data.test_fraction).
        inputs: The input column(s): one image column, one token-id column, or numeric feature columns.
        label_column: The class column: ClassLabel, integer ids 0..C−1, or class names (numbered in sorted order).
        user_column: A user-id column: each user becomes a client (partition natural).
        train_split: The training split of a DatasetDict folder.
        test_split: The test split of a DatasetDict folder (used when present).
        size: [height, width] images are resized to.
        color: 'rgb' (3 channels) or 'gray' (1 channel) for images.
        num_classes: Number of classes C (None: from a ClassLabel, else the largest label + 1).
        max_memory_mb: Decoded images larger than this many MiB (train and test sets apiece) are
            memory-mapped from a cache file instead of held in memory (None: always in memory);
            needs a test split of its own (test_split or test_path).
        cache_dir: The folder for that cache (written once, reused while the images are unchanged);
            never the data folder. Needed when max_memory_mb is exceeded.
    """
    if len(size) != 2:
        raise ValueError(f"size: give [height, width] (got {list(size)})")
    if not inputs:
        raise ValueError("inputs: name at least one input column")
    layout = LAYOUT.format(train=train_split, test=test_split)
    file = Path(path)
    train = open_split(file, train_split, "data.path", "data.train_split", layout)
    test, test_file = None, file
    if test_path is not None:
        test_file = Path(test_path)
        test = open_split(test_file, test_split, "data.test_path", "data.test_split", layout)
    elif file.is_dir():
        test = open_split(file, test_split, "data.path", "data.test_split", layout, required=False)
    wanted = [*inputs, label_column, *([user_column] if user_column else [])]
    keys = ["data.inputs"] * len(inputs) + ["data.label_column"] + (["data.user_column"] if user_column else [])
    for ds, where in [(train, file), *([(test, test_file)] if test is not None else [])]:
        for name, key in zip(wanted, keys):
            column_names(ds, [name], key, where)
    shape, mode = (int(size[0]), int(size[1])), "RGB" if color == "rgb" else "L"
    memory = (max_memory_mb, cache_dir)
    mapped = over_bound(len(train), shape, mode, max_memory_mb) or (
        test is not None and over_bound(len(test), shape, mode, max_memory_mb))
    if mapped and test is None and any(isinstance(train.features[c], require_datasets().Image) for c in inputs):
        raise ConfigError("data.max_memory_mb", "memory-mapped images need a test split of their own "
                          "(data.test_split or data.test_path); holding out a fraction would copy them into memory")
    x = read_inputs(train, list(inputs), shape, mode, file, "train", memory)
    labels, classes, names = read_labels(train, label_column, file)
    users = np.asarray(train[user_column]) if user_column else None
    test_arrays, test_labels = None, None
    if test is not None:
        xt = read_inputs(test, list(inputs), shape, mode, test_file, "test", memory)
        test_labels, _, _ = read_labels(test, label_column, test_file)
        test_arrays = (xt, np.asarray(test[user_column]) if user_column else None)
    if test_labels is not None and isinstance(labels, list) != isinstance(test_labels, list):
        raise DataError(f"{test_file}: column {label_column!r} (data.label_column) holds class names in one "
                        "set and class ids in the other")
    if isinstance(labels, list):
        y, yt, names = class_ids(labels, list(test_labels or []))
        classes = len(names)
    else:
        y, yt = labels, np.asarray(test_labels if test_labels is not None else [], dtype=np.int64)
    test_tuple = None if test_arrays is None else (test_arrays[0], yt, test_arrays[1])
    src = from_arrays("hf", file, x, y, users, test_tuple, ctx, num_classes or (max(classes, 2) if classes else None),
                      x_dtype=torch.int64 if x.dtype in (np.int64, torch.int64) else torch.float32)
    if names is not None:
        src.info["classes"] = names
    src.info["memory_mapped"] = bool(mapped and x.ndim == 4)
    return src


__all__ = ["hf"]
