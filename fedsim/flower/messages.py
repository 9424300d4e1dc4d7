"""What fedsim's ServerApp and ClientApp say to each other: the contents of their messages.

* query (server → node): ``fedsim`` {config}; the reply says which fedsim client the node
  serves (its ``partition-id``), after checking that it fits the config.
* train (server → node): ``arrays`` (the published model, one array per model tensor),
  ``extras`` / ``extras-numbers`` (``Payload.extras``), and ``fedsim`` {client, job,
  version, accepted-job, config}. ``config`` is the resolved fedsim config (YAML), so
  every node builds exactly the server's data, model and strategy.
* train reply: ``arrays`` (the update u = x_start − y_end), ``extras`` /
  ``extras-numbers`` (``ClientOutput.extras``), ``metrics`` (the client's metrics plus
  Flower's conventional ``num-examples``) and ``fedsim`` {client, job, version,
  num-samples, num-steps}. The client's new persistent state never leaves the node; the
  server trusts only the update, extras and metrics (the rest of the row it knows itself).
"""
from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from ..contributions import Contributions
from ..params import ParamLayout
from ..strategy import ClientOutput, Payload
from .records import record_to_vector, records_to_tensors, tensors_to_records, vector_to_record

QUERY = "query"
TRAIN = "train"


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


def encode_query(config: str) -> RecordDict:
    """Returns the content of a query message."""
    return RecordDict({"fedsim": ConfigRecord({"config": config})})


def encode_node_client(client: int) -> RecordDict:
    """Returns the content of a node's reply to the query: the fedsim client it serves."""
    return RecordDict({"fedsim": ConfigRecord({"client": client})})


def decode_node_client(content: RecordDict) -> int:
    """Inverse of `encode_node_client`."""
    return int(content.config_records["fedsim"]["client"])


def _with_extras(records: dict, extras: dict) -> RecordDict:
    records["extras"], records["extras-numbers"] = tensors_to_records(extras)
    return RecordDict(records)


def encode_task(task: TrainTask, config: str, layout: ParamLayout) -> RecordDict:
    """Returns the content of a train message."""
    meta = ConfigRecord({
        "client": task.client, "job": task.job_id, "version": task.version,
        "accepted-job": task.accepted_job, "config": config,
    })
    return _with_extras({"arrays": vector_to_record(task.payload.params, layout), "fedsim": meta}, dict(task.payload.extras))


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


def decode_result(content: RecordDict, layout: ParamLayout) -> tuple[int, int, ClientOutput]:
    """Inverse of `encode_result`: (job id, client, the client's output without its state,
    which stayed on the node)."""
    meta = content.config_records["fedsim"]
    metrics = {k: float(v) for k, v in content.metric_records["metrics"].items() if k != "num-examples"}
    extras = records_to_tensors(content.array_records["extras"], content.config_records["extras-numbers"])
    update = record_to_vector(content.array_records["arrays"], layout)
    return int(meta["job"]), int(meta["client"]), ClientOutput(update, {}, extras, metrics)
