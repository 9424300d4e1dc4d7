"""pfl-research's CIFAR-10 benchmark shape, end to end through fedsim's vmap executor.

1,000 clients × 50 CIFAR-10-shaped images (offline, `benchmarks/_images.py`), 50 clients
per round, one local epoch of batch 10 (5 steps), pfl's simple_cnn (with its dropout),
FedAvg, 1,500 rounds, central evaluation on 10,000 test images every 10 rounds. Prints the
total wall time (process start to the last evaluation), its parts, and the final accuracy.
pfl reports 7–72× speed-ups over other simulators on this shape; our target on one H200 is
the whole run in under 60 s.

    python benchmarks/pfl_cifar.py --device cuda [--precision tf32] [--conv auto|native|triton] [--rounds 1500]
"""
from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fedsim.config import load_config  # noqa: E402
from fedsim.runner import build, drive  # noqa: E402


def config(rounds: int, device: str, precision: str, conv: str, graphs: bool, lr: float,
           shuffle: str = "generator", compile_: bool = False) -> dict:
    """Returns the benchmark's fedsim config mapping."""
    return {
        "name": "pfl-cifar10-shape",
        "seed": 0,
        "plugins": ["benchmarks._images"],
        "data": {"name": "cifar_shaped", "num_clients": 1000, "partition": "iid"},
        "model": {"name": "benchmarks._images:pfl_cnn"},
        "strategy": {"name": "fedavg"},
        "local": {"lr": lr, "batch_size": 10, "epochs": 1, "shuffle": shuffle},
        "protocol": {"name": "sync", "clients_per_round": 50},
        "executor": {"kind": "vmap", "device": device, "precision": precision, "conv": conv, "graphs": graphs,
                     "randomness": "different", "keep_on_device": True, "compile": compile_},
        "run": {"rounds": rounds, "eval_every": 10, "progress": False},
    }


def _timed(fn, spent: dict, name: str):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - t

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=1500)
    ap.add_argument("--precision", default="tf32")
    ap.add_argument("--conv", default="auto", help="executor.conv (auto: triton on Hopper GPUs, else native)")
    ap.add_argument("--graphs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--shuffle", default="generator", help="local.shuffle: generator (default) or hash")
    ap.add_argument("--compile", type=int, default=0, help="executor.compile")
    args = ap.parse_args()
    import os

    os.chdir(ROOT)  # the plugin is imported by module name
    cfg = load_config(config(args.rounds, args.device, args.precision, args.conv, bool(args.graphs), args.lr,
                             args.shuffle, bool(args.compile)))
    t_build = time.perf_counter()
    run = build(cfg)
    spent = {"executor.run": 0.0, "evaluate": 0.0}
    ex = run.ctx.executor
    ex.run, ex.evaluate = _timed(ex.run, spent, "executor.run"), _timed(ex.evaluate, spent, "evaluate")
    t_drive = time.perf_counter()
    rows = drive(run, None, progress=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    t_end = time.perf_counter()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    print(f"device: {name}; torch {torch.__version__}; precision {args.precision}, conv {args.conv}, "
          f"graphs {bool(args.graphs)}, shuffle {args.shuffle}, compile {bool(args.compile)}")
    print(f"rounds {run.final_state.rounds}, evaluations {len(rows)}, final test accuracy {rows[-1]['test_accuracy']:.4f}")
    print(f"imports {t_build - T0:.1f} s (incl. config), build (data, model, executor) {t_drive - t_build:.1f} s, "
          f"rounds+evaluations {t_end - t_drive:.1f} s ({(t_end - t_drive) / max(1, run.final_state.rounds) * 1000:.1f} ms/round), "
          f"peak GPU memory {peak:.1f} GiB")
    rest = t_end - t_drive - sum(spent.values())
    print("of which " + ", ".join(f"{k} {v:.1f} s" for k, v in spent.items()) + f", protocol/server/rest {rest:.1f} s")
    print(f"TOTAL wall time {t_end - T0:.1f} s (target < 60 s for 1,500 rounds)")


if __name__ == "__main__":
    main()
