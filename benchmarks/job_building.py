"""Host cost of building a round's jobs: `RunContext.make_jobs` (bulk) against `make_job` per client.

Every job carries its client's batch order for the round, drawn from a generator keyed by
(seed, client, job id), so that results do not depend on the executor. With many clients
per round and a cheap model that is a large part of a round on a GPU (benchmarks/README.md).
Both paths must give the same indices; the script checks it, then prints the best of
`--repeats` timings side by side.

    python benchmarks/job_building.py [--clients 1000] [--partition dirichlet_per_client]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.config import load_config  # noqa: E402
from fedsim.runner import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--partition", default="dirichlet_per_client", help="iid gives equal client sizes")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    n = args.clients
    cfg = {"name": "job-building", "seed": 0,
           "data": {"name": "gaussian_mixture", "num_samples": 64 * n, "dim": 8, "num_classes": 10,
                    "num_clients": n, "partition": {"name": args.partition}},
           "model": {"name": "logreg"}, "strategy": {"name": "fedavg"},
           "local": {"lr": 0.05, "batch_size": 16, "epochs": 1}, "protocol": {"name": "sync"},
           "executor": {"kind": "serial"}, "run": {"rounds": 1, "progress": False}}
    ctx = build(load_config(cfg)).ctx
    payload = ctx.strategy.publish(ctx.strategy.init(ctx.initial_params))
    clients = np.arange(n)

    def bulk(r: int) -> list:
        return ctx.make_jobs(clients, payload, 0, r * n + clients)

    def one_by_one(r: int) -> list:
        return [ctx.make_job(int(c), payload, 0, r * n + int(c)) for c in clients]

    a, b = bulk(0), one_by_one(0)
    assert all(np.array_equal(x.indices, y.indices) for x, y in zip(a, b)), "bulk and one-by-one jobs differ"
    best = {"make_jobs (bulk)": float("inf"), "make_job per client": float("inf")}
    for r in range(args.repeats):  # alternate, so that both see the same machine
        for name, fn in (("make_jobs (bulk)", bulk), ("make_job per client", one_by_one)):
            t = time.perf_counter()
            fn(r + 1)
            best[name] = min(best[name], time.perf_counter() - t)
    sizes = ctx.data.samples_per_client()
    print(f"{n} jobs, client sizes {int(np.min(sizes))}-{int(np.max(sizes))} samples, batch 16, one epoch")
    for name, t in best.items():
        print(f"  {name:22s} {t * 1e3:8.2f} ms per round  {t / n * 1e6:6.2f} µs per job")
    print(f"  bulk is {best['make_job per client'] / best['make_jobs (bulk)']:.2f}x faster")


if __name__ == "__main__":
    main()
