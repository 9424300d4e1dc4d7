"""The picture of a partition: per-client label distribution and sizes (`fedsim partition`).

One stacked bar per client, its height the client's number of training samples and its
segments the samples of each class (as flwr-datasets' ``plot_label_distributions`` draws
them); tasks without classes get plain size bars.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .data.base import FederatedData


def label_counts(data: FederatedData) -> np.ndarray:
    """Returns the [clients, classes] matrix of training-sample counts ([clients, 1] without classes)."""
    src = data.source
    if src.task != "classification" or not src.num_classes:
        return data.samples_per_client()[:, None]
    y = src.y_train.numpy()
    return np.stack([np.bincount(y[idx], minlength=src.num_classes) for idx in data.client_train])


def summary(counts: np.ndarray) -> str:
    """Returns one line: clients, samples, client sizes (min / median / max), classes per client."""
    sizes = counts.sum(1)
    line = (f"{len(sizes)} clients, {int(sizes.sum())} training samples; samples per client: min {int(sizes.min())}, "
            f"median {float(np.median(sizes)):g}, max {int(sizes.max())}")
    if counts.shape[1] > 1:
        held = (counts > 0).sum(1)
        line += f"; classes per client: min {int(held.min())}, mean {held.mean():.3g}, max {int(held.max())}"
    return line


def draw(counts: np.ndarray, out: Path, title: str = "") -> Path:
    """Writes the stacked per-client bar chart of `counts` to `out` (PNG); returns `out`.
    Raises FedsimError (one line) when `out` cannot be written."""
    from .plots import plt, save_figure  # matplotlib (Agg) is slow to import: only when drawing

    n, c = counts.shape
    fig, ax = plt.subplots(figsize=(min(4 + 0.12 * n, 16), 4.5))
    cmap = plt.get_cmap("tab20" if c <= 20 else "viridis")
    colour = lambda k: cmap(k % 20) if c <= 20 else cmap(k / max(c - 1, 1))  # noqa: E731
    bottom = np.zeros(n)
    for k in range(c):
        if not counts[:, k].any():
            continue
        top = bottom + counts[:, k]
        if n <= 100:  # one bar per client
            ax.bar(np.arange(n), counts[:, k], 0.8, bottom=bottom, color=colour(k), label=str(k), linewidth=0)
        else:  # many clients: one step-shaped band per class (a bar chart's look at a fraction of the cost)
            edges = np.arange(n + 1) - 0.5
            ax.fill_between(edges, np.append(bottom, bottom[-1]), np.append(top, top[-1]), step="post",
                            color=colour(k), label=str(k), linewidth=0)
        bottom = top
    ax.set_xlabel("client")
    ax.set_ylabel("training samples")
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_title(title or "per-client label distribution")
    if 1 < c <= 20:
        ax.legend(title="class", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize="small")
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)


def draw_run_partition(data: FederatedData, run_dir: Path, title: str) -> Path | None:
    """Writes `run_dir`/partition.png, the picture of `data`'s partition; returns its path,
    or None when matplotlib is not installed (the run goes on without it)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return None
    return draw(label_counts(data), run_dir / "partition.png", title)


__all__ = ["draw", "draw_run_partition", "label_counts", "summary"]
