"""The ClientApp: a fedsim strategy's unchanged client part, run on a Flower SuperNode.

A node is one fedsim client: its node config's ``partition-id`` is the client id (Flower's
simulation engine sets it to 0..N−1 by itself; on a deployment each SuperNode is started
with ``--node-config 'partition-id=K num-partitions=N'``). Every train message is one
fedsim `Job`: the node builds the run from the config the server sent (data, model and
strategy, exactly as fedsim's executors build them — once per process), makes the job
with `RunContext.make_job` (same keyed batches as in simulation) and runs it with fedsim's
`Worker` through the serial executor.

The client's persistent state (SCAFFOLD's c_i, …) stays on the node, in Flower's
``Context.state``. As in fedsim, a new state counts only once the server aggregated the
job that produced it: it is held as pending and committed when a later message names that
job as accepted (a straggler's state is dropped).

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
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from .. import runner
from ..config import load_config
from ..errors import ConfigError, FedsimError
from ..registry import registered_names_only
from ..strategy import Tensor
from .messages import config_text, decode_task, encode_node_client, encode_result
from .records import records_to_tensors, tensors_to_records


NODE_CONFIG_ENV = "FEDSIM_NODE_CONFIG"


@dataclass(frozen=True)
class NodeTrust:
    """What code this node runs for a config it receives: its own plugins, and whether
    ``package.module:factory`` component names are accepted."""

    plugins: tuple[str, ...] = ()
    allow_dotted: bool = False


def node_trust(node_config: Mapping[str, Any]) -> NodeTrust:
    """Reads `NodeTrust` from the node config, over the keys of $FEDSIM_NODE_CONFIG
    (``key=value`` pairs as in ``--node-config``)."""
    from flwr.common.config import parse_config_args

    merged = {**parse_config_args([os.environ.get(NODE_CONFIG_ENV, "")]), **node_config}
    allow = merged.get("allow-dotted-factories", False)
    if not isinstance(allow, bool):
        raise FedsimError(f"node config allow-dotted-factories must be true or false, got {allow!r}")
    return NodeTrust(tuple(str(merged.get("plugins", "")).split()), allow)


@functools.lru_cache(maxsize=2)
def node_run(config: str, trust: NodeTrust = NodeTrust()) -> runner.Run:
    """Returns the run built from a config text the server sent (cached: Flower's simulation
    reuses processes). The text is data: the node imports `trust.plugins` instead of the
    plugins it names, and accepts dotted factory names only if `trust.allow_dotted`."""
    raw = yaml.safe_load(config)
    if not isinstance(raw, dict):
        raise FedsimError("the server sent a config that is not a mapping")
    asked = raw.get("plugins") or []
    raw["plugins"] = list(trust.plugins)
    guard = nullcontext() if trust.allow_dotted else registered_names_only(
        "this node accepts only registered names (node config allow-dotted-factories=true accepts "
        "package.module:factory names)")
    try:
        with guard:
            return runner.build(load_config(raw))
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

    def hold(self, job_id: int, state: dict[str, Tensor]) -> None:
        """Keeps `state` as pending until the server accepts `job_id`."""
        if state:
            self._put("fedsim.pending", state)
            self.records["fedsim.pending-job"] = ConfigRecord({"job": job_id})


def train(message: Message, context: Context) -> Message:
    """Runs one fedsim job on this node and replies with its update, extras and metrics."""
    run = node_run(config_text(message.content), node_trust(context.node_config))
    ctx = run.ctx
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
    ctx = node_run(config_text(message.content), node_trust(context.node_config)).ctx
    return Message(encode_node_client(node_client(context, ctx.num_clients)), reply_to=message)


def client_app() -> ClientApp:
    """Returns a Flower ClientApp that answers fedsim's query and train messages."""
    app = ClientApp()
    app.train()(train)
    app.query()(query)
    return app
