"""Ray-sharded vmap against one vmap executor: one synchronous cohort of N clients per round.

Runs the same config twice on this machine: (a) `executor.kind: vmap` (one device), and (b)
`executor.kind: ray, worker: vmap` with A actors — one per GPU, or two sharing one GPU
(`--share-gpu`), or CPU actors without a GPU — each training its contiguous shard of the
cohort with a vmap executor. Model: the benchmarks' MLP 60-200-10 on workload W's Gaussian
mixture (benchmarks/_workload.py), about 64 samples per client, one local epoch of batch 16
(4 steps); or pfl's CNN on CIFAR-shaped 3×32×32 images (`--model cnn`, dropout off so the
two runs compare to rounding), 50 images per client, batch 10. FedAvg over the whole cohort.

Prints, per variant: client-updates/s after a warm-up round, the ratio, the per-round split
as far as it is measured — the executor's call (for Ray: the actors' vmap time, mean over
actors; the driver's fetch and unpickling of the stacked shards; the rest of the call:
putting the model, Ray's scheduling and transfer) and the host's bookkeeping outside the
executor (building jobs, aggregation) — and the largest absolute difference between the
two runs' final models.

    python benchmarks/ray_vmap.py [--clients 10000] [--rounds 5] [--actors A] [--share-gpu] [--model mlp|cnn]
    python benchmarks/ray_vmap.py --quick          # CPU-sized check: 64 clients, 2 rounds, 2 actors
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._workload import workload_w  # noqa: E402
from fedsim.config import load_config  # noqa: E402
from fedsim.executors.ray_cluster import loopback_only  # noqa: E402
from fedsim.runner import build  # noqa: E402


def config(model: str, clients: int, rounds: int, executor: dict[str, Any]) -> dict[str, Any]:
    """Returns the benchmark's config: every client trains in every round."""
    if model == "mlp":
        cfg = workload_w(rounds)
        cfg["data"].update(num_clients=clients, num_samples=clients * 80, partition="iid")  # 64 train samples each
    else:
        cfg = {
            "name": "ray-vmap-cnn", "seed": 0, "plugins": ["benchmarks._images"],
            "data": {"name": "cifar_shaped", "num_train": clients * 50, "num_test": 1000, "num_clients": clients,
                     "partition": "iid"},
            "model": {"name": "benchmarks._images:pfl_cnn", "dropout": False},
            "strategy": {"name": "fedavg"},
            "local": {"lr": 0.05, "batch_size": 10, "epochs": 1},
            "protocol": {"name": "sync"},
            "run": {"rounds": rounds, "eval_every": rounds, "progress": False},
        }
    cfg["protocol"]["clients_per_round"] = clients
    cfg["executor"] = executor
    return cfg


def _timed(obj: Any, name: str, spent: dict[str, float]) -> None:
    """Wraps obj.name so that its wall time adds up in spent[name]."""
    fn = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - t

    setattr(obj, name, wrapper)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(cfg: dict[str, Any], rounds: int, device: str) -> dict[str, Any]:
    """Builds the run, runs one warm-up round, then times `rounds` rounds; returns the seconds
    per round, its split, and the final model."""
    run = build(load_config(cfg))
    ctx, proto = run.ctx, run.protocol
    state = proto.step(ctx, proto.init(ctx))  # warm-up: first cohort (vmap set-up, CUDA graphs, actor imports)
    ex = ctx.executor
    spent = {"run": 0.0}
    _timed(ex, "run", spent)
    before = {k: getattr(ex, k, 0.0) for k in ("compute_s", "fetch_s")}
    sync(device)
    t0 = time.perf_counter()
    for _ in range(rounds):
        state = proto.step(ctx, state)
    sync(device)
    wall = (time.perf_counter() - t0) / rounds
    actors = len(getattr(ex, "_slots", [])) or 1  # the Ray variant: its actors
    compute = (getattr(ex, "compute_s", 0.0) - before["compute_s"]) / actors / rounds
    fetch = (getattr(ex, "fetch_s", 0.0) - before["fetch_s"]) / rounds
    params = proto.eval_params(ctx, state).detach().cpu().clone()
    placement = getattr(ex, "placement", [])
    ex.close()
    return {"wall": wall, "executor": spent["run"] / rounds, "compute": compute, "fetch": fetch, "params": params,
            "devices": sorted({a["device"] for a in placement})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10_000, help="cohort size N (every client, every round)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds, after one warm-up round")
    ap.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    ap.add_argument("--actors", type=int, default=None, help="A (default: the number of GPUs, else 2)")
    ap.add_argument("--share-gpu", action="store_true", help="two actors on one GPU (num_gpus 0.5 each)")
    ap.add_argument("--precision", default="fp32", help="the vmap executor's precision (both variants)")
    ap.add_argument("--quick", action="store_true", help="tiny CPU-sized check: 64 clients, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.rounds = 64, 2
    gpus = torch.cuda.device_count()
    device = "cuda" if gpus else "cpu"
    actors = 2 if args.share_gpu else args.actors or gpus or 2
    per_gpu = 0.0 if not gpus else 0.5 if args.share_gpu else 1.0
    cpus = os.cpu_count() or 2
    vmap = {"precision": args.precision}
    ray_executor = {"kind": "ray", "worker": "vmap", "num_actors": actors, "num_gpus": per_gpu,
                    "num_cpus": max(1, cpus // actors if not gpus else min(4, cpus // actors)), "vmap": vmap}
    if args.model == "cnn":
        os.chdir(ROOT)  # the data and model plugin are imported by module name
    import ray

    with loopback_only():  # a private Ray on 127.0.0.1 only
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False, logging_level=logging.WARNING)
    try:
        one = measure(config(args.model, args.clients, args.rounds, {"kind": "vmap", "device": device, **vmap}),
                      args.rounds, device)
        sharded = measure(config(args.model, args.clients, args.rounds, ray_executor), args.rounds, device)
    finally:
        ray.shutdown()

    name = torch.cuda.get_device_name() if gpus else "CPU"
    print(f"{args.model}, cohort of {args.clients} clients (FedAvg, every client every round), {args.rounds} timed "
          f"rounds after a warm-up; {name} × {max(gpus, 1)}, {cpus} CPUs, torch {torch.__version__}, "
          f"precision {args.precision}")
    print(f"ray: {actors} actor(s), num_gpus {per_gpu:g} and num_cpus {ray_executor['num_cpus']} each, "
          f"on {', '.join(sharded['devices'])}")
    head = (f"{'variant':18s} {'updates/s':>11s} {'s/round':>8s} {'executor':>9s} {'actor vmap':>10s} "
            f"{'fetch':>7s} {'Ray rest':>8s} {'host':>7s}")
    print(head)
    for label, r in ((f"vmap ({device})", one), (f"ray+vmap x{actors}", sharded)):
        ray_rest = r["executor"] - r["compute"] - r["fetch"] if r is sharded else float("nan")
        compute = r["compute"] if r is sharded else r["executor"]
        fetch = r["fetch"] if r is sharded else float("nan")
        print(f"{label:18s} {args.clients / r['wall']:11.0f} {r['wall']:8.4f} {r['executor']:9.4f} {compute:10.4f} "
              f"{fetch:7.4f} {ray_rest:8.4f} {r['wall'] - r['executor']:7.4f}")
    print(f"ratio ray+vmap / vmap (updates/s): {one['wall'] / sharded['wall']:.2f}")
    diff = (sharded["params"] - one["params"]).abs().max().item()
    print(f"max |difference| of the final models: {diff:.3g} (model max |w| {one['params'].abs().max().item():.3g})")
    print("columns (seconds per round): executor = the executor's run call; actor vmap = the actors' vmap calls "
          "(mean over actors; for vmap: the whole call); fetch = the driver's ray.get of the stacked shards; "
          "Ray rest = executor − actor vmap − fetch (model put, scheduling, transfer, waiting for the slowest "
          "shard); host = outside the executor (jobs, aggregation).")


if __name__ == "__main__":
    main()
