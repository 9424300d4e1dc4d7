"""`fedsim reproduce NAME`: run a paper's configs, draw its figure, write claims.md.

A paper lives in ``experiments/papers/<name>/`` (inside the package once installed, see
`fedsim.layout`): its YAML configs plus a ``reproduce.py`` that defines

* ``RUNS``: a list of `RunSpec` (label, config file, overrides, seeds, quick overrides);
* ``report(results, out) -> list[Claim]``: draws the figure(s) into `out` from the run
  folders (``results[label]`` = one folder per seed) and returns the paper's claims with
  what was measured. Nothing in a claim may be hard-coded: every number comes from the runs.
* optionally ``TITLE`` (the paper) and ``FULL_RUNTIME`` (expected time of the full version).

claims.md starts with what was run — mode, runs and seeds, executor, wall and CPU time —
and the command that regenerates it; `fedsim.gallery` builds docs/gallery.md from it. Beside
it, sweep.csv and summary.csv hold every run's final metrics and their mean ± std over each
curve's seeds, as `fedsim sweep` writes them; `seed_mean` averages a curve's runs over the
seeds the way `fedsim plot` draws its bands.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping, Sequence

from .errors import FedsimError
from .layout import EXPERIMENTS

PAPERS_DIR = EXPERIMENTS / "papers"


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


def seed_mean(folders: Sequence[Path], x: str, y: str) -> tuple[Any, Any, Any]:
    """Returns (x values, mean, std) of metric `y` against `x` over the runs in `folders` (a
    curve's seeds), as `fedsim plot` averages them (`fedsim.plots.mean_std`: on the x values
    the runs share; sample std, zeros for one run). Rows without `x` or `y` are left out."""
    from .plots import mean_std, run_metrics, series

    return mean_std([series(run_metrics(f, x, y), x, y) for f in folders])


def seed_final(folders: Sequence[Path], key: str) -> tuple[float | None, float | None]:
    """Returns (mean, std) over the runs in `folders` (a curve's seeds) of metric `key` in each
    run's final metrics row, as summary.csv holds them (`fedsim.sweep.summarize`: sample std,
    None for one run); (None, None) where no run has a number for it."""
    from .sweep import SweepRun, finished, summarize, table

    rows = table([finished(SweepRun((), i, f.name), f, "ran") for i, f in enumerate(folders)], [])
    (row,) = summarize(rows, [])
    return row.get(f"{key}_mean"), row.get(f"{key}_std")


def available(papers_dir: Path = PAPERS_DIR) -> list[str]:
    """Returns the names of the papers that have a reproduce.py."""
    return sorted(p.parent.name for p in papers_dir.glob("*/reproduce.py"))


def load_paper(name: str, papers_dir: Path = PAPERS_DIR) -> ModuleType:
    """Imports <papers_dir>/<name>/reproduce.py; raises FedsimError for a name that is not one
    of `available` (so never a path: a name with `/` or `..` is unknown)."""
    path = papers_dir / name / "reproduce.py"
    names = available(papers_dir)
    if name not in names:
        import difflib

        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise FedsimError(f"unknown paper {name!r}{hint} (known: {', '.join(names)}, all)")
    spec = importlib.util.spec_from_file_location(f"fedsim_paper_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plan(paper: ModuleType, quick: bool) -> list[tuple[RunSpec, int]]:
    """Returns every (spec, seed) run of `paper` in this mode, in order."""
    runs = []
    for spec in paper.RUNS:
        seeds = (spec.quick_seeds if spec.quick_seeds is not None else list(spec.seeds)[:1]) if quick else spec.seeds
        runs += [(spec, int(s)) for s in seeds]
    return runs


def describe_runs(runs: Sequence[tuple[RunSpec, int]]) -> str:
    """Returns e.g. '45 runs: 15 curves, seeds 0, 1, 2 (3 per curve)' for a plan."""
    per = {}
    for spec, seed in runs:
        per.setdefault(spec.label, []).append(seed)
    counts = sorted({len(s) for s in per.values()})
    each = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    seeds = ", ".join(str(s) for s in sorted({s for _, s in runs}))
    return f"{len(runs)} runs: {len(per)} curves, seeds {seeds} ({each} per curve)"


def command(name: str, quick: bool, executor: str | None = None, settings: Sequence[str] = ()) -> str:
    """Returns the command line that regenerates a reproduction."""
    return " ".join(["fedsim reproduce", name, *(["--quick"] if quick else []),
                     *([f"--executor {executor}"] if executor else []), *(f"--set {x}" for x in settings),
                     "--out DIR"])


def claims_markdown(title: str, claims: Sequence[Claim], figures: Sequence[Path], quick: bool, seconds: float,
                    name: str = "", runs: str = "", executor: str | None = None, cpu_seconds: float | None = None,
                    full_runtime: str | None = None, load: str = "", settings: Sequence[str] = ()) -> str:
    """Renders claims.md: what was run and how to run it again, the figures, the claim table."""
    mark = {True: "yes", False: "**no**", None: "inconclusive"}
    cpu = f"; CPU time {cpu_seconds:.0f} s" if cpu_seconds is not None else ""
    busy = f"; load average {load} at the end" if load else ""
    lines = [f"# {title}", "", f"Mode: {'quick' if quick else 'full'}; run time {seconds:.0f} s{cpu}{busy}.  "]
    if runs:
        extra = f"; overrides: {', '.join(settings)}" if settings else ""
        lines.append(f"Runs: {runs}; executor: {executor or 'serial'}{extra}.  ")
    if name:
        full = f" (full mode: {full_runtime})" if quick and full_runtime else ""
        lines.append(f"Regenerate: `{command(name, quick, executor, settings)}`{full}.")
    lines += [""] + [f"![{f.stem}]({f.name})" for f in figures]
    lines += ["", "| claim | measured | supported |", "|---|---|---|"]
    lines += [f"| {c.claim} | {c.measured} | {mark[c.supported]} |" for c in claims]
    return "\n".join(lines) + "\n"


def check_executor(executor: str | None) -> None:
    """Raises FedsimError before any run if `executor` is not a registered executor kind."""
    if executor is None:
        return
    from .registry import EXECUTORS

    if executor not in EXECUTORS.names():
        raise FedsimError(f"--executor: unknown executor {executor!r} (known: {', '.join(EXECUTORS.names())})")


@contextlib.contextmanager
def shared_ray(executor: str | None, ray: Mapping[str, Any] | None = None) -> Iterator[None]:
    """With the Ray executor, connects once for all of a paper's runs as the runs' `ray`
    section says (by default one private local Ray, stopped at the end; each run would
    otherwise start and stop its own); otherwise does nothing."""
    if executor != "ray":
        yield
        return
    from .config.ray_section import RaySection
    from .executors.ray_cluster import connect

    connection = connect(RaySection(**(ray or {})))
    try:
        yield
    finally:
        connection.close()


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (Ray's own processes not included)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def check_settings(settings: Sequence[str]) -> None:
    """Raises FedsimError before any run if a `--set` override is not KEY=VALUE."""
    for item in settings:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise FedsimError(f"--set: expected KEY=VALUE (e.g. ray.address=auto), got {item!r}")


def reproduce(name: str, out: Path, quick: bool = False, executor: str | None = None,
              progress: Callable[[str], Any] = print, papers_dir: Path = PAPERS_DIR,
              settings: Sequence[str] = ()) -> Result:
    """Runs every RunSpec of paper `name` (each seed), then its report; writes out/claims.md.
    `settings` are config overrides (KEY=VALUE) applied to every run after the paper's own,
    e.g. ``ray.address=auto`` or ``executor.device=cuda``."""
    from .config import load_config
    from .runner import execute

    check_executor(executor)
    check_settings(settings)
    paper = load_paper(name, papers_dir)
    runs = plan(paper, quick)

    def run_config(spec: RunSpec, seed: int):
        overrides = [*spec.overrides, f"seed={seed}", "run.progress=false"]
        if quick:
            overrides += list(spec.quick)
        if executor:
            overrides.append(f"executor.kind={executor}")
        return load_config(papers_dir / name / spec.config, [*overrides, *settings])

    first = run_config(*runs[0]) if runs else None  # a bad override stops here, before anything runs
    out.mkdir(parents=True, exist_ok=True)
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    results: dict[str, list[Path]] = {}
    done = []
    with shared_ray(executor, first.extra.get("ray") if first is not None else None):
        for i, (spec, seed) in enumerate(runs):
            folder = out / "runs" / f"{spec.label}-seed{seed}".replace(" ", "_").replace("/", "_")
            progress(f"[{name}] {spec.label} seed {seed} -> {folder}")
            execute(first if i == 0 else run_config(spec, seed), folder, overwrite=True, progress=False)
            results.setdefault(spec.label, []).append(folder)
            done.append((spec.label, seed, folder))
    write_tables(out, done)
    before = set(out.glob("*.png"))
    claims = list(paper.report(results, out))
    figures = sorted(set(out.glob("*.png")) - before) or sorted(out.glob("*.png"))
    text = claims_markdown(getattr(paper, "TITLE", name), claims, figures, quick, time.perf_counter() - start,
                           name=name, runs=describe_runs(runs), executor=executor, settings=settings,
                           cpu_seconds=_cpu_seconds() - cpu0, full_runtime=getattr(paper, "FULL_RUNTIME", None),
                           load=load_average())
    (out / "claims.md").write_text(text)
    return Result(out, claims, figures)


def write_tables(out: Path, runs: Sequence[tuple[str, int, Path]]) -> None:
    """Writes out/sweep.csv (a row per (curve label, seed, run folder): the run's final metrics
    and wall time) and out/summary.csv (per curve: n and each final metric's mean and std over
    its seeds), as `fedsim sweep` writes them."""
    from .sweep import SweepRun, finished, summarize, table, write_csv

    outcomes = [finished(SweepRun((("curve", label),), seed, folder.name), folder, "ran") for label, seed, folder in runs]
    rows = table(outcomes, ["curve"])
    write_csv(out / "sweep.csv", rows)
    write_csv(out / "summary.csv", summarize(rows, ["curve"]))


def load_average() -> str:
    """Returns the 1-minute load average as text ('' where the OS does not say)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:  # pragma: no cover - platforms without getloadavg
        return ""
