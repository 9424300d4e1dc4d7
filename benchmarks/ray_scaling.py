"""Ray executor scaling: workload W with 1, 2, … actors; speed-up and memory over rounds.

Every variant runs the same config (benchmarks/_workload.py, torch threads = 1 in the driver
and in each actor, so all variants compute bitwise the same model — the script checks it)
and reports, side by side: seconds per round after a warm-up round, speed-up over one
actor and over the serial executor, and resident memory (RSS; USS = memory unique to the
process, without the shared object-store pages) of the driver and of each actor, sampled
every few rounds — flat lines mean nothing accumulates per round.

    python benchmarks/ray_scaling.py [--actors 1 2] [--rounds 60] [--sample-every 10] [--jobs-per-actor 2] [--epochs 1]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._workload import workload_w  # noqa: E402
from fedsim.config import load_config  # noqa: E402
from fedsim.executors.ray_cluster import loopback_only  # noqa: E402
from fedsim.runner import build  # noqa: E402

MB = 2**20


def run_variant(executor: dict, rounds: int, every: int, epochs: int) -> dict:
    """Runs workload W (`epochs` local epochs) for `rounds` rounds on `executor`; returns
    timings, memory samples and the final model."""
    cfg = workload_w(rounds, **executor)
    cfg["run"]["torch_threads"] = 1
    cfg["local"]["epochs"] = epochs
    run = build(load_config(cfg))
    ctx, proto = run.ctx, run.protocol
    state = proto.init(ctx)
    state = proto.step(ctx, state)  # warm-up round (first jobs, lazy set-up)
    samples, t0 = [], time.perf_counter()
    for r in range(2, rounds + 1):
        state = proto.step(ctx, state)
        if r % every == 0 or r == rounds:
            actors = ctx.executor.memory() if hasattr(ctx.executor, "memory") else []
            samples.append((r, psutil.Process().memory_info().rss, actors))
    elapsed = time.perf_counter() - t0
    params = proto.eval_params(ctx, state).clone()
    ctx.executor.close()
    return {"s_per_round": elapsed / (rounds - 1), "samples": samples, "params": params}


def mb_range(values: list[int]) -> str:
    return f"{values[0] / MB:7.1f} → {values[-1] / MB:7.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--sample-every", type=int, default=10)
    ap.add_argument("--jobs-per-actor", type=int, default=2, help="executor.jobs_per_actor")
    ap.add_argument("--epochs", type=int, default=1, help="local epochs per job (W: 1, i.e. 4 SGD steps)")
    args = ap.parse_args()
    import ray

    with loopback_only():  # its processes listen on 127.0.0.1 only
        ray.init(address="local", num_cpus=max(args.actors), include_dashboard=False, logging_level=logging.WARNING)
    try:
        results = {"serial": run_variant({"executor": "serial"}, args.rounds, args.sample_every, args.epochs)}
        for n in args.actors:
            results[f"ray x{n}"] = run_variant({"executor": "ray", "num_actors": n, "num_cpus": 1,
                                                "jobs_per_actor": args.jobs_per_actor},
                                               args.rounds, args.sample_every, args.epochs)
    finally:
        ray.shutdown()

    base = results["serial"]
    one = results.get("ray x1", base)
    print(f"workload W, {args.epochs} local epoch(s): 100 clients/round, {args.rounds} rounds (first one not timed), "
          f"torch threads 1, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'variant':10s} {'s/round':>8s} {'vs serial':>9s} {'vs 1 actor':>10s} {'same model':>10s}  "
          f"{'driver RSS MB':>17s}  {'per-actor RSS MB':>17s}  {'per-actor USS MB':>17s}")
    for name, res in results.items():
        same = torch.equal(res["params"], base["params"])
        driver = [s[1] for s in res["samples"]]
        actors = [s[2] for s in res["samples"]]
        rss = [max(a["rss"] for a in snap) for snap in actors] if actors and actors[0] else []
        uss = [max(a["uss"] for a in snap) for snap in actors] if actors and actors[0] else []
        print(f"{name:10s} {res['s_per_round']:8.3f} {base['s_per_round'] / res['s_per_round']:9.2f} "
              f"{one['s_per_round'] / res['s_per_round']:10.2f} {str(same):>10s}  {mb_range(driver):>17s}  "
              f"{mb_range(rss) if rss else '-':>17s}  {mb_range(uss) if uss else '-':>17s}")
    print("memory samples at rounds", [s[0] for s in base["samples"]], "(first → last; per-actor: the largest actor)")
    for name, res in results.items():
        print(f"  {name:8s} driver RSS MB:        {' '.join(f'{s[1] / MB:.1f}' for s in res['samples'])}")
        if res["samples"][0][2]:
            largest = [f"{max(a['rss'] for a in s[2]) / MB:.1f}" for s in res["samples"]]
            print(f"  {name:8s} largest actor RSS MB: {' '.join(largest)}")


if __name__ == "__main__":
    main()
