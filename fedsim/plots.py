"""Curves from run folders: one run's accuracy plots, and figures of several runs grouped into
mean ± std bands over seeds."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text stays text (editable, searchable)
import matplotlib.pyplot as plt  # noqa: E402

from .errors import FedsimError  # noqa: E402
from .outputs import iter_runs  # noqa: E402

LABELS = {  # axis labels, with their units
    "virtual_time": "virtual time (s)",
    "round": "rounds",
    "wall_time": "wall time (s)",
    "test_accuracy": "test accuracy (fraction)",
    "test_loss": "test loss",
    "train_loss": "training loss",
    "bytes_up": "bytes sent by clients (B)",
    "bytes_down": "bytes sent to clients (B)",
    "aggregations": "aggregations (server model updates)",
    "dist_to_opt": "distance to optimum (L2)",
}


def series(rows: Sequence[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    """Returns (xs, ys) of the rows that have both `x` and `y` (not null)."""
    xs, ys = [], []
    for r in rows:
        if r.get(x) is not None and r.get(y) is not None:
            xs.append(r[x])
            ys.append(r[y])
    return xs, ys


def _number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def run_metrics(run_dir: Path, x: str, y: str) -> list[dict[str, Any]]:
    """Returns the metrics rows of `run_dir`; raises FedsimError (one line, naming the file)
    if metrics.jsonl is unreadable, a row is not a JSON object, or a row's `x` or `y` is
    neither a number nor null."""
    metrics = run_dir / "metrics.jsonl"
    try:
        ((_, rows),) = iter_runs([run_dir])
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0] if str(exc) else ""
        raise FedsimError(f"{metrics}: not a readable metrics file ({type(exc).__name__}: {why})") from None
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise FedsimError(f"{metrics}: row {i} is a JSON {type(row).__name__}, not an object of metrics")
        for key in (x, y):
            if row.get(key) is not None and not _number(row[key]):
                raise FedsimError(f"{metrics}: row {i}: {key} is {str(row[key])[:40]!r}, not a number")
    return rows


def default_metric(rows: Sequence[dict[str, Any]]) -> str:
    """The metric a run is judged by: dist_to_opt where measured, else test accuracy, else test loss."""
    y = "test_accuracy" if any(r.get("test_accuracy") is not None for r in rows) else "test_loss"
    if any(r.get("dist_to_opt") is not None for r in rows):
        y = "dist_to_opt"
    return y


def curves(run_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """Draws the run's metric against round and against virtual time into curves.png."""
    y = default_metric(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, x in zip(axes, ("round", "virtual_time")):
        xs, ys = series(rows, x, y)
        ax.plot(xs, ys, marker="." if len(xs) < 40 else None)
        ax.set_xlabel(LABELS.get(x, x))
        ax.set_ylabel(LABELS.get(y, y))
        if y == "dist_to_opt" and ys and min(ys) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# config keys that do not change what a run computes: runs differing only in them are seeds of one curve
NOT_RESULT_KEYS = ("seed", "run.progress", "run.torch_threads", "run.checkpoint_every", "run.keep_checkpoints",
                   "run.state_dir", "run.state_memory_mb", "run.loggers", "run.log_events")
FORMATS = (".png", ".pdf", ".svg")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Returns a nested mapping as {dotted.key: leaf value} (lists are leaves, as tuples)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tuple(tree) if isinstance(tree, list) else tree}


def run_config(run_dir: Path) -> dict[str, Any] | None:
    """Returns the run's config.yaml flattened to dotted keys, or None where it has none."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise FedsimError(f"{path}: not a readable config ({type(exc).__name__})") from None
    return flatten(tree) if isinstance(tree, dict) else None


def expand_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Returns the run folders named: a run folder itself, or each run folder directly inside a
    folder that holds run folders (a sweep's); FedsimError for a path that is neither."""
    found = []
    for p in map(Path, paths):
        if (p / "metrics.jsonl").is_file() or not p.is_dir():
            found.append(p)  # not a folder: run_metrics says why
            continue
        inside = sorted(c for c in p.iterdir() if (c / "metrics.jsonl").is_file())
        found += inside or [p]
    return found


@dataclass
class Group:
    """The runs drawn as one curve: mean over them, ± their std as a band."""

    key: tuple
    runs: list[tuple[Path, list[dict[str, Any]], dict[str, Any] | None]]
    label: str = ""


def group_runs(loaded: Sequence[tuple[Path, list[dict[str, Any]], dict[str, Any] | None]],
               group_by: Sequence[str] | None) -> list[Group]:
    """Groups runs by the values of the `group_by` config keys, or (None) by their whole config but
    the keys that do not change results (the seed, the progress bar…); a run without config.yaml
    is its own group. Labels: `k=v` of the keys that differ between groups, else the experiment
    name, else the folder name. FedsimError for a `group_by` key no run's config has."""
    groups: dict[tuple, Group] = {}
    for path, rows, cfg in loaded:
        if cfg is None:
            key: tuple = ("folder", str(path))
        elif group_by:
            key = tuple((k, cfg.get(k)) for k in group_by)
        else:
            key = tuple(sorted((k, repr(v)) for k, v in cfg.items() if k not in NOT_RESULT_KEYS))
        groups.setdefault(key, Group(key, [])).runs.append((path, rows, cfg))
    if group_by:
        known = set().union(*(cfg for _, _, cfg in loaded if cfg is not None))
        missing = [k for k in group_by if k not in known]
        if missing:
            import difflib

            close = difflib.get_close_matches(missing[0], sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise FedsimError(f"--group-by: no run's config has {missing[0]!r}{hint}")
    configs = [g.runs[0][2] for g in groups.values() if g.runs[0][2] is not None]
    keys = group_by or sorted({k for c in configs for k in c if k not in NOT_RESULT_KEYS
                               and len({repr(d.get(k)) for d in configs}) > 1})
    for g in groups.values():
        path, _, cfg = g.runs[0]
        if cfg is None:
            g.label = path.name
        elif keys:
            g.label = ", ".join(f"{k}={cfg.get(k)}" for k in keys)
        else:
            g.label = str(cfg.get("name", path.name))
    return list(groups.values())


def mean_std(series: Sequence[tuple[list[float], list[float]]]) -> tuple[Any, Any, Any]:
    """Returns (x, mean, std) of several (xs, ys) curves: on their common x where all share it,
    else interpolated onto the union of their x within the range they all cover. std is the
    sample std (zeros for one curve)."""
    import numpy as np

    curves = [(np.asarray(xs, float), np.asarray(ys, float)) for xs, ys in series if xs]
    if all(len(x) == len(curves[0][0]) and np.array_equal(x, curves[0][0]) for x, _ in curves):
        grid, ys = curves[0][0], np.stack([y for _, y in curves])
    else:
        lo, hi = max(x.min() for x, _ in curves), min(x.max() for x, _ in curves)
        grid = np.unique(np.concatenate([x for x, _ in curves]))
        grid = grid[(grid >= lo) & (grid <= hi)]
        ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    std = ys.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(grid)
    return grid, ys.mean(axis=0), std


def band(ax: Any, x: Any, mean: Any, std: Any, n: int, **style: Any) -> Any:
    """Draws `mean` against `x` on `ax` (matplotlib `style`: label, color, ls…) and, where it
    is the mean of n > 1 runs, a ± `std` band in the line's colour; returns the line."""
    line, = ax.plot(x, mean, **style)
    if n > 1:
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def overlay(run_dirs: Sequence[str | Path], x: str, y: str | None, out: str | Path, labels: Sequence[str] | None = None,
            title: str | None = None, logy: bool = False, group_by: Sequence[str] | None = None) -> Path:
    """Draws metric `y` (None: `default_metric` of the first run) against `x`: one curve per group of runs (see `group_runs`), the mean over
    its runs with a ± std band where it has several. `run_dirs`: run folders, or folders holding
    run folders (a sweep's). `labels`: one per curve, in order (default from the configs); the
    title defaults to the experiment name the runs share. The format follows the extension of
    `out` (.png, .pdf, .svg). Returns `out`. Raises FedsimError for a label count that does not
    match, unreadable metrics, an unknown format or an image that cannot be written."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise FedsimError(f"cannot write {out}: the extension chooses the format, one of {', '.join(FORMATS)}")
    paths = expand_runs(run_dirs)
    if y is None:  # the first run's own metric (see default_metric)
        y = default_metric(run_metrics(paths[0], x, x))
    loaded = [(p, run_metrics(p, x, y), None) for p in paths]
    loaded = [(p, rows, run_config(p)) for p, rows, _ in loaded]
    groups = group_runs(loaded, group_by)
    if labels and len(labels) != len(groups):
        what = "runs" if len(groups) == len(paths) else "curves (groups of runs)"
        raise FedsimError(f"{len(labels)} label(s) for {len(groups)} {what}: give one --label per curve, in order")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = 0
    for i, g in enumerate(groups):
        runs = [s for s in (series(rows, x, y) for _, rows, _ in g.runs) if s[0]]
        if not runs:
            continue
        label = labels[i] if labels else g.label
        band(ax, *mean_std(runs), n=len(runs), label=f"{label} (n={len(runs)})" if len(runs) > 1 else label)
        drawn += 1
    if not drawn:
        plt.close(fig)
        raise FedsimError(f"no run has both {x!r} and {y!r} in its metrics")
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y) + (" (mean ± std over seeds)" if any(len(g.runs) > 1 for g in groups) else ""))
    if logy:
        ax.set_yscale("log")
    names = {cfg.get("name") for _, _, cfg in loaded if cfg is not None}
    title = title or (str(next(iter(names))) if len(names) == 1 else None)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, Path(out), dpi=120)


def save_figure(fig: Any, out: Path, dpi: int) -> Path:
    """Writes `fig` to `out` (its folder created) and closes it; returns `out`. Raises
    FedsimError (one line) when `out` cannot be written."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
    except (OSError, ValueError) as exc:
        raise FedsimError(f"cannot write {out}: {exc}") from None
    finally:
        plt.close(fig)
    return out
