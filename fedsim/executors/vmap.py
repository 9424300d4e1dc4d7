"""The vectorised executor: many clients' local updates as one ``torch.func.vmap`` call.

Submitted jobs wait until a result is asked for; then every pending job runs, grouped into
cohorts of equal shapes (`cohort.py`: same [K, B] index shape, state and extras layout).
For a cohort, the strategy's own ``local(payload, state, batches, grad_fn, hp)`` is mapped
over the stacked clients with ``grad_fn = torch.func.grad_and_value(task.loss)`` (built
without importing ``torch._dynamo`` on the eager path: `light_grad.py`; a pure
``functional_call`` loss whose masked mean makes padded rows contribute nothing), so every
client's gradient is exactly its own and each result equals the serial executor's up to
float rounding (tests/test_vmap_executor.py: ≤ 1e-6 relative on the CPU in fp32).

Cohorts larger than memory allows are split: a cohort that runs out of memory is retried
in halves, and the size that worked is kept. A strategy whose local update cannot be
vectorised (Python control flow on tensor values, ``.item()``, random layers without
``randomness``) is detected on its first cohort — the cohort is re-run client by client;
if that succeeds the executor says why vmap failed and either falls back to running every
job serially or stops (``on_unsupported``). A user error that also fails serially is
reported exactly as the serial executor reports it.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import replace
from typing import Annotated, Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..augment import apply as augment_batches, job_draws
from ..config import Ge, OneOf
from ..errors import ConfigError, FedsimError, first_line
from ..registry import EXECUTORS
from ..compressors import NeedsJobKeys, row_job_seeds
from ..rng import cuda_index, key, keyed_torch, keys
from ..strategy import Batches, GradFn, Payload, Strategy, Tensor, split_job_hp
from ..task import Task
from ..contributions import Contributions, from_outputs
from .base import Executor, Job, Worker, WorkerSpec
from .cohort import Stacked, group, signature, stack, unstack
from .job_batch import JobBatch
from .light_grad import grad_and_value
from .graphs import StaticCohortRunner, bucket, clone_tree
from .precision import PRECISIONS, keep_freed_memory, precision
from .unfold_conv import with_unfold_convs
from .channels_last import accepts_channels_last, clients_channels_last


EXACT_SIZES = 8  # distinct cohort sizes captured exactly before padding to buckets


def _as_tensors(values: dict[str, Any]) -> dict[str, Tensor]:
    return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in values.items()}


def _is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def resolve_device(device: str) -> torch.device:
    """Returns the torch device for 'cpu', 'cuda' or 'auto' (CUDA when available), with its
    index: tensors report ``cuda:0``, and ``torch.device('cuda') != torch.device('cuda:0')``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("executor.device", "CUDA is not available on this machine; use device: cpu or auto")
    dev = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev


def auto_conv(device: torch.device, precision_mode: str, compile_cohorts: bool, graphs: bool | None) -> str:
    """``executor.conv: auto``'s choice: 'triton' on a CUDA device of compute capability 9.0
    or later (Hopper, where the kernels were measured: after their one-off compile, faster or
    equal on every CNN timed) with Triton installed, float32/TF32, CUDA graphs on and
    ``compile`` off; else 'native'."""
    if device.type != "cuda" or compile_cohorts or precision_mode == "bf16" or graphs is False:
        return "native"
    if torch.cuda.get_device_capability(device) < (9, 0):
        return "native"
    from . import triton_conv  # imports triton: only on such a GPU

    return "triton" if triton_conv.available() else "native"


class NotVectorisable(FedsimError):
    """A cohort's local update cannot be vectorised (with ``on_unsupported: error``)."""


class VmapExecutor(Executor):
    """Runs pending jobs cohort by cohort under torch.func.vmap; see the module docstring."""

    def __init__(self, device: str = "auto", max_chunk: int | None = None, precision_mode: str = "fp32",
                 graphs: bool | None = None, conv: str = "auto", randomness: str = "error",
                 on_unsupported: str = "fallback", keep_memory: bool = True, keep_on_device: bool = False,
                 compile_cohorts: bool = False):
        self.device_name = device
        self.max_chunk = max_chunk
        self.precision = precision_mode
        self.graphs = graphs
        self.conv_asked = conv
        self.conv = conv  # 'auto' becomes 'triton' or 'native' at start
        self.randomness = randomness
        self.on_unsupported = on_unsupported
        self.keep_memory = keep_memory
        self.keep_on_device = keep_on_device
        self.compile = compile_cohorts
        self.unsupported: str | None = None  # why vmap was given up (fallback mode)
        self.chunk_cap: int | None = None  # largest cohort that fit in memory, once one did not
        self._pending: dict[int, Job] = {}
        self._done: dict[int, Contributions] = {}  # job id -> its row, run but not yet fetched
        self._fills: list = []  # metric copies still on their way to the host (see cohort.unstack)
        self.row_seeds = False  # whether cohorts get each job's seed (the local update asked: `job_key`)
        self.job_seeds: Callable[[np.ndarray], np.ndarray] = self._own_job_seeds

    def _own_job_seeds(self, job_ids: np.ndarray) -> np.ndarray:
        """Returns the seed of each of `job_ids`, ``key(seed, "job", job_id)``, as the serial
        executor seeds the job (int64 [len(job_ids)]); a vectorised sweep replaces it with its runs' own."""
        return np.array(keys(self.spec.seed, "job", job_ids.tolist()), dtype=np.int64)

    # ---- set-up --------------------------------------------------------------------------
    def start(self, spec: WorkerSpec, strategy: Strategy | None = None) -> None:
        self.spec = spec
        self.strategy = spec.task.prepare(strategy if strategy is not None else spec.strategy.build())
        self.device = resolve_device(self.device_name)
        self.order_device = self.device  # hashed batch orders (local.shuffle: hash) are computed there
        base = spec.task
        on_cpu = self.device.type == "cpu"
        self.eval_task = base if on_cpu else base.with_module(copy.deepcopy(base.module).to(self.device))
        self.x = spec.x_train.to(self.device)
        self.y = spec.y_train.to(self.device)
        self.mask_dtype = self.x.dtype if self.x.is_floating_point() else torch.float32
        if self.conv_asked == "auto":
            self.conv = auto_conv(self.device, self.precision, self.compile, self.graphs)
        self._build_model(on_cpu)
        self.channels_last = self.conv == "channels_last" and self._takes_channels_last()
        use_graphs = (not on_cpu) if self.graphs is None else self.graphs
        self.runner = StaticCohortRunner(capture=not on_cpu) if use_graphs else None
        self.order_graphs = use_graphs  # the cohorts' hashed batch orders, too
        self._fns: dict[Any, Any] = {}
        self._sizes: set[int] = set()
        self._test: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        if on_cpu and self.keep_memory:
            keep_freed_memory()

    def _build_model(self, on_cpu: bool) -> None:
        """The model the cohorts train (``executor.conv``'s layers swapped in), its gradient
        function, and the client-by-client worker for jobs that cannot be vectorised."""
        base = self.spec.task
        module, swapped = self._swap_convs(base.module, on_cpu)
        if swapped or not on_cpu:  # a copy: Module.to() moves in place, the run's task stays on the CPU
            self.task = base.with_module((module if swapped else copy.deepcopy(module)).to(self.device))
        else:
            self.task = base
        self.grad_fn = self._grad_transform(grad_and_value)
        # jobs that cannot be vectorised run client by client, on this executor's device and model
        self.serial = Worker(replace(self.spec, task=self.task, x_train=self.x, y_train=self.y), self.strategy)

    def _native_convs(self, exc: BaseException) -> None:
        """With ``executor.conv: auto``: after the Triton kernels failed (`exc`), warns and
        trains the model with its own convolutions from now on."""
        warnings.warn(f"executor.conv 'auto': the Triton convolution kernels failed on this model "
                      f"({type(exc).__name__}: {first_line(exc)}); running its convolutions natively from now on",
                      RuntimeWarning, stacklevel=3)
        self.conv = "native"
        self._build_model(self.device.type == "cpu")
        if self.runner is not None:
            self.runner.clear()
        self._fns = {}

    def _swap_convs(self, module: nn.Module, on_cpu: bool) -> tuple[nn.Module, int]:
        """(the model to train, number of convolution layers swapped) for ``executor.conv``."""
        if self.conv == "unfold":
            return with_unfold_convs(module)
        if self.conv != "triton":
            return module, 0
        from . import triton_conv  # imports triton: only when asked for

        if not triton_conv.available():
            raise ConfigError("executor.conv", "'triton' needs the triton package (pip install triton; "
                              "CUDA builds of torch bring it)")
        if on_cpu and not triton_conv.interpreted():
            raise ConfigError("executor.conv", "'triton' runs on CUDA devices (on the CPU only in Triton's "
                              "interpreter, TRITON_INTERPRET=1 set before start, for testing)")
        if self.compile:
            raise ConfigError("executor.conv", "'triton' does not combine with executor.compile")
        if self.precision == "bf16":
            raise ConfigError("executor.conv", "'triton' computes in float32 or TF32: set executor.precision "
                              "to fp32 or tf32")
        if not on_cpu and self.graphs is False:
            warnings.warn("executor.conv 'triton' with executor.graphs off: each step's kernel launches cost "
                          "more host time than the kernels save (pfl's CNN on an H100: 7.9 against 4.5 ms a "
                          "step eagerly); leave graphs on", RuntimeWarning, stacklevel=3)
        module, swapped = triton_conv.with_triton_convs(module)
        if not swapped and self.conv_asked == "triton":
            warnings.warn(f"executor.conv 'triton': the model has no groups-1, zero-padded Conv2d of at most "
                          f"{triton_conv.WIDEST_INPUT} input channels (wider ones are faster natively); its "
                          "layers run natively", RuntimeWarning, stacklevel=3)
        return module, swapped

    def _takes_channels_last(self) -> bool:
        """Whether the model takes clients' images laid out channels-last (`channels_last.py`);
        warns and keeps the native layout when it does not."""
        with precision(self.precision, self.device.type):
            why = accepts_channels_last(self.task, self.grad_fn, self.x, self.y, self.mask_dtype, self.randomness)
        if why is not None:
            warnings.warn(f"executor.conv 'channels_last': the model's training step cannot take channels-last "
                          f"images under vmap ({why}); using the native layout", RuntimeWarning, stacklevel=3)
        return why is None

    def _grad_transform(self, transform: Callable[..., Any]) -> GradFn:
        """The vectorisable gradient function for the task's loss (with the running
        statistics as auxiliary output for a model that carries them)."""
        if self.task.has_stats:
            return transform(self.task.loss_and_stats, has_aux=True)
        return transform(self.task.loss)

    @property
    def model_device(self) -> torch.device | None:
        """Where the runner should keep the model (None: the CPU, the default)."""
        return self.device if self.keep_on_device and self.device.type != "cpu" else None

    # ---- the executor interface ------------------------------------------------------------
    def submit(self, job: Job) -> None:
        self._pending[job.job_id] = job

    def result(self, job_id: int) -> Contributions:
        if job_id not in self._done:
            if job_id not in self._pending:
                raise KeyError(f"job {job_id} was not submitted")
            self._flush()
        return self._done.pop(job_id)

    def discard(self, job_id: int) -> None:
        self._pending.pop(job_id, None)
        self._done.pop(job_id, None)

    def close(self) -> None:
        if getattr(self, "runner", None) is not None:
            self.runner.clear()
        self._fns = {}
        self._test = None

    def evaluate(self, task: Task, params: Tensor, x: Tensor, y: Tensor, batch_size: int) -> dict[str, float | None]:
        """Evaluates on the executor's device (the test set is copied there once)."""
        if self.device.type == "cpu":
            return task.evaluate(params, x, y, batch_size)
        if self._test is None or self._test[0] is not x or self._test[1] is not y:
            self._test = (x, y, x.to(self.device), y.to(self.device))
        with precision(self.precision, self.device.type):
            return self.eval_task.evaluate(params.to(self.device), self._test[2], self._test[3], batch_size)

    # ---- running cohorts ---------------------------------------------------------------------
    def _flush(self) -> None:
        jobs = list(self._pending.values())
        self._pending.clear()
        done = self._done
        # the asynchronous protocols take results job by job: each cohort is split into rows
        # as soon as it is queued, while the device still computes
        self._run_cohorts(jobs, lambda piece: done.update(zip(piece.jobs.tolist(), piece.split())))

    def _run_jobs(self, jobs: Sequence[Job]) -> Contributions:
        """Runs `jobs` cohort by cohort; returns their contributions in the jobs' order."""
        jobs = JobBatch.of(jobs)
        pieces: list[Contributions] = []
        several = self._run_cohorts(jobs, pieces.append) > 1
        merged = Contributions.concat(pieces)
        if not several:
            return merged
        at = {job_id: i for i, job_id in enumerate(merged.jobs.tolist())}  # several cohorts: back to the jobs' order
        return merged.take([at[j] for j in jobs.job_ids.tolist()])

    def _run_cohorts(self, jobs: Sequence[Job], take: Callable[[Contributions], Any]) -> int:
        """Runs `jobs` cohort by cohort, handing each chunk's contributions to `take` as it is
        queued; returns once every chunk's metrics reached the host. Returns the number of
        cohorts (1 when the pieces are in the jobs' order)."""
        if self.unsupported is not None:
            take(self._serially(jobs))
            return 1
        cohorts = group(jobs)
        try:
            for cohort in cohorts:
                for piece in self._run_group(cohort):
                    take(piece)
        finally:  # the cohorts' metrics reach the host last: other cohorts run meanwhile
            fills, self._fills = self._fills, []
            for fill in fills:
                fill()
        return len(cohorts)

    def run(self, jobs: Sequence[Job]) -> Contributions:
        """Runs `jobs` (with any still pending) and returns their contributions in the jobs' order."""
        if not self._pending:
            return self._run_jobs(jobs)
        for job in jobs:
            self._pending[job.job_id] = job
        self._flush()
        return Contributions.concat([self._done.pop(job.job_id) for job in jobs])

    def _run_group(self, jobs: JobBatch) -> list[Contributions]:
        """Runs one group of equal signature, in chunks; returns each chunk's contributions."""
        size = min(x for x in (len(jobs), self.max_chunk, self.chunk_cap) if x is not None)
        pieces: list[Contributions] = []
        i = 0
        while i < len(jobs):
            part = jobs if i == 0 and size >= len(jobs) else jobs[i : i + size]
            if self.unsupported is not None:
                pieces.append(self._serially(part))
            else:
                try:
                    pieces.append(self._run_cohort(part))
                except Exception as exc:  # noqa: BLE001 - classified below
                    if _asked_for_job_keys(exc) and not self.row_seeds:
                        self.row_seeds = True  # the local update draws from its job's key: give every row its own
                        continue
                    if self.conv == "triton" and _from_triton(exc):
                        if self.conv_asked == "auto":
                            self._native_convs(exc)
                            continue
                        # asked for by name: falling back client by client would hide a kernel failure
                        raise RuntimeError(f"executor.conv 'triton': the convolution kernels failed on this model "
                                           f"({type(exc).__name__}: {first_line(exc)}); use executor.conv: native") from exc
                    if _is_oom(exc) and size > 1:
                        size = self.chunk_cap = max(1, len(part) // 2)
                        if self.device.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    pieces.append(self._not_vectorisable(part, exc))
            i += len(part)
        return pieces

    def _run_cohort(self, jobs: JobBatch) -> Contributions:
        if not self.compile:
            return self._run_cohort_with(jobs, compiled=False)
        try:
            return self._run_cohort_with(jobs, compiled=True)
        except Exception as exc:  # noqa: BLE001 - compiler failures vary; the eager re-run decides
            if _is_oom(exc):
                raise
            outputs = self._run_cohort_with(jobs, compiled=False)  # a cohort that fails eagerly raises here
            first = first_line(exc)
            warnings.warn(f"executor vmap: torch.compile of the cohort failed ({type(exc).__name__}: {first}); "
                          "running cohorts eagerly from now on", RuntimeWarning, stacklevel=2)
            self.compile = False
            return outputs

    def _run_cohort_with(self, jobs: JobBatch, compiled: bool) -> Contributions:
        # static shapes (CUDA graphs, compiled functions): pad to a bounded set of cohort sizes
        pad = self._padded_size(len(jobs)) if self.runner is not None or compiled else None
        st = stack(jobs, self.device, pad_to=pad)
        idx = st.indices if isinstance(st.indices, torch.Tensor) else torch.from_numpy(st.indices).to(self.device)
        first = jobs[0]
        fn_key = (signature(first), st.size, st.params_dim, st.params_block, tuple(sorted(st.extras_dims.items())),
                  compiled, self.row_seeds)
        inputs: tuple = (st.params, st.extras, st.state, idx,
                         self._draws(jobs, st.size) if self.spec.augment.active else None,
                         self._seeds(jobs, st.size) if self.row_seeds else None)

        def build():
            if not compiled:
                return self._cohort_fn(st, self.grad_fn)
            return torch.compile(self._cohort_fn(st, self._grad_transform(torch.func.grad_and_value)), dynamic=False)

        with precision(self.precision, self.device.type), self._keyed_rng(first.job_id):
            if self.runner is not None:
                out = self.runner.run(fn_key, build, inputs)
            else:
                if fn_key not in self._fns:
                    self._fns[fn_key] = build()
                out = self._fns[fn_key](*inputs)
        home = first.payload.params.device
        if self.runner is not None and home == self.device:
            # the graph's output buffers are overwritten by the next replay, and results may be
            # fetched after it (asynchronous protocols); elsewhere unstack's .to(home) copies
            out = clone_tree(out)
        batch, fill = unstack(out, jobs, home, first.num_steps)
        self._fills.append(fill)
        return batch

    def _draws(self, jobs: JobBatch, size: int) -> Tensor:
        """The cohort's augmentation draws [size, K, B, 3], each job's as the serial executor
        draws them (padding rows: zeros)."""
        aug, shape = self.spec.augment, tuple(int(v) for v in jobs.shapes[0])
        out = np.zeros((size, *shape, 3), dtype=np.int64)
        for i, (client, job_id) in enumerate(zip(jobs.clients.tolist(), jobs.job_ids.tolist())):
            out[i] = job_draws(aug, self.spec.seed, client, job_id, *shape)
        return torch.from_numpy(out).to(self.device)

    def _seeds(self, jobs: JobBatch, size: int) -> Tensor:
        """The cohort's job seeds [size] (`job_seeds`; padding rows: 0)."""
        out = np.zeros(size, dtype=np.int64)
        out[: len(jobs)] = self.job_seeds(jobs.job_ids)
        return torch.from_numpy(out).to(self.device)

    def _padded_size(self, n: int) -> int:
        """Cohort size to capture: n itself for the first few sizes seen (a synchronous run has
        one), else the smallest captured size ≥ n, else `bucket(n)`; bounds the graphs kept."""
        if n in self._sizes or len(self._sizes) < EXACT_SIZES:
            self._sizes.add(n)
            return n
        fits = [s for s in self._sizes if s >= n]
        return min(fits) if fits else bucket(n)

    @contextlib.contextmanager
    def _keyed_rng(self, job_id: int) -> Iterator[None]:
        """With random layers allowed, seeds torch's generators (CPU and the executor's device)
        by the key of the cohort's first job, as the serial executor seeds that job's."""
        if self.randomness == "error":
            yield
            return
        with keyed_torch(key(self.spec.seed, "job", job_id), cuda_index(self.device)):
            yield

    def _cohort_fn(self, st: Stacked, grad_fn: GradFn):
        local, hp = self.strategy.local, self.spec.hp

        def one(params, extras, state, x, y, mask, seed=None):
            own_hp, extras = split_job_hp(hp, extras)  # a job's own lr/momentum/weight decay (vectorised sweeps)
            with row_job_seeds(seed):  # `job_key` inside: this row's job's key
                out = local(Payload(params, extras), state, Batches(x, y, mask), grad_fn, own_hp)
            return out.update, dict(out.state), _as_tensors(out.extras), _as_tensors(out.metrics)

        in_dims = st.in_dims + ((0,) if self.row_seeds else ())
        if st.params_block is None:
            mapped = torch.func.vmap(one, in_dims=in_dims, randomness=self.randomness)
        else:
            mapped = _in_blocks(one, st, self.randomness, self.row_seeds)
        x_all, y_all, mask_dtype = self.x, self.y, self.mask_dtype
        padding = self.spec.augment.crop_padding
        layout = clients_channels_last if self.channels_last else None

        def run(params: Tensor, extras: dict, state: dict, idx: Tensor, draws: Optional[Tensor] = None,
                seeds: Optional[Tensor] = None):
            safe = idx.clamp_min(0)
            x = x_all[safe] if draws is None else augment_batches(x_all[safe], draws, padding)
            if layout is not None:
                x = layout(x)
            rows = (params, extras, state, x, y_all[safe], (idx >= 0).to(mask_dtype))
            return mapped(*rows, seeds) if seeds is not None else mapped(*rows)

        return run

    def _serially(self, jobs: Sequence[Job]) -> Contributions:
        """Runs `jobs` client by client on the executor's device; returns their contributions
        where the jobs' models live (as a vectorised cohort's)."""
        jobs = list(jobs)
        home = jobs[0].payload.params.device
        got = from_outputs(jobs, [self.serial.run(_on_device(j, self.device)) for j in jobs])
        if not isinstance(got.updates, torch.Tensor) or got.updates.device == home:
            return got
        return got.replace(updates=got.updates.to(home), extras={k: v.to(home) for k, v in got.extras.items()},
                           state={k: v.to(home) for k, v in got.state.items()})

    def _not_vectorisable(self, jobs: Sequence[Job], exc: BaseException) -> Contributions:
        """Re-runs `jobs` client by client (a user error surfaces here as ClientJobError, as
        with the serial executor); if they succeed, vmap itself was the problem: report it,
        then fall back or stop as configured. Returns the jobs' contributions."""
        got = self._serially(jobs)
        name = getattr(self.spec.strategy, "name", "?")
        first = first_line(exc)
        if _from_gpu_library(exc):
            msg = (f"executor vmap: the vectorised step of strategy {name!r} failed in a GPU library "
                   f"({type(exc).__name__}: {first}), while client by client it runs: the cohort's batched "
                   "kernels (e.g. grouped convolutions) are what failed; try executor.conv or executor.precision "
                   "settings, or a smaller executor.max_chunk.")
        else:
            msg = (
                f"executor vmap: strategy {name!r}'s local update cannot be vectorised with torch.func.vmap "
                f"({type(exc).__name__}: {first}). Usual causes: Python control flow on tensor values "
                "(if/while on a tensor, .item(), float(t)), in-place updates of inputs, or random layers "
                "(set executor.randomness: different)."
            )
        if self.on_unsupported == "error":
            raise NotVectorisable(msg + " Use executor.kind: serial, or executor.on_unsupported: fallback.")
        warnings.warn(msg + " Running every job client by client from now on.", RuntimeWarning, stacklevel=2)
        self.unsupported = msg
        return got


def _from_triton(exc: BaseException) -> bool:
    """Whether `exc` is one of Triton's own errors (a kernel that does not compile or launch)."""
    return type(exc).__module__.split(".")[0] == "triton"


GPU_LIBRARIES = ("cudnn", "cublas", "cufft", "cusolver", "cuda error", "cuda driver error")


def _from_gpu_library(exc: BaseException) -> bool:
    """Whether `exc` reports a failure inside a GPU library (cuDNN, cuBLAS, …) or the CUDA
    runtime, not in the strategy's Python code."""
    text = str(exc).lower()
    return any(lib in text for lib in GPU_LIBRARIES)


def _asked_for_job_keys(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is `NeedsJobKeys`."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, NeedsJobKeys):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _on_device(job: Job, device: torch.device) -> Job:
    """`job` with its model, payload extras and client state on `device`."""
    def to(v: Any) -> Any:
        return v.to(device) if isinstance(v, torch.Tensor) else v

    p = job.payload
    return replace(job, payload=Payload(to(p.params), {k: to(v) for k, v in p.extras.items()}),
                   state={k: to(v) for k, v in job.state.items()})


def _in_blocks(one: Callable[..., Any], st: Stacked, randomness: str, seeds: bool = False) -> Callable[..., Any]:
    """`one` mapped over a cohort whose models come in blocks (`Stacked.params_block`): an
    outer vmap over the blocks' models, an inner one over each block's clients with the
    block's model broadcast, as a cohort sharing one model is; takes and returns the flat
    cohort's arguments (with `seeds`, each row's job seed last) and outputs (rows in order)."""
    m, dims = st.params_block, st.extras_dims
    rows = (0, 0, 0, 0) + ((0,) if seeds else ())
    inner = torch.func.vmap(one, in_dims=(None, dims, *rows), randomness=randomness)
    outer = torch.func.vmap(inner, in_dims=(0, dims, *rows), randomness=randomness)

    def mapped(params: Tensor, extras: dict, state: dict, x: Tensor, y: Tensor, mask: Tensor, *seed: Tensor):
        g = params.shape[0]

        def blocks(t: Tensor) -> Tensor:
            return t.reshape(g, m, *t.shape[1:])

        extras = {k: blocks(v) if dims[k] == 0 else v for k, v in extras.items()}
        out = outer(params, extras, tree_map(blocks, state), blocks(x), blocks(y), blocks(mask), *map(blocks, seed))
        return tree_map(lambda t: t.reshape(g * m, *t.shape[2:]), out)

    return mapped


@EXECUTORS.register("vmap")
def vmap(
    device: Annotated[str, OneOf(("auto", "cpu", "cuda"))] = "auto",
    max_chunk: Annotated[Optional[int], Ge(1)] = None,
    precision: Annotated[str, OneOf(PRECISIONS)] = "fp32",
    graphs: Optional[bool] = None,
    conv: Annotated[str, OneOf(("auto", "native", "channels_last", "unfold", "triton"))] = "auto",
    randomness: Annotated[str, OneOf(("error", "different", "same"))] = "error",
    on_unsupported: Annotated[str, OneOf(("fallback", "error"))] = "fallback",
    keep_freed_memory: bool = True,
    keep_on_device: bool = False,
    compile: bool = False,
) -> Executor:
    """Trains whole cohorts of clients at once with torch.func.vmap, on the CPU or a GPU.

    Args:
        device: 'cpu', 'cuda', or 'auto' (CUDA when available).
        max_chunk: Most clients in one vectorised call (default: the whole cohort; a cohort
            that runs out of memory is split in halves automatically either way).
        precision: 'fp32' (equal to the serial executor up to rounding), 'tf32' (TF32 matrix
            units on CUDA), 'bf16' (bfloat16 autocast; parameters stay float32).
        graphs: Replay each cohort shape as a CUDA graph (after 8 distinct cohort sizes, new
            sizes are padded to captured or bucketed ones), and with ``local.shuffle: hash``
            the computation of its batch orders too;
            default: on for CUDA, off on the CPU (where it only pads and reuses buffers).
        conv: 'auto' (the default): 'triton' on a CUDA GPU of compute capability 9.0 or
            later (Hopper: timed on H100s; the H200 is the same architecture) with Triton
            installed, precision fp32 or tf32, CUDA graphs on and ``compile`` off, 'native'
            everywhere else; if the Triton kernels fail on the model, it warns and continues
            with 'native' (the failed cohort is re-run). Otherwise 'native' convolutions
            (grouped convolutions under vmap); 'channels_last' (the same grouped convolutions,
            fed the clients' images laid out so that they run channels-last (NHWC): made for the GPU's NHWC convolution kernels, though on an
            H200 pfl-research's small CNN ran no faster than with 'native', and on a 2-core
            CPU neither (benchmarks/README.md). Convolutions that follow
            one another keep the layout without copies; a pooling layer in between hands
            the next one the native layout, and adaptive pooling runs per client (slow). A
            model whose training step cannot take such input under vmap (GroupNorm, or a
            ``.view`` of the images) keeps 'native' with a warning); or 'unfold' (im2col +
            batched matmul; measured 3-4x slower on an H200 and 2.2x on an H100 for pfl's CNN, see
            benchmarks/README.md); or 'triton' (CUDA: each groups-1, zero-padded Conv2d of
            the clients of at most 32 input channels, and its gradients, as one Triton
            implicit-GEMM kernel for the whole cohort instead of cuDNN's grouped convolutions
            (a strided layer's input gradient stays grouped; wider layers stay native, where
            cuDNN is faster): on an H100, pfl's CNN's rounds spent 22% less time in the
            executor (the whole run 18% less), LEAF's FEMNIST CNN's 44% less, ResNet-18's
            the same. Pays with CUDA graphs (the default on CUDA); float32/TF32 only, not with
            ``compile``; other layers run natively; each layer shape's kernels compile on first
            use, seconds that Triton caches on disk; asked for by name, a kernel failure stops
            the run).
        randomness: vmap's handling of random layers (dropout): 'error' (refuse: results
            equal serial), 'different' or 'same' (per-client or shared draws, keyed per cohort;
            reproducible, but not the serial executor's draws, and with CUDA graphs not the
            eager path's either).
        on_unsupported: If the strategy cannot be vectorised: 'fallback' (warn and run client
            by client) or 'error' (stop with the reason).
        keep_freed_memory: On the CPU, keep freed buffers in the process (glibc mallopt,
            process-wide) instead of returning them to the OS after every step.
        keep_on_device: Keep the global model and the updates on the GPU (no copies to the
            CPU each round; the server's arithmetic runs there too). Stored client state and
            server-side memory stay in the state store on the CPU (run.state_memory_mb)
            and are copied in with each cohort. Results
            always come back where the job's model lives, so a run resumed from a checkpoint
            (saved on the CPU) continues on the CPU.
        compile: Compile each cohort function with ``torch.compile`` (Inductor) before its
            first run: fuses the vectorised step's elementwise work — 1.4-1.5x faster on an
            H200 for small CNNs, ~2x on the CPU for an MLP (benchmarks/README.md) — at a
            one-off cost of tens of seconds per cohort shape (cohorts are padded to at most a
            few sizes, as for CUDA graphs). Results match the eager path to float rounding,
            not bitwise. Needs a C++ compiler on the CPU and Triton on CUDA; if compiling
            fails the executor warns and runs eagerly.
    """
    return VmapExecutor(device, max_chunk, precision, graphs, conv, randomness, on_unsupported,
                        keep_freed_memory, keep_on_device, compile)
