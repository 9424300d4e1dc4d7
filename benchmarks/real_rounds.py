"""Rounds of the seed papers' real workloads on one GPU: the vmap executor's whole cohort
against the same cohort trained one client at a time on the same GPU (`max_chunk: 1`, the
loop most simulators run), through fedsim's runner.

* resnet18: CIFAR-10-shaped images (offline, `_images.py`), ResNet-18 with GroupNorm, 100
  clients of 500 images, 10 per round, one local epoch of batch 50 (10 steps), FedAvg —
  the DFedSAM / SCAFFOLD-M shape.
* femnist: FEMNIST-shaped images (1×28×28, 62 classes), 3,400 writers of 226 images on
  average (log-normal sizes), LEAF's CNN (`femnist_cnn`), 340 per round, 20 local steps of
  batch 10, FedAvg.

Prints client-updates/s, ms per round and peak GPU memory for both, and their ratio. With
``--conv native,triton`` the whole cohort runs once per `executor.conv` (the one-at-a-time
side stays native); `triton` computes every convolution of the LEAF CNN and of ResNet-18
with Triton kernels (the input gradients of ResNet's strided ones stay cuDNN's).

    python benchmarks/real_rounds.py --device cuda [--workloads resnet18,femnist] [--rounds 5] [--conv native,triton]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.config import load_config  # noqa: E402
from fedsim.runner import build, drive  # noqa: E402

WORKLOADS = {
    "resnet18": {
        "data": {"name": "cifar_shaped", "num_train": 50_000, "num_test": 2_000, "num_clients": 100, "partition": "iid"},
        "model": {"name": "resnet18"},
        "local": {"lr": 0.05, "batch_size": 50, "epochs": 1},
        "protocol": {"name": "sync", "clients_per_round": 10},
    },
    "femnist": {
        "data": {"name": "femnist_shaped", "num_clients": 3400, "num_test": 2_000,
                 "partition": {"name": "quantity_skew", "sigma": 0.5}},
        "model": {"name": "femnist_cnn"},
        "local": {"lr": 0.05, "batch_size": 10, "steps": 20},
        "protocol": {"name": "sync", "clients_per_round": 340},
    },
}


QUICK = {  # a CPU check of the script, not a measurement
    "resnet18": {"data": {"num_train": 200, "num_test": 50, "num_clients": 10}, "local": {"batch_size": 10},
                 "protocol": {"clients_per_round": 2}},
    "femnist": {"data": {"num_train": 2_000, "num_test": 50, "num_clients": 50}, "local": {"steps": 2},
                "protocol": {"clients_per_round": 10}},
}


def config(workload: str, rounds: int, device: str, precision: str, one_at_a_time: bool, quick: bool = False,
           conv: str = "native") -> dict:
    """Returns the benchmark's config for `workload`."""
    executor = {"kind": "vmap", "device": device, "precision": precision, "keep_on_device": device == "cuda",
                "conv": conv}
    if one_at_a_time:
        executor["max_chunk"] = 1
    sections = {k: dict(v) for k, v in WORKLOADS[workload].items()}
    for k, v in (QUICK[workload] if quick else {}).items():
        sections[k].update(v)
    return {"name": f"real-{workload}", "seed": 0, "plugins": ["benchmarks._images"], **sections,
            "strategy": {"name": "fedavg"}, "executor": executor,
            "run": {"rounds": rounds, "eval_every": rounds, "progress": False, "partition_plot": False}}


def measure(workload: str, rounds: int, device: str, precision: str, one_at_a_time: bool, quick: bool,
            conv: str = "native") -> dict:
    """Runs one warm-up round, then `rounds` rounds; returns the timing of the latter."""
    run = build(load_config(config(workload, rounds + 1, device, precision, one_at_a_time, quick, conv)))
    cohort = run.protocol.cohort_size(run.ctx.num_clients)
    spent = {"executor": 0.0}
    ex = run.ctx.executor
    real_run = ex.run

    def timed(jobs):
        t = time.perf_counter()
        out = real_run(jobs)
        if device == "cuda":
            torch.cuda.synchronize()
        spent["executor"] += time.perf_counter() - t
        spent.setdefault("per_round", []).append(time.perf_counter() - t)
        return out

    ex.run = timed
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    drive(run, None, progress=False)
    steady = spent["per_round"][1:]  # the first round captures graphs and warms caches
    sec = sum(steady) / len(steady)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"cohort": cohort, "s_per_round": sec, "ups": cohort / sec, "peak_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workloads", default="resnet18,femnist")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--precision", default="tf32")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script on a CPU")
    ap.add_argument("--conv", default="auto", help="executor.conv of the whole-cohort side, comma-separated")
    args = ap.parse_args()
    os.chdir(ROOT)  # the plugin is imported by module name
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device {name}; torch {torch.__version__}; precision {args.precision}; executor time per round "
          f"(steady state, {args.rounds} rounds after one warm-up round)")
    print(f"{'workload':9s} {'conv':>7s} {'cohort':>6s} | {'vmap ms/round':>13s} {'upd/s':>8s} {'GiB':>5s} | "
          f"{'one at a time ms':>16s} {'upd/s':>8s} {'GiB':>5s} | {'vmap / one at a time':>20s}")
    for w in args.workloads.split(","):
        b = measure(w, args.rounds, args.device, args.precision, one_at_a_time=True, quick=args.quick)
        for conv in args.conv.split(","):
            a = measure(w, args.rounds, args.device, args.precision, one_at_a_time=False, quick=args.quick, conv=conv)
            print(f"{w:9s} {conv:>7s} {a['cohort']:6d} | {a['s_per_round'] * 1e3:13.1f} {a['ups']:8.1f} "
                  f"{a['peak_gib']:5.1f} | {b['s_per_round'] * 1e3:16.1f} {b['ups']:8.1f} {b['peak_gib']:5.1f} | "
                  f"{a['ups'] / b['ups']:20.2f}", flush=True)


if __name__ == "__main__":
    main()
