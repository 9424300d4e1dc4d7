"""Compressed uplinks on workload W: the serial executor against the vmap executor.

Workload W (`_workload.py`: 100 clients, MLP 60-200-10, one epoch of batch 16, all clients
every round) with `strategy: compressed` over FedAvg under EF21, for each compressor given.
The vmap executor maps every built-in compressor over the cohort in one call (randk and qsgd
with each row's own job key); the "vectorised" column says whether it did. Prints ms per round after a warm-up round, the ratio, and the final test
loss and bytes sent of both (equal when the runs agree).

    python benchmarks/compressed_uplink.py [--compressors topk,sign,randk,qsgd] [--rounds 10] [--device cpu]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._workload import workload_w  # noqa: E402
from fedsim.config import load_config  # noqa: E402
from fedsim.runner import build, drive  # noqa: E402

SETTINGS = {"topk": {"name": "topk", "ratio": 0.1}, "randk": {"name": "randk", "ratio": 0.1},
            "sign": "sign", "qsgd": {"name": "qsgd", "bits": 4}, "identity": "identity"}


def measure(compressor: str, executor: str, rounds: int, device: str) -> dict:
    """Runs W with the compressed uplink for rounds + 1 rounds; returns the timing of the last `rounds`."""
    kwargs = {"device": device, "keep_on_device": device == "cuda"} if executor == "vmap" else {}
    cfg = workload_w(rounds=rounds + 1, executor=executor, **kwargs)
    cfg["strategy"] = {"name": "compressed", "compressor": SETTINGS[compressor], "feedback": "ef21"}
    cfg["run"] = {**cfg["run"], "eval_every": rounds + 1, "progress": False, "partition_plot": False}
    run = build(load_config(cfg))
    step, starts = run.protocol.step, []

    def timed(ctx, state):
        starts.append(time.perf_counter())
        return step(ctx, state)

    run.protocol.step = timed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's warning: the column says it
        rows = drive(run, None, progress=False)
    end = time.perf_counter()
    vectorised = executor == "vmap" and run.ctx.executor.unsupported is None
    return {"ms": (end - starts[1]) / rounds * 1e3, "loss": rows[-1]["test_loss"], "bytes_up": rows[-1]["bytes_up"],
            "vectorised": vectorised}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compressors", default="topk,sign,randk,qsgd")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, vmap on {args.device}, {torch.get_num_threads()} threads; workload W, "
          f"compressed FedAvg under EF21, {args.rounds} rounds after a warm-up round")
    print(f"{'compressor':10s} {'serial ms/round':>16s} {'vmap ms/round':>14s} {'vectorised':>10s} {'serial / vmap':>13s}"
          f"  final test loss (serial, vmap)  bytes_up equal")
    for name in args.compressors.split(","):
        s = measure(name, "serial", args.rounds, "cpu")
        v = measure(name, "vmap", args.rounds, args.device)
        print(f"{name:10s} {s['ms']:16.1f} {v['ms']:14.1f} {str(v['vectorised']):>10s} {s['ms'] / v['ms']:12.2f}x"
              f"  {s['loss']:.6f}, {v['loss']:.6f}  {s['bytes_up'] == v['bytes_up']}")


if __name__ == "__main__":
    main()
