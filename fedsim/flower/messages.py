"""What fedsim's ServerApp and ClientApp say to each other: the contents of their messages.

* query (server → node): ``fedsim`` {config}; the reply says which fedsim client the node
  serves (its ``partition-id``), after checking that it fits the config.
* train (server → node), in Flower's convention plus fedsim's own records: ``arrays``
  (the published model, one array per model tensor), ``config`` (a ConfigRecord as
  Flower's strategies send it: ``server-round`` and the local-training settings ``lr``,
  ``batch-size``, ``local-steps`` / ``local-epochs``, plus the run config's extra keys),
  ``extras`` / ``extras-numbers`` (``Payload.extras``), and ``fedsim`` {client, job,
  version, accepted-job, config}. The ``fedsim`` ``config`` is the resolved fedsim config
  (YAML), so every fedsim node builds exactly the server's data, model and strategy.
* train reply, either of two forms:

  - fedsim's ClientApp: ``arrays`` (the update u = x_start − y_end), ``extras`` /
    ``extras-numbers`` (``ClientOutput.extras``), ``metrics`` (the client's metrics plus
    Flower's conventional ``num-examples``) and ``fedsim`` {client, job, version,
    num-samples, num-steps}. The client's new persistent state never leaves the node.
  - any other ClientApp (Flower's convention, no ``fedsim`` record): ``arrays`` (the new
    weights y_end; the server derives u = x_sent − y_end), ``metrics`` with
    ``num-examples`` (the client's sample count: its aggregation weight) and optionally
    ``num-steps``, and the strategy's uplink extras as ``extras`` / ``extras-numbers``
    (filled by a client-side helper, e.g. `fedsim.flower.scaffold_client`).

  The server trusts only the update, extras, metrics and reported counts (the rest of the
  row it knows itself); both forms report the client's sample count, its aggregation weight.
* evaluate (server → node, run config ``evaluation`` 'federated' or 'both'): ``arrays`` (the
  global model), ``config`` {``server-round``} and ``fedsim`` {config}; the reply, in
  Flower's convention, has ``metrics`` with ``num-examples`` and a loss (``eval_loss``) and
  optionally an accuracy (``eval_acc``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..contributions import Contributions
from ..params import ParamLayout
from ..strategy import ClientOutput, Payload, Tensor
from .records import record_to_vector, records_to_tensors, tensors_to_records, vector_to_record

QUERY = "query"
TRAIN = "train"
EVALUATE = "evaluate"
NUM_EXAMPLES = "num-examples"
NUM_STEPS = "num-steps"


@dataclass(frozen=True)
class TrainTask:
    """One job as a node receives it."""

    client: int
    job_id: int
    version: int
    accepted_job: int  # the client's last job the server aggregated (−1: none); its state is committed
    payload: Payload


def config_text(content: RecordDict) -> str:
    """Returns the fedsim config (YAML text) carried by a query or train message."""
    return str(content.config_records["fedsim"]["config"])


def fedsim_record(config: str, num_classes: int = 0, **fields: Any) -> ConfigRecord:
    """Returns the ``fedsim`` record of a message to a node: `fields`, the fedsim config and,
    from a ServerApp without data, the number of classes (``num-classes``) for a node that
    loads its own data (node config ``load-data``)."""
    return ConfigRecord({**fields, "config": config, **({"num-classes": num_classes} if num_classes else {})})


def sent_num_classes(content: RecordDict) -> int | None:
    """Returns the ``num-classes`` the server sent (None: it has data and did not send it)."""
    n = content.config_records["fedsim"].get("num-classes")
    return int(n) if n is not None else None


def encode_query(config: str, num_classes: int = 0) -> RecordDict:
    """Returns the content of a query message."""
    return RecordDict({"fedsim": fedsim_record(config, num_classes)})


def encode_node_client(client: int) -> RecordDict:
    """Returns the content of a node's reply to the query: the fedsim client it serves."""
    return RecordDict({"fedsim": ConfigRecord({"client": client})})


def decode_node_client(content: RecordDict) -> int:
    """Inverse of `encode_node_client`."""
    return int(content.config_records["fedsim"]["client"])


def _with_extras(records: dict, extras: dict) -> RecordDict:
    records["extras"], records["extras-numbers"] = tensors_to_records(extras)
    return RecordDict(records)


def encode_task(task: TrainTask, config: str, layout: ParamLayout, train_config: Mapping[str, Any] | None = None,
                num_classes: int = 0) -> RecordDict:
    """Returns the content of a train message; `train_config` fills Flower's ``config``
    record (``server-round`` = version + 1 is added)."""
    meta = fedsim_record(config, num_classes, client=task.client, job=task.job_id, version=task.version,
                         **{"accepted-job": task.accepted_job})
    flower_config = ConfigRecord({**(train_config or {}), "server-round": task.version + 1})
    return _with_extras({"arrays": vector_to_record(task.payload.params, layout), "config": flower_config,
                         "fedsim": meta}, dict(task.payload.extras))


def encode_evaluate(params: Tensor, server_round: int, config: str, layout: ParamLayout, num_classes: int = 0) -> RecordDict:
    """Returns the content of an evaluate message: the model (``arrays``), Flower's ``config``
    record (``server-round``) and, for fedsim's ClientApp, the fedsim config."""
    return RecordDict({"arrays": vector_to_record(params, layout), "config": ConfigRecord({"server-round": server_round}),
                       "fedsim": fedsim_record(config, num_classes)})


LOSS_KEYS = ("eval_loss", "loss", "test_loss")
ACCURACY_KEYS = ("eval_acc", "eval_accuracy", "accuracy", "test_accuracy")


def decode_evaluation(content: RecordDict) -> tuple[int, float, float | None]:
    """Reads an evaluate reply in Flower's convention: returns (num-examples, loss, accuracy
    or None); raises ValueError when it has no sample count or no loss."""
    metrics = _metrics(content)
    if NUM_EXAMPLES not in metrics:
        raise ValueError(f"the reply's metrics have no {NUM_EXAMPLES!r} (the client's sample count)")
    loss = next((metrics[k] for k in LOSS_KEYS if k in metrics), None)
    if loss is None:
        raise ValueError(f"the reply's metrics have no loss (one of {', '.join(LOSS_KEYS)})")
    acc = next((metrics[k] for k in ACCURACY_KEYS if k in metrics), None)
    return int(metrics[NUM_EXAMPLES]), loss, acc


def decode_task(content: RecordDict, layout: ParamLayout) -> TrainTask:
    """Inverse of `encode_task` (the config is read with `config_text`)."""
    meta = content.config_records["fedsim"]
    params = record_to_vector(content.array_records["arrays"], layout)
    extras = records_to_tensors(content.array_records["extras"], content.config_records["extras-numbers"])
    return TrainTask(int(meta["client"]), int(meta["job"]), int(meta["version"]), int(meta["accepted-job"]),
                     Payload(params, extras))


def encode_result(got: Contributions, layout: ParamLayout) -> RecordDict:
    """Returns the content of a train reply from a job's one-row contributions (the
    client's new state is not included)."""
    n = int(got.num_samples[0])
    meta = ConfigRecord({
        "client": int(got.senders[0]), "job": int(got.jobs[0]), "version": int(got.versions[0]),
        "num-samples": n, "num-steps": int(got.num_steps[0]),
    })
    values = {k: float(v[0]) for k, v in got.metrics.items() if v[0] == v[0]}  # NaN: not reported
    metrics = MetricRecord({**values, "num-examples": n})
    extras = {k: v[0] for k, v in got.extras.items()}
    return _with_extras({"arrays": vector_to_record(got.updates[0], layout), "metrics": metrics, "fedsim": meta}, extras)


@dataclass(frozen=True)
class Reply:
    """A train reply as the server reads it. `job_id` and `client` are None for a reply in
    Flower's convention (it names neither; the server knows which message it answers);
    `num_examples` / `num_steps` are the counts such a reply reported (None: use the server's)."""

    output: ClientOutput  # the update, extras and metrics; no state (it stays on the node)
    job_id: int | None = None
    client: int | None = None
    num_examples: int | None = None
    num_steps: int | None = None


def _metrics(content: RecordDict) -> dict[str, float]:
    records = content.metric_records
    metrics = records["metrics"] if "metrics" in records else next(iter(records.values()), {})
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _extras(content: RecordDict) -> dict[str, Any]:
    if "extras" not in content.array_records:
        return {}
    return records_to_tensors(content.array_records["extras"], content.config_records.get("extras-numbers"))


def decode_result(content: RecordDict, layout: ParamLayout, sent: Tensor) -> Reply:
    """Reads a train reply of either form (see the module docstring); `sent` is the model
    the job was sent, from which the update of a Flower-convention reply is derived.
    Raises ValueError for a reply that has neither form."""
    if "fedsim" in content.config_records:
        meta = content.config_records["fedsim"]
        metrics = {k: v for k, v in _metrics(content).items() if k != NUM_EXAMPLES}
        update = record_to_vector(content.array_records["arrays"], layout)
        return Reply(ClientOutput(update, {}, _extras(content), metrics), int(meta["job"]), int(meta["client"]),
                     num_examples=int(meta["num-samples"]))
    if "arrays" not in content.array_records:
        raise ValueError("the reply has no 'arrays' record (the new model weights)")
    metrics = _metrics(content)
    if NUM_EXAMPLES not in metrics:
        raise ValueError(f"the reply's metrics have no {NUM_EXAMPLES!r} (the client's sample count)")
    weights = record_to_vector(model_part(content.array_records["arrays"], layout), layout)
    update = sent - weights.to(sent.dtype)
    steps = metrics.pop(NUM_STEPS, None)
    n = metrics.pop(NUM_EXAMPLES)
    return Reply(ClientOutput(update, {}, _extras(content), metrics), num_examples=int(n),
                 num_steps=None if steps is None else int(steps))


def model_part(record: ArrayRecord, layout: ParamLayout) -> ArrayRecord:
    """Returns the model's tensors of `record`, in the model's order, without anything else a
    ``state_dict`` holds (buffers); raises ValueError naming a missing tensor."""
    missing = [n for n in layout.names if n not in record]
    if missing:
        raise ValueError(f"the reply's arrays lack {missing} (the model has {list(layout.names)})")
    return ArrayRecord({n: record[n] for n in layout.names})
