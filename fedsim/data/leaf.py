"""LEAF benchmark data (Caldas et al. 2018, https://leaf.cmu.edu) from its JSON files.

LEAF's preprocessing writes ``train/*.json`` and ``test/*.json`` under ``<dataset>/data/``;
each file is ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...],
"y": [...]}}}``. Every user with training samples becomes one client (``partition:
natural``), in the order the users appear in the sorted train files; a user's samples in the
test files are that client's own test set, and all test files together are the global test
set. Inputs are encoded as LEAF's reference models encode them:

* femnist: 784 floats per sample → ``[1, 28, 28]`` float32; 62 classes.
* shakespeare: a string of characters → their indices in LEAF's ``ALL_LETTERS`` (80
  symbols, int64); the label is the next character's index. A character outside
  ``ALL_LETTERS`` is refused (LEAF would give it the index −1).
* sent140: the tweet text (``x[4]`` of LEAF's raw row, or a plain string) split with LEAF's
  ``split_line``, words mapped to vocabulary ids, unknown words and padding to
  ``len(vocab)``, cut or padded to `max_words` (int64); 2 classes. The vocabulary is a file
  (LEAF's ``embs.json`` with a ``vocab`` list, or one word per line) or, without one, the
  `vocab_size` most frequent training words.
* synthetic: float feature vectors; classes from the labels (or `num_classes`).
* celeba: image file names, read from ``raw/img_align_celeba/`` beside train/ and test/,
  RGB, resized to `image_size` × `image_size` → ``[3, H, W]`` float32 in [0, 1]; 2 classes.

Everything is decoded into memory at start-up.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import numpy as np
import torch

from ..config import Ge
from ..errors import DataError
from ..registry import DATA_SOURCES
from .base import SourceContext, SourceData

ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
DATASETS = ("femnist", "shakespeare", "sent140", "synthetic", "celeba")
LAYOUT = ("{root}/train/*.json and {root}/test/*.json as LEAF writes them ({{'users': [...], 'num_samples': [...], "
          "'user_data': {{user: {{'x': [...], 'y': [...]}}}}}}), e.g. leaf/data/{dataset}/data after LEAF's preprocess.sh")
CELEBA_IMAGES = "raw/img_align_celeba"


def split_line(line: str) -> list[str]:
    """LEAF's tokenizer: words (letters, digits, apostrophes) and the punctuation . , ! ? ;"""
    return re.findall(r"[\w']+|[.,!?;]", line)


def read_split(root: Path, split: str, dataset: str) -> dict[str, tuple[list, list, Path]]:
    """Returns {user: (xs, ys, file)} from every ``root/split/*.json``, users in file order;
    raises DataError naming the file for a missing folder, bad JSON or a malformed record."""
    layout = LAYOUT.format(root=root, dataset=dataset)
    folder = root / split
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise DataError(f"no {split}/*.json in {root}: put {layout}")
    users: dict[str, tuple[list, list, Path]] = {}
    for path in files:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not a LEAF JSON file ({exc}); expected {layout}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("users"), list) or not isinstance(doc.get("user_data"), dict):
            raise DataError(f"{path}: not a LEAF JSON file (needs 'users' and 'user_data'); expected {layout}")
        for user in doc["users"]:
            record = doc["user_data"].get(user) if isinstance(user, str) else None
            if not isinstance(record, dict) or not isinstance(record.get("x"), list) or not isinstance(record.get("y"), list):
                raise DataError(f"{path}: user {user!r} has no user_data entry with 'x' and 'y' lists")
            if len(record["x"]) != len(record["y"]):
                raise DataError(f"{path}: user {user!r} has {len(record['x'])} x but {len(record['y'])} y")
            xs, ys, _ = users.setdefault(user, ([], [], path))
            xs.extend(record["x"])
            ys.extend(record["y"])
    return users


def _labels(ys: list, path: Path, user: str, num_classes: int | None) -> np.ndarray:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() for v in ys):
        raise DataError(f"{path}: user {user!r} has a label that is not an integer class")
    y = np.asarray(ys, dtype=np.int64)
    if num_classes is not None and y.size and (y.min() < 0 or y.max() >= num_classes):
        bad = int(y[(y < 0) | (y >= num_classes)][0])
        raise DataError(f"{path}: user {user!r} has label {bad}, outside 0..{num_classes - 1}")
    return y


class _Encoder:
    """Turns one user's raw LEAF records into (x, y) arrays for one dataset."""

    def __init__(self, dataset: str, root: Path, num_classes: Optional[int], max_words: int, image_size: int,
                 vocab: dict[str, int] | None):
        self.dataset, self.root, self.max_words, self.image_size, self.vocab = dataset, root, max_words, image_size, vocab
        self.num_classes = {"femnist": 62, "shakespeare": len(ALL_LETTERS), "sent140": 2, "celeba": 2}.get(dataset, num_classes)
        self.width: int | None = None  # feature length all samples must share

    def _same_width(self, n: int, path: Path, user: str, what: str) -> None:
        if self.width is None:
            self.width = n
        elif n != self.width:
            raise DataError(f"{path}: user {user!r} has {what} of length {n}, others {self.width}")

    def encode(self, xs: list, ys: list, path: Path, user: str) -> tuple[np.ndarray, np.ndarray]:
        """Returns (x, y) of one user; raises DataError naming `path` and `user` when malformed."""
        d = self.dataset
        if d == "shakespeare":
            return self._text(xs, ys, path, user)
        y = _labels(ys, path, user, self.num_classes)
        if d in ("femnist", "synthetic"):
            try:
                x = np.asarray(xs, dtype=np.float32)
            except (TypeError, ValueError):
                raise DataError(f"{path}: user {user!r}: x must be lists of numbers of one length") from None
            if x.ndim != 2 and not (x.size == 0 and x.ndim == 1):
                raise DataError(f"{path}: user {user!r}: x must be lists of numbers of one length")
            x = x.reshape(len(xs), -1)
            if d == "femnist":
                if x.shape[1] != 784 and len(xs):
                    raise DataError(f"{path}: user {user!r}: a FEMNIST sample has {x.shape[1]} values, not 784 (28×28)")
                return x.reshape(-1, 1, 28, 28), y
            if len(xs):
                self._same_width(x.shape[1], path, user, "features")
            return x, y
        if d == "sent140":
            return np.stack([self._words(r, path, user) for r in xs]) if xs else np.zeros((0, self.max_words), np.int64), y
        return self._images(xs, path, user), y

    def _chars(self, texts: list, path: Path, user: str) -> list[list[int]]:
        rows = []
        for t in texts:
            if not isinstance(t, str):
                raise DataError(f"{path}: user {user!r}: Shakespeare x and y must be strings, got {type(t).__name__}")
            idx = [ALL_LETTERS.find(c) for c in t]
            if -1 in idx:
                raise DataError(f"{path}: user {user!r}: character {t[idx.index(-1)]!r} is not in LEAF's ALL_LETTERS")
            rows.append(idx)
        return rows

    def _text(self, xs: list, ys: list, path: Path, user: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = self._chars(xs, path, user), self._chars(ys, path, user)
        for r in x:
            self._same_width(len(r), path, user, "text")
        if any(len(r) != 1 for r in y):
            raise DataError(f"{path}: user {user!r}: a Shakespeare y must be one character")
        return np.asarray(x, dtype=np.int64).reshape(len(x), self.width or 0), np.asarray(y, dtype=np.int64).reshape(-1)

    def _words(self, record: Any, path: Path, user: str) -> np.ndarray:
        text = record[4] if isinstance(record, list) and len(record) > 4 else record
        if not isinstance(text, str):
            raise DataError(f"{path}: user {user!r}: a Sent140 x must be LEAF's raw row (text at x[4]) or a string")
        assert self.vocab is not None
        unk = len(self.vocab)
        ids = [self.vocab.get(w, unk) for w in split_line(text)][: self.max_words]
        return np.asarray(ids + [unk] * (self.max_words - len(ids)), dtype=np.int64)

    def _images(self, names: list, path: Path, user: str) -> np.ndarray:
        try:
            from PIL import Image
        except ImportError:
            raise DataError("LEAF celeba needs Pillow to read its images: pip install pillow") from None
        folder = self.root / CELEBA_IMAGES
        out = np.zeros((len(names), 3, self.image_size, self.image_size), dtype=np.float32)
        for i, name in enumerate(names):
            if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
                raise DataError(f"{path}: user {user!r}: a CelebA x must be an image file name, got {name!r}")
            img_path = folder / name
            try:
                with Image.open(img_path) as img:
                    img = img.convert("RGB").resize((self.image_size, self.image_size))
                    out[i] = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
            except FileNotFoundError:
                raise DataError(f"missing image {img_path}: put CelebA's img_align_celeba/ in {self.root / 'raw'}") from None
            except OSError as exc:
                raise DataError(f"{img_path}: not a readable image ({exc})") from None
        return out


def read_vocab(path: Path) -> dict[str, int]:
    """Returns {word: id} from LEAF's embs.json (its 'vocab' list) or a file of one word per line."""
    if not path.is_file():
        raise DataError(f"vocabulary file {path} does not exist: give LEAF's embs.json or one word per line")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the vocabulary ({exc})") from None
    if path.suffix == ".json":
        try:
            words = json.loads(text).get("vocab")
        except (json.JSONDecodeError, AttributeError):
            words = None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise DataError(f"{path}: expected LEAF's embs.json, an object with a 'vocab' list of words")
    else:
        words = [w for w in text.splitlines() if w]
    return {w: i for i, w in enumerate(words)}


def frequent_words(users: dict[str, tuple[list, list, Path]], size: int) -> dict[str, int]:
    """Returns {word: id} for the `size` most frequent words of the training texts (ties alphabetical)."""
    counts: Counter[str] = Counter()
    for xs, _, _ in users.values():
        for r in xs:
            text = r[4] if isinstance(r, list) and len(r) > 4 else r
            if isinstance(text, str):
                counts.update(split_line(text))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]
    return {w: i for i, (w, _) in enumerate(ranked)}


@DATA_SOURCES.register("leaf")
def leaf(
    ctx: SourceContext,
    root: str = "data/leaf",
    dataset: Literal["femnist", "shakespeare", "sent140", "synthetic", "celeba"] = "femnist",
    num_classes: Annotated[Optional[int], Ge(2)] = None,
    max_words: Annotated[int, Ge(1)] = 25,
    vocab: Optional[str] = None,
    vocab_size: Annotated[int, Ge(1)] = 10000,
    image_size: Annotated[int, Ge(1)] = 84,
) -> SourceData:
    """LEAF's JSON files (FEMNIST, Shakespeare, Sent140, Synthetic, CelebA): users are clients.

    Each user holding training samples is one client of the natural partition (users in the
    order of the sorted train files; `data.num_clients: all` takes every user); its samples
    in test/*.json are its own test set (per-client metrics), all test files the global one.

    Args:
        root: The folder with LEAF's train/ and test/ folders of JSON files (leaf/data/<dataset>/data).
        dataset: Which LEAF dataset the files hold; decides how x and y are decoded.
        num_classes: Classes of a synthetic dataset (None: the largest label + 1); fixed for the others.
        max_words: Sent140: words per tweet, cut or padded with the unknown-word id (LEAF: 25).
        vocab: Sent140: vocabulary file, LEAF's embs.json or one word per line (None: the most frequent training words).
        vocab_size: Sent140 without `vocab`: how many of the most frequent training words get an id.
        image_size: CelebA: images are resized to image_size × image_size (LEAF: 84).
    """
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"LEAF folder {base} does not exist: put {LAYOUT.format(root=base, dataset=dataset)}")
    train, test = read_split(base, "train", dataset), read_split(base, "test", dataset)
    words = None
    if dataset == "sent140":
        words = read_vocab(Path(vocab)) if vocab else frequent_words(train, vocab_size)
    enc = _Encoder(dataset, base, num_classes, max_words, image_size, words)
    if dataset == "synthetic" and num_classes is None:
        labels = [y for part in (train, test) for _, ys, _ in part.values() for y in ys if isinstance(y, int)]
        enc.num_classes = max(max(labels, default=0) + 1, 2)
    x_tr, y_tr, x_te, y_te, groups, test_groups = [], [], [], [], [], []
    n_tr = n_te = 0
    for user, (xs, ys, path) in train.items():
        if not xs:
            continue
        x, y = enc.encode(xs, ys, path, user)
        x_tr.append(x), y_tr.append(y), groups.append(np.arange(n_tr, n_tr + len(y)))  # noqa: B018
        n_tr += len(y)
        txs, tys, tpath = test.get(user, ([], [], path))
        tx, ty = enc.encode(txs, tys, tpath, user) if txs else (None, None)
        k = 0 if ty is None else len(ty)
        if k:
            x_te.append(tx), y_te.append(ty)  # noqa: B018
        test_groups.append(np.arange(n_te, n_te + k))
        n_te += k
    for user, (xs, ys, path) in test.items():  # test users without training data: global test set only
        if user not in train or not train[user][0]:
            if xs:
                x, y = enc.encode(xs, ys, path, user)
                x_te.append(x), y_te.append(y)  # noqa: B018
    if not groups:
        raise DataError(f"{base / 'train'}: no user has training samples")
    cat = lambda parts, dt: torch.as_tensor(np.concatenate(parts)).to(dt)  # noqa: E731
    x_dtype = torch.int64 if dataset in ("shakespeare", "sent140") else torch.float32
    xs_te = cat(x_te, x_dtype) if x_te else torch.zeros((0, *x_tr[0].shape[1:]), dtype=x_dtype)
    ys_te = cat(y_te, torch.int64) if y_te else torch.zeros(0, dtype=torch.int64)
    info: dict[str, Any] = {"users": [u for u, (xs, _, _) in train.items() if xs]}
    if words is not None:
        info["vocab_size"] = len(words) + 1  # the unknown/padding id is len(vocab)
    return SourceData(cat(x_tr, x_dtype), cat(y_tr, torch.int64), xs_te, ys_te, num_classes=enc.num_classes,
                      groups=groups, test_groups=test_groups, info=info)


__all__ = ["ALL_LETTERS", "leaf", "split_line"]
