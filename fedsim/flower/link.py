"""The ServerApp's line to the SuperNodes: who serves which fedsim client, and job messages.

`connect` asks every node that joins which fedsim client it serves (its node config's
``partition-id``) until clients 0..N−1 all have a node. A node whose ClientApp has no
query handler (an ordinary Flower ClientApp: "No query function registered") is a *plain*
node: once there are enough nodes, plain nodes take the clients no fedsim node claimed, in
ascending node-id order. `dispatch` pushes one job to its client's node; `collect` pulls
the replies that have arrived. Each reply is matched to the job it answers and returned
once; a reply to a job the server gave up on is ignored.
A job whose node went away (Flower's "unavailable" errors) is reported as lost; an
exception in a node's ClientApp stops the run with the node's reason.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from ..errors import FedsimError
from ..params import ParamLayout
from ..strategy import Tensor
from .messages import (EVALUATE, QUERY, TRAIN, Reply, TrainTask, decode_evaluation, decode_node_client, decode_result,
                       encode_evaluate, encode_query, encode_task)

START_HINT = "start each SuperNode with --node-config 'partition-id=K num-partitions=N'"
LOST_CODES = {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE}


NO_QUERY_HANDLER = "No query function registered"


@dataclass(frozen=True)
class Dispatched:
    """A job in flight: which client runs it, and the model it was sent."""

    client: int
    job_id: int
    sent: Tensor | None = None


class NodeLink:
    """See the module docstring."""

    def __init__(self, grid: Grid, config: str, layout: ParamLayout, poll_interval: float = 0.1,
                 train_config: Mapping[str, Any] | None = None, num_classes: int = 0):
        self.grid = grid
        self.config = config
        self.num_classes = num_classes  # sent to the nodes by a ServerApp without data (0: not sent)
        self.layout = layout
        self.poll_interval = poll_interval
        self.train_config = dict(train_config or {})  # Flower's "config" record of every train message
        self.nodes: dict[int, int] = {}  # fedsim client id -> Flower node id
        self.in_flight: dict[str, Dispatched] = {}  # message id -> job

    def connect(self, num_clients: int, timeout: float) -> None:
        """Waits until every client 0..num_clients−1 has a node; raises FedsimError after `timeout` s."""
        deadline = time.monotonic() + timeout
        asked: dict[str, int] = {}  # query message id -> node id
        seen: set[int] = set()
        plain: list[int] = []  # nodes without a query handler
        while len(self.nodes) < num_clients:
            new = [n for n in self.grid.get_node_ids() if n not in seen]
            if new:
                queries = [Message(encode_query(self.config, self.num_classes), dst_node_id=n, message_type=QUERY) for n in new]
                asked.update(zip(self.grid.push_messages(queries), new))
                seen.update(new)
            for reply in self.grid.pull_messages(list(asked)):
                node = asked.pop(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    if NO_QUERY_HANDLER in reply.error.reason:
                        plain.append(node)
                        continue
                    raise FedsimError(f"node {node} could not join: {reply.error.reason}")
                client = decode_node_client(reply.content)
                if client in self.nodes:
                    raise FedsimError(f"nodes {self.nodes[client]} and {node} both have partition-id={client}")
                self.nodes[client] = node
            if plain and len(self.nodes) + len(plain) >= num_clients:
                free = [c for c in range(num_clients) if c not in self.nodes]
                self.nodes.update(zip(free, sorted(plain)))
            if len(self.nodes) < num_clients:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(num_clients)) - set(self.nodes))
                    raise FedsimError(f"no SuperNode serves partition(s) {missing} after {timeout:g} s; {START_HINT}")
                time.sleep(self.poll_interval)

    def dispatch(self, tasks: list[TrainTask], group: str) -> None:
        """Pushes each task to the node of its client."""
        messages = [
            Message(encode_task(t, self.config, self.layout, self.train_config, self.num_classes), dst_node_id=self.nodes[t.client],
                    message_type=TRAIN, group_id=group)
            for t in tasks
        ]
        ids = list(self.grid.push_messages(messages))
        if len(ids) != len(tasks) or not all(ids):
            raise FedsimError(f"the SuperLink refused {len(tasks) - len([m for m in ids if m])} of {len(tasks)} "
                              "job messages (too large? see the ServerApp log)")
        for task, mid in zip(tasks, ids):
            self.in_flight[mid] = Dispatched(task.client, task.job_id, task.payload.params)

    def collect(self) -> tuple[list[tuple[int, Reply]], list[Dispatched]]:
        """Returns ((job id, reply) of the replies, lost jobs) that arrived since the last
        call, each ordered by job id."""
        if not self.in_flight:
            return [], []
        results, lost = [], []
        for reply in self.grid.pull_messages(list(self.in_flight)):
            job = self.in_flight.pop(reply.metadata.reply_to_message_id, None)
            if job is None:
                continue
            if reply.has_error():
                if reply.error.code in LOST_CODES:
                    lost.append(job)
                    continue
                raise FedsimError(f"client {job.client} (job {job.job_id}, node {self.nodes[job.client]}) "
                                  f"failed: {reply.error.reason}")
            try:
                got = decode_result(reply.content, self.layout, job.sent)
            except ValueError as exc:
                raise FedsimError(f"client {job.client} (job {job.job_id}, node {self.nodes[job.client]}) "
                                  f"sent a reply fedsim cannot read: {exc}") from None
            if got.job_id is not None and (got.client, got.job_id) != (job.client, job.job_id):
                raise FedsimError(f"a reply for job {job.job_id} of client {job.client} carries "
                                  f"job {got.job_id} of client {got.client}")
            results.append((job.job_id, got))
        return sorted(results, key=lambda r: r[0]), sorted(lost, key=lambda d: d.job_id)

    def wait(self, until: float) -> tuple[list[tuple[int, Reply]], list[Dispatched]]:
        """Polls until something arrives, nothing is in flight, or the monotonic clock reaches `until`."""
        while True:
            results, lost = self.collect()
            if results or lost or not self.in_flight or time.monotonic() >= until:
                return results, lost
            time.sleep(min(self.poll_interval, max(0.0, until - time.monotonic())))

    def evaluate(self, params: Tensor, server_round: int, timeout: float) -> dict[str, float | None]:
        """Federated evaluation: sends `params` to every client's node and returns the
        num-examples-weighted means of the replies' loss and accuracy (``loss``, ``accuracy``,
        None when no node reports one) and ``examples``, their total. A node that went away
        is left out; a failing node or none answering within `timeout` s stops the run."""
        content = encode_evaluate(params, server_round, self.config, self.layout, self.num_classes)
        messages = [Message(content, dst_node_id=node, message_type=EVALUATE, group_id=f"evaluate-{server_round}")
                    for node in self.nodes.values()]
        client_of = dict(zip(self.grid.push_messages(messages), self.nodes))
        deadline = time.monotonic() + timeout
        got: list[tuple[int, float, float | None]] = []
        while client_of:
            for reply in self.grid.pull_messages(list(client_of)):
                client = client_of.pop(reply.metadata.reply_to_message_id)
                where = f"client {client} (node {self.nodes[client]})"
                if reply.has_error():
                    if reply.error.code in LOST_CODES:
                        continue
                    raise FedsimError(f"{where} failed to evaluate: {reply.error.reason}")
                try:
                    got.append(decode_evaluation(reply.content))
                except ValueError as exc:
                    raise FedsimError(f"{where} sent an evaluate reply fedsim cannot read: {exc}") from None
            if client_of and time.monotonic() >= deadline:
                raise FedsimError(f"no evaluate reply from client(s) {sorted(client_of.values())} within {timeout:g} s")
            if client_of:
                time.sleep(self.poll_interval)
        return weighted_evaluation(got)

    def abandon(self, job_ids: set[int]) -> None:
        """Stops waiting for these jobs; their replies, if any come, are ignored."""
        self.in_flight = {m: d for m, d in self.in_flight.items() if d.job_id not in job_ids}


def weighted_evaluation(replies: list[tuple[int, float, float | None]]) -> dict[str, float | None]:
    """Returns the num-examples-weighted mean loss and accuracy of (num-examples, loss,
    accuracy) replies, and their total ``examples``; raises FedsimError when none counts."""
    total = sum(n for n, _, _ in replies)
    if total <= 0:
        raise FedsimError("federated evaluation: no node reported any evaluation example")
    with_acc = [(n, a) for n, _, a in replies if a is not None]
    acc_total = sum(n for n, _ in with_acc)
    return {"loss": sum(n * loss for n, loss, _ in replies) / total,
            "accuracy": sum(n * a for n, a in with_acc) / acc_total if acc_total else None,
            "examples": float(total)}
