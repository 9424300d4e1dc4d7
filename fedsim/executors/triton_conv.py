"""Many clients' 2-D convolutions at once, as Triton implicit-GEMM kernels.

Under ``vmap`` a convolution whose weights differ per client becomes one grouped
convolution (groups = clients), and cuDNN runs grouped convolutions far below its dense
speed. These kernels compute the same thing for a whole cohort in one launch each: for
client m, ``out[m] = conv2d(x[m], w[m]) + bias[m]`` (`clients_conv2d`), its gradient with
respect to the input (`clients_conv2d_input_grad`) and to the weight
(`clients_conv2d_weight_grad`). Each is a matrix product whose left operand, the im2col
matrix of the client's images, is gathered tile by tile from the images and never stored:

    out[m][(b, i, j), o] = Σ_k A[m][(b, i, j), k] · W[m][k, o],
    A[m][(b, i, j), (c, u, v)] = x[m, b, c, i·s_h + u·d_h − p_h, j·s_w + v·d_w − p_w]  (0 outside),

with ``W[m] = w[m].reshape(O, C·KH·KW)ᵀ`` (stride s, dilation d, padding p). For stride 1
the input gradient is the same product on the output gradient with the weight flipped in
space and its channels swapped, and padding ``d·(KH − 1) − p``; a strided layer's input
gradient runs as torch's grouped transposed convolution. The weight gradient is ``Aᵀ`` times
the output gradient, reduced over the positions (split over programs, then summed).

Scope: groups 1, zero padding, float32 tensors (TF32 matrix units when
``torch.backends.cudnn.allow_tf32`` is on, as for cuDNN's convolutions). The kernels run on
CUDA devices; with ``TRITON_INTERPRET=1`` set before Triton is imported they run on the CPU in
Triton's interpreter, exactly and very slowly (the tests do that). `ClientsConv2d` (via
`with_triton_convs`) puts them under ``vmap``; `supported` says whether a layer qualifies.
Under nested vmaps (a vectorised sweep maps over runs, then clients) the outer dimensions
fold into the clients', so each pass is still one launch.

Each launch compiles once per layer shape (the channel count, kernel size and the loop
lengths are compile-time constants); block sizes come from `TUNING` and `TAPS_FROM`.
"""
from __future__ import annotations

import copy
import functools
import os
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..rng import cuda_index

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None
    tl = None

# Block sizes and warps per kernel, (pass, taps) -> (BLOCK_P, BLOCK_K, warps): the fastest of
# a sweep on an H100 over pfl-research's simple_cnn layers (3→32 and 32→64 channels, 3×3, on
# 32×32 images; 50 clients × 10 images), on the tensors of its vectorised training step.
TUNING: dict[tuple[str, bool], tuple[int, int, int]] = {
    ("forward", False): (128, 32, 8),
    ("forward", True): (128, 32, 4),
    ("input_grad", False): (64, 32, 8),
    ("input_grad", True): (256, 64, 8),
    ("weight_grad", False): (16, 128, 4),
}
MAX_GRID = 65535  # CUDA's limit on the grid's second and third dimensions
SMALLEST_SHARED = 101_376  # bytes a program may use on any GPU since Ampere (sm_86/89's opt-in limit)
STAGES = 3  # Triton's default software-pipelining depth on CUDA: operand tiles kept in flight
Pair = tuple[int, int]
Geometry = tuple[Pair, Pair, Pair]  # a convolution's (padding, stride, dilation)


def available() -> bool:
    """Whether Triton can be imported."""
    return triton is not None


def supported(conv: nn.Module) -> bool:
    """Whether `conv` is a layer these kernels compute: a plain float32 ``nn.Conv2d`` with
    groups 1 and zero padding given as numbers (any stride and dilation)."""
    return (
        type(conv) is nn.Conv2d
        and conv.weight.dtype == torch.float32
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


if triton is not None:

    @triton.jit
    def _positions(p, Ho, Wo):
        """(image, row, column) of flat output positions p = (b·Ho + i)·Wo + j."""
        r = p % (Ho * Wo)
        return p // (Ho * Wo), r // Wo, r % Wo

    @triton.jit
    def _columns(k, KH: tl.constexpr, KW: tl.constexpr):
        """(channel, tap row, tap column) of flat im2col columns k = (c·KH + u)·KW + v."""
        return k // (KH * KW), (k % (KH * KW)) // KW, k % KW

    def _conv_kernel(x_ptr, w_ptr, b_ptr, out_ptr,
                     sxm, sxb, sxc, sxh, sxw,
                     swm, swo, swc, swh, sww,
                     sbm, sbo,
                     som, sob, soo, soh, sow,
                     H, W, O, Ho, Wo, P, pad_h, pad_w, st_h, st_w, dil_h, dil_w,
                     C: tl.constexpr, K: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, TAPS: tl.constexpr,
                     HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[m, b, o, i, j] = Σ_{c,u,v} x[m, b, c, i·st_h + u·dil_h − pad_h, j·st_w + v·dil_w − pad_w]
        · w[m, o, c, u, v] (+ bias[m, o]);
        one program per (BLOCK_P output positions, BLOCK_O channels, client). The product's
        inner loop runs over BLOCK_K flattened (c, u, v) columns, or with TAPS over the taps
        (u, v) and then BLOCK_K channels (one bounds mask per row and tap: many channels)."""
        m = tl.program_id(2).to(tl.int64)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        pm = p < P
        om = o < O
        b, i, j = _positions(p, Ho, Wo)
        rows = x_ptr + m * sxm + b * sxb
        ws = w_ptr + m * swm + o[None, :] * swo
        acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
        if TAPS:
            for u in tl.static_range(KH):
                for v in tl.static_range(KW):
                    ih = i * st_h + u * dil_h - pad_h
                    iw = j * st_w + v * dil_w - pad_w
                    rm = pm & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    at = rows + ih * sxh + iw * sxw
                    for c0 in range(0, C, BLOCK_K):
                        c = c0 + tl.arange(0, BLOCK_K)
                        cm = c < C
                        a = tl.load(at[:, None] + c[None, :] * sxc, mask=rm[:, None] & cm[None, :], other=0.0)
                        wk = tl.load(ws + (c * swc + u * swh + v * sww)[:, None],
                                     mask=cm[:, None] & om[None, :], other=0.0)
                        acc += tl.dot(a, wk, input_precision=PREC)
        else:
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                km = k < K
                c, u, v = _columns(k, KH, KW)
                ih = i[:, None] * st_h + u[None, :] * dil_h - pad_h
                iw = j[:, None] * st_w + v[None, :] * dil_w - pad_w
                am = pm[:, None] & km[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a = tl.load(rows[:, None] + c[None, :] * sxc + ih * sxh + iw * sxw, mask=am, other=0.0)
                wk = tl.load(ws + (c * swc + u * swh + v * sww)[:, None], mask=km[:, None] & om[None, :], other=0.0)
                acc += tl.dot(a, wk, input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + m * sbm + o * sbo, mask=om, other=0.0)[None, :]
        dst = out_ptr + m * som + (b * sob + i * soh + j * sow)[:, None] + o[None, :] * soo
        tl.store(dst, acc, mask=pm[:, None] & om[None, :])

    def _weight_grad_kernel(x_ptr, g_ptr, out_ptr,
                            sxm, sxb, sxc, sxh, sxw,
                            sgm, sgb, sgo, sgh, sgw,
                            C, H, W, O, Ho, Wo, P, pad_h, pad_w, st_h, st_w, dil_h, dil_w, SPLIT, MCH,
                            K: tl.constexpr, PER_SPLIT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PREC: tl.constexpr,
                            BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
        """out[s, m, o, k] = Σ_{p in split s} g[m, p, o] · A[m][p, k]; one program per
        (BLOCK_O channels, BLOCK_K im2col columns, client × split)."""
        z = tl.program_id(2)
        m = (z // SPLIT).to(tl.int64)
        s = z % SPLIT
        o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        om = o < O
        km = k < K
        c, u, v = _columns(k, KH, KW)
        xs = x_ptr + m * sxm
        gs = g_ptr + m * sgm
        acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
        for t in range(0, PER_SPLIT, BLOCK_P):
            p = s * PER_SPLIT + t + tl.arange(0, BLOCK_P)
            pm = p < P
            b, i, j = _positions(p, Ho, Wo)
            g = tl.load(gs + (b * sgb + i * sgh + j * sgw)[None, :] + o[:, None] * sgo,
                        mask=om[:, None] & pm[None, :], other=0.0)
            ih = i[:, None] * st_h + u[None, :] * dil_h - pad_h
            iw = j[:, None] * st_w + v[None, :] * dil_w - pad_w
            am = pm[:, None] & km[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(xs + (b * sxb)[:, None] + c[None, :] * sxc + ih * sxh + iw * sxw, mask=am, other=0.0)
            acc += tl.dot(g, a, input_precision=PREC)
        dst = out_ptr + ((s * MCH + m) * O + o[:, None]) * K + k[None, :]
        tl.store(dst, acc, mask=om[:, None] & km[None, :])

    _conv_kernel = triton.jit(_conv_kernel)
    _weight_grad_kernel = triton.jit(_weight_grad_kernel)


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` when it was
    imported): then they take CPU tensors."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


def _kernel(fn: Any, device: torch.device) -> Any:
    """`fn`, if it can run on `device`."""
    if device.type != "cuda" and not interpreted():
        raise RuntimeError(f"the Triton convolution kernels run on CUDA devices, not {device.type} "
                           "(on the CPU only in Triton's interpreter: TRITON_INTERPRET=1)")
    return fn


def _pow2(n: int, low: int = 16, high: int = 128) -> int:
    return max(low, min(high, 1 << max(0, n - 1).bit_length()))


# Per pass, the input channels from which the product loops over taps, then channels
# (`_conv_kernel`'s TAPS), instead of over flattened (channel, tap) columns: the same sweep
# found the taps loop faster for the 32- and 64-channel layers.
TAPS_FROM: dict[str, int] = {"forward": 16, "input_grad": 16}


def _tuned(kind: str, taps: bool, *given: int | None) -> tuple[int, int, int]:
    """The given (BLOCK_P, BLOCK_K, warps), each None replaced by ``TUNING[kind, taps]``'s."""
    return tuple(g if g is not None else d for g, d in zip(given, TUNING[kind, taps]))  # type: ignore[return-value]


def _shared_limit(device: torch.device) -> int | None:
    """Bytes of shared memory one program may use on `device` (None in the interpreter)."""
    index = cuda_index(device)
    return _device_shared_limit(index[0]) if index else None


@functools.lru_cache(maxsize=None)
def _device_shared_limit(index: int) -> int:
    """`_shared_limit` of CUDA device `index`, asked once (the query costs ~1 ms per call)."""
    try:  # the driver query Triton's own compiler checks launches against (Triton 3.x)
        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except (AttributeError, KeyError, TypeError):
        optin = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
        return int(optin) if optin else SMALLEST_SHARED


def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of CUDA `device`, asked once (the query costs ~0.2 ms)."""
    return _device_multiprocessors(cuda_index(device)[0])


@functools.lru_cache(maxsize=None)
def _device_multiprocessors(index: int) -> int:
    """`_multiprocessors` of CUDA device `index`."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def fit_shared(rows: int, per_row: int, fixed: int, limit: int | None, stages: int = STAGES) -> tuple[int, int]:
    """(rows, stages) such that a product's pipelined float32 operand tiles,
    ``stages·(rows·per_row + fixed)·4`` bytes, fit in `limit` (None: no limit): `rows`
    halved down to 16 first, then fewer stages (down to 1). Raises ValueError if nothing fits."""
    def need(r: int, s: int) -> int:
        return s * (r * per_row + fixed) * 4
    if limit is None:
        return rows, stages
    while need(rows, stages) > limit and rows > 16:
        rows //= 2
    while need(rows, stages) > limit and stages > 1:
        stages -= 1
    if need(rows, stages) > limit:
        raise ValueError(f"Triton convolution tiles of {rows} rows need {need(rows, stages)} bytes of shared "
                         f"memory; the device has {limit}")
    return rows, stages


def _precision() -> str:
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


def _check(**tensors: Tensor) -> None:
    """Raises unless Triton is there and every tensor is float32."""
    if triton is None:
        raise RuntimeError("the Triton convolution kernels need the triton package")
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: the Triton convolution kernels take float32 tensors, not {t.dtype}")


def clients_conv2d(x: Tensor, w: Tensor, bias: Tensor | None = None, padding: Pair = (0, 0),
                   stride: Pair = (1, 1), dilation: Pair = (1, 1), block_p: int | None = None,
                   block_k: int | None = None, warps: int | None = None, taps: bool | None = None,
                   kind: str = "forward", block_o: int | None = None, stages: int = STAGES) -> Tensor:
    """Returns ``stack([conv2d(x[m], w[m], bias[m], stride, padding, dilation) for m])``: x
    [M, B, C, H, W], w [M, O, C, KH, KW], bias [M, O] or None; output [M, B, O, Ho, Wo] float32.
    `taps`: loop over the kernel's taps, then channels (default: from ``TAPS_FROM[kind]``
    channels on), else over the flattened (channel, tap) columns. The block sizes and warps
    tune the kernel (default: ``TUNING[kind, taps]``; `block_o`, the output channels per
    program, defaults to O's next power of two within 16..128; `stages`, the operand tiles in
    flight, to Triton's 3 — fewer where the device's shared memory asks); `kind` names the
    pass it computes."""
    _check(x=x, w=w)
    M, B, C, H, W = x.shape
    O, KH, KW = w.shape[1], w.shape[3], w.shape[4]
    (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
    Ho, Wo = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1, (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    out = torch.empty((M, B, O, Ho, Wo), device=x.device, dtype=torch.float32)
    P = B * Ho * Wo
    if P == 0 or O == 0 or M == 0:
        return out.zero_()
    block_o = block_o or _pow2(O)
    b_ = bias if bias is not None else w  # a valid pointer; not read without a bias
    sb = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)
    taps = C >= TAPS_FROM[kind] if taps is None else taps
    block_p, block_k, warps = _tuned(kind, taps, block_p, block_k, warps)
    # the product's tiles: A [BLOCK_P, BLOCK_K] and w [BLOCK_K, BLOCK_O]
    block_p, stages = fit_shared(block_p, block_k, block_k * block_o, _shared_limit(x.device), stages)
    kernel = _kernel(_conv_kernel, x.device)
    for lo in range(0, M, MAX_GRID):
        hi = min(M, lo + MAX_GRID)
        xs, ws, os_ = x[lo:hi], w[lo:hi], out[lo:hi]
        bs = b_[lo:hi]
        grid = (triton.cdiv(P, block_p), triton.cdiv(O, block_o), hi - lo)
        kernel[grid](xs, ws, bs, os_, *xs.stride(), *ws.stride(), *sb, *os_.stride(),
                     H, W, O, Ho, Wo, P, ph, pw, sh, sw, dh, dw, C=C, K=C * KH * KW, KH=KH, KW=KW, TAPS=taps,
                     HAS_BIAS=bias is not None, PREC=_precision(), BLOCK_P=block_p, BLOCK_O=block_o, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out


def clients_conv2d_input_grad(grad: Tensor, w: Tensor, input_hw: Pair, padding: Pair = (0, 0),
                              stride: Pair = (1, 1), dilation: Pair = (1, 1), **tuning: Any) -> Tensor:
    """Returns the gradient of `clients_conv2d`'s output with respect to x, for output
    gradient `grad` [M, B, O, Ho, Wo], weight w [M, O, C, KH, KW] and the input's (H, W):
    [M, B, C, H, W]. With stride 1 it is the correlation of `grad` with the flipped kernel
    (padding ``dilation·(KH − 1) − padding``, which gives exactly the input's size), by the
    kernel; a strided convolution's runs as torch's grouped transposed convolution.
    `tuning`: `clients_conv2d`'s block sizes, warps and taps."""
    KH, KW = w.shape[3], w.shape[4]
    if tuple(stride) != (1, 1):
        return _grouped_input_grad(grad, w, input_hw, padding, stride, dilation)
    flipped = w.flip(3, 4).transpose(1, 2)  # [M, C, O, KH, KW]
    full = (dilation[0] * (KH - 1) - padding[0], dilation[1] * (KW - 1) - padding[1])
    return clients_conv2d(grad, flipped, None, full, (1, 1), dilation, kind="input_grad", **tuning)


def _grouped_input_grad(grad: Tensor, w: Tensor, input_hw: Pair, padding: Pair, stride: Pair,
                        dilation: Pair) -> Tensor:
    """`clients_conv2d_input_grad` as one grouped transposed convolution (groups = clients)."""
    M, B, O, Ho, Wo = grad.shape
    C, KH, KW = w.shape[2:]
    extra = tuple(n - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
                  for n, o, s, p, d, k in zip(input_hw, (Ho, Wo), stride, padding, dilation, (KH, KW)))
    g = grad.transpose(0, 1).reshape(B, M * O, Ho, Wo)
    out = F.conv_transpose2d(g, w.reshape(M * O, C, KH, KW), None, stride, padding, extra, M, dilation)
    return out.reshape(B, M, C, *input_hw).transpose(0, 1)


def clients_conv2d_weight_grad(x: Tensor, grad: Tensor, kernel_hw: Pair, padding: Pair = (0, 0),
                               stride: Pair = (1, 1), dilation: Pair = (1, 1), block_p: int | None = None,
                               programs: int | None = None, block_k: int | None = None,
                               warps: int | None = None, block_o: int | None = None,
                               stages: int = STAGES) -> Tensor:
    """Returns the gradient of `clients_conv2d`'s output with respect to w, for input x
    [M, B, C, H, W] and output gradient `grad` [M, B, O, Ho, Wo]: [M, O, C, KH, KW]. The
    positions are split so that about `programs` programs run (default: 4 per
    multiprocessor on CUDA; each split a power-of-two number of blocks, so that few cohort
    sizes compile a kernel of their own). The product runs over flattened (channel, tap)
    columns: on pfl's 32-channel layer that took 0.50 ms where a loop over taps, then
    channels took 0.83 (H100). The other arguments tune it as `clients_conv2d`'s do."""
    _check(x=x, grad=grad)
    M, B, C, H, W = x.shape
    O, Ho, Wo = grad.shape[2], grad.shape[3], grad.shape[4]
    KH, KW = kernel_hw
    P, K = B * Ho * Wo, C * KH * KW
    if P == 0 or M == 0:
        return x.new_zeros((M, O, C, KH, KW))
    block_o = block_o or _pow2(O)
    block_p, block_k, warps = _tuned("weight_grad", False, block_p, block_k, warps)
    # the product's tiles: g [BLOCK_O, BLOCK_P] and A [BLOCK_P, BLOCK_K]
    block_p, stages = fit_shared(block_p, block_o + block_k, 0, _shared_limit(x.device), stages)
    cols = triton.cdiv(K, block_k)
    tiles = triton.cdiv(O, block_o) * cols
    if programs is None:
        programs = 4 * _multiprocessors(x.device) if x.is_cuda else 4
    chunks = triton.cdiv(P, block_p)
    split = max(1, min(chunks, triton.cdiv(programs, tiles * M)))
    per_split = triton.next_power_of_2(triton.cdiv(chunks, split)) * block_p
    split = triton.cdiv(P, per_split)
    kernel = _kernel(_weight_grad_kernel, x.device)
    parts = []
    for lo in range(0, M, max(1, MAX_GRID // split)):
        hi = min(M, lo + max(1, MAX_GRID // split))
        xs, gs = x[lo:hi], grad[lo:hi]
        out = torch.empty((split, hi - lo, O, K), device=x.device, dtype=torch.float32)
        grid = (triton.cdiv(O, block_o), cols, (hi - lo) * split)
        kernel[grid](xs, gs, out, *xs.stride(), *gs.stride(),
                     C, H, W, O, Ho, Wo, P, *padding, *stride, *dilation, split, hi - lo,
                     K=K, PER_SPLIT=per_split, KH=KH, KW=KW, PREC=_precision(),
                     BLOCK_O=block_o, BLOCK_K=block_k, BLOCK_P=block_p, num_warps=warps, num_stages=stages)
        parts.append(out[0] if split == 1 else out.sum(0))
    dw = parts[0] if len(parts) == 1 else torch.cat(parts)
    return dw.reshape(M, O, C, KH, KW)


def _at0(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    """`t` with its vmap dimension first (an unbatched tensor expanded, without a copy)."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


def _tracked(t: Tensor | None) -> bool:
    """Whether `t` is wrapped by a functorch gradient transform outside the vmap."""
    return t is not None and torch._C._functorch.is_gradtrackingtensor(t)


class _Conv(torch.autograd.Function):
    """One client's convolution whose vmap rule runs the cohort's in one launch. `geometry`:
    (padding, stride, dilation)."""

    generate_vmap_rule = False

    @staticmethod
    def forward(x: Tensor, w: Tensor, bias: Tensor | None, geometry: Geometry) -> Tensor:
        padding, stride, dilation = geometry
        return F.conv2d(x, w, bias, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, w, bias, geometry = inputs
        ctx.save_for_backward(x, w)
        ctx.geometry = geometry
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        x, w = ctx.saved_tensors
        gx = _InputGrad.apply(grad, w, tuple(x.shape[-2:]), ctx.geometry) if ctx.needs_input_grad[0] else None
        gw = _WeightGrad.apply(x, grad, tuple(w.shape[-2:]), ctx.geometry) if ctx.needs_input_grad[1] else None
        gb = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, w: Tensor, bias: Tensor | None, geometry: Geometry) -> tuple:
        xd, wd, bd, _ = in_dims
        n = info.batch_size
        if any(_tracked(t) for t in (x, w, bias)):
            raise RuntimeError("executor.conv 'triton': the clients' gradients must be taken inside vmap "
                               "(vmap(grad(f))), not around it")
        return _CohortConv.apply(_at0(x, xd, n), _at0(w, wd, n), _at0(bias, bd, n), geometry), 0


class _Gradient(torch.autograd.Function):
    """A function with its own vmap rule, not differentiable (the gradients of `_Conv`, and
    the cohort-wide kernels its vmap rules call)."""

    generate_vmap_rule = False

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        raise RuntimeError("executor.conv 'triton': second derivatives of a convolution are not supported "
                           "(and gradients are taken inside vmap, not around it)")


def _fold(info: Any, in_dims: tuple, *tensors: Tensor | None) -> tuple[int, list[Tensor | None]]:
    """(vmap size n, the tensors with the vmap dimension folded into their leading clients'
    dimension: [n, M, ...] -> [n·M, ...])."""
    n = info.batch_size
    out = []
    for t, d in zip(tensors, in_dims):
        t = _at0(t, d, n)
        out.append(None if t is None else t.reshape(n * t.shape[1], *t.shape[2:]))
    return n, out


def _folded(fn: Any, info: Any, in_dims: tuple, batched: int, *args: Any) -> tuple[Tensor, int]:
    """``fn.apply(*args)`` with the vmap dimension of its first `batched` arguments folded
    into the clients' (`_fold`), and the result's unfolded again: (result [n, M, ...], 0)."""
    n, folded = _fold(info, in_dims[:batched], *args[:batched])
    out = fn.apply(*folded, *args[batched:])
    return out.reshape(n, out.shape[0] // n, *out.shape[1:]), 0


def _vmapped_function(compute: Any, batched: int, name: str, cohort: type | None = None) -> type:
    """A `_Gradient` whose forward is `compute`, and whose vmap rule hands the vmapped
    dimension of its first `batched` arguments on: for one client's function, stacked as the
    clients of `cohort` (a cohort-wide function); for a cohort-wide one (`cohort` None: under
    a vectorised sweep's runs around the clients), folded into its own clients' dimension."""

    class Function(_Gradient):
        @staticmethod
        def forward(*args: Any) -> Tensor:
            return compute(*args)

        @staticmethod
        def vmap(info: Any, in_dims: tuple, *args: Any) -> tuple:
            if cohort is None:
                return _folded(Function, info, in_dims, batched, *args)
            stacked = [_at0(t, d, info.batch_size) for t, d in zip(args[:batched], in_dims)]
            return cohort.apply(*stacked, *args[batched:]), 0

    Function.__name__ = Function.__qualname__ = name
    return Function


# (x, w, bias, geometry), (grad, w, input_hw, geometry), (x, grad, kernel_hw, geometry)
_CohortConv = _vmapped_function(lambda x, w, b, geo: clients_conv2d(x, w, b, *geo), 3, "_CohortConv")
_CohortInputGrad = _vmapped_function(lambda g, w, hw, geo: clients_conv2d_input_grad(g, w, hw, *geo), 2,
                                     "_CohortInputGrad")
_CohortWeightGrad = _vmapped_function(lambda x, g, hw, geo: clients_conv2d_weight_grad(x, g, hw, *geo), 2,
                                      "_CohortWeightGrad")


def _input_grad(grad: Tensor, w: Tensor, input_hw: Pair, geometry: Geometry) -> Tensor:
    """One client's input gradient, for an input of spatial size `input_hw`."""
    padding, stride, dilation = geometry
    return torch.nn.grad.conv2d_input((grad.shape[0], w.shape[1], *input_hw), w, grad, stride, padding, dilation)


def _weight_grad(x: Tensor, grad: Tensor, kernel_hw: Pair, geometry: Geometry) -> Tensor:
    """One client's weight gradient, for a kernel of size `kernel_hw`."""
    padding, stride, dilation = geometry
    return torch.nn.grad.conv2d_weight(x, (grad.shape[-3], x.shape[-3], *kernel_hw), grad, stride, padding, dilation)


_InputGrad = _vmapped_function(_input_grad, 2, "_InputGrad", cohort=_CohortInputGrad)
_WeightGrad = _vmapped_function(_weight_grad, 2, "_WeightGrad", cohort=_CohortWeightGrad)


class ClientsConv2d(nn.Module):
    """A drop-in for a `supported` ``nn.Conv2d`` (same parameters and names): outside vmap
    the layer's own convolution; under vmap over clients, the cohort's convolutions and their
    gradients in one Triton launch each (a strided layer's input gradient: torch's grouped
    transposed convolution)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not supported(conv):
            raise ValueError(f"not a groups-1, zero-padded Conv2d with numeric padding: {conv}")
        self.weight = conv.weight
        self.bias = conv.bias
        self.geometry = (tuple(conv.padding), tuple(conv.stride), tuple(conv.dilation))

    def extra_repr(self) -> str:
        o, c, kh, kw = self.weight.shape
        (padding, stride, dilation) = self.geometry
        return (f"{c}, {o}, kernel_size=({kh}, {kw}), stride={stride}, padding={padding}, dilation={dilation}, "
                f"bias={self.bias is not None}")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # one image [C, H, W]
            return self.forward(x.unsqueeze(0)).squeeze(0)
        return _Conv.apply(x, self.weight, self.bias, self.geometry)


# The widest input a swapped layer takes. cuDNN's grouped convolutions are slow where each
# client's layer is narrow and fast where it is wide; per pass on an H100 (ms, cuDNN grouped /
# Triton, forward): LEAF's 1→32 and 32→64 5×5 layers over 340 clients 1.45 / 0.16 and
# 25.0 / 1.5, pfl's 32→64 over 50 clients 0.71 / 0.20, but ResNet-18's 64→64 to 512→512
# layers over 10 clients 0.48 / 1.88 to 0.48 / 1.38 (and their gradients likewise).
WIDEST_INPUT = 32


def with_triton_convs(module: nn.Module, widest: int | None = WIDEST_INPUT) -> tuple[nn.Module, int]:
    """Returns (a deep copy of `module` with every `supported` Conv2d of at most `widest` input
    channels (None: any) replaced by ClientsConv2d, number of layers replaced). Parameter
    names and order are unchanged."""
    module = copy.deepcopy(module)
    count = 0
    for sub in list(module.modules()):
        for name, child in list(sub.named_children()):
            if supported(child) and (widest is None or child.in_channels <= widest):
                setattr(sub, name, ClientsConv2d(child))
                count += 1
    return module, count
