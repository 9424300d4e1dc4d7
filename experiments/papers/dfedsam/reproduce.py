"""DFedAvg vs DFedSAM vs DFedSAM-MGS (Q = 4) over five topologies (Shi et al., ICML 2023).

Task: scikit-learn digits over 32 nodes, Dirichlet(0.3) label skew per class, MLP with one hidden layer of 64
(`dfl.yaml`). Topologies from sparse to dense: ring, 2-D grid, static exponential graph,
a random 4-regular graph re-drawn every round (the paper's "random"), complete graph, all
with Metropolis–Hastings weights. Measured: the mean test accuracy of the nodes' own
models (what a node of a decentralized system actually uses), averaged over the last
three evaluations and over seeds; the accuracy of the nodes' average model is reported
beside it.
"""
from __future__ import annotations

from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedsim.outputs import read_jsonl  # noqa: E402
from fedsim.reproduce import Claim, RunSpec  # noqa: E402

TITLE = "DFedSAM / DFedSAM-MGS (Shi, Shen, Wei, Sun, Yuan, Wang, Tao — ICML 2023, arXiv 2302.04083)"
FULL_RUNTIME = "about 25 minutes of CPU time on 2 cores (45 runs: 3 methods × 5 topologies × 3 seeds); quick: about 2 minutes"

RHO = 0.05
TOPOLOGIES = {
    "ring": ["topology.name=ring"],
    "grid": ["topology.name=grid"],
    "exponential": ["topology.name=exponential"],
    "random": ["topology.name=dynamic_regular", "topology.degree=4"],
    "complete": ["topology.name=complete"],
}
METHODS = {
    "DFedAvg": ["strategy.name=dfedavg"],
    "DFedSAM": ["strategy.name=dfedsam", f"strategy.rho={RHO}"],
    "DFedSAM-MGS": ["strategy.name=dfedsam", f"strategy.rho={RHO}", "protocol.gossip_steps=4"],
}
QUICK = ["run.rounds=40"]
RUNS = [
    RunSpec(f"{method} {topo}", "dfl.yaml", [*t_over, *m_over], seeds=(0, 1, 2), quick=QUICK)
    for topo, t_over in TOPOLOGIES.items()
    for method, m_over in METHODS.items()
]


def final(folders: list[Path], key: str, last: int = 3) -> float:
    """Returns `key` averaged over the last `last` evaluations of each run, then over runs."""
    return mean(mean(r[key] for r in read_jsonl(f / "metrics.jsonl")[-last:]) for f in folders)


def table(results: dict[str, list[Path]], key: str) -> dict[str, dict[str, float]]:
    """Returns {method: {topology: final `key`}}."""
    return {m: {t: final(results[f"{m} {t}"], key) for t in TOPOLOGIES} for m in METHODS}


def draw(node: dict, avg: dict, out: Path) -> Path:
    """Grouped bars: per-node and average-model accuracy for each topology and method."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    x = np.arange(len(TOPOLOGIES))
    for ax, data, title in zip(axes, (node, avg), ("mean accuracy of the nodes' models", "accuracy of the average model")):
        for k, m in enumerate(METHODS):
            ax.bar(x + (k - 1) * 0.27, [data[m][t] for t in TOPOLOGIES], 0.27, label=m)
        ax.set_xticks(x, list(TOPOLOGIES))
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    lo = min(min(d.values()) for d in node.values())
    axes[0].set_ylim(max(0.0, lo - 0.1), 1.0)
    axes[0].set_ylabel("final test accuracy")
    axes[0].legend(fontsize=8)
    fig.suptitle("digits, 32 nodes, Dirichlet(0.3); topologies from sparse (left) to dense (right)")
    fig.tight_layout()
    path = out / "dfedsam_topologies.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def report(results: dict[str, list[Path]], out: Path) -> list[Claim]:
    node, avg = table(results, "node_acc_mean"), table(results, "test_accuracy")
    cons = table(results, "consensus_distance")
    draw(node, avg, out)
    claims = []

    order = ["ring", "grid", "exponential", "complete"]
    accs = [node["DFedAvg"][t] for t in order]
    tol = 0.01
    monotone = all(b >= a - tol for a, b in zip(accs, accs[1:]))
    claims.append(Claim(
        "Sparser topology, lower accuracy: complete ≥ exponential ≥ grid ≥ ring (DFedAvg)",
        ", ".join(f"{t} {pct(a)}" for t, a in zip(order, accs)) + f" (node models; each step within {pct(tol)})",
        monotone and accs[-1] > accs[0],
    ))

    gains = {t: node["DFedSAM"][t] - node["DFedAvg"][t] for t in TOPOLOGIES}
    wins = sum(g > 0 for g in gains.values())
    avg_gain = mean(gains.values())
    claims.append(Claim(
        "SAM helps: DFedSAM beats DFedAvg",
        f"ρ = {RHO}: DFedSAM − DFedAvg = " + ", ".join(f"{t} {100 * g:+.1f} pp" for t, g in gains.items())
        + f"; mean {100 * avg_gain:+.1f} pp, better on {wins}/{len(gains)}",
        None if abs(avg_gain) < 0.005 else (avg_gain > 0 and wins > len(gains) / 2),
    ))

    full = node["DFedSAM"]["complete"]
    parts = []
    closes = []
    for t in ("ring", "grid"):
        gap_sam, gap_mgs = full - node["DFedSAM"][t], full - node["DFedSAM-MGS"][t]
        share = 1 - gap_mgs / gap_sam if gap_sam > 0 else float("nan")
        parts.append(f"{t}: gap to complete {100 * gap_sam:.1f} pp (Q=1) → {100 * gap_mgs:.1f} pp (Q=4), "
                     f"{100 * share:.0f}% closed")
        closes.append(gap_sam > 0 and 0 < share)
    claims.append(Claim("DFedSAM-MGS (Q = 4) closes part of the gap to the complete graph", "; ".join(parts), all(closes)))

    shrink = {t: cons["DFedSAM-MGS"][t] / cons["DFedSAM"][t] for t in ("ring", "grid", "exponential")}
    claims.append(Claim(
        "MGS improves model consistency (smaller consensus distance mean_i ‖x_i − x̄‖)",
        "consensus distance Q=4 / Q=1: " + ", ".join(f"{t} {r:.2f}" for t, r in shrink.items()),
        all(r < 1 for r in shrink.values()),
    ))
    return claims
