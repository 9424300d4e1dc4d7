"""Differential privacy and Byzantine robustness: accuracy against ε, and under attack.

Claims under test:

* DP-FedAvg (McMahan et al. 2018): more noise (smaller ε) costs accuracy; asynchronous
  aggregation (FedBuff, Nguyen et al. 2022) with the same noise multiplier trains about as
  well — but fedsim cannot give it an ε (docs/privacy-and-robustness.md says why).
* Robust aggregation (Yin et al. 2018; Blanchard et al. 2017; Karimireddy et al. 2021) keeps
  training under crude attacks (sign flip ×4, Gaussian updates) that break plain averaging;
  "a little is enough" (Baruch et al. 2019) evades the median and Krum.

Runs on digits.yaml (100 clients, 10 per round, equal weights). DP: clipping norm 1,
central noise, z ∈ {0.5, 1, 2}, sync and FedBuff (buffer 10, concurrency 20); sync rows
report ε at δ = 10⁻⁵ (fixed-size sampling, RDP). Attacks: 20 malicious clients (keyed
choice), each reducer (mean = FedAvg, median, trimmed mean β = 0.2, multi-Krum f = 2 of 5,
centered clipping τ = 1) under none, sign flip ×4, Gaussian σ = 1, ALIE (paper's z), label flip.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedsim.plots import band  # noqa: E402
from fedsim.reproduce import Claim, RunSpec, seed_final  # noqa: E402

TITLE = "Differential privacy (DP-FedAvg, sync vs FedBuff) and robust aggregation under attack, digits non-IID"
FULL_RUNTIME = "about 10 minutes on 2 cores (33 runs × 2 seeds, 100 rounds)"

ROUNDS, QUICK_ROUNDS = 100, 30
SEEDS = (0, 1)
NOISE = (0.5, 1.0, 2.0)
FEDBUFF = "protocol={name: async, buffer_size: 10, concurrency: 20}"
REDUCERS = {"mean": "{name: mean}", "median": "{name: median}", "trimmed mean": "{name: trimmed_mean, trim: 0.2}",
            "multi-Krum": "{name: krum, f: 2, select: 5}", "centered clip": "{name: centered_clip, tau: 1.0}"}
ATTACKS = {"none": "{name: none}", "sign flip": "{name: sign_flip, scale: 4.0, fraction: 0.2}",
           "gaussian": "{name: gaussian, sigma: 1.0, fraction: 0.2}", "alie": "{name: alie, fraction: 0.2}",
           "label flip": "{name: label_flip, fraction: 0.2}"}


def _spec(label: str, overrides: list[str]) -> RunSpec:
    return RunSpec(label, "digits.yaml", [*overrides, f"run.rounds={ROUNDS}"], SEEDS,
                   quick=[f"run.rounds={QUICK_ROUNDS}"])


def _dp(z: float) -> str:
    return f"strategy={{name: dp, clip: 1.0, noise_multiplier: {z}}}"


RUNS = [_spec("sync", []), _spec("FedBuff", [FEDBUFF])]
RUNS += [_spec(f"sync z={z}", [_dp(z)]) for z in NOISE]
RUNS += [_spec(f"FedBuff z={z}", [FEDBUFF, _dp(z)]) for z in NOISE]
RUNS += [_spec(f"{reducer} / {attack}", [f"strategy={{name: robust, reducer: {spec}}}", f"system.adversary={adv}"])
         for reducer, spec in REDUCERS.items() for attack, adv in ATTACKS.items()]


def final(folders: list[Path], key: str = "test_accuracy") -> float | None:
    """Returns the mean over the seeds of `key` in each run's last metrics row (summary.csv's mean)."""
    return seed_final(folders, key)[0]


def report(results: dict[str, list[Path]], out: Path) -> list[Claim]:
    """Draws accuracy against z (with sync's ε) and the attack × reducer table; checks the claims."""
    acc = {label: final(folders) for label, folders in results.items()}
    std = {label: seed_final(folders, "test_accuracy")[1] or 0.0 for label, folders in results.items()}
    eps = {z: final(results[f"sync z={z}"], "dp_epsilon") for z in NOISE}
    seeds = min(len(folders) for folders in results.values())
    fig, (ax_dp, ax_rb) = plt.subplots(1, 2, figsize=(12, 4.2))
    for proto in ("sync", "FedBuff"):
        labels = [proto, *(f"{proto} z={z}" for z in NOISE)]
        band(ax_dp, np.array([0.0, *NOISE]), np.array([acc[k] for k in labels]), np.array([std[k] for k in labels]),
             seeds, marker="o", label=proto)
    for z in NOISE:
        ax_dp.annotate(f"ε={eps[z]:.1f}", (z, acc[f"sync z={z}"]), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax_dp.set(xlabel="noise multiplier z (clip 1, central)",
              ylabel="final test accuracy" + (f" (mean ± std, {seeds} seeds)" if seeds > 1 else ""), ylim=(0, 1),
              title="DP-FedAvg; ε at δ = 1e-5 for sync (FedBuff: not valid)")
    ax_dp.legend()
    table = np.array([[acc[f"{r} / {a}"] for a in ATTACKS] for r in REDUCERS])
    ax_rb.imshow(table, vmin=0, vmax=1, cmap="viridis")
    ax_rb.set_xticks(range(len(ATTACKS)), list(ATTACKS), rotation=20)
    ax_rb.set_yticks(range(len(REDUCERS)), list(REDUCERS))
    for i in range(len(REDUCERS)):
        for j in range(len(ATTACKS)):
            ax_rb.text(j, i, f"{table[i, j]:.2f}", ha="center", va="center", color="w" if table[i, j] < 0.6 else "k")
    ax_rb.set_title("final accuracy, 20% malicious clients")
    fig.suptitle(f"digits, 100 clients, 10 per round — mean of {seeds} seed(s)")
    fig.tight_layout()
    fig.savefig(out / "privacy_and_robustness.png", dpi=120)
    plt.close(fig)

    claims = []
    sync = [acc["sync"], *(acc[f"sync z={z}"] for z in NOISE)]
    drops = all(b <= a + 0.01 for a, b in zip(sync, sync[1:]))
    claims.append(Claim(
        "DP-FedAvg: smaller ε (more noise) costs accuracy",
        "sync: no DP {:.3f}; ".format(sync[0]) + "; ".join(
            f"z={z} (ε={eps[z]:.1f}) {acc[f'sync z={z}']:.3f}" for z in NOISE), bool(drops)))
    gaps = [acc[f"FedBuff z={z}"] - acc[f"sync z={z}"] for z in NOISE]
    claims.append(Claim(
        "FedBuff with the same noise multiplier trains about as well as sync DP-FedAvg (within 3 pts)",
        "; ".join(f"z={z}: FedBuff {acc[f'FedBuff z={z}']:.3f} vs sync {acc[f'sync z={z}']:.3f}" for z in NOISE)
        + " (FedBuff's ε is not valid: aggregations are not uniform samples)", bool(max(abs(g) for g in gaps) <= 0.03)))
    clean = acc["mean / none"]
    robust = [r for r in REDUCERS if r != "mean"]
    for attack in ("sign flip", "gaussian"):
        held = {r: acc[f"{r} / {attack}"] for r in robust}
        ok = acc[f"mean / {attack}"] < clean - 0.1 and min(held.values()) >= clean - 0.05
        claims.append(Claim(
            f"Robust reducers keep training under '{attack}' where plain averaging fails",
            f"clean FedAvg {clean:.3f}; under attack: mean {acc[f'mean / {attack}']:.3f}, "
            + ", ".join(f"{r} {v:.3f}" for r, v in held.items()), bool(ok)))
    evaded = {r: (acc[f"{r} / none"], acc[f"{r} / alie"]) for r in ("median", "multi-Krum")}
    claims.append(Claim(
        "'A little is enough' costs the median and Krum accuracy (≥ 5 pts below their clean runs)",
        "; ".join(f"{r}: clean {c:.3f}, ALIE {a:.3f}" for r, (c, a) in evaded.items()),
        bool(all(a <= c - 0.05 for c, a in evaded.values()))))
    return claims
