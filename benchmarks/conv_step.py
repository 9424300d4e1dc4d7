"""One vectorised SGD step of pfl's simple_cnn for 50 clients × batch 10, several ways.

What pfl_cifar.py's executor time is made of: the forward and backward of the clients'
own models in one ``torch.func.vmap`` call (each client's convolution becomes one group of
a grouped convolution), against the same step written as unfold + batched matrix products
(`executor.conv: unfold`), with channels-last images, and against the "limit": one model
on all 500 images (the same FLOPs without per-client weights). Each in TF32 and bf16
autocast, and on CUDA also with ``torch.backends.cudnn.benchmark`` (cuDNN times its
algorithms once per shape and keeps the fastest) and with `executor.conv: triton`'s kernels
(TF32). Prints ms per step (mean of 30 after 3 warm-up steps; 2 on a CPU) and, on CUDA, the
GPU time per step (the kernels' summed times under torch.profiler, 5 steps): the Triton step
is bound by its launches when it runs eagerly, which CUDA graphs remove in a run.

With ``--passes [pfl|leaf|resnet]`` it times each convolution layer's three passes (forward,
input gradient, weight gradient) for the cohort: cuDNN's grouped convolution (what vmap
makes of it), the Triton kernels, and one model's dense convolution on all the images
(TF32). The layers are pfl's simple_cnn (50 clients × 10 images), LEAF's FEMNIST CNN (340 ×
10, 5×5 kernels) or ResNet-18's (10 × 50, 3×3), the shapes of real_rounds.py's cohorts.
``--sweep`` adds, per layer and pass, the fastest Triton tuning of a grid (``SWEEP``: rows,
columns and output channels per program, warps, pipeline stages) with its settings: whether
any tuning would beat cuDNN where the default one does not (each setting compiles a kernel
of its own: minutes on a GPU).

    python benchmarks/conv_step.py [--device cuda] [--clients 50] [--passes [pfl|leaf|resnet] [--sweep]]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

from benchmarks._images import pfl_cnn  # noqa: E402
from fedsim.executors import triton_conv  # noqa: E402
from fedsim.executors.unfold_conv import with_unfold_convs  # noqa: E402

BATCH = 10
# --passes: per model, (clients, batch, [(in channels, out channels, image side, kernel, padding)])
LAYERS = {
    "pfl": (50, BATCH, [(3, 32, 32, 3, 0), (32, 64, 30, 3, 0)]),
    "leaf": (340, 10, [(1, 32, 28, 5, 2), (32, 64, 14, 5, 2)]),
    "resnet": (10, 50, [(3, 64, 32, 3, 1), (64, 64, 32, 3, 1), (128, 128, 16, 3, 1), (256, 256, 8, 3, 1),
                        (512, 512, 4, 3, 1)]),
}

# --sweep: (block_p, block_k, block_o, warps, stages) grids, for the forward and input
# gradient (`clients_conv2d`) and for the weight gradient
SWEEP = {
    "conv": [(bp, bk, bo, 8, st) for bp in (64, 128) for bk in (32, 64) for bo in (128, 256) for st in (2, 3)],
    "weight_grad": [(bp, bk, bo, nw, 2) for bp in (16, 32) for bk in (64, 128) for bo in (64, 128) for nw in (4, 8)],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clients", type=int, default=None, help="cohort size (default: 50, or the --passes model's)")
    ap.add_argument("--passes", nargs="?", const="pfl", choices=sorted(LAYERS), default=None,
                    help="per layer and pass of a model's convolutions: grouped, Triton, dense")
    ap.add_argument("--sweep", action="store_true", help="with --passes: also the best Triton tuning of SWEEP's grid")
    args = ap.parse_args()
    if args.sweep and not args.passes:
        ap.error("--sweep goes with --passes")
    if args.passes:
        passes(args.passes, args.clients, args.device, args.sweep)
        return
    dev, m = args.device, args.clients or 50
    reps = 30 if dev == "cuda" else 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    base = pfl_cnn((3, 32, 32), 10, dropout=False).to(dev)
    params = {n: p.detach().unsqueeze(0).repeat(m, *[1] * p.dim()).clone() for n, p in base.named_parameters()}
    x = torch.randn(m, BATCH, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (m, BATCH), device=dev)

    def timeit(fn, label: str) -> None:
        for _ in range(3):
            fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / reps * 1000
        gpu = f"   GPU {gpu_ms(fn):8.3f} ms/step" if dev == "cuda" else ""
        print(f"{label:45s} {wall:8.3f} ms/step{gpu}", flush=True)

    def gpu_ms(fn) -> float:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        return sum(e.self_device_time_total for e in prof.key_averages()) / 5 / 1000

    def vectorised(module: nn.Module, channels_last: bool = False, bf16: bool = False):
        def loss(p, xb, yb):
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
                out = functional_call(module, p, (xb,))
            return nn.functional.cross_entropy(out.float(), yb)

        g = vmap(grad(loss))

        def step():
            xx = x
            if channels_last:
                xx = x.reshape(m * BATCH, 3, 32, 32).contiguous(memory_format=torch.channels_last).reshape(x.shape)
            gs = g(params, xx, y)
            return {k: params[k] - 0.05 * gs[k] for k in gs}

        return step

    def limit(bf16: bool = False):
        model = pfl_cnn((3, 32, 32), 10, dropout=False).to(dev)
        xx, yy = x.reshape(m * BATCH, 3, 32, 32), y.reshape(-1)

        def step():
            model.zero_grad(set_to_none=True)
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
                out = model(xx)
            nn.functional.cross_entropy(out.float(), yy).backward()

        return step

    print(f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'CPU'}; torch {torch.__version__}; "
          f"{m} clients x batch {BATCH}, pfl simple_cnn on 3x32x32")
    unfolded, _ = with_unfold_convs(base)
    for bf16 in (False, True):
        p = "bf16" if bf16 else "tf32"
        torch.backends.cudnn.benchmark = False
        timeit(limit(bf16), f"{p} limit (one model, batch {m * BATCH})")
        timeit(vectorised(base, bf16=bf16), f"{p} vmap native")
        timeit(vectorised(unfolded, bf16=bf16), f"{p} vmap unfold")
        if dev == "cuda":
            torch.backends.cudnn.benchmark = True
            timeit(limit(bf16), f"{p} limit, cudnn.benchmark")
            timeit(vectorised(base, bf16=bf16), f"{p} vmap native, cudnn.benchmark")
            timeit(vectorised(base, channels_last=True, bf16=bf16), f"{p} vmap channels_last, cudnn.benchmark")
            torch.backends.cudnn.benchmark = False
            if not bf16 and triton_conv.available():
                timeit(vectorised(triton_conv.with_triton_convs(base)[0]), f"{p} vmap triton (executor.conv: triton)")


def passes(model: str, clients: int | None, dev: str, sweep: bool = False) -> None:
    """Prints ms per pass of `model`'s convolution layers (``LAYERS``) for its cohort, or
    `clients` clients (on the CPU, the Triton kernels only where Triton's interpreter is on:
    a check of the script); with `sweep`, also the fastest tuning of ``SWEEP`` per pass."""
    import torch.nn.functional as F

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    reps = 30 if dev == "cuda" else 1
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def ms(fn) -> float:
        for _ in range(3 if dev == "cuda" else 0):
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t) / reps * 1000

    def three(conv, x, w, g) -> tuple[float, float, float]:
        """(forward, input gradient, weight gradient) ms of a torch convolution call."""
        fwd = ms(lambda: conv(x, w))
        return (fwd, ms(lambda: torch.autograd.grad(conv(x, w), x, g)) - fwd,
                ms(lambda: torch.autograd.grad(conv(x, w), w, g)) - fwd)

    m, batch, layers = LAYERS[model]
    m = clients or m
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    print(f"device {name}; {model}: {m} clients x batch {batch}; ms per pass, TF32")
    print(f"{'layer':22s} {'':16s} {'forward':>8s} {'input grad':>11s} {'weight grad':>12s}")
    for c, o, h, k, pad in layers:
        ho = h + 2 * pad - k + 1
        x = torch.randn(batch, m * c, h, h, device=dev, requires_grad=True)
        w = torch.randn(m * o, c, k, k, device=dev, requires_grad=True)
        g = torch.randn(batch, m * o, ho, ho, device=dev)
        rows = {"cuDNN grouped": three(lambda a, b: F.conv2d(a, b, padding=pad, groups=m), x, w, g)}
        xd = torch.randn(m * batch, c, h, h, device=dev, requires_grad=True)
        wd = torch.randn(o, c, k, k, device=dev, requires_grad=True)
        gd = torch.randn(m * batch, o, ho, ho, device=dev)
        dense = three(lambda a, b: F.conv2d(a, b, padding=pad), xd, wd, gd)
        if triton_conv.available() and (dev == "cuda" or triton_conv.interpreted()):
            xb, wb = torch.randn(m, batch, c, h, h, device=dev), torch.randn(m, o, c, k, k, device=dev)
            gb = torch.randn(m, batch, o, ho, ho, device=dev)
            p = (pad, pad)
            rows["Triton"] = (ms(lambda: triton_conv.clients_conv2d(xb, wb, None, p)),
                              ms(lambda: triton_conv.clients_conv2d_input_grad(gb, wb, (h, h), p)),
                              ms(lambda: triton_conv.clients_conv2d_weight_grad(xb, gb, (k, k), p)))
        rows["dense, one model"] = dense
        for name, (f, i, wg) in rows.items():
            print(f"{f'{c}->{o} {k}x{k} on {h}x{h}':22s} {name:16s} {f:8.3f} {i:11.3f} {wg:12.3f}")
        if sweep and "Triton" in rows:
            def kw(cfg):
                return dict(zip(("block_p", "block_k", "block_o", "warps", "stages"), cfg))

            best = [_fastest(ms, lambda cfg: triton_conv.clients_conv2d(xb, wb, None, p, **kw(cfg)), SWEEP["conv"]),
                    _fastest(ms, lambda cfg: triton_conv.clients_conv2d_input_grad(gb, wb, (h, h), p, **kw(cfg)),
                             SWEEP["conv"]),
                    _fastest(ms, lambda cfg: triton_conv.clients_conv2d_weight_grad(xb, gb, (k, k), p, **kw(cfg)),
                             SWEEP["weight_grad"])]
            print(f"{'':22s} {'Triton, swept':16s} " + "  ".join(
                f"{t:.3f} {cfg}" if cfg else "-" for t, cfg in best) + "   (block_p, block_k, block_o, warps, stages)")


def _fastest(ms, call, grid) -> tuple[float, tuple | None]:
    """(ms, settings) of the fastest of `grid`'s settings for `call` (settings that do not
    compile or fit are skipped; (inf, None) if none ran)."""
    best: tuple[float, tuple | None] = (float("inf"), None)
    for cfg in grid:
        try:
            t = ms(lambda: call(cfg))
        except Exception:  # noqa: BLE001 - a setting the device cannot run
            continue
        best = min(best, (t, cfg), key=lambda r: r[0])
    return best


if __name__ == "__main__":
    main()
