"""Decentralized learning with 1,000 nodes: serial on the CPU against vmap on the GPU.

Workload: N nodes (default 1,000) × 64 samples of a 60-feature Gaussian mixture (10
classes, Dirichlet(0.5) label proportions per node), MLP 60-200-10, DFedAvg: every round
every node runs 4 local SGD steps of batch 16 (lr 0.05), then one gossip step with
Metropolis–Hastings weights over a ring or an exponential graph (beyond 256 nodes W is a
sparse CSR tensor). Variants, each a full fedsim run from the same config:

* ``serial-cpu``: the serial executor, node after node, the node stack on the CPU;
* ``vmap-cpu``: the vmap executor on the CPU;
* ``vmap-cuda``: the vmap executor on the GPU with ``keep_on_device`` and CUDA graphs: the
  node stack, the vmapped local steps and the sparse gossip matmul all stay on the GPU.

Printed per variant: seconds per round in steady state (rounds after the first
`--warmup`), rounds/s, node-updates/s, the share of the run spent in the executor and
in gossip (each bracketed by a device synchronisation) and in building the nodes' jobs
(batch indices and Job objects, on the host), and the largest relative
difference of the node stack from the serial run's after `--compare-rounds` rounds (same
initial weights, same keyed batches).

    python benchmarks/decentralized_gpu.py --nodes 1000 --topologies ring,exponential
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.config import load_config  # noqa: E402
from fedsim.runner import build, drive  # noqa: E402

SAMPLES = 64
VARIANTS = {
    "serial-cpu": {"kind": "serial"},
    "vmap-cpu": {"kind": "vmap", "device": "cpu"},
    "vmap-cuda": {"kind": "vmap", "device": "cuda", "keep_on_device": True},
}


def config(nodes: int, topology: str, rounds: int, executor: dict[str, Any]) -> dict[str, Any]:
    """Returns the benchmark's fedsim config."""
    return {
        "name": "decentralized-gpu",
        "seed": 0,
        "data": {"name": "gaussian_mixture", "num_samples": nodes * SAMPLES * 5 // 4, "dim": 60, "num_classes": 10,
                 "test_fraction": 0.2, "num_clients": nodes,
                 "partition": {"name": "dirichlet_per_client", "alpha": 0.5}},
        "model": {"name": "mlp", "hidden": [200]},
        "strategy": {"name": "dfedavg"},
        "local": {"lr": 0.05, "batch_size": 16, "epochs": 1},
        "protocol": {"name": "decentralized", "eval_nodes": 4},
        "topology": {"name": topology},
        "executor": executor,
        "run": {"rounds": rounds, "eval_every": rounds, "progress": False},
    }


class Timed:
    """Wraps a run's protocol step, executor and merge rule with synchronised timers."""

    def __init__(self, run, snapshot_at: int):
        self.stamps: list[float] = []
        self.executor_s = self.gossip_s = self.jobs_s = 0.0
        self.snapshot: torch.Tensor | None = None
        self.cuda = run.ctx.initial_params.device.type == "cuda"
        ctx, step, ex_run, merge = run.ctx, run.protocol.step, run.ctx.executor.run, run.ctx.strategy.merge

        def timed(fn, field, sync=True):
            def call(*args):
                if sync:
                    self.sync()
                t = time.perf_counter()
                out = fn(*args)
                if sync:
                    self.sync()
                setattr(self, field, getattr(self, field) + time.perf_counter() - t)
                return out
            return call

        def timed_step(c, state):
            out = step(c, state)
            self.sync()
            self.stamps.append(time.perf_counter())
            if out.rounds == snapshot_at:
                self.snapshot = out.models.detach().cpu().clone()
            return out

        run.protocol.step = timed_step
        ctx.executor.run = timed(ex_run, "executor_s")
        ctx.strategy = ctx.strategy._replace(merge=timed(merge, "gossip_s"))
        ctx.make_jobs = timed(ctx.make_jobs, "jobs_s", sync=False)  # host work only: batch indices, Job objects

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def measure(nodes: int, topology: str, variant: str, rounds: int, warmup: int, compare_at: int) -> dict[str, Any]:
    """Runs one variant; returns its timing, its node stack after `compare_at` rounds and its accuracy."""
    t = time.perf_counter()
    run = build(load_config(config(nodes, topology, rounds, VARIANTS[variant])))
    build_s = time.perf_counter() - t
    timer = Timed(run, compare_at)
    start = time.perf_counter()
    rows = drive(run, None, progress=False)
    total = time.perf_counter() - start
    stamps = timer.stamps[:rounds]
    skip = min(warmup, rounds - 1)
    steady = (stamps[-1] - stamps[skip - 1]) / (rounds - skip) if skip else (stamps[-1] - start) / rounds
    return {"variant": variant, "build_s": build_s, "total_s": total, "s_per_round": steady,
            "first_round_s": stamps[0] - start, "executor_share": timer.executor_s / total,
            "gossip_share": timer.gossip_s / total, "jobs_share": timer.jobs_s / total, "snapshot": timer.snapshot,
            "accuracy": rows[-1]["test_accuracy"], "device": str(run.final_state.models.device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--topologies", default="ring,exponential")
    ap.add_argument("--variants", default="serial-cpu,vmap-cpu,vmap-cuda" if torch.cuda.is_available()
                    else "serial-cpu,vmap-cpu")
    ap.add_argument("--serial-rounds", type=int, default=4, help="rounds for the serial variant (slow)")
    ap.add_argument("--rounds", type=int, default=60, help="rounds for the vmap variants")
    ap.add_argument("--warmup", type=int, default=5, help="vmap rounds left out of the steady state")
    args = ap.parse_args()
    variants = args.variants.split(",")
    compare_at = args.serial_rounds
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {dev}; {args.nodes} nodes, "
          f"MLP 60-200-10, DFedAvg, 4 local steps of batch 16 + 1 gossip step per round")
    head = (f"{'topology':12s} {'variant':11s} {'s/round':>9s} {'rounds/s':>9s} {'node-upd/s':>11s} "
            f"{'vs serial':>9s} {'1st round s':>11s} {'executor':>8s} {'gossip':>7s} {'make_jobs':>9s} "
            f"{'rel diff @' + str(compare_at):>12s} {'accuracy':>8s}")
    lines = []
    for topo in args.topologies.split(","):
        ref: dict[str, Any] | None = None
        for v in variants:
            serial = v.startswith("serial")
            rounds = args.serial_rounds if serial else max(args.rounds, compare_at + args.warmup + 1)
            r = measure(args.nodes, topo, v, rounds, 1 if serial else args.warmup, compare_at)
            if ref is None and serial:
                ref = r
            diff = "–"
            if ref is not None and ref["snapshot"] is not None and r["snapshot"] is not None:
                diff = f"{float((r['snapshot'] - ref['snapshot']).abs().max() / ref['snapshot'].abs().max()):.1e}"
            speed = f"{ref['s_per_round'] / r['s_per_round']:.1f}x" if ref is not None else "–"
            line = (f"{topo:12s} {v:11s} {r['s_per_round']:9.4f} {1 / r['s_per_round']:9.2f} "
                    f"{args.nodes / r['s_per_round']:11.0f} {speed:>9s} {r['first_round_s']:11.2f} "
                    f"{r['executor_share']:8.0%} {r['gossip_share']:7.1%} {r['jobs_share']:9.0%} {diff:>12s} "
                    f"{r['accuracy']:8.4f}")
            lines.append(line)
            print(line, f"(models on {r['device']}, {rounds} rounds, build {r['build_s']:.1f} s)", flush=True)
    print("\n" + head + "\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
