"""The Flower executor: jobs travel as messages to SuperNodes, results come back as replies.

It is the deployment's transport, nothing more: the protocols (`fedsim.protocols`) decide
who trains when and how results are aggregated, on the wall clock
(`fedsim.protocols.clocks.WallClock`), exactly as they do in simulation with a local
executor. `submit` queues a job for its client's node (queued jobs are pushed together at the
next `poll`, `result` or `run`), `poll` pulls the replies that came in, and `result` returns a
job's one-row `Contributions` (no row when its node went away). The row is built from the
server's own job (client, sample count, steps) and the reply's update, extras and metrics;
a reply in Flower's convention (an ordinary ClientApp) brings its own sample count
(``num-examples``, the aggregation weight) and, if it reports it, its step count.

A client's persistent state stays on its node; `keep_states` tells the executor which job of
each client produced the state to keep (it was aggregated, or the client restarts from it),
and the next message to that client carries it, so the node commits that job's state (a
straggler's state is dropped).
"""
from __future__ import annotations

import time
from logging import INFO
from typing import Sequence

import numpy as np
import yaml
from flwr.common.logger import log
from flwr.serverapp import Grid

from ..config.load import Config
from ..contributions import Contributions, from_outputs
from ..errors import ConfigError, FedsimError
from ..executors.base import Executor, Job, WorkerSpec
from ..protocols.clocks import WallClock
from ..strategy import Strategy, Tensor
from ..task import Task
from .link import NodeLink
from .messages import Reply, TrainTask
from .settings import FlowerSettings


def train_config(config: Config, settings: FlowerSettings) -> dict:
    """Returns the ``config`` record of every train message, in Flower's convention: the
    local-training settings (``lr``, ``batch-size``, ``local-steps`` or ``local-epochs``) and
    the run config's keys that are not the ServerApp's own (`FlowerSettings.passthrough`)."""
    local = config.local
    steps = {"local-steps": local.steps} if local.steps is not None else {"local-epochs": local.epochs}
    return {"lr": local.lr, "batch-size": local.batch_size, **steps, **dict(settings.passthrough)}


def contribution(job: Job, reply: Reply) -> Contributions:
    """Returns the one-row contributions of `job` from its reply (with the counts the reply reported)."""
    row = from_outputs([job], [reply.output])
    if reply.num_examples is not None:
        row.num_samples[0] = reply.num_examples
    if reply.num_steps is not None:
        row.num_steps[0] = reply.num_steps
    return row


class FlowerExecutor(Executor):
    """See the module docstring."""

    def __init__(self, grid: Grid, config: Config, settings: FlowerSettings, clock: WallClock):
        self.grid = grid
        self.config = config
        self.settings = settings
        self.clock = clock
        self._jobs: dict[int, Job] = {}  # submitted, not yet fetched
        self._outbox: list[Job] = []
        self._done: dict[int, Contributions] = {}
        self._accepted: dict[int, int] = {}  # client -> its last job the server aggregated
        self._evaluations = 0  # federated evaluations so far (the next one's server-round)

    def start(self, spec: WorkerSpec, strategy: Strategy | None = None) -> None:
        """Connects to the SuperNodes (one per client, found by its partition-id); the wall
        clock starts once they are all there. A resumed run (run config ``resume``) refuses a
        strategy whose clients keep state: that state lived in the nodes' ``Context.state`` of
        the stopped Flower run, which Flower keeps per run."""
        if self.settings.resume and strategy is not None and strategy.client_state is not None:
            raise ConfigError("run-config.resume", f"strategy {self.config.strategy.name!r} keeps client state on the "
                              "nodes, which Flower keeps per run: a new run cannot continue it")
        text = yaml.safe_dump(self.config.resolved(), sort_keys=False)
        dataless = self.settings.evaluation == "federated"
        self.link = NodeLink(self.grid, text, spec.task.layout, self.settings.poll_interval,
                             train_config(self.config, self.settings), self.settings.num_classes if dataless else 0)
        self.link.connect(spec.num_clients, self.settings.node_timeout)
        self.clock.restart()

    def submit(self, job: Job) -> None:
        self._jobs[job.job_id] = job
        self._outbox.append(job)

    def _flush(self) -> None:
        if not self._outbox:
            return
        by_version: dict[int, list[Job]] = {}
        for job in self._outbox:
            by_version.setdefault(job.version, []).append(job)
        self._outbox = []
        for version, jobs in by_version.items():
            tasks = [TrainTask(j.client, j.job_id, j.version, self._accepted.get(j.client, -1), j.payload) for j in jobs]
            self.link.dispatch(tasks, group=str(version))

    def poll(self, until: float) -> list[int]:
        """Waits until replies come in or the monotonic clock reaches `until`; returns the ids
        of the jobs that finished (answered, or lost with their node)."""
        self._flush()
        results, lost = self.link.wait(until)
        for job_id, reply in results:
            self._done[job_id] = contribution(self._jobs[job_id], reply)
        for d in lost:
            self._done[d.job_id] = Contributions.empty()
        return [job_id for job_id, _ in results] + [d.job_id for d in lost]

    def result(self, job_id: int) -> Contributions:
        if job_id not in self._jobs:
            raise KeyError(f"job {job_id} was not submitted (or its result was already taken)")
        deadline = time.monotonic() + self.settings.reply_timeout
        while job_id not in self._done:
            if time.monotonic() >= deadline:
                raise FedsimError(f"no reply from client {self._jobs[job_id].client} (job {job_id}) within "
                                  f"reply-timeout={self.settings.reply_timeout:g} s")
            self.poll(deadline)
        del self._jobs[job_id]
        return self._done.pop(job_id)

    def discard(self, job_id: int) -> None:
        self._outbox = [j for j in self._outbox if j.job_id != job_id]
        self._jobs.pop(job_id, None)
        self._done.pop(job_id, None)
        self.link.abandon({job_id})

    def evaluate(self, task: Task, params: Tensor, x: Tensor, y: Tensor, batch_size: int) -> dict[str, float | None]:
        """Evaluates the global model as the run config's ``evaluation`` says: on the server's
        test set (x, y), on the nodes (Flower evaluate messages: ``federated_test_loss``,
        ``federated_test_accuracy``, ``federated_examples``), or both. Without a server test
        set the federated values are also the row's ``loss`` / ``accuracy``. Every evaluation
        is logged in the ServerApp's log (``flwr run --stream``, ``flwr log``)."""
        where = self.settings.evaluation
        got = super().evaluate(task, params, x, y, batch_size) if where != "federated" else {}
        if where != "server":
            fed = self.link.evaluate(params, self._evaluations, self.settings.reply_timeout)
            named = {"federated_test_loss": fed["loss"], "federated_test_accuracy": fed["accuracy"],
                     "federated_examples": fed["examples"]}
            got = {"loss": fed["loss"], "accuracy": fed["accuracy"], **named} if where == "federated" else {**got, **named}
        shown = {("test_" + k if k in ("loss", "accuracy") else k): v for k, v in got.items()}
        log(INFO, "fedsim: evaluation %d: %s", self._evaluations,
            " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
        self._evaluations += 1
        return got

    def keep_states(self, jobs: np.ndarray, clients: np.ndarray) -> None:
        for job, client in zip(jobs.tolist(), clients.tolist()):
            self._accepted[client] = job

    def run(self, jobs: Sequence[Job]) -> Contributions:
        for job in jobs:
            self.submit(job)
        return Contributions.concat([self.result(j.job_id) for j in jobs])

    def close(self) -> None:
        if hasattr(self, "link"):
            self.link.abandon(set(self._jobs))
        self._jobs.clear()
        self._done.clear()
