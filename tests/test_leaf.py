"""LEAF JSON reader on tiny files written in LEAF's format: decoding, per-user splits, errors, CLI runs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.data.base import SourceContext
from fedsim.data.leaf import ALL_LETTERS, leaf
from fedsim.errors import DataError

from .conftest import digits_config

CTX = SourceContext(num_clients=None, seed=0, test_fraction=0.2)


def write_leaf(root, train: dict, test: dict, files: int = 1) -> None:
    """Writes {user: (xs, ys)} dicts as LEAF JSON, users spread over `files` files per split."""
    for split, users in (("train", train), ("test", test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        names = list(users)
        for f in range(files):
            mine = names[f::files]
            doc = {"users": mine, "num_samples": [len(users[u][1]) for u in mine],
                   "user_data": {u: {"x": users[u][0], "y": users[u][1]} for u in mine}}
            (root / split / f"all_data_{f}_niid_train.json").write_text(json.dumps(doc))


def femnist_users(n_users=3, per_user=4, seed=0):
    rng = np.random.default_rng(seed)
    return {f"f{u:04d}": (rng.random((per_user, 784)).round(3).tolist(), rng.integers(0, 62, per_user).tolist())
            for u in range(n_users)}


def test_femnist_users_are_clients_with_their_own_test_sets(tmp_path):
    train, test = femnist_users(3, 4), femnist_users(3, 2, seed=1)
    write_leaf(tmp_path, train, test, files=2)
    src = leaf(CTX, root=str(tmp_path), dataset="femnist")
    assert tuple(src.x_train.shape) == (12, 1, 28, 28) and src.num_classes == 62
    assert len(src.groups) == 3 and [len(g) for g in src.test_groups] == [2, 2, 2]
    # files are read sorted: file 0 holds users 0 and 2, file 1 user 1
    order = src.info["users"]
    assert order == ["f0000", "f0002", "f0001"]
    for i, user in enumerate(order):
        np.testing.assert_allclose(src.x_train[src.groups[i]].reshape(4, 784).numpy(), np.float32(train[user][0]))
        assert src.y_test[src.test_groups[i]].tolist() == test[user][1]


def test_shakespeare_maps_characters_as_leaf_does(tmp_path):
    text = "To be, or not to be: that is the question"[:20]
    train = {"HAMLET": ([text, text[1:] + "!"], ["x", "\n"])}
    write_leaf(tmp_path, train, {"HAMLET": ([text], ["}"])})
    src = leaf(CTX, root=str(tmp_path), dataset="shakespeare")
    assert src.num_classes == len(ALL_LETTERS) == 80
    assert src.x_train.dtype == torch.int64 and tuple(src.x_train.shape) == (2, 20)
    assert src.x_train[0].tolist() == [ALL_LETTERS.index(c) for c in text]
    assert src.y_train.tolist() == [ALL_LETTERS.index("x"), 0] and src.y_test.tolist() == [79]


def test_shakespeare_character_outside_leafs_alphabet_is_refused(tmp_path):
    write_leaf(tmp_path, {"A": (["abc€"], ["a"])}, {"A": (["abcd"], ["a"])})
    with pytest.raises(DataError, match="train.*'A'.*'€' is not in LEAF's ALL_LETTERS"):
        leaf(CTX, root=str(tmp_path), dataset="shakespeare")


def test_sent140_words_use_a_vocabulary_and_pad_with_the_unknown_id(tmp_path):
    row = lambda t: ["1467810369", "Mon Apr 06", "NO_QUERY", "user", t]  # noqa: E731
    write_leaf(tmp_path, {"u1": ([row("good day, good!"), row("bad day")], [1, 0])}, {"u1": ([row("good grief")], [1])})
    (tmp_path / "embs.json").write_text(json.dumps({"vocab": ["good", "day", ","], "emba": []}))
    src = leaf(CTX, root=str(tmp_path), dataset="sent140", max_words=4, vocab=str(tmp_path / "embs.json"))
    assert src.x_train.tolist() == [[0, 1, 2, 0], [3, 1, 3, 3]]  # "!" cut at 4 words; "bad" unknown (3)
    assert src.x_test.tolist() == [[0, 3, 3, 3]] and src.info["vocab_size"] == 4
    built = leaf(CTX, root=str(tmp_path), dataset="sent140", max_words=3, vocab_size=1)
    assert built.x_train.tolist() == [[1, 0, 1], [1, 0, 1]]  # "good" and "day" twice each: "day" (first alphabetically) gets id 0


def test_synthetic_infers_classes_and_keeps_test_only_users_global(tmp_path):
    write_leaf(tmp_path, {"a": ([[0.1, 0.2], [0.3, 0.4]], [0, 4])},
               {"a": ([[1.0, 1.0]], [2]), "only_test": ([[2.0, 2.0]], [1])})
    src = leaf(CTX, root=str(tmp_path), dataset="synthetic")
    assert src.num_classes == 5 and len(src.y_test) == 2 and [len(g) for g in src.test_groups] == [1]


def test_celeba_reads_and_resizes_images(tmp_path):
    from PIL import Image

    (tmp_path / "raw" / "img_align_celeba").mkdir(parents=True)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
        Image.new("RGB", (10, 12), colour).save(tmp_path / "raw" / "img_align_celeba" / f"{i:06d}.jpg")
    write_leaf(tmp_path, {"7": (["000000.jpg"], [1])}, {"7": (["000001.jpg"], [0])})
    src = leaf(CTX, root=str(tmp_path), dataset="celeba", image_size=8)
    assert tuple(src.x_train.shape) == (1, 3, 8, 8)
    assert src.x_train[0, 0].mean() > 0.9 and src.x_test[0, 1].mean() > 0.9
    (tmp_path / "raw" / "img_align_celeba" / "000001.jpg").unlink()
    with pytest.raises(DataError, match="missing image .*000001.jpg.*img_align_celeba"):
        leaf(CTX, root=str(tmp_path), dataset="celeba")


@pytest.mark.parametrize("corrupt, match", [
    (lambda p: p.write_text("{not json"), "not a LEAF JSON file"),
    (lambda p: p.write_text(json.dumps({"users": ["a"]})), "needs 'users' and 'user_data'"),
    (lambda p: p.write_text(json.dumps({"users": ["a"], "user_data": {"a": {"x": [[0.0] * 784], "y": []}}})),
     "1 x but 0 y"),
    (lambda p: p.write_text(json.dumps({"users": ["a"], "user_data": {"a": {"x": [[0.0] * 783], "y": [1]}}})),
     "783 values, not 784"),
    (lambda p: p.write_text(json.dumps({"users": ["a"], "user_data": {"a": {"x": [[0.0] * 784], "y": [62]}}})),
     "label 62, outside 0..61"),
    (lambda p: p.unlink(), "no train/\\*.json in .*train/\\*.json and .*test/\\*.json"),
])
def test_corrupt_leaf_files_are_refused_naming_the_file(tmp_path, corrupt, match):
    write_leaf(tmp_path, femnist_users(1, 2), femnist_users(1, 1))
    corrupt(tmp_path / "train" / "all_data_0_niid_train.json")
    with pytest.raises(DataError, match=match) as info:
        leaf(CTX, root=str(tmp_path), dataset="femnist")
    assert len(str(info.value).splitlines()) == 1


def char_bag(input_shape, num_classes, vocab=80):
    """A tiny model over token ids: an embedding, flattened, then a linear layer."""
    return nn.Sequential(nn.Embedding(vocab, 4), nn.Flatten(), nn.Linear(4 * input_shape[0], num_classes))


def leaf_run(tmp_path, tmp_yaml, capsys, data: dict, model: dict, extra_args=()):
    from fedsim.cli import main

    cfg = tmp_yaml({**digits_config(run={"rounds": 2, "eval_every": 1}), "data": data, "model": model,
                    "protocol": {"name": "sync", "clients_per_round": 2}})
    code = main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet", *extra_args])
    err = capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] if code == 0 else []
    return code, err, rows


def test_cli_runs_femnist_with_every_user_and_per_client_accuracy(tmp_path, tmp_yaml, capsys):
    write_leaf(tmp_path / "femnist", femnist_users(3, 6), femnist_users(3, 3, seed=1))
    data = {"name": "leaf", "root": str(tmp_path / "femnist"), "dataset": "femnist", "num_clients": "all",
            "partition": "natural"}
    code, err, rows = leaf_run(tmp_path, tmp_yaml, capsys, data, {"name": "mlp", "hidden": [8]})
    assert code == 0, err
    assert len(rows) == 3 and all(0 <= r["client_acc_min"] <= r["client_acc_mean"] <= 1 for r in rows)


def test_cli_runs_shakespeare(tmp_path, tmp_yaml, capsys):
    text = "abcdefgh"
    users = {u: ([text[i:] + text[:i] for i in range(4)], list("abcd")) for u in ("A", "B", "C")}
    write_leaf(tmp_path / "sh", users, users)
    data = {"name": "leaf", "root": str(tmp_path / "sh"), "dataset": "shakespeare", "num_clients": 3}
    code, err, rows = leaf_run(tmp_path, tmp_yaml, capsys, data, {"name": "tests.test_leaf:char_bag"})
    assert code == 0, err
    assert len(rows) == 3 and rows[-1]["test_accuracy"] is not None


def test_all_clients_of_a_generated_source_is_one_line(tmp_path, tmp_yaml, capsys):
    code, err, _ = leaf_run(tmp_path, tmp_yaml, capsys, {"name": "synthetic", "num_clients": "all"}, {"name": "mlp"})
    assert code == 2 and len(err.strip().splitlines()) == 1 and "data.num_clients" in err, err
