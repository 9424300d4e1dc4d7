"""Host cost of building a round's jobs, for each way of drawing batch orders.

Every job carries its client's batch order for the round, keyed by (seed, client, job id),
so that results do not depend on the executor. With many clients per round and a cheap
model, building them is a large part of a round on a GPU (benchmarks/README.md). Contenders:

* generator: `RunContext.make_jobs` with `local.shuffle: generator` (keyed numpy generators,
  seeded in bulk; the default), and `make_job` called per client for comparison;
* hash, host: `local.shuffle: hash` computed job by job with numpy (serial and Ray executors);
* hash, on the executor's device: `make_jobs` leaves the orders to the vmap executor, which
  computes the whole cohort's [m, K, B] indices at once with torch (timed to the indices
  being ready on the device); the jobs stay columns (`JobBatch`), no `Job` per client.

The paths that must agree are checked first; the script prints the best of `--repeats`.

    python benchmarks/job_building.py [--clients 1000] [--partition dirichlet_per_client] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.config import load_config  # noqa: E402
from fedsim.executors.cohort import group, stack  # noqa: E402
from fedsim.runner import build  # noqa: E402


def context(n: int, partition: str, shuffle: str, executor: dict):
    cfg = {"name": "job-building", "seed": 0,
           "data": {"name": "gaussian_mixture", "num_samples": 64 * n, "dim": 8, "num_classes": 10,
                    "num_clients": n, "partition": {"name": partition}},
           "model": {"name": "logreg"}, "strategy": {"name": "fedavg"},
           "local": {"lr": 0.05, "batch_size": 16, "epochs": 1, "shuffle": shuffle}, "protocol": {"name": "sync"},
           "executor": executor, "run": {"rounds": 1, "progress": False}}
    return build(load_config(cfg)).ctx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--partition", default="iid", help="iid: equal client sizes (one cohort); "
                    "dirichlet_per_client: uneven sizes (a cohort per batch count)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    n = args.clients
    gen = context(n, args.partition, "generator", {"kind": "serial"})
    host = context(n, args.partition, "hash", {"kind": "serial"})
    dev = context(n, args.partition, "hash", {"kind": "vmap", "device": args.device})
    payload = gen.strategy.publish(gen.strategy.init(gen.initial_params))
    clients = np.arange(n)
    device = torch.device(args.device)

    def generator(r: int) -> list:
        return gen.make_jobs(clients, payload, 0, r * n + clients)

    def per_client(r: int) -> list:
        return [gen.make_job(int(c), payload, 0, r * n + int(c)) for c in clients]

    def hashed_host(r: int) -> list:
        return host.make_jobs(clients, payload, 0, r * n + clients)

    def hashed_device(r: int) -> list:
        jobs = dev.make_jobs(clients, payload, 0, r * n + clients)  # a JobBatch: columns, no Job per client
        out = [stack(cohort, device).indices for cohort in group(jobs)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    a, b = generator(0), per_client(0)
    assert all(np.array_equal(x.indices, y.indices) for x, y in zip(a, b)), "bulk and one-by-one jobs differ"
    h = {j.job_id: j.indices for j in hashed_host(0)}
    for cohort in group(dev.make_jobs(clients, payload, 0, clients)):
        got = stack(cohort, device).indices.cpu().numpy()
        assert all(np.array_equal(got[i], h[j]) for i, j in enumerate(cohort.job_ids.tolist())), \
            "device and host orders differ"
    contenders = (("generator, make_jobs (bulk)", generator), ("generator, make_job per client", per_client),
                  ("hash, host (numpy per job)", hashed_host), (f"hash, cohort on {args.device}", hashed_device))
    best = {name: float("inf") for name, _ in contenders}
    for r in range(args.repeats):  # alternate, so that all see the same machine
        for name, fn in contenders:
            t = time.perf_counter()
            fn(r + 1)
            best[name] = min(best[name], time.perf_counter() - t)
    sizes = gen.data.samples_per_client()
    print(f"{n} jobs, client sizes {int(np.min(sizes))}-{int(np.max(sizes))} samples, batch 16, one epoch; "
          f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    ref = best["generator, make_jobs (bulk)"]
    for name, t in best.items():
        print(f"  {name:32s} {t * 1e3:8.2f} ms per round  {t / n * 1e6:6.2f} µs per job  {ref / t:5.2f}x the default")


if __name__ == "__main__":
    main()
