"""`fedsim reproduce NAME`: run a paper's configs, draw its figure, write claims.md.

A paper lives in ``experiments/papers/<name>/``: its YAML configs plus a ``reproduce.py``
that defines

* ``RUNS``: a list of `RunSpec` (label, config file, overrides, seeds, quick overrides);
* ``report(results, out) -> list[Claim]``: draws the figure(s) into `out` from the run
  folders (``results[label]`` = one folder per seed) and returns the paper's claims with
  what was measured. Nothing in a claim may be hard-coded: every number comes from the runs.
* optionally ``TITLE`` (the paper) and ``FULL_RUNTIME`` (expected time of the full version).
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

from .errors import FedsimError

PAPERS_DIR = Path(__file__).resolve().parents[1] / "experiments" / "papers"


@dataclass(frozen=True)
class RunSpec:
    """One curve of a paper figure: a config (relative to the paper folder) run for each seed."""

    label: str
    config: str
    overrides: Sequence[str] = ()
    seeds: Sequence[int] = (0,)
    quick: Sequence[str] = ()  # extra overrides in --quick mode
    quick_seeds: Sequence[int] | None = None  # seeds in --quick mode (default: the first seed)


@dataclass(frozen=True)
class Claim:
    """A paper's claim, the measurement that bears on it, and whether the run supports it."""

    claim: str
    measured: str
    supported: bool | None  # None: inconclusive


@dataclass
class Result:
    """What `reproduce` produced."""

    out: Path
    claims: list[Claim]
    figures: list[Path] = field(default_factory=list)


def available() -> list[str]:
    """Returns the names of the papers that have a reproduce.py."""
    return sorted(p.parent.name for p in PAPERS_DIR.glob("*/reproduce.py"))


def load_paper(name: str) -> ModuleType:
    """Imports experiments/papers/<name>/reproduce.py; raises FedsimError for unknown names."""
    path = PAPERS_DIR / name / "reproduce.py"
    if not path.is_file():
        import difflib

        names = available()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise FedsimError(f"unknown paper {name!r}{hint} (known: {', '.join(names)}, all)")
    spec = importlib.util.spec_from_file_location(f"fedsim_paper_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def claims_markdown(title: str, claims: Sequence[Claim], figures: Sequence[Path], quick: bool, seconds: float) -> str:
    """Renders claims.md: the claim table plus links to the figures."""
    mark = {True: "yes", False: "**no**", None: "inconclusive"}
    lines = [f"# {title}", "", f"Mode: {'quick' if quick else 'full'}; run time {seconds:.0f} s.", ""]
    lines += [f"![{f.stem}]({f.name})" for f in figures]
    lines += ["", "| claim | measured | supported |", "|---|---|---|"]
    lines += [f"| {c.claim} | {c.measured} | {mark[c.supported]} |" for c in claims]
    return "\n".join(lines) + "\n"


def reproduce(name: str, out: Path, quick: bool = False, executor: str | None = None,
              progress: Callable[[str], Any] = print) -> Result:
    """Runs every RunSpec of paper `name` (each seed), then its report; writes out/claims.md."""
    from .config import load_config
    from .runner import execute

    paper = load_paper(name)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict[str, list[Path]] = {}
    for spec in paper.RUNS:
        seeds = (spec.quick_seeds if spec.quick_seeds is not None else list(spec.seeds)[:1]) if quick else spec.seeds
        for seed in seeds:
            overrides = [*spec.overrides, f"seed={seed}", "run.progress=false"]
            if quick:
                overrides += list(spec.quick)
            if executor:
                overrides.append(f"executor.kind={executor}")
            folder = out / "runs" / f"{spec.label}-seed{seed}".replace(" ", "_").replace("/", "_")
            progress(f"[{name}] {spec.label} seed {seed} -> {folder}")
            execute(load_config(PAPERS_DIR / name / spec.config, overrides), folder, overwrite=True, progress=False)
            results.setdefault(spec.label, []).append(folder)
    before = set(out.glob("*.png"))
    claims = list(paper.report(results, out))
    figures = sorted(set(out.glob("*.png")) - before) or sorted(out.glob("*.png"))
    title = getattr(paper, "TITLE", name)
    (out / "claims.md").write_text(claims_markdown(title, claims, figures, quick, time.perf_counter() - start))
    return Result(out, claims, figures)
