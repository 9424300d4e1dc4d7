"""The ClientApp: a fedsim strategy's unchanged client part, run on a Flower SuperNode.

A node is one fedsim client: its node config's ``partition-id`` is the client id (Flower's
simulation engine sets it to 0..N−1 by itself; on a deployment each SuperNode is started
with ``--node-config 'partition-id=K num-partitions=N'``). Every train message is one
fedsim `Job`: the node builds the run from the config the server sent (data, model and
strategy, exactly as fedsim's executors build them — once per process), makes the job
with `RunContext.make_job` (same keyed batches as in simulation) and runs it with fedsim's
`Worker` through the serial executor. With node config ``load-data="module:function"`` the
node trains on the data that function returns for its partition instead of building the
config's data source (`fedsim.flower.node_data`; Flower's ``load_data`` pattern).

The client's persistent state (SCAFFOLD's c_i, …) stays on the node, in Flower's
``Context.state``. As in fedsim, a new state counts only once the server aggregated the
job that produced it: it is held as pending and committed when a later message names that
job as accepted (a straggler's state is dropped).

It also answers Flower's standard messages, so Flower's own strategies (``FedAvg`` of
``flwr.serverapp.strategy``…) can drive it: a train message without fedsim's records
(``arrays`` + ``config``) runs one job of the node's client from the received model and
replies, in Flower's convention, with the new weights under ``arrays`` and ``metrics``
(``train_loss``…, ``num-examples``); an evaluate message replies with ``metrics``
{``eval_loss``, ``eval_acc``, ``num-examples``} of the received model on the client's
held-out data (its training data if it has none). Such messages carry no fedsim config (an
evaluate message of fedsim's ServerApp does, and is answered on that config's data), so
the node reads its own: ``client_app(config=...)``, or the node config ``config`` (a path
on the node). The job uses that config's local training (``lr``, steps…); its batches are
keyed by the message's ``server-round``; the client's state, if its strategy keeps one, is
committed at once (Flower's strategies aggregate every reply); uplink extras are not sent
(Flower's strategies expect one ArrayRecord), so this serves strategies without them.

Node config ``delay`` (seconds, default 0) makes the node wait that long before replying —
a slow device on a local test deployment.

The config a node receives is data from the network, not code: the node never imports the
plugins it names, only those of its own node config ``plugins`` (space-separated modules
or .py files), and refuses ``package.module:factory`` component names unless its node
config sets ``allow-dotted-factories=true``. Where Flower fixes the node config (its
simulation engine), the same keys can be given in the node's environment, as
``FEDSIM_NODE_CONFIG='plugins="my_strategy.py"'``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Mapping

import yaml
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .. import runner
from ..config import load_config
from ..errors import ConfigError, FedsimError
from ..registry import registered_names_only
from ..strategy import Payload, Tensor
from .messages import NUM_EXAMPLES, config_text, decode_task, encode_node_client, encode_result, model_part, sent_num_classes
from .node_data import node_data
from .records import record_to_vector, records_to_tensors, tensors_to_records, vector_to_record


NODE_CONFIG_ENV = "FEDSIM_NODE_CONFIG"


@dataclass(frozen=True)
class NodeTrust:
    """What code this node runs for a config it receives: its own plugins, whether
    ``package.module:factory`` component names are accepted, and its own data loader
    (``load-data``, `fedsim.flower.node_data`; empty: the config's data source)."""

    plugins: tuple[str, ...] = ()
    allow_dotted: bool = False
    load_data: str = ""


def node_trust(node_config: Mapping[str, Any]) -> NodeTrust:
    """Reads `NodeTrust` from the node config, over the keys of $FEDSIM_NODE_CONFIG
    (``key=value`` pairs as in ``--node-config``)."""
    from flwr.common.config import parse_config_args

    merged = {**parse_config_args([os.environ.get(NODE_CONFIG_ENV, "")]), **node_config}
    allow = merged.get("allow-dotted-factories", False)
    if not isinstance(allow, bool):
        raise FedsimError(f"node config allow-dotted-factories must be true or false, got {allow!r}")
    return NodeTrust(tuple(str(merged.get("plugins", "")).split()), allow, str(merged.get("load-data", "")))


def message_run(message: Message, context: Context) -> runner.Run:
    """Returns the run of a message of fedsim's ServerApp (see `node_run`)."""
    trust = node_trust(context.node_config)
    if not trust.load_data:
        return node_run(config_text(message.content), trust)
    cfg = context.node_config
    where = (int(cfg["partition-id"]), int(cfg["num-partitions"])) if "partition-id" in cfg else None
    return node_run(config_text(message.content), trust, where, sent_num_classes(message.content))


@functools.lru_cache(maxsize=4)  # a process of Flower's simulation engine may serve several partitions
def node_run(config: str, trust: NodeTrust = NodeTrust(), partition: tuple[int, int] | None = None,
             num_classes: int | None = None) -> runner.Run:
    """Returns the run built from a config text the server sent (cached: Flower's simulation
    reuses processes). The text is data: the node imports `trust.plugins` instead of the
    plugins it names, and accepts dotted factory names only if `trust.allow_dotted`. With
    `trust.load_data` the data is the node's own (`fedsim.flower.node_data`) for `partition`
    (partition-id, num-partitions), with the `num_classes` the server sent."""
    raw = yaml.safe_load(config)
    if not isinstance(raw, dict):
        raise FedsimError("the server sent a config that is not a mapping")
    asked = raw.get("plugins") or []
    raw["plugins"] = list(trust.plugins)
    def guard():
        return nullcontext() if trust.allow_dotted else registered_names_only(
            "this node accepts only registered names (node config allow-dotted-factories=true accepts "
            "package.module:factory names)")

    try:
        with guard():
            cfg = load_config(raw)
        data = None
        if trust.load_data:
            if partition is None:
                raise FedsimError("node config load-data needs the node's partition-id and num-partitions")
            if partition[1] != cfg.data.common["num_clients"]:
                raise FedsimError(f"node config num-partitions={partition[1]} does not fit the config's "
                                  f"data.num_clients={cfg.data.common['num_clients']}")
            data = node_data(trust.load_data, *partition, num_classes)
        with guard():
            return runner.build(cfg, data=data)
    except ConfigError as exc:
        if asked and list(asked) != list(trust.plugins) and "unknown" in exc.message:
            raise ConfigError(exc.path, f"{exc.message}; the server's config names plugins {asked}, which a node "
                                        f"imports only from its own node config (plugins=\"...\")") from None
        raise


def node_client(context: Context, num_clients: int) -> int:
    """Returns the fedsim client this node serves (its partition-id); raises FedsimError if unset or wrong."""
    cfg = context.node_config
    if "partition-id" not in cfg:
        raise FedsimError("this SuperNode has no partition-id; start it with "
                          "--node-config 'partition-id=K num-partitions=N'")
    client, parts = int(cfg["partition-id"]), int(cfg.get("num-partitions", num_clients))
    if parts != num_clients or not 0 <= client < parts:
        raise FedsimError(f"node config partition-id={client} num-partitions={parts} does not fit "
                          f"the config's data.num_clients={num_clients}")
    return client


class NodeState:
    """The client's persistent state in ``Context.state``: the committed one and a pending one."""

    def __init__(self, records: RecordDict):
        self.records = records

    def _get(self, name: str) -> dict[str, Tensor] | None:
        if name not in self.records:
            return None
        return records_to_tensors(self.records[name], self.records[f"{name}-numbers"])

    def _put(self, name: str, state: dict[str, Tensor]) -> None:
        self.records[name], self.records[f"{name}-numbers"] = tensors_to_records(state)

    def committed(self) -> dict[str, Tensor] | None:
        """Returns the last committed state, or None if the client never had one accepted."""
        return self._get("fedsim.state")

    def settle(self, accepted_job: int) -> None:
        """Commits the pending state if its job is `accepted_job`; drops it in any case."""
        if "fedsim.pending-job" not in self.records:
            return
        if int(self.records["fedsim.pending-job"]["job"]) == accepted_job:
            self._put("fedsim.state", self._get("fedsim.pending") or {})
        for name in ("fedsim.pending", "fedsim.pending-numbers", "fedsim.pending-job"):
            del self.records[name]

    def commit(self, state: dict[str, Tensor]) -> None:
        """Makes `state` the committed state at once."""
        if state:
            self._put("fedsim.state", state)

    def hold(self, job_id: int, state: dict[str, Tensor]) -> None:
        """Keeps `state` as pending until the server accepts `job_id`."""
        if state:
            self._put("fedsim.pending", state)
            self.records["fedsim.pending-job"] = ConfigRecord({"job": job_id})


def train(message: Message, context: Context) -> Message:
    """Runs one fedsim job on this node and replies with its update, extras and metrics."""
    ctx = message_run(message, context).ctx
    task = decode_task(message.content, ctx.task.layout)
    client = node_client(context, ctx.num_clients)
    if task.client != client:
        raise FedsimError(f"the server sent client {task.client}'s job to the node of partition {client}")
    state = NodeState(context.state)
    state.settle(task.accepted_job)
    job = ctx.make_job(client, task.payload, task.version, task.job_id)
    committed = state.committed()
    if committed is not None:
        job = dataclasses.replace(job, state=committed)
    got = ctx.executor.run([job])
    state.hold(task.job_id, {k: v[0] for k, v in got.state.items()})
    time.sleep(float(context.node_config.get("delay", 0.0)))
    return Message(encode_result(got, ctx.task.layout), reply_to=message)


def query(message: Message, context: Context) -> Message:
    """Tells the server which fedsim client this node serves (after checking it fits the config)."""
    ctx = message_run(message, context).ctx
    return Message(encode_node_client(node_client(context, ctx.num_clients)), reply_to=message)


def from_fedsim(message: Message) -> bool:
    """True for a message of fedsim's ServerApp (it carries the ``fedsim`` record)."""
    return "fedsim" in message.content.config_records


@functools.lru_cache(maxsize=2)
def own_run(path: str) -> runner.Run:
    """Returns the run built from the node's own fedsim config file (cached per process)."""
    return runner.build(load_config(path))


def own_config(context: Context, config: str | os.PathLike | None) -> str:
    """Returns the node's own fedsim config path for Flower's standard messages."""
    path = config if config is not None else context.node_config.get("config")
    if path is None:
        raise FedsimError("a Flower message without fedsim's records needs the node's own fedsim config: "
                          "client_app(config=...) or --node-config 'config=\"/path/to/fedsim.yaml\"'")
    return str(path)


def received_params(message: Message, layout) -> Tensor:
    """Returns the model of a Flower message (its ``arrays`` record) as a flat vector."""
    return record_to_vector(model_part(message.content.array_records["arrays"], layout), layout)


def standard_train(message: Message, context: Context, config: str | os.PathLike | None = None) -> Message:
    """Runs one job from a Flower-convention train message; replies with the new weights and
    metrics (see the module docstring)."""
    ctx = own_run(own_config(context, config)).ctx
    layout = ctx.task.layout
    client = node_client(context, ctx.num_clients)
    params = received_params(message, layout)
    extras = {}
    if "extras" in message.content.array_records:
        extras = records_to_tensors(message.content.array_records["extras"], message.content.config_records.get("extras-numbers"))
    rnd = int(message.content.config_records["config"].get("server-round", 0)) if "config" in message.content.config_records else 0
    state = NodeState(context.state)
    job = ctx.make_job(client, Payload(params, extras), rnd, rnd)
    committed = state.committed()
    if committed is not None:
        job = dataclasses.replace(job, state=committed)
    got = ctx.executor.run([job])
    state.commit({k: v[0] for k, v in got.state.items()})
    time.sleep(float(context.node_config.get("delay", 0.0)))
    metrics = {k: float(v[0]) for k, v in got.metrics.items() if v[0] == v[0]}
    weights = params - got.updates[0]
    content = RecordDict({"arrays": vector_to_record(weights, layout),
                          "metrics": MetricRecord({**metrics, NUM_EXAMPLES: int(got.num_samples[0])})})
    return Message(content, reply_to=message)


def standard_evaluate(message: Message, context: Context, config: str | os.PathLike | None = None) -> Message:
    """Evaluates the model of a Flower evaluate message on this client's held-out data (its
    training data if it has none); replies with ``metrics`` (see the module docstring). The
    data is that of the fedsim config the message carries (fedsim's ServerApp sends it), else
    of the node's own."""
    if from_fedsim(message):
        ctx = message_run(message, context).ctx
    else:
        ctx = own_run(own_config(context, config)).ctx
    client = node_client(context, ctx.num_clients)
    data = ctx.data
    x, y = data.client_test_data(client)
    if not len(y):
        rows = data.client_train[client]
        x, y = data.x_train[rows], data.y_train[rows]
    got = ctx.task.evaluate(received_params(message, ctx.task.layout), x, y)
    metrics = {f"eval_{'acc' if k == 'accuracy' else k}": float(v) for k, v in got.items() if v is not None}
    return Message(RecordDict({"metrics": MetricRecord({**metrics, NUM_EXAMPLES: len(y)})}), reply_to=message)


def client_app(config: str | os.PathLike | None = None) -> ClientApp:
    """Returns a Flower ClientApp that answers fedsim's query and train messages, and
    Flower's standard train and evaluate messages (for which `config`, or the node config
    ``config``, names the node's own fedsim config)."""
    app = ClientApp()

    @app.train()
    def _train(message: Message, context: Context) -> Message:
        return train(message, context) if from_fedsim(message) else standard_train(message, context, config)

    @app.evaluate()
    def _evaluate(message: Message, context: Context) -> Message:
        return standard_evaluate(message, context, config)

    app.query()(query)
    return app
