"""Resident memory of per-client state: SCAFFOLD on 100,000 clients with a 100k-parameter model.

Each sampled client keeps c_i (one model-sized vector, 426 KB). Without a budget the state
store grows by that much per new client; with `run.state_memory_mb` it stays flat and the
rest spills to disk. Every variant runs in its own process (a clean RSS baseline); the
script prints RSS against the number of clients that hold state.

    python benchmarks/state_memory.py [--rounds 200] [--budget-mb 64] [--unbounded-rounds 30]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 2**20


def config(rounds: int, budget_mb: float | None) -> dict:
    """100,000 clients × 2 samples (60-feature Gaussian mixture), MLP 60-1500-10 (106,510
    parameters), SCAFFOLD, 100 clients per round, one local step of batch 2."""
    return {
        "name": "state-memory",
        "seed": 0,
        "data": {"name": "gaussian_mixture", "num_samples": 250_000, "dim": 60, "num_classes": 10,
                 "test_fraction": 0.2, "num_clients": 100_000, "partition": "iid"},
        "model": {"name": "mlp", "hidden": [1500]},
        "strategy": {"name": "scaffold"},
        "local": {"lr": 0.05, "batch_size": 2, "steps": 1},
        "protocol": {"name": "sync", "clients_per_round": 100},
        "run": {"rounds": rounds, "eval_every": rounds, "progress": False, "state_memory_mb": budget_mb,
                "torch_threads": 1},
    }


def measure(rounds: int, budget_mb: float | None, every: int) -> None:
    """Runs one variant in this process; prints one JSON line per sample."""
    import psutil

    from fedsim.config import load_config
    from fedsim.runner import build

    run = build(load_config(config(rounds, budget_mb)))
    ctx, proto = run.ctx, run.protocol
    proc = psutil.Process()
    state = proto.init(ctx)
    rss0 = proc.memory_info().rss
    start = time.perf_counter()
    try:
        while not state.finished:
            state = proto.step(ctx, state)
            if state.rounds % every == 0 or state.finished:
                print(json.dumps({"round": state.rounds, "clients_with_state": len(ctx.store),
                                  "store_mem_mib": ctx.store.memory_in_use / MiB,
                                  "rss_growth_mib": (proc.memory_info().rss - rss0) / MiB,
                                  "seconds": time.perf_counter() - start}), flush=True)
    finally:
        ctx.store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--budget-mb", type=float, default=64.0)
    ap.add_argument("--unbounded-rounds", type=int, default=30)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--child", nargs=2, metavar=("ROUNDS", "BUDGET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        budget = None if args.child[1] == "none" else float(args.child[1])
        measure(int(args.child[0]), budget, args.every)
        return
    for label, rounds, budget in (("unbounded", args.unbounded_rounds, "none"),
                                  (f"budget {args.budget_mb:g} MiB", args.rounds, str(args.budget_mb))):
        cmd = [sys.executable, __file__, "--child", str(rounds), budget, "--every", str(args.every)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        print(f"\n{label}:\n| round | clients with state | store memory MiB | RSS growth MiB | s |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['round']} | {r['clients_with_state']} | {r['store_mem_mib']:.0f} | "
                  f"{r['rss_growth_mib']:.0f} | {r['seconds']:.0f} |")
        first, last = rows[0], rows[-1]
        slope = (last["rss_growth_mib"] - first["rss_growth_mib"]) / max(
            last["clients_with_state"] - first["clients_with_state"], 1) * 1000
        print(f"RSS slope after round {first['round']}: {slope:.1f} MiB per 1,000 more clients with state")


if __name__ == "__main__":
    main()
