"""executor.conv 'triton': the cohort's convolutions as Triton kernels, against torch's.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1 before anything imports triton); on a GPU machine they run compiled on
CUDA, in full float32 (TF32 off) so that they can be held to float rounding.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

pytest.importorskip("triton")

from fedsim.errors import ConfigError  # noqa: E402
from fedsim.executors import triton_conv as tc  # noqa: E402
from fedsim.executors.precision import precision  # noqa: E402

from .conftest import digits_config, run_config  # noqa: E402
from .test_vmap_executor import final_params, rel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def full_float32():
    with precision("fp32", DEVICE):
        yield


def reference(x, w, b, geometry):
    """Each client's torch convolution, and the gradients of <out, g> for a fixed g."""
    padding, stride, dilation = geometry
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = torch.stack([F.conv2d(x[m], w[m], None if b is None else b[m], stride, padding, dilation)
                       for m in range(len(x))])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    return out.detach(), g, gx, gw


def close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("taps", [False, True])
@pytest.mark.parametrize("shape, geometry", [
    # M, B, C, H, W, O, KH, KW; (padding, stride, dilation)
    ((3, 2, 3, 7, 6, 5, 3, 2), ((0, 0), (1, 1), (1, 1))),     # a non-square kernel
    ((2, 2, 17, 6, 5, 20, 3, 3), ((1, 2), (1, 1), (1, 1))),   # more channels than a block, uneven padding
    ((2, 2, 3, 9, 8, 4, 3, 3), ((1, 0), (2, 3), (1, 1))),     # strides (ResNet's downsampling)
    ((2, 1, 17, 9, 9, 4, 3, 2), ((2, 1), (1, 1), (2, 3))),    # dilation
])
def test_forward_and_gradients_equal_torch(shape, geometry, taps):
    M, B, C, H, W, O, KH, KW = shape
    padding, stride, dilation = geometry
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=gen).to(DEVICE) for s in ((M, B, C, H, W), (M, O, C, KH, KW), (M, O)))
    out, g, gx, gw = reference(x, w, b, geometry)
    tuning = dict(block_p=16, block_k=16, taps=taps)
    assert close(tc.clients_conv2d(x, w, b, *geometry, **tuning), out)
    assert close(tc.clients_conv2d(x, w, None, *geometry, **tuning), out - b[:, None, :, None, None])
    assert close(tc.clients_conv2d_input_grad(g, w, (H, W), *geometry, **tuning), gx)
    # split over one program per client and over many: the partial sums add up the same
    for programs in (1, 64):
        dw = tc.clients_conv2d_weight_grad(x, g, (KH, KW), *geometry, block_p=16, block_k=16, programs=programs)
        assert close(dw, gw)


def test_strided_and_shared_operands():
    # clients along a middle dimension (as vmap may hand them over) and one weight shared by all (stride 0)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 6, 6, generator=gen).to(DEVICE).movedim(1, 0)  # [M=3, B=2, ...], not contiguous
    w = torch.randn(5, 4, 3, 3, generator=gen).to(DEVICE).expand(3, 5, 4, 3, 3)
    out, g, gx, gw = reference(x, w.contiguous(), None, ((1, 1), (1, 1), (1, 1)))
    assert close(tc.clients_conv2d(x, w, None, (1, 1), block_p=16, block_k=16), out)
    assert close(tc.clients_conv2d_input_grad(g.movedim(0, 1).contiguous().movedim(1, 0), w, (6, 6), (1, 1)), gx)
    assert close(tc.clients_conv2d_weight_grad(x, g, (3, 3), (1, 1), block_p=16), gw)


def record_launches(monkeypatch) -> list[tuple[tuple, dict]]:
    """Makes the kernels' launches record (grid, keyword arguments) in the list returned."""
    launches: list[tuple[tuple, dict]] = []
    real = tc._kernel

    class Recorded:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, kwargs))
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tc, "_kernel", lambda fn, device: Recorded(real(fn, device)))
    return launches


def test_cohorts_beyond_one_launch_are_split_into_launches(monkeypatch):
    # CUDA caps a grid's dimension at 65,535 (clients, or clients × position splits) per launch
    monkeypatch.setattr(tc, "MAX_GRID", 2)
    launches = record_launches(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(s, generator=gen).to(DEVICE) for s in ((5, 2, 3, 6, 5), (5, 4, 3, 3, 3), (5, 4)))
    out, g, gx, gw = reference(x, w, b, ((1, 1), (1, 1), (1, 1)))
    assert close(tc.clients_conv2d(x, w, b, (1, 1), block_p=16, block_k=16), out)
    assert close(tc.clients_conv2d_weight_grad(x, g, (3, 3), (1, 1), block_p=16, block_k=16, programs=1), gw)
    assert [grid[2] for grid, _ in launches] == [2, 2, 1] * 2  # 5 clients: launches of 2, 2 and 1
    assert close(tc.clients_conv2d_weight_grad(x, g, (3, 3), (1, 1), block_p=16, block_k=16, programs=64), gw)


def test_tiles_are_fitted_to_the_devices_shared_memory(monkeypatch):
    # ResNet's 128-channel input gradient at the taps tuning (256 x 64 tiles, 3 stages) needs
    # 294,912 bytes; an H100 gives a program 232,448: fewer rows first, then fewer stages
    assert tc.fit_shared(256, 64, 64 * 128, 232_448) == (128, 3)
    assert tc.fit_shared(256, 64, 64 * 128, None) == (256, 3)
    assert tc.fit_shared(16, 64, 64 * 512, 300_000) == (16, 2)
    with pytest.raises(ValueError, match="shared memory"):
        tc.fit_shared(16, 512, 512 * 512, 100_000)
    # the launches use the fitted sizes, and compute the same
    monkeypatch.setattr(tc, "_shared_limit", lambda device: 2 * (16 * 16 + 16 * 16) * 4)
    launches = record_launches(monkeypatch)
    gen = torch.Generator().manual_seed(6)
    x, w = (torch.randn(s, generator=gen).to(DEVICE) for s in ((2, 2, 3, 6, 5), (2, 4, 3, 3, 3)))
    out, g, gx, gw = reference(x, w, None, ((1, 1), (1, 1), (1, 1)))
    assert close(tc.clients_conv2d(x, w, None, (1, 1), block_p=128, block_k=16), out)
    assert [(kw["BLOCK_P"], kw["num_stages"]) for _, kw in launches] == [(16, 2)]
    # tuned by hand: a channel block below O (two blocks of output channels), one stage
    monkeypatch.setattr(tc, "_shared_limit", lambda device: None)
    w8 = torch.randn((2, 20, 3, 3, 3), generator=gen).to(DEVICE)
    out8, g8, _, gw8 = reference(x, w8, None, ((1, 1), (1, 1), (1, 1)))
    assert close(tc.clients_conv2d(x, w8, None, (1, 1), block_o=16, stages=1), out8)
    assert close(tc.clients_conv2d_weight_grad(x, g8, (3, 3), (1, 1), block_o=16, stages=1), gw8)
    assert [(kw["BLOCK_O"], kw["num_stages"]) for _, kw in launches[-2:]] == [(16, 1), (16, 1)]


def test_a_kernel_failure_stops_the_run_instead_of_falling_back(monkeypatch):
    from triton.runtime.errors import OutOfResources

    def fail(*args, **kwargs):
        raise OutOfResources(294912, 232448, "shared memory")

    monkeypatch.setattr(tc, "clients_conv2d", fail)
    with pytest.raises(RuntimeError, match="executor.conv 'triton': the convolution kernels failed"):
        run_config(cnn_config(conv="triton"))


def test_auto_picks_triton_only_where_it_was_measured_faster(monkeypatch):
    from fedsim.executors import vmap as vm

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert vm.auto_conv(cuda, "tf32", False, None) == "triton"
    assert vm.auto_conv(cuda, "fp32", False, True) == "triton"
    assert vm.auto_conv(torch.device("cpu"), "fp32", False, None) == "native"
    assert vm.auto_conv(cuda, "bf16", False, None) == "native"  # the kernels are float32/TF32
    assert vm.auto_conv(cuda, "tf32", True, None) == "native"  # executor.compile
    assert vm.auto_conv(cuda, "tf32", False, False) == "native"  # eager launches cost more than they save
    monkeypatch.setattr(tc, "available", lambda: False)
    assert vm.auto_conv(cuda, "tf32", False, None) == "native"
    monkeypatch.setattr(tc, "available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # not timed before Hopper
    assert vm.auto_conv(cuda, "tf32", False, None) == "native"


def test_under_auto_a_kernel_failure_falls_back_to_native_convolutions(monkeypatch):
    from triton.runtime.errors import OutOfResources

    from fedsim.executors import vmap as vm

    native = run_config(cnn_config(conv="native"))
    monkeypatch.setattr(vm, "auto_conv", lambda *args: "triton")  # as on an H100

    def fail(*args, **kwargs):
        raise OutOfResources(294912, 232448, "shared memory")

    monkeypatch.setattr(tc, "clients_conv2d", fail)
    with pytest.warns(RuntimeWarning, match="executor.conv 'auto': the Triton convolution kernels failed"):
        auto = run_config(cnn_config(conv="auto"))
    assert auto.ctx.executor.conv == "native" and type(auto.ctx.executor.task.module[0]) is nn.Conv2d
    same = torch.equal(final_params(auto), final_params(native)) if DEVICE == "cpu" else \
        rel(final_params(auto).cpu(), final_params(native).cpu()) <= 1e-5  # cuDNN may pick other kernels
    assert same  # the failed cohort left nothing behind


def test_auto_swaps_the_layers_where_it_picks_triton(monkeypatch):
    from fedsim.executors import vmap as vm

    monkeypatch.setattr(vm, "auto_conv", lambda *args: "triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # auto is quiet about what it picks
        run = run_config(cnn_config(conv="auto"))
    assert isinstance(run.ctx.executor.task.module[0], tc.ClientsConv2d)
    float64 = nn.Conv2d(3, 4, 3).double()
    assert not tc.supported(float64) and tc.with_triton_convs(nn.Sequential(float64))[1] == 0


def test_non_float32_inputs_are_refused():
    x = torch.randn(1, 1, 1, 4, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float32"):
        tc.clients_conv2d(x, torch.randn(1, 2, 1, 3, 3, dtype=torch.float64, device=DEVICE))


def small_cnn():
    """8×8 images: a stride-1 layer, a strided one (its input gradient: the grouped path) and
    a padded stride-1 one (its input gradient: the kernel)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1, stride=2), nn.ReLU(),
                         nn.Conv2d(5, 5, 3, padding=1), nn.Flatten(), nn.Linear(5 * 3 * 3, 3)).to(DEVICE)


def test_layers_are_swapped_only_where_the_kernels_apply():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, stride=2, dilation=2), nn.Conv2d(4, 4, 3, groups=2),
                        nn.Conv2d(4, 4, 3, padding="same"), nn.Conv2d(4, 4, 3, padding_mode="reflect"),
                        nn.Conv1d(4, 4, 3), nn.Conv2d(4, 64, 1), nn.Conv2d(64, 4, 1))
    swapped, count = tc.with_triton_convs(net)
    assert count == 3 and all(type(swapped[i]) is tc.ClientsConv2d for i in (0, 1, 6))
    assert swapped[1].geometry == ((0, 0), (2, 2), (2, 2))
    assert all(type(swapped[i]) is type(net[i]) for i in (2, 3, 4, 5, 7))  # wide inputs stay native too
    assert tc.with_triton_convs(net, widest=None)[1] == 4
    assert [n for n, _ in swapped.named_parameters()] == [n for n, _ in net.named_parameters()]
    assert type(net[0]) is nn.Conv2d  # the original model is left alone


def test_vectorised_gradients_equal_native_convolutions():
    net = small_cnn()
    swapped, count = tc.with_triton_convs(net)
    assert count == 3
    M, B = 3, 2
    gen = torch.Generator().manual_seed(3)
    per_client = {k: (v.detach().unsqueeze(0) + 0.1 * torch.randn(M, *v.shape, generator=gen).to(DEVICE))
                  for k, v in net.named_parameters()}
    shared = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(M, B, 3, 8, 8, generator=gen).to(DEVICE)
    y = torch.randint(0, 3, (M, B), generator=gen).to(DEVICE)

    def grads(module, params, in_dims):
        loss = lambda p, xb, yb: F.cross_entropy(functional_call(module, p, (xb,)), yb)  # noqa: E731
        return vmap(grad(loss), in_dims=in_dims)(params, x, y)

    for params, in_dims in ((per_client, (0, 0, 0)), (shared, (None, 0, 0))):
        want, got = grads(net, params, in_dims), grads(swapped, params, in_dims)
        assert all(close(got[k], want[k]) for k in want), {k: (got[k] - want[k]).abs().max().item() for k in want}
    # outside vmap the layer is torch's own convolution: batches and single images
    assert torch.equal(swapped(x[0]), net(x[0]))
    assert torch.equal(swapped[0](x[0, 0]), net[0](x[0, 0]))


def test_nested_vmap_over_runs_and_clients_equals_native_convolutions():
    # a vectorised sweep maps over runs, then over each run's clients
    net = small_cnn()
    swapped, _ = tc.with_triton_convs(net)
    R, M, B = 2, 2, 2
    gen = torch.Generator().manual_seed(4)
    params = {k: v.detach() + 0.1 * torch.randn(R, M, *v.shape, generator=gen).to(DEVICE) for k, v in net.named_parameters()}
    x = torch.randn(R, M, B, 3, 8, 8, generator=gen).to(DEVICE)
    y = torch.randint(0, 3, (R, M, B), generator=gen).to(DEVICE)

    def grads(module):
        loss = lambda p, xb, yb: F.cross_entropy(functional_call(module, p, (xb,)), yb)  # noqa: E731
        return vmap(vmap(grad(loss)))(params, x, y)

    want, got = grads(net), grads(swapped)
    assert all(close(got[k], want[k]) for k in want), {k: (got[k] - want[k]).abs().max().item() for k in want}


def test_outside_vmap_the_layers_train_as_torch_convolutions():
    # the executor's client-by-client fallback runs the swapped model without vmap
    net = small_cnn()
    swapped, _ = tc.with_triton_convs(net)
    x = torch.randn(2, 3, 8, 8, device=DEVICE, requires_grad=True)
    y = torch.tensor([0, 2], device=DEVICE)
    want = torch.autograd.grad(F.cross_entropy(net(x), y), [x, *net.parameters()])
    got = torch.autograd.grad(F.cross_entropy(swapped(x), y), [x, *swapped.parameters()])
    assert all(close(g, w) for g, w in zip(got, want))


def test_gradients_taken_around_vmap_are_refused():
    swapped, _ = tc.with_triton_convs(small_cnn())
    params = {k: v.detach().unsqueeze(0).repeat(2, *[1] * v.dim()) for k, v in swapped.named_parameters()}
    x = torch.randn(2, 1, 3, 8, 8, device=DEVICE)
    total = lambda p: vmap(lambda q, xb: functional_call(swapped, q, (xb,)).sum())(p, x).sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="inside vmap"):
        grad(total)(params)


def cnn_config(**executor):
    return digits_config(model={"name": "cnn", "channels": [4, 8], "hidden": 16},
                         protocol={"name": "sync", "clients_per_round": 3},
                         local={"lr": 0.1, "batch_size": 16, "steps": 2}, run={"rounds": 1, "eval_every": 1},
                         executor={"kind": "vmap", "device": DEVICE, **executor})


def test_a_run_with_triton_convolutions_equals_the_serial_run():
    cfg = cnn_config(conv="triton")
    a = run_config({**cfg, "executor": {"kind": "serial"}})
    b = run_config(cfg)
    assert isinstance(b.ctx.executor.task.module[0], tc.ClientsConv2d)
    tol = 1e-5 if DEVICE == "cpu" else 1e-4  # CUDA: other kernels' float32 rounding than the CPU's serial run
    assert rel(final_params(b).cpu(), final_params(a)) <= tol
    assert b.rows[-1]["test_loss"] == pytest.approx(a.rows[-1]["test_loss"], rel=tol)


def test_config_errors_name_the_key(monkeypatch):
    with pytest.raises(ConfigError, match="executor.conv: 'triton' does not combine with executor.compile"):
        run_config(cnn_config(conv="triton", compile=True))
    with pytest.raises(ConfigError, match="executor.conv: 'triton' computes in float32 or TF32"):
        run_config(cnn_config(conv="triton", precision="bf16"))
    if DEVICE == "cpu":
        monkeypatch.setattr(tc, "interpreted", lambda: False)
        with pytest.raises(ConfigError, match="executor.conv: 'triton' runs on CUDA devices"):
            run_config(cnn_config(conv="triton"))


def test_a_vectorised_sweep_shares_calls_and_equals_single_runs(tmp_path, monkeypatch):
    from fedsim import sweep_vectorized
    from fedsim.sweep import sweep

    calls = []
    original = sweep_vectorized.SharedVmap._run_shared
    monkeypatch.setattr(sweep_vectorized.SharedVmap, "_run_shared", lambda self, batch: calls.append(len(batch)) or original(self, batch))
    cfg = cnn_config(conv="triton")
    lines: list[str] = []
    rows = sweep(cfg, [], [0, 1], tmp_path / "s", print_line=lines.append, vectorize=True)
    assert [r["status"] for r in rows] == ["done", "done"] and calls == [2], lines  # one round, one shared call
    for seed in (0, 1):
        single = run_config(cfg, None, overrides=(f"seed={seed}",))
        model = single.protocol.eval_params(single.ctx, single.final_state)
        torch.testing.assert_close(torch.load(tmp_path / "s" / f"seed={seed}" / "final_model.pt"), model.cpu(),
                                   rtol=1e-5, atol=1e-6)


def test_a_gpu_run_without_cuda_graphs_is_warned_about():
    from fedsim.executors.vmap import VmapExecutor

    executor = VmapExecutor(conv="triton", graphs=False)
    with pytest.warns(RuntimeWarning, match="executor.graphs off"):
        module, swapped = executor._swap_convs(small_cnn(), on_cpu=False)
    assert swapped == 3
    executor.graphs = None  # the default: graphs on CUDA
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        executor._swap_convs(small_cnn(), on_cpu=False)
