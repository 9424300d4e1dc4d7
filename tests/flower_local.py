"""An in-process Flower Grid for fast adapter tests: each node is a ClientApp called directly.

Every message and reply goes through Flower's wire format (deflate to bytes, inflate), as
between a SuperLink and a SuperNode; a node's reply becomes visible after its `delay`
seconds of wall-clock time, so asynchronous schedules can be staged.
"""
from __future__ import annotations

import itertools
import time
from typing import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


def over_the_wire(obj):
    """Returns a copy of a Flower object after serialisation to bytes and back."""
    contents = {oid: o.deflate() for oid, o in get_all_nested_objects(obj).items()}
    return inflate_object_from_contents(obj.object_id, contents)


class LocalGrid(Grid):
    """Nodes 1000 + i serve partition i. Node i's k-th train reply becomes visible `delays[i]`
    seconds (or `delays[i][k]`) after the push; nodes in `unavailable` answer train messages
    with Flower's NODE_UNAVAILABLE error. `every_node` is added to every node's node config."""

    def __init__(self, client_app, num_nodes: int, delays: dict[int, float | list[float]] | None = None,
                 node_config: dict[int, dict] | None = None, unavailable: set[int] = frozenset(),
                 every_node: dict | None = None):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # what a ServerApp process has
        self.app = client_app
        self.delays = delays or {}
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i,
                              node_config={**(node_config or {}).get(i, {"partition-id": i, "num-partitions": num_nodes}),
                                           **(every_node or {})},
                              state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self.unavailable = unavailable
        self.trained = {node: 0 for node in self.contexts}
        self.replies: dict[str, tuple[float, Message]] = {}
        self.ids = itertools.count()
        self.pushed: list[Message] = []
        self._run = Run.create_empty(1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"m{next(self.ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            self.pushed.append(msg)
            node = msg.metadata.dst_node_id
            received = over_the_wire(msg.content)
            inbound = Message(received, dst_node_id=node, message_type=msg.metadata.message_type)
            inbound.metadata.__dict__["_message_id"] = mid
            self.replies[mid] = (time.monotonic() + self._delay(msg), self._answer(inbound))
            ids.append(mid)
        return ids

    def _answer(self, inbound: Message) -> Message:
        node = inbound.metadata.dst_node_id
        if inbound.metadata.message_type == "train" and node - 1000 in self.unavailable:
            return Message(Error(ErrorCode.NODE_UNAVAILABLE, "node went away"), reply_to=inbound)
        try:
            reply = self.app(inbound, self.contexts[node])
            return Message(over_the_wire(reply.content), reply_to=inbound)
        except Exception as exc:  # noqa: BLE001 - what Flower does with a ClientApp exception
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"),
                           reply_to=inbound)

    def _delay(self, msg: Message) -> float:
        if msg.metadata.message_type != "train":
            return 0.0
        node = msg.metadata.dst_node_id
        k, self.trained[node] = self.trained[node], self.trained[node] + 1
        d = self.delays.get(node - 1000, 0.0)
        return d[min(k, len(d) - 1)] if isinstance(d, list) else d

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        now = time.monotonic()
        ready = [m for m in message_ids if m in self.replies and self.replies[m][0] <= now]
        return [self.replies.pop(m)[1] for m in ready]

    def send_and_receive(self, messages, *, timeout=None):
        ids = set(self.push_messages(messages))
        out = []
        while ids:
            got = list(self.pull_messages(ids))
            ids -= {m.metadata.reply_to_message_id for m in got}
            out += got
        return out
