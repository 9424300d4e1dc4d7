"""Your own arrays: a NumPy ``.npz`` file or a CSV table, with an optional user-id column.

Both become a classification dataset held in memory. With a user column, every distinct
user (in order of first appearance) is one client of the natural partition, and its test
samples (a test file's rows of that user, or a seeded `data.test_fraction` of its own
samples) are its own test set. ``.npz`` files are read with ``allow_pickle=False``, so a
file from a stranger cannot run code.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated, List, Optional

import numpy as np
import torch

from ..config import Ge
from ..errors import DataError
from ..registry import DATA_SOURCES
from ..rng import numpy_rng
from .base import SourceContext, SourceData
from .sources import split_train_test

NPZ_LAYOUT = ("a .npz (numpy.savez) with arrays {x} [n, ...] and {y} [n] of integer classes, optionally {user} [n] "
              "and {x}_test, {y}_test, {user}_test")
CSV_LAYOUT = "a CSV with a header row, one sample per row: numeric feature columns, a {label!r} column{user}"


def first_appearance(users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (distinct users in order of first appearance, each row's user number in that order)."""
    uniq, first, inverse = np.unique(users, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return uniq[order], rank[inverse.reshape(-1)]


def from_arrays(name: str, where: Path, x: np.ndarray, y: np.ndarray, users: np.ndarray | None,
                test: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None, ctx: SourceContext,
                num_classes: int | None, x_dtype: torch.dtype = torch.float32) -> SourceData:
    """Returns the SourceData of train arrays (x, y, users) and optional test arrays, inputs
    cast to `x_dtype`; without test arrays, a seeded `ctx.test_fraction` is held out (of each
    user's samples, with users; stratified by class without). Raises DataError naming `where`
    for bad labels or lengths."""
    if len(x) != len(y) or (users is not None and len(users) != len(y)):
        raise DataError(f"{where}: {len(x)} inputs, {len(y)} labels" + (f", {len(users)} user ids" if users is not None else ""))
    labels = [y] if test is None else [y, test[1]]
    top = max(int(v.max()) for v in labels if v.size) if any(v.size for v in labels) else 0
    classes = num_classes if num_classes is not None else max(top + 1, 2)
    for v in labels:
        if v.size and (v.min() < 0 or v.max() >= classes):
            bad = int(v[(v < 0) | (v >= classes)][0])
            raise DataError(f"{where}: label {bad} is outside 0..{classes - 1}")
    groups = test_groups = None
    if test is not None:
        xt, yt, ut = test
        if len(xt) != len(yt) or xt.shape[1:] != x.shape[1:]:
            raise DataError(f"{where}: test arrays {list(xt.shape)} and {list(yt.shape)} do not match the training "
                            f"inputs {list(x.shape[1:])} per sample")
        tr, te = np.arange(len(y)), None
    else:
        rng = numpy_rng(ctx.seed, f"{name}/split")
        if users is None:
            tr, te = split_train_test(len(y), ctx.test_fraction, rng, y)
        else:
            _, rank = first_appearance(users)
            parts = [split_train_test(int((rank == u).sum()), ctx.test_fraction, rng) for u in range(rank.max() + 1)]
            rows = [np.flatnonzero(rank == u) for u in range(rank.max() + 1)]
            tr = np.concatenate([r[p[0]] for r, p in zip(rows, parts)])
            te = np.concatenate([r[p[1]] for r, p in zip(rows, parts)])
        xt, yt, ut = x[te], y[te], (users[te] if users is not None else None)
    if te is not None:  # rows held out; with test arrays every row trains (x may be memory-mapped: not copied)
        x, y = x[tr], y[tr]
        users = users[tr] if users is not None else None
    if users is not None:
        names, rank = first_appearance(users)
        groups = [np.flatnonzero(rank == u) for u in range(len(names))]
        if ut is not None:
            where_user = {u: i for i, u in enumerate(names.tolist())}
            test_rank = np.array([where_user.get(u, -1) for u in ut.tolist()], dtype=np.int64)
            test_groups = [np.flatnonzero(test_rank == u) for u in range(len(names))]
    return SourceData(torch.as_tensor(x, dtype=x_dtype), torch.as_tensor(y, dtype=torch.int64),
                      torch.as_tensor(xt, dtype=x_dtype), torch.as_tensor(yt, dtype=torch.int64),
                      num_classes=classes, groups=groups, test_groups=test_groups)


def _npz_arrays(path: Path, keys: tuple[str, str, Optional[str]], layout: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path} does not exist: give {layout}")
    with path.open("rb") as fh:
        if fh.read(4) != b"PK\x03\x04":  # a zip archive, as numpy.savez writes
            raise DataError(f"{path}: not a .npz file (not a zip archive); expected {layout}")
    try:
        with np.load(path, allow_pickle=False) as z:
            found = {k: z[k] for k in z.files}
    except ValueError as exc:
        raise DataError(f"{path}: holds object arrays, which are refused (they could run code): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - zipfile, OSError, EOFError: not a readable npz
        raise DataError(f"{path}: not a .npz file ({type(exc).__name__}: {exc}); expected {layout}") from None
    x_key, y_key, _ = keys
    for k in (x_key, y_key):
        if k not in found:
            raise DataError(f"{path}: no array {k!r} (has {', '.join(sorted(found)) or 'none'}); expected {layout}")
    for k, a in found.items():
        if k.startswith(y_key) and a.dtype.kind not in "iu":
            raise DataError(f"{path}: {k!r} must hold integer class ids, got {a.dtype}")
        if k.startswith(x_key) and a.dtype.kind not in "iufb":
            raise DataError(f"{path}: {k!r} must be numeric, got {a.dtype}")
    return found


@DATA_SOURCES.register("npz")
def npz(
    ctx: SourceContext,
    path: str = "data/data.npz",
    x_key: str = "x",
    y_key: str = "y",
    user_key: Optional[str] = None,
    num_classes: Annotated[Optional[int], Ge(2)] = None,
) -> SourceData:
    """Arrays from a .npz file (numpy.savez): inputs of any shape, integer labels, optional user ids.

    A test set is read from `<x_key>_test` / `<y_key>_test` (and `<user_key>_test`) when the
    file has them, else a seeded `data.test_fraction` is held out (of each user's samples
    when there are users). Inputs are cast to float32.

    Args:
        path: The .npz file.
        x_key: Name of the inputs array, [n, ...].
        y_key: Name of the labels array, [n] integer classes 0..C−1.
        user_key: Name of an array [n] of user ids (any numbers or strings): each user becomes a client (partition natural).
        num_classes: Number of classes C (None: the largest label + 1).
    """
    file = Path(path)
    layout = NPZ_LAYOUT.format(x=x_key, y=y_key, user=user_key or "user")
    a = _npz_arrays(file, (x_key, y_key, user_key), layout)
    if user_key is not None and user_key not in a:
        raise DataError(f"{file}: no array {user_key!r} (data.user_key); expected {layout}")
    test = None
    if f"{x_key}_test" in a or f"{y_key}_test" in a:
        if f"{x_key}_test" not in a or f"{y_key}_test" not in a:
            raise DataError(f"{file}: give both {x_key}_test and {y_key}_test, or neither")
        test = (a[f"{x_key}_test"], a[f"{y_key}_test"], a.get(f"{user_key}_test") if user_key else None)
    return from_arrays("npz", file, a[x_key], a[y_key], a.get(user_key) if user_key else None, test, ctx, num_classes)


def read_csv(path: Path, label: str, user: Optional[str], features: Optional[List[str]],
             layout: str) -> tuple[list[str], np.ndarray, list[str], list[str] | None]:
    """Returns (feature names, features [n, f] float32, raw labels, raw user ids or None) of a
    CSV file; raises DataError naming the file, line and column of the first bad value."""
    if not path.is_file():
        raise DataError(f"{path} does not exist: give {layout}")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc}); expected {layout}") from None
    if not rows:
        raise DataError(f"{path}: empty; expected {layout}")
    header = [h.strip() for h in rows[0]]
    for col in [label, *([user] if user else []), *(features or [])]:
        if col not in header:
            raise DataError(f"{path}: no column {col!r} in the header ({', '.join(header)}); expected {layout}")
    names = features if features is not None else [h for h in header if h not in (label, user)]
    if not names:
        raise DataError(f"{path}: no feature columns besides {label!r}; expected {layout}")
    cols = [header.index(n) for n in names]
    x = np.empty((len(rows) - 1, len(cols)), dtype=np.float32)
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)}")
        for j, c in enumerate(cols):
            try:
                x[line - 2, j] = float(row[c])
            except ValueError:
                raise DataError(f"{path}, line {line}: column {names[j]!r} is {row[c]!r}, not a number") from None
    labels = [r[header.index(label)].strip() for r in rows[1:]]
    users = [r[header.index(user)].strip() for r in rows[1:]] if user else None
    return names, x, labels, users


def class_ids(labels: list[str], more: list[str]) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Returns (ids of `labels`, ids of `more`, class names): integer labels keep their values
    (names None), any other labels are numbered in sorted order of their names."""
    every = labels + more
    if every and all(v.lstrip("-").isdigit() for v in every):
        return np.array(labels, dtype=np.int64), np.array(more, dtype=np.int64), None
    names = sorted(set(every))
    index = {n: i for i, n in enumerate(names)}
    return (np.array([index[v] for v in labels], dtype=np.int64), np.array([index[v] for v in more], dtype=np.int64),
            names)


@DATA_SOURCES.register("csv")
def csv_table(
    ctx: SourceContext,
    path: str = "data/data.csv",
    test_path: Optional[str] = None,
    label_column: str = "label",
    user_column: Optional[str] = None,
    features: Optional[List[str]] = None,
) -> SourceData:
    """A CSV table (header row, one sample per row): numeric features, a class column, optional user ids.

    Labels that are all integers are class ids 0..C−1; any other labels are numbered in
    sorted order (the names are in the source's `info['classes']`). Without `test_path`, a seeded
    `data.test_fraction` is held out (of each user's rows when there is a user column).

    Args:
        path: The training CSV file.
        test_path: A CSV with the same columns for testing (None: hold out data.test_fraction).
        label_column: Name of the class column.
        user_column: Name of a user-id column: each user becomes a client (partition natural).
        features: Feature columns to use (None: every column but the label and user columns).
    """
    file = Path(path)
    layout = CSV_LAYOUT.format(label=label_column, user=f" and a {user_column!r} column" if user_column else "")
    names, x, labels, users = read_csv(file, label_column, user_column, features, layout)
    test = None
    if test_path is not None:
        tnames, xt, tlabels, tusers = read_csv(Path(test_path), label_column, user_column, features or names, layout)
        y, yt, classes = class_ids(labels, tlabels)
        test = (xt, yt, np.array(tusers) if tusers is not None else None)
    else:
        y, _, classes = class_ids(labels, [])
    src = from_arrays("csv", file, x, y, np.array(users) if users is not None else None, test, ctx,
                      None if classes is None else max(len(classes), 2))
    src.info.update(features=names, **({"classes": classes} if classes is not None else {}))
    return src


__all__ = ["csv_table", "from_arrays", "npz"]
