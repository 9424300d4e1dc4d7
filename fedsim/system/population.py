"""The population's timing: how long a job takes, who is available, which jobs are lost."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .. import rng
from ..config.load import SystemConfig
from ..contributions import Contributions
from ..data.base import FederatedData
from .adversary import AdversaryModel, flip_labels, malicious_ids
from .models import AvailabilityModel, ComputeModel, DropoutModel, LinkModel, SystemContext


@dataclass
class Population:
    """Per-client behaviour for the protocols; every answer is keyed, none uses a shared stream."""

    num_clients: int
    seed: int
    compute: ComputeModel
    link: LinkModel
    availability: AvailabilityModel
    dropout: DropoutModel
    jitter: str = "none"
    jitter_sigma: float = 0.5
    adversary: AdversaryModel = field(default_factory=AdversaryModel)
    malicious: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # sorted ids
    _step_times: dict[int, float] = field(default_factory=dict, repr=False, compare=False)  # one client's, asked alone

    @classmethod
    def build(cls, system: SystemConfig, num_clients: int, seed: int) -> "Population":
        """Builds the population's behaviour models from the `system` config section."""
        ctx = SystemContext(num_clients, seed)
        common = system.adversary.common
        try:
            malicious = malicious_ids(num_clients, seed, common.get("fraction", 0.0), common.get("ids"))
        except ValueError as exc:
            from ..errors import ConfigError

            raise ConfigError("system.adversary.ids", str(exc)) from None
        return cls(
            num_clients,
            seed,
            system.compute.build(ctx),
            system.link.build(ctx),
            system.availability.build(ctx),
            system.dropout.build(ctx),
            jitter=system.compute.common.get("jitter", "none"),
            jitter_sigma=system.compute.common.get("jitter_sigma", 0.5),
            adversary=system.adversary.build(ctx),
            malicious=malicious,
        )

    def step_time(self, clients: np.ndarray) -> np.ndarray:
        """Returns each client's seconds per local step. A compute model is a function of the
        client ids alone, so one client's answer, asked for job after job by the asynchronous
        protocols, is remembered."""
        clients = np.asarray(clients)
        if clients.size != 1:
            return np.asarray(self.compute.step_time(clients), dtype=np.float64)
        return np.full(clients.shape, self._step_time_one(int(clients.reshape(-1)[0])))

    def _step_time_one(self, client: int) -> float:
        got = self._step_times.get(client)
        if got is None:
            got = self._step_times[client] = float(np.asarray(self.compute.step_time(np.array([client])),
                                                              dtype=np.float64).reshape(-1)[0])
        return got

    def jitter_factor(self, job_ids: np.ndarray) -> np.ndarray:
        """Returns each job's random factor on its compute time (mean 1), keyed by job id."""
        job_ids = np.asarray(job_ids)
        if self.jitter == "exponential":
            return -np.log1p(-rng.uniform(self.seed, "jitter", job_ids))
        if self.jitter == "lognormal":
            s = self.jitter_sigma
            return np.exp(s * rng.normal(self.seed, "jitter", job_ids) - s * s / 2)
        return np.ones(len(job_ids))

    def job_seconds(
        self, clients: np.ndarray, steps: np.ndarray, bytes_down: np.ndarray, bytes_up: np.ndarray, job_ids: np.ndarray
    ) -> np.ndarray:
        """Returns job durations in seconds: compute of `steps` local steps (times the job's
        jitter factor) + transfer time of the bytes actually sent. They are not rounded: the
        clock adds them to each job's unrounded start (`fedsim.clock.later`)."""
        clients = np.asarray(clients)
        compute = self.step_time(clients) * np.asarray(steps) * self.jitter_factor(job_ids)
        return compute + np.asarray(self.link.transfer_time(clients, np.asarray(bytes_down), np.asarray(bytes_up)))

    def job_seconds_one(self, client: int, steps: int, bytes_down: int, bytes_up: int, job: int) -> float:
        """Returns `job_seconds` of one job as a float: the same arithmetic, in the same order
        (so the same bits), without building arrays for the models that need none (the
        asynchronous protocols time job by job)."""
        compute = self._step_time_one(int(client)) * steps
        if self.jitter != "none":
            compute *= float(self.jitter_factor(np.array([job]))[0])
        if self.link.instant:
            return compute
        transfer = self.link.transfer_time(np.array([client]), np.array([bytes_down]), np.array([bytes_up]))
        return compute + float(np.asarray(transfer).reshape(-1)[0])

    def available(self, clients: np.ndarray, t: float) -> np.ndarray:
        """Returns the ids among `clients` available at virtual time t (seconds)."""
        clients = np.asarray(clients)
        if self.availability.always:
            return clients
        return clients[np.asarray(self.availability.available(clients, t), dtype=bool)]

    def next_availability_change(self, t: float) -> float:
        """Returns the next time (seconds) at which availability may change (inf: never)."""
        return self.availability.next_change(t)

    def drops(self, clients: np.ndarray, job_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns (lost mask, fraction of the duration after which each lost job disappears)."""
        return self.dropout.drops(np.asarray(clients), np.asarray(job_ids))

    @property
    def attacks_updates(self) -> bool:
        """True when malicious clients rewrite what they send."""
        return self.adversary.attack is not None and len(self.malicious) > 0

    def tamper(self, contribs: Contributions) -> Contributions:
        """Returns `contribs` with the malicious senders' updates rewritten by the attack
        (unchanged when no row is malicious); the updates must be one tensor."""
        if not self.attacks_updates or not len(contribs):
            return contribs
        bad = np.isin(contribs.senders, self.malicious)
        if not bad.any():
            return contribs
        return contribs.replace(updates=self.adversary.attack(contribs.updates, bad, contribs.jobs))

    def poison(self, data: FederatedData) -> FederatedData:
        """Returns `data` with the malicious clients' training labels flipped when the attack
        flips labels (else `data` itself); raises ValueError for data without classes."""
        if not self.adversary.flip_labels or not len(self.malicious):
            return data
        source = data.source
        if source.task != "classification" or not source.num_classes:
            raise ValueError(f"label flipping needs a classification data source (this one's task is {source.task!r})")
        rows = np.concatenate([data.client_train[i] for i in self.malicious.tolist()])
        y = source.y_train.clone()
        index = torch.as_tensor(rows, dtype=torch.long)
        y[index] = flip_labels(y[index], source.num_classes)
        return replace(data, source=replace(source, y_train=y))
