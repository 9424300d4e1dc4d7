"""Images above data.max_memory_mb are memory-mapped from a cache in data.cache_dir: the same
values and the same run, bit for bit, as decoding into memory; nothing written next to the data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.data.base import SourceContext
from fedsim.data.image_folder import image_folder
from fedsim.errors import ConfigError

from .conftest import digits_config, run_config

CTX = SourceContext(num_clients=2, seed=0, test_fraction=0.25)
TINY = 0.001  # MiB: a dozen 8×8 RGB images exceed it


def write_noise_images(root, classes=("a", "b", "c"), per_class=4):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def listing(folder):
    return sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_memory_mapped_images_equal_the_decoded_ones_and_the_cache_is_written_once(tmp_path):
    data, cache = tmp_path / "imgs", tmp_path / "cache"
    write_noise_images(data)
    before = listing(data)
    held = image_folder(CTX, root=str(data), size=[8, 8])
    mapped = image_folder(CTX, root=str(data), size=[8, 8], max_memory_mb=TINY, cache_dir=str(cache))
    assert not held.info["memory_mapped"] and mapped.info["memory_mapped"]
    assert torch.equal(held.x_train, mapped.x_train) and torch.equal(held.x_test, mapped.x_test)
    assert torch.equal(held.y_train, mapped.y_train)
    files = listing(cache)
    assert len(files) == 2 and all(p.suffix == ".npy" for p, _ in files)  # train and test, no temporaries
    again = image_folder(CTX, root=str(data), size=[8, 8], max_memory_mb=TINY, cache_dir=str(cache))
    assert torch.equal(again.x_train, held.x_train) and listing(cache) == files  # reused, not rewritten
    assert listing(data) == before  # nothing written next to the data


def test_over_the_bound_without_a_cache_folder_is_a_config_error(tmp_path):
    write_noise_images(tmp_path / "imgs")
    with pytest.raises(ConfigError, match=r"data.cache_dir: the decoded images \(.* MiB\) exceed data.max_memory_mb"):
        image_folder(CTX, root=str(tmp_path / "imgs"), size=[8, 8], max_memory_mb=TINY)


def image_run(data, **extra):
    cfg = digits_config(run={"rounds": 2, "eval_every": 1}, model={"name": "mlp", "hidden": [8]},
                        data={"client_test_fraction": 0.25}, protocol={"name": "sync", "clients_per_round": 2})
    cfg["data"] = {"name": "image_folder", "root": str(data), "size": [8, 8], "num_clients": 3,
                   "client_test_fraction": 0.25, "partition": "iid", **extra}
    return cfg


def test_a_run_on_memory_mapped_images_equals_the_in_memory_run_bit_for_bit(tmp_path):
    write_noise_images(tmp_path / "imgs")
    held = run_config(image_run(tmp_path / "imgs")).rows
    mapped = run_config(image_run(tmp_path / "imgs", max_memory_mb=TINY, cache_dir=str(tmp_path / "cache"))).rows
    drop = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]  # noqa: E731
    assert len(held) == 3 and drop(held) == drop(mapped)


def test_vmap_refuses_a_memory_mapped_set_on_one_line(tmp_path):
    write_noise_images(tmp_path / "imgs")
    cfg = image_run(tmp_path / "imgs", max_memory_mb=TINY, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="executor.kind: vmap copies the whole training set") as info:
        run_config({**cfg, "executor": {"kind": "vmap"}})
    assert len(str(info.value).splitlines()) == 1


def test_hf_images_are_memory_mapped_with_a_test_split_of_their_own(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from fedsim.data.hf import hf

    datasets.disable_progress_bars()
    rng = np.random.default_rng(1)
    ds = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)) for _ in range(6)],
         "label": [0, 1, 2, 0, 1, 2]}, features=datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")}))
    datasets.DatasetDict(train=ds, test=ds.select([0, 1])).save_to_disk(tmp_path / "dd")
    kw = dict(path=str(tmp_path / "dd"), inputs=["img"], size=[4, 4])
    held = hf(CTX, **kw)
    mapped = hf(CTX, **kw, max_memory_mb=TINY, cache_dir=str(tmp_path / "cache"))
    assert mapped.info["memory_mapped"] and torch.equal(held.x_train, mapped.x_train)
    assert torch.equal(held.x_test, mapped.x_test)
    ds.to_parquet(tmp_path / "d.parquet")
    with pytest.raises(ConfigError, match="data.max_memory_mb: memory-mapped images need a test split"):
        hf(CTX, path=str(tmp_path / "d.parquet"), inputs=["img"], size=[4, 4], max_memory_mb=TINY,
           cache_dir=str(tmp_path / "cache"))
