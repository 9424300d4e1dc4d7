"""The experiment configuration: plain sections as dataclasses, pluggable ones as components.

Every key is documented here (plain sections) or in its factory's docstring (components);
`fedsim config-reference` and docs/config-reference.md are generated from both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, List, Optional, Union

from ..registry import (
    ADVERSARY_MODELS,
    AVAILABILITY_MODELS,
    COMPUTE_MODELS,
    DATA_SOURCES,
    DROPOUT_MODELS,
    EXECUTORS,
    LINK_MODELS,
    MODELS,
    PARTITIONERS,
    PROTOCOLS,
    STRATEGIES,
    TOPOLOGIES,
)
from .checks import CountOrAll, Each, FitsInMemory, Ge, Gt, OneOf, Range
from .components import ComponentSpec


def knob(default: Any, help: str, *checks: Any) -> Any:
    """A dataclass field carrying its documentation and value checks."""
    meta = {"help": help, "checks": checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


CLIENT_BYTES = 256  # below what a client costs with the smallest source (~400 B: index arrays, behaviour models)


@dataclass
class DataCommon:
    """Keys of the `data` section shared by every data source."""

    num_clients: Annotated[Union[int, str], CountOrAll(), Ge(1), FitsInMemory(CLIENT_BYTES, "clients")] = knob(
        10, "Number of clients (or gossip nodes) in the population, or 'all': every user of a source that "
        "has users of its own (leaf, a csv/npz user column) becomes a client. A population that cannot fit "
        f"in this machine's memory at {CLIENT_BYTES} bytes per client (less than any data source needs) is "
        "refused before anything is built."
    )
    partition: Any = knob(
        "auto",
        "How training samples are split among clients: a partitioner name or a mapping "
        "{name: ..., kwargs}. 'auto' is the source's natural per-user split when it has one "
        "(synthetic, quadratic, leaf, npz/csv with a user column) and IID otherwise.",
    )
    test_fraction: Annotated[float, Range(0.0, 1.0, open_hi=True)] = knob(
        0.2, "Share of samples held out as the global test set, for sources without their own test split."
    )
    client_test_fraction: Annotated[float, Range(0.0, 1.0, open_hi=True)] = knob(
        0.0, "Share of each client's samples kept as that client's own test split: every evaluation row then "
        "has client_acc_mean, client_acc_std, client_acc_p10 and client_acc_min (the global model, or each gossip "
        "node's own model, on each client's test data). Must be 0 for sources with per-user test sets of their "
        "own (leaf, user columns), which are used instead."
    )
    client_finetune_steps: Annotated[int, Ge(0)] = knob(
        0, "Personalisation: before the per-client evaluation, each client also fine-tunes the evaluated model "
        "alone for this many plain SGD steps on mini-batches (local.batch_size) of its own training samples, "
        "and rows get client_acc_ft_mean, client_acc_ft_std, client_acc_ft_p10 and client_acc_ft_min. The "
        "fine-tuned models are discarded. 0 = off. Needs clients with test data of their own."
    )
    client_finetune_lr: Annotated[Optional[float], Gt(0)] = knob(
        None, "Learning rate of the per-client fine-tuning steps (default: local.lr)."
    )
    augment_crop: Annotated[int, Ge(0)] = knob(
        0, "Training-time random crop: pad images by this many zero pixels per side and cut a random window "
        "of the original size (CIFAR's standard pipeline: 4); 0 = off. Drawn per sample, keyed by "
        "(seed, client, job), the same on every executor.",
    )
    augment_flip: bool = knob(False, "Training-time random horizontal flip (probability ½ per sample).")
    normalize_mean: Optional[List[float]] = knob(
        None, "Per-channel mean subtracted from image inputs, in training (after crop and flip) and evaluation; "
        "with normalize_std (CIFAR-10: [0.4914, 0.4822, 0.4465])."
    )
    normalize_std: Annotated[Optional[List[float]], Each(Gt(0))] = knob(
        None, "Per-channel standard deviation image inputs are divided by (CIFAR-10: [0.2470, 0.2435, 0.2616])."
    )


@dataclass
class ModelCommon:
    """Keys of the `model` section shared by every model: the loss and BatchNorm statistics."""

    loss: str = knob(
        "auto",
        "The loss clients minimise and the test loss: 'auto' (the data's task: cross-entropy for "
        "classification, binary cross-entropy for multilabel, squared error for regression, per-token "
        "cross-entropy for lm), a registered loss (cross_entropy, binary_cross_entropy, squared_error, "
        "absolute_error) or 'package.module:fn', fn(outputs, targets) -> per-sample losses.",
    )
    bn: Annotated[str, OneOf(("global", "local"))] = knob(
        "global",
        "BatchNorm running statistics: 'global' (they travel with the model and are averaged like the "
        "parameters) or 'local' (each client keeps its own in its client state, FedBN-style; the "
        "global model keeps its initial statistics; server-based strategies only).",
    )


@dataclass
class ComputeCommon:
    """Keys of `system.compute` shared by every compute model: per-job randomness."""

    jitter: Annotated[str, OneOf(("none", "exponential", "lognormal"))] = knob(
        "none",
        "Per-job factor on the client's compute time: 'none' (deterministic), 'exponential' "
        "(Exp with mean 1, as in Fraboni et al.'s theory), 'lognormal' (mean 1, σ = jitter_sigma).",
    )
    jitter_sigma: Annotated[float, Ge(0)] = knob(0.5, "σ of the log-normal per-job factor.")


@dataclass
class AdversaryCommon:
    """Keys of `system.adversary` shared by every attack: who the malicious clients are."""

    fraction: Annotated[float, Range(0.0, 1.0)] = knob(
        0.0, "Share of the population that is malicious: round(fraction·N) clients chosen by a keyed permutation.")
    ids: Annotated[Optional[List[int]], Each(Ge(0))] = knob(None, "Ids of the malicious clients (replaces fraction).")


@dataclass
class TopologyCommon:
    """Keys of the `topology` section shared by every graph builder."""

    mixing: str = knob("metropolis_hastings", "Mixing-matrix rule over the graph (see topologies.mixing).")
    allow_disconnected: bool = knob(False, "Accept a disconnected graph instead of refusing it.")


@dataclass
class LocalSection:
    """`local`: how a client trains on its own data during one job."""

    lr: Annotated[float, Gt(0)] = knob(0.05, "Local (client) learning rate η.")
    batch_size: Annotated[int, Ge(1)] = knob(16, "Mini-batch size B.")
    epochs: Annotated[int, Ge(1)] = knob(1, "Passes over the client's data per job (ignored when `steps` is set).")
    steps: Annotated[Optional[int], Ge(1)] = knob(
        None, "Exact number of local steps K per job; overrides `epochs`."
    )
    sampling: Annotated[str, OneOf(("epoch", "replacement"))] = knob(
        "epoch",
        "'epoch': shuffle, then consecutive batches; 'replacement': every step draws a fresh "
        "batch uniformly from the client's data (Fraboni et al.).",
    )
    drop_last: bool = knob(False, "Drop the last incomplete batch of an epoch.")
    shuffle: Annotated[str, OneOf(("generator", "hash"))] = knob(
        "generator",
        "How a job's batch order is drawn, keyed by (seed, client, job) either way: 'generator' (a keyed numpy "
        "generator's permutations) or 'hash' (the stable sort of a counter-based keyed hash, which the vmap "
        "executor computes for a whole cohort on its own device; same shapes, different orders, so results differ "
        "from 'generator' runs).",
    )
    momentum: Annotated[float, Range(0.0, 1.0, open_hi=True)] = knob(
        0.0, "Local SGD momentum; the buffer starts at zero at every job."
    )
    weight_decay: Annotated[float, Ge(0)] = knob(0.0, "L2 weight decay added to the local gradient.")


@dataclass
class RunSection:
    """`run`: when to stop, when to evaluate, what to log."""

    rounds: Annotated[Optional[int], Ge(1)] = knob(
        None, "Stop after this many rounds (server aggregations for server-based protocols)."
    )
    time_budget: Annotated[Optional[float], Gt(0)] = knob(
        None,
        "Stop at this virtual time (seconds). Refused when no job takes virtual time (the clock would never "
        "get there) and when it ends before the fastest client can finish its first job's local steps; a "
        "run that it ends before the first round completes warns.",
    )
    eval_every: Annotated[int, Ge(1)] = knob(1, "Evaluate every this many rounds / aggregations.")
    eval_every_time: Annotated[Optional[float], Ge(1e-9)] = knob(
        None, "Evaluate every this many virtual seconds instead of counting rounds (at least 1e-9: the "
        "virtual clock counts nanoseconds, and a shorter interval would evaluate forever at one instant)."
    )
    eval_batch_size: Annotated[int, Ge(1)] = knob(2048, "Batch size for evaluation on the test set.")
    loggers: Annotated[List[str], Each(OneOf(("csv", "tensorboard", "wandb")))] = knob(
        [],
        "Where metrics go besides metrics.jsonl (fed the same rows): 'csv' (metrics.csv), 'tensorboard' "
        "(event files in tensorboard/, needs the extra fedsim[tensorboard]), 'wandb' (a Weights & Biases run in "
        "wandb/, offline unless WANDB_MODE says otherwise; extra fedsim[wandb]).",
    )
    log_events: bool = knob(False, "Write events.jsonl: every dispatch, arrival and aggregation on the virtual clock.")
    progress: bool = knob(True, "Show a progress bar on stderr.")
    partition_plot: bool = knob(
        True, "Draw partition.png in the run folder at start (each client's training samples per class, as "
        "`fedsim partition` draws it; about a second of matplotlib per run). Not redrawn on resume.",
    )
    torch_threads: Annotated[Optional[int], Ge(1)] = knob(None, "torch intra-op threads (default: torch's choice).")
    checkpoint_every: Annotated[int, Ge(0)] = knob(
        5, "Write a checkpoint every this many evaluations (0: only on interruption)."
    )
    keep_checkpoints: Annotated[int, Ge(1)] = knob(2, "How many of the newest checkpoints to keep.")
    divergence_factor: Annotated[Optional[float], Gt(1)] = knob(
        4.0,
        "Stop as diverged (exit status 3) when, for `divergence_evals` evaluations in a row, the test loss is "
        "above this many times its initial value (when that is > 0) and the test accuracy, where measured, is "
        "at chance level (at most the most common test class's share plus a tenth of the rest). null: off. "
        "A NaN or infinite test loss always stops the run.",
    )
    divergence_evals: Annotated[int, Ge(1)] = knob(
        3, "Evaluations in a row that must show divergence (see `divergence_factor`) to stop the run."
    )
    stall_jobs_per_client: Annotated[Optional[int], Ge(1)] = knob(
        100,
        "Stop with exit status 4 (checkpoint written) when this many jobs per client (× data.num_clients) "
        "start without the run getting closer to its end: no round completed (with `rounds`) and the "
        "clock did not move (with `time_budget`), e.g. every job is lost. null: never.",
    )
    max_idle_time: Annotated[Optional[float], Ge(1e-9)] = knob(
        86400.0,
        "Stop with exit status 4 (checkpoint written) after this many virtual seconds in which no job "
        "started and no round completed, e.g. when no client is ever available again; keep it above the "
        "longest job's duration (at least 1e-9, one tick of the clock). null: never.",
    )
    state_memory_mb: Annotated[Optional[float], Ge(0)] = knob(
        1024.0,
        "Memory budget (MiB) for per-client persistent state (SCAFFOLD's c_i, …); the least recently "
        "used states beyond it spill to disk and are read back exactly. null: unbounded.",
    )
    state_dir: Optional[str] = knob(
        None,
        "Folder in which spilled client state is kept (in a private sub-folder deleted when the run "
        "ends); default: the run folder, or the system temp folder when there is none.",
    )


@dataclass
class SystemSection:
    """`system`: client heterogeneity; each key is a named behaviour model with its own knobs."""

    compute: Any = knob({"name": "constant"}, "Compute-time model: seconds per local step per client.")
    link: Any = knob({"name": "ideal"}, "Link model: bandwidth (bytes/s) and latency per client.")
    availability: Any = knob({"name": "always"}, "When a client can be dispatched.")
    dropout: Any = knob({"name": "none"}, "Whether a dispatched job is lost before it reports.")
    adversary: Any = knob({"name": "none"}, "Malicious clients: who they are and what they send (fedsim/system/adversary.py).")


TOP_LEVEL_HELP = {
    "name": "Experiment name, used for the default run folder runs/<name>-<timestamp>: one folder name "
            "(1-200 characters, no '/', '\\' or control characters).",
    "seed": "Seed of every random draw; each draw is keyed by (seed, purpose, ids).",
    "plugins": "Python modules imported before the config is read (they register components).",
    "plugin_dirs": "Folders put on the import path for plugins and 'module:factory' names (fedsim "
                   "records where they were found, so a saved config.yaml works from any folder).",
    "data": "Data source (name + its knobs) and how it is split among clients.",
    "model": "Model architecture (name + knobs, or 'package.module:factory').",
    "strategy": "The FL / gossip algorithm (name + its hyperparameters).",
    "local": LocalSection.__doc__,
    "system": SystemSection.__doc__,
    "protocol": "When things happen: sync rounds, async arrivals, gossip (name + knobs).",
    "topology": "Communication graph for decentralized protocols (name + knobs).",
    "executor": "Where client jobs run: serial, ray, vmap (kind + knobs).",
    "run": RunSection.__doc__,
}

# `returns`: what a factory must build (models and topologies check their own results)
COMPONENTS: dict[str, ComponentSpec] = {
    "data": ComponentSpec(DATA_SOURCES, default="digits", common=DataCommon, returns="fedsim.data.base:SourceData"),
    "model": ComponentSpec(MODELS, default="auto", common=ModelCommon,
                           context_params=("ctx", "input_shape", "num_classes")),
    "strategy": ComponentSpec(STRATEGIES, default="fedavg", returns="fedsim.strategy:STRATEGY_TYPES"),
    "protocol": ComponentSpec(PROTOCOLS, default="sync", returns="fedsim.protocols.base:Protocol"),
    "topology": ComponentSpec(TOPOLOGIES, default="ring", common=TopologyCommon),
    "executor": ComponentSpec(EXECUTORS, name_key="kind", default="serial", returns="fedsim.executors.base:Executor"),
}
NESTED_COMPONENTS: dict[str, ComponentSpec] = {
    "data.partition": ComponentSpec(PARTITIONERS, default="auto", returns="builtins:list"),
    "system.compute": ComponentSpec(COMPUTE_MODELS, default="constant", common=ComputeCommon,
                                    returns="fedsim.system.models:ComputeModel"),
    "system.link": ComponentSpec(LINK_MODELS, default="ideal", returns="fedsim.system.models:LinkModel"),
    "system.availability": ComponentSpec(AVAILABILITY_MODELS, default="always",
                                         returns="fedsim.system.models:AvailabilityModel"),
    "system.dropout": ComponentSpec(DROPOUT_MODELS, default="none", returns="fedsim.system.models:DropoutModel"),
    "system.adversary": ComponentSpec(ADVERSARY_MODELS, default="none", common=AdversaryCommon,
                                      returns="fedsim.system.adversary:AdversaryModel"),
}
SECTIONS: dict[str, type] = {"local": LocalSection, "run": RunSection, "system": SystemSection}
SCALARS = {"name": (str, "experiment"), "seed": (int, 0), "plugins": (list, []), "plugin_dirs": (list, [])}
