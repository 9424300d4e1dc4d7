"""Curves from run folders: one run's accuracy plots, and overlays of several runs."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .errors import FedsimError  # noqa: E402
from .outputs import iter_runs  # noqa: E402

LABELS = {
    "virtual_time": "virtual time (s)",
    "round": "round",
    "wall_time": "wall time (s)",
    "test_accuracy": "test accuracy",
    "test_loss": "test loss",
    "bytes_up": "bytes sent by clients",
    "aggregations": "aggregations",
    "dist_to_opt": "distance to optimum",
}


def _series(rows: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
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


def curves(run_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """Draws the run's metric against round and against virtual time into curves.png."""
    y = "test_accuracy" if any(r.get("test_accuracy") is not None for r in rows) else "test_loss"
    if any(r.get("dist_to_opt") is not None for r in rows):
        y = "dist_to_opt"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, x in zip(axes, ("round", "virtual_time")):
        xs, ys = _series(rows, x, y)
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


def overlay(run_dirs: Sequence[str | Path], x: str, y: str, out: str | Path, labels: Sequence[str] | None = None,
            title: str | None = None, logy: bool = False) -> Path:
    """Overlays metric `y` against `x` for several runs with a legend (`labels`: one per run,
    in order; default the folder names); returns the PNG path. Raises FedsimError for a
    label count that does not match, unreadable metrics, or an image that cannot be written."""
    if labels and len(labels) != len(run_dirs):
        raise FedsimError(f"{len(labels)} label(s) for {len(run_dirs)} runs: give one --label per run, in order")
    loaded = [(Path(p), run_metrics(Path(p), x, y)) for p in run_dirs]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = 0
    for i, (path, rows) in enumerate(loaded):
        xs, ys = _series(rows, x, y)
        if not xs:
            continue
        ax.plot(xs, ys, label=labels[i] if labels else path.name)
        drawn += 1
    if not drawn:
        plt.close(fig)
        raise FedsimError(f"no run has both {x!r} and {y!r} in its metrics")
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    if logy:
        ax.set_yscale("log")
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
