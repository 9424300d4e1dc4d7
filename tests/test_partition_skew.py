"""Quantity skew and k-classes-per-client partitions, and `fedsim partition` drawing them."""
from __future__ import annotations

import numpy as np
import pytest

from fedsim.data.partition import classes_per_client, quantity_skew

from .conftest import digits_config
from .test_partition import LABELS, ctx, skew


@pytest.mark.parametrize("distribution", ["lognormal", "power_law", "dirichlet"])
def test_quantity_skew_assigns_every_sample_once_at_the_labels_mix(distribution):
    parts = quantity_skew(ctx(n=20), distribution=distribution, min_size=5)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))
    assert min(len(p) for p in parts) >= 5
    largest = max(parts, key=len)
    assert len(largest) > 2 * len(LABELS) / 20 and skew([largest]) < 0.2  # sizes skewed, labels not


def test_quantity_skew_grows_with_sigma():
    def spread(sigma):
        sizes = [len(p) for seed in range(5) for p in quantity_skew(ctx(seed, n=20), sigma=sigma, min_size=0)]
        return np.std(sizes) / np.mean(sizes)

    assert spread(0.1) < 0.3 < spread(2.0)


def test_quantity_skew_min_size_beyond_the_data_is_refused():
    with pytest.raises(ValueError, match="min_size 60 × 20 clients exceeds the 1000 samples"):
        quantity_skew(ctx(n=20), min_size=60)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_classes_per_client_gives_each_client_exactly_k_classes(k):
    parts = classes_per_client(ctx(n=20), k=k)
    assert [len(np.unique(LABELS[p])) for p in parts] == [k] * 20
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx) == len(LABELS)  # 20 clients cover all 10 classes (i mod 10)


def test_classes_per_client_k_above_the_classes_is_refused():
    with pytest.raises(ValueError, match="k=11 exceeds the 10 classes"):
        classes_per_client(ctx(), k=11)


def test_partition_command_draws_the_configs_partition(tmp_path, tmp_yaml, capsys):
    from fedsim.cli import main

    cfg = tmp_yaml({**digits_config(), "data": {"name": "digits", "num_clients": 6,
                                                "partition": {"name": "classes_per_client", "k": 2}}})
    out = tmp_path / "p" / "partition.png"
    assert main(["partition", str(cfg), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "6 clients" in printed and "classes per client: min 2, mean 2, max 2" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["partition", str(cfg), "data.partition.k=99", "-o", str(out)]) == 2
    assert "data.partition: k=99 exceeds the 10 classes" in capsys.readouterr().err


def test_every_run_folder_has_the_partition_picture_unless_turned_off(tmp_path):
    from fedsim.config import load_config
    from fedsim.runner import execute

    for drawn in (True, False):
        cfg = load_config(digits_config(run={"rounds": 1, "partition_plot": drawn}))
        execute(cfg, tmp_path / str(drawn), progress=False)
        picture = tmp_path / str(drawn) / "partition.png"
        assert picture.is_file() == drawn
        assert not drawn or picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
