"""The decentralized paper folders: every run of their RUNS (full and quick) is a valid config."""
from __future__ import annotations

import pytest

from fedsim.config import load_config
from fedsim.reproduce import PAPERS_DIR, load_paper


@pytest.mark.parametrize("name", ["dfedsam", "vca"])
def test_paper_runs_are_valid_configs(name):
    paper = load_paper(name)
    assert paper.TITLE and paper.FULL_RUNTIME and callable(paper.report)
    labels = [spec.label for spec in paper.RUNS]
    assert len(labels) == len(set(labels))
    for spec in paper.RUNS:
        for extra in ((), tuple(spec.quick)):
            cfg = load_config(PAPERS_DIR / name / spec.config, [*spec.overrides, *extra])
            assert cfg.protocol.name in ("decentralized", "async_gossip", "sync")
