"""Gossip learning with plain vs variance-corrected averaging vs FL (Tian et al., arXiv 2404.04616).

16 nodes on a random 4-regular graph hold Dirichlet(0.5) shares of scikit-learn digits and
start from independent initialisations (`gossip.yaml`, MLP 64-64-10). Every ~1 s (±15 %)
a node trains one mini-batch, pushes its model to its neighbours and, once it has a model
from every neighbour, merges ("train 50 / average 50"), plainly or with VCA. The FL
baseline (`fedavg.yaml`) gives every client the same local work per round: one mini-batch
from the global model. Control: the same gossip runs from one shared initial model.
Measured against virtual time: the mean accuracy of the nodes' own models (gossip) and of
the global model (FL), averaged over seeds.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedsim.outputs import read_jsonl  # noqa: E402
from fedsim.plots import band  # noqa: E402
from fedsim.reproduce import Claim, RunSpec, seed_mean  # noqa: E402

TITLE = "Variance-corrected averaging for gossip learning (Tian, Al-Ars, Kitsak, Hofstee — arXiv 2404.04616)"
FULL_RUNTIME = "about 5 minutes of CPU time on 2 cores (15 runs: 5 variants × 3 seeds, 400 s of virtual time); quick: under 1 minute"

QUICK = ["run.time_budget=200"]
PLAIN, VCA = "strategy.variance_correction=false", "strategy.variance_correction=true"
SHARED = "protocol.init=shared"
RUNS = [
    RunSpec("GL plain", "gossip.yaml", [PLAIN], seeds=(0, 1, 2), quick=QUICK),
    RunSpec("GL VCA", "gossip.yaml", [VCA], seeds=(0, 1, 2), quick=QUICK),
    RunSpec("FedAvg", "fedavg.yaml", [], seeds=(0, 1, 2), quick=QUICK),
    RunSpec("GL plain shared-init", "gossip.yaml", [PLAIN, SHARED], seeds=(0, 1, 2), quick=QUICK),
    RunSpec("GL VCA shared-init", "gossip.yaml", [VCA, SHARED], seeds=(0, 1, 2), quick=QUICK),
]
STYLE = {"GL plain": "C1", "GL VCA": "C0", "FedAvg": "k", "GL plain shared-init": "C1", "GL VCA shared-init": "C0"}


def curve(folders: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (virtual times, accuracy: mean over the seeds, its std): node models for gossip,
    else the global model."""
    key = "node_acc_mean" if "node_acc_mean" in read_jsonl(folders[0] / "metrics.jsonl")[0] else "test_accuracy"
    return seed_mean(folders, "virtual_time", key)


def time_to(t: np.ndarray, acc: np.ndarray, target: float) -> float:
    """Returns the first evaluation time at which `acc` reaches `target` (inf if never)."""
    hit = np.nonzero(acc >= target)[0]
    return float(t[hit[0]]) if len(hit) else float("inf")


def draw(curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], seeds: int, out: Path) -> Path:
    """Draws each curve's mean over the seeds with a ± std band; returns the figure's path."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, shared in zip(axes, (False, True)):
        for label, (t, acc, std) in curves.items():
            if label == "FedAvg" or label.endswith("shared-init") == shared:
                band(ax, t, acc, std, seeds, color=STYLE[label], ls="--" if label == "FedAvg" else "-", label=label)
        ax.set_xlabel("virtual time (s)")
        ax.set_title("shared initial model (control)" if shared else "independent initialisations", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test accuracy (gossip: mean over nodes)" + (f"\nmean ± std over {seeds} seeds" if seeds > 1 else ""))
    fig.suptitle("digits, 16 nodes, random 4-regular graph, Dirichlet(0.5)")
    fig.tight_layout()
    path = out / "vca_accuracy_vs_time.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(results: dict[str, list[Path]], out: Path) -> list[Claim]:
    stats = {label: curve(folders) for label, folders in results.items()}
    draw(stats, min(len(folders) for folders in results.values()), out)
    curves = {label: (t, acc) for label, (t, acc, _) in stats.items()}
    t_fl, acc_fl = curves["FedAvg"]
    target = 0.9 * float(np.mean(acc_fl[-3:]))
    times = {label: time_to(t, acc, target) for label, (t, acc) in curves.items()}
    final = {label: float(np.mean(acc[-3:])) for label, (_, acc) in curves.items()}

    def fmt(label: str) -> str:
        return f"{label}: {times[label]:.0f} s" if np.isfinite(times[label]) else f"{label}: not reached"

    step = float(t_fl[1] - t_fl[0])
    claims = [
        Claim(
            "GL with VCA converges about as fast as FL (independent initialisations)",
            f"time to {100 * target:.1f}% (90% of FedAvg's final accuracy): {fmt('GL VCA')}, {fmt('FedAvg')}",
            times["GL VCA"] <= 1.25 * times["FedAvg"] + step,
        ),
        Claim(
            "Plain averaging of independently initialised models is slower",
            f"{fmt('GL plain')} vs {fmt('GL VCA')}; final accuracy plain {100 * final['GL plain']:.1f}% vs "
            f"VCA {100 * final['GL VCA']:.1f}%",
            times["GL plain"] > times["GL VCA"] + step,
        ),
    ]
    _, plain_s = curves["GL plain shared-init"]
    _, vca_s = curves["GL VCA shared-init"]
    _, plain_i = curves["GL plain"]
    _, vca_i = curves["GL VCA"]
    gap_shared, gap_ind = float(np.max(np.abs(plain_s - vca_s))), float(np.max(np.abs(plain_i - vca_i)))
    claims.append(Claim(
        "With a shared initial model, plain averaging and VCA coincide",
        f"largest gap between the curves: shared init {100 * gap_shared:.1f} pp, independent init "
        f"{100 * gap_ind:.1f} pp; {fmt('GL plain shared-init')}, {fmt('GL VCA shared-init')}",
        gap_shared <= 0.05 and gap_shared < gap_ind / 5,
    ))
    return claims
