"""One step of compressed gossip over many nodes: messages made together against one by one.

A random 4-regular graph of n nodes with Metropolis–Hastings weights and d-dimensional
float64 models; each step every node compresses its model under the feedback rule, and every
node moves towards the mix of what it knows of its neighbours (`fedsim.channel.Channel.step`,
what the decentralized protocol runs per gossip step). From `SEND_TOGETHER_FROM` senders the
channel makes every message in one vectorised call; the "one by one" column forces the
per-node path. Prints ms per step of both (best of `--repeats` runs of 5 steps), their ratio,
and whether both gave the same models bit for bit.

    python benchmarks/compressed_gossip.py [--nodes 1000] [--dim 2000] [--device cpu]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import fedsim.channel as channel  # noqa: E402
from fedsim.merge import mix  # noqa: E402
from fedsim.topologies.mixing import as_tensor, metropolis_hastings  # noqa: E402

CASES = [("topk 10%", {"name": "topk", "ratio": 0.1}, "ef21"), ("topk 10%", {"name": "topk", "ratio": 0.1}, "ef"),
         ("sign", "sign", "none"), ("identity", "identity", "econtrol"),
         ("qsgd 3 bits", {"name": "qsgd", "bits": 3, "contractive": True}, "ef21"),
         ("randk 10%", {"name": "randk", "ratio": 0.1}, "ef")]


def steps(ch: channel.Channel, w: torch.Tensor, x0: torch.Tensor, count: int = 5) -> tuple[float, torch.Tensor]:
    """Runs `count` gossip steps from x0; returns (seconds per step, final models)."""
    x, state, senders = x0.clone(), ch.initial_state(x0), np.ones(len(x0), dtype=bool)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for s in range(count):
        x, state, _ = ch.step(x, w, state, senders, s, None, mix)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / count, x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    n, device = args.nodes, torch.device(args.device)
    w = as_tensor(metropolis_hastings(nx.random_regular_graph(4, n, seed=1)), torch.float64, device)
    x0 = torch.randn(n, args.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads; {n} nodes, d = {args.dim}, "
          f"random 4-regular graph, float64; best of {args.repeats} x 5 steps")
    print(f"{'compressor':12s} {'rule':9s} {'together ms/step':>17s} {'one by one ms/step':>19s} {'ratio':>7s}  same models")
    together_from = channel.SEND_TOGETHER_FROM
    for label, comp, rule in CASES:
        ch = channel.build_channel("compression", {"compressor": comp, "feedback": rule, "gamma": 0.2})
        best = {}
        for mode, threshold in (("together", together_from), ("alone", n + 1)):
            channel.SEND_TOGETHER_FROM = threshold
            runs = [steps(ch, w, x0) for _ in range(args.repeats)]
            best[mode] = (min(r[0] for r in runs), runs[0][1])
        channel.SEND_TOGETHER_FROM = together_from
        t, a = best["together"][0] * 1e3, best["alone"][0] * 1e3
        same = torch.equal(best["together"][1], best["alone"][1])
        print(f"{label:12s} {rule:9s} {t:17.1f} {a:19.1f} {a / t:6.2f}x  {same}")


if __name__ == "__main__":
    main()
