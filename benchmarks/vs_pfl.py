"""fedsim against pfl-research 0.6.0 on pfl's own CIFAR-10 benchmark shape, in one process.

pfl-research (Apple's ``pfl`` package) is an optional benchmark dependency, never a runtime
one: ``pip install pfl==0.6.0`` (see benchmarks/README.md). Both sides get the very same
arrays: 1,000 users × 50 CIFAR-10-shaped images and 10,000 test images from fedsim's
offline generator (``_images.py``, Gaussian class images), users as fedsim's iid partition
draws them.

* pfl: set up as pfl's ``benchmarks/image_classification/pytorch/train.py`` does with
  ``configs/baseline.yaml`` (dataset cifar10_iid): simple_cnn on channels-last images
  (its ``Transpose2D`` first layer, then the same layers as ``_images.pfl_cnn``),
  ``PyTorchModel`` with local ``torch.optim.SGD`` and central ``SGD(lr=1.0)``,
  ``FederatedAveraging`` with cohort 50, local batch 10, 1 local epoch, ``WeightByUser``,
  no privacy (``NoPrivacy`` locally and centrally applied), ``CentralEvaluationCallback``
  every 10 iterations on the 10,000 test images in one batch, and the benchmark's
  callbacks (stopwatch, metrics CSV in a temporary folder, best-metric tracking). Its best
  settings: user and test data as tensors on the device (pfl's benchmark keeps the test
  set in numpy and copies it at every evaluation), TF32 on (``--precision``), and
  ``PyTorchModel(use_torch_compile=True)`` (``--pfl-compile``).
* fedsim: the config of ``pfl_cifar.py`` (vmap executor, CUDA graphs, ``keep_on_device``,
  dropout drawn per client), FedAvg, the same cohort, batch, epochs, evaluation and lr.

The local lr is 0.05 for both: at pfl's baseline 0.1 (tuned for normalised CIFAR-10) both
diverge on these images and stay at chance; at 0.05 both reach ~1.0 test accuracy within
150 rounds.

For each it reports imports, setup, the rounds with their evaluations (ms/round over the
whole run and in the steady state, after the first quarter), the whole-run time and the
test accuracy of the final model (for pfl evaluated once more after its timing: its callback
evaluates every 10th iteration only); then the ratio of ms/round (pfl / fedsim) and the whole-run ratio
projected to ``--rounds`` (each side's measured time plus its steady ms/round for the
rounds it did not run).

    python benchmarks/vs_pfl.py [--rounds 1500] [--pfl-rounds N] [--fedsim-rounds N] \\
        [--device cuda] [--precision tf32] [--pfl-compile pfl] [--fedsim-conv native|channels_last|unfold|triton] [--lr 0.05] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PFL_VERSION = "0.6.0"
BATCH, EPOCHS, EVAL_EVERY, CENTRAL_LR = 10, 1, 10, 1.0


@dataclass
class Result:
    """One side's timings (seconds) and its last evaluation."""

    name: str
    settings: str
    imports: float
    setup: float
    run: float
    rounds: int
    round_ends: list[float]  # perf_counter at the end of each round
    run_start: float
    accuracy: float
    accuracy_round: int

    @property
    def ms_per_round(self) -> float:
        return self.run / self.rounds * 1000

    @property
    def steady_ms_per_round(self) -> float:
        """Mean round time after the first quarter of the rounds (evaluations included)."""
        first = self.rounds // 4
        t0 = self.round_ends[first - 1] if first else self.run_start
        return (self.round_ends[-1] - t0) / (self.rounds - first) * 1000

    @property
    def whole(self) -> float:
        return self.imports + self.setup + self.run

    def projected(self, rounds: int) -> float:
        """Whole-run seconds for `rounds`: measured, plus steady rounds for the ones not run."""
        return self.whole + max(0, rounds - self.rounds) * self.steady_ms_per_round / 1000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _tf32(on: bool):
    """TF32 matmul and cuDNN convolutions on or off for the block (pfl has no setting of its own)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ---- the shared data ---------------------------------------------------------------------

def fedsim_config(args: argparse.Namespace, rounds: int) -> dict:
    """Returns fedsim's config mapping: pfl_cifar.py's, scaled by --users/--test-images."""
    from benchmarks.pfl_cifar import config

    cfg = config(rounds, args.device, args.precision, args.fedsim_conv, args.device == "cuda", args.lr)
    cfg["data"]["num_clients"] = args.users
    cfg["protocol"]["clients_per_round"] = args.cohort
    cfg["data"].update(num_train=args.users * args.per_user, num_test=args.test_images)
    cfg["executor"]["compile"] = args.fedsim_compile
    return cfg


def shared_data(args: argparse.Namespace):
    """Returns fedsim's FederatedData for the benchmark (generated once, given to both sides)."""
    from fedsim.config import load_config
    from fedsim.data import build_federated_data

    cfg = load_config(fedsim_config(args, 1))
    return build_federated_data(cfg.data, cfg.partition, cfg.seed)


# ---- fedsim ------------------------------------------------------------------------------

def run_fedsim(args: argparse.Namespace, data, rounds: int, imports: float) -> Result:
    """Builds and drives fedsim's run on `data`; returns its timings and last evaluation."""
    from benchmarks._timing import record_round_ends
    from fedsim import runner
    from fedsim.config import load_config

    device = torch.device(args.device)
    t = time.perf_counter()
    mapping = fedsim_config(args, rounds)
    cfg = load_config(mapping)
    with mock.patch.object(runner, "build_federated_data", lambda *a, **k: data):  # the shared arrays
        run = runner.build(cfg)
    ends = record_round_ends(run)
    _sync(device)
    start = time.perf_counter()
    rows = runner.drive(run, None, progress=False)
    _sync(device)
    end = time.perf_counter()
    last = rows[-1]
    ex = mapping["executor"]
    settings = (f"vmap executor on {ex['device']}, precision {ex['precision']}, CUDA graphs {ex['graphs']}, "
                f"keep_on_device {ex['keep_on_device']}, compile {ex['compile']}, conv {ex['conv']}, dropout per client")
    return Result("fedsim", settings, imports, start - t, end - start, run.final_state.rounds, ends[:rounds],
                  start, float(last["test_accuracy"]), int(last["round"]))


# ---- pfl ---------------------------------------------------------------------------------

def _pfl_model(input_shape, num_classes: int):
    """Returns pfl's benchmark simple_cnn (benchmarks/model/pytorch/cnn.py) for channels-last
    [H, W, C] images with its loss and metrics methods bound, and those two functions."""
    import types

    import torch.nn.functional as F
    from pfl.metrics import Weighted

    from benchmarks._images import pfl_cnn

    class Transpose2D(torch.nn.Module):  # pfl's benchmarks/model/pytorch/layer.py
        def forward(self, inputs):
            return inputs.permute((0, 3, 1, 2))

    h, w, c = input_shape
    model = torch.nn.Sequential(Transpose2D(), *pfl_cnn((c, h, w), num_classes))

    def loss(self, inputs, targets, eval=False):  # benchmarks/model/pytorch/metrics.py
        self.eval() if eval else self.train()
        return F.cross_entropy(self(inputs), targets.squeeze().long())

    @torch.no_grad()
    def metrics(self, inputs, targets, eval=True):
        self.eval() if eval else self.train()
        logits = self(inputs)
        targets = targets.squeeze().long()
        correct = (logits.argmax(-1) == targets).float().sum().item()
        summed = F.cross_entropy(logits, targets, reduction="sum").item()
        return {"loss": Weighted(summed, len(inputs)), "accuracy": Weighted(correct, len(inputs))}

    model.loss = types.MethodType(loss, model)
    model.metrics = types.MethodType(metrics, model)
    return model, loss, metrics


def run_pfl(args: argparse.Namespace, data, rounds: int, imports: float) -> Result:
    """Sets up pfl as its CIFAR-10 benchmark does, on `data`; returns its timings and last evaluation."""
    import types

    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByUser
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.aggregate_metrics_to_disk import AggregateMetricsToDisk
    from pfl.callback.base import TrainingProcessCallback
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.callback.stopwatch import StopwatchCallback
    from pfl.callback.track_best_overall_metrics import TrackBestOverallMetrics
    from pfl.data import FederatedDataset
    from pfl.data.dataset import Dataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.internal.ops.pytorch_ops import get_default_device, to_tensor
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel
    from pfl.privacy import CentrallyAppliedPrivacyMechanism, NoPrivacy

    device = torch.device(args.device)
    assert get_default_device() == device, (get_default_device(), device)  # PFL_PYTORCH_DEVICE is set in main
    ends: list[float] = []

    class Timer(TrainingProcessCallback):
        """Records the end of every central iteration (its evaluation included)."""

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            ends.append(time.perf_counter())
            return False, Metrics()

    torch.random.manual_seed(0)
    np.random.seed(0)
    t = time.perf_counter()
    # pfl's benchmark: images channels-last, labels through to_tensor (float32), both on the device
    x_train = to_tensor(data.x_train.permute(0, 2, 3, 1).contiguous().numpy())
    y_train = to_tensor(data.y_train.numpy())
    x_test = to_tensor(data.source.x_test.permute(0, 2, 3, 1).contiguous().numpy())
    y_test = to_tensor(data.source.y_test.numpy())
    users = {u: (x_train[torch.as_tensor(ix, device=device)], y_train[torch.as_tensor(ix, device=device)])
             for u, ix in enumerate(data.client_train)}
    train = FederatedDataset.from_slices(users, get_user_sampler("random", range(len(users))))
    val_users = {u: (x_test[s:s + args.per_user], y_test[s:s + args.per_user])
                 for u, s in enumerate(range(0, len(x_test), args.per_user))}
    val = FederatedDataset.from_slices(val_users, get_user_sampler("random", range(len(val_users))))
    central = Dataset(raw_data=[x_test, y_test])

    net, loss, metrics = _pfl_model(tuple(x_train.shape[1:]), 10)
    net = net.to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(params, CENTRAL_LR),
                         use_torch_compile=args.pfl_compile != "off")
    if args.pfl_compile == "forward":
        # pfl's option compiles the module, but the benchmark's loss/metrics are bound to the
        # uncompiled one and call its forward; bound to the compiled one, they run compiled
        compiled = model.pytorch_model
        compiled.loss, compiled.metrics = types.MethodType(loss, compiled), types.MethodType(metrics, compiled)
    backend = SimulatedBackend(training_data=train, val_data=val,
                               postprocessors=[WeightByUser(), NoPrivacy(), CentrallyAppliedPrivacyMechanism(NoPrivacy())])
    algorithm_params = NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=EVAL_EVERY,
                                         train_cohort_size=args.cohort, val_cohort_size=0)
    train_params = NNTrainHyperParams(local_learning_rate=args.lr, local_num_epochs=EPOCHS, local_batch_size=BATCH)
    eval_params = NNEvalHyperParams(local_batch_size=args.test_images)
    with tempfile.TemporaryDirectory() as tmp:
        callbacks = [StopwatchCallback(),
                     CentralEvaluationCallback(central, model_eval_params=eval_params, frequency=EVAL_EVERY),
                     AggregateMetricsToDisk(os.path.join(tmp, "metrics.csv")),
                     TrackBestOverallMetrics(higher_is_better_metric_names=["Central val | accuracy"]),
                     Timer()]
        _sync(device)
        start = time.perf_counter()
        # pfl prints every iteration's metrics to stdout: kept out of the table
        with _tf32(args.precision == "tf32"), open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            FederatedAveraging().run(algorithm_params=algorithm_params, backend=backend, model=model,
                                     model_train_params=train_params, model_eval_params=eval_params,
                                     callbacks=callbacks)
        _sync(device)
        end = time.perf_counter()
    # the final model, evaluated as the callback does (outside the timing: pfl's callback
    # evaluates every 10th iteration, not necessarily the last one)
    with _tf32(args.precision == "tf32"):
        final = model.evaluate(central, eval_params=eval_params)
    accuracy = next(float(v.overall_value) for k, v in final if str(k) == "accuracy")
    tf32 = args.precision == "tf32" if device.type == "cuda" else "n/a"
    settings = (f"pfl {PFL_VERSION}, data on {device.type}, TF32 {tf32}, "
                f"use_torch_compile {args.pfl_compile != 'off'}"
                + (" (loss/metrics bound to the compiled module)" if args.pfl_compile == "forward" else ""))
    return Result("pfl", settings, imports, start - t, end - start, rounds, ends, start, accuracy, rounds)


# ---- report ------------------------------------------------------------------------------

def table(results: list[Result], rounds: int) -> str:
    """Returns the comparison as a Markdown table with the ratio lines under it."""
    head = ("| framework | rounds | imports s | setup s | rounds+evals s | ms/round | steady ms/round "
            f"| whole run s | projected to {rounds} rounds s | final accuracy (round) |")
    lines = [head, "|" + "---|" * 10]
    for r in results:
        lines.append(f"| {r.name} | {r.rounds} | {r.imports:.1f} | {r.setup:.1f} | {r.run:.1f} | {r.ms_per_round:.1f} "
                     f"| {r.steady_ms_per_round:.1f} | {r.whole:.1f} | {r.projected(rounds):.1f} "
                     f"| {r.accuracy:.4f} ({r.accuracy_round}) |")
    by = {r.name: r for r in results}
    if {"pfl", "fedsim"} <= by.keys():
        p, f = by["pfl"], by["fedsim"]
        lines += ["",
                  f"ms/round ratio pfl / fedsim: {p.ms_per_round / f.ms_per_round:.1f}x "
                  f"(steady {p.steady_ms_per_round / f.steady_ms_per_round:.1f}x)",
                  f"whole-run ratio pfl / fedsim, projected to {rounds} rounds: "
                  f"{p.projected(rounds) / f.projected(rounds):.1f}x"
                  + (" (measured)" if p.rounds == f.rounds == rounds else "")]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1500, help="rounds of each side unless given below; the projection's length")
    ap.add_argument("--pfl-rounds", type=int, help="pfl's central iterations (0: skip pfl)")
    ap.add_argument("--fedsim-rounds", type=int, help="fedsim's rounds (0: skip fedsim)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("fp32", "tf32"), default="tf32", help="both sides")
    ap.add_argument("--pfl-compile", choices=("off", "pfl", "forward"), default="pfl",
                    help="off; pfl's use_torch_compile; or that plus loss/metrics bound to the compiled module")
    ap.add_argument("--fedsim-compile", action="store_true", help="executor.compile: true")
    ap.add_argument("--fedsim-conv", choices=("auto", "native", "channels_last", "unfold", "triton"), default="auto", help="executor.conv")
    ap.add_argument("--lr", type=float, default=0.05,
                    help="local SGD lr of both (pfl's baseline.yaml has 0.1, at which both diverge on this data)")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--cohort", type=int, default=50, help="users per round")
    ap.add_argument("--per-user", type=int, default=50)
    ap.add_argument("--test-images", type=int, default=10_000)
    ap.add_argument("--quick", action="store_true",
                    help="a CPU check: 20 rounds, 100 users, cohort 5, 1,000 test images")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.users, args.cohort, args.test_images = 20, 100, 5, 1000
    pfl_rounds = args.rounds if args.pfl_rounds is None else args.pfl_rounds
    fedsim_rounds = args.rounds if args.fedsim_rounds is None else args.fedsim_rounds

    os.environ["PFL_PYTORCH_DEVICE"] = args.device  # pfl's device override (read when pfl places tensors)
    imports = {}  # each framework's own imports (torch is already loaded)
    if pfl_rounds:
        t = time.perf_counter()
        try:
            import pfl
            import pfl.model.pytorch  # noqa: F401
        except ImportError:
            sys.exit(f"vs_pfl.py: error: pfl is not installed (pip install pfl=={PFL_VERSION}; see benchmarks/README.md)")
        if getattr(pfl, "__version__", PFL_VERSION) != PFL_VERSION:
            print(f"warning: pfl {pfl.__version__} installed; this benchmark follows pfl {PFL_VERSION}")
        imports["pfl"] = time.perf_counter() - t
    t = time.perf_counter()
    import fedsim.runner  # noqa: F401
    imports["fedsim"] = time.perf_counter() - t
    os.chdir(ROOT)  # fedsim imports the data plugin by module name
    device = torch.device(args.device)
    torch.ones(1, device=device).sum().item()  # the device's context, outside both timings

    t = time.perf_counter()
    data = shared_data(args)
    print(f"shared data: {data.num_clients} users x {args.per_user} images 3x32x32, {len(data.source.y_test)} test "
          f"images (generated in {time.perf_counter() - t:.1f} s, outside both timings)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; local lr {args.lr}, cohort {args.cohort}, batch {BATCH}, "
          f"{EPOCHS} local epoch, central lr {CENTRAL_LR}, evaluation every {EVAL_EVERY} rounds")
    results = []
    if pfl_rounds:
        results.append(run_pfl(args, data, pfl_rounds, imports["pfl"]))
        print(f"pfl settings: {results[-1].settings}")
    if fedsim_rounds:
        results.append(run_fedsim(args, data, fedsim_rounds, imports["fedsim"]))
        print(f"fedsim settings: {results[-1].settings}")
    print()
    print(table(results, args.rounds))


if __name__ == "__main__":
    main()
