"""The population's timing: how long a job takes, who is available, which jobs are lost."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import rng
from ..config.load import SystemConfig
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

    @classmethod
    def build(cls, system: SystemConfig, num_clients: int, seed: int) -> "Population":
        """Builds the population's behaviour models from the `system` config section."""
        ctx = SystemContext(num_clients, seed)
        return cls(
            num_clients,
            seed,
            system.compute.build(ctx),
            system.link.build(ctx),
            system.availability.build(ctx),
            system.dropout.build(ctx),
            jitter=system.compute.common.get("jitter", "none"),
            jitter_sigma=system.compute.common.get("jitter_sigma", 0.5),
        )

    def step_time(self, clients: np.ndarray) -> np.ndarray:
        """Returns each client's seconds per local step."""
        return np.asarray(self.compute.step_time(np.asarray(clients)), dtype=np.float64)

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

    def available(self, clients: np.ndarray, t: float) -> np.ndarray:
        """Returns the ids among `clients` available at virtual time t (seconds)."""
        clients = np.asarray(clients)
        return clients[np.asarray(self.availability.available(clients, t), dtype=bool)]

    def next_availability_change(self, t: float) -> float:
        """Returns the next time (seconds) at which availability may change (inf: never)."""
        return self.availability.next_change(t)

    def drops(self, clients: np.ndarray, job_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns (lost mask, fraction of the duration after which each lost job disappears)."""
        return self.dropout.drops(np.asarray(clients), np.asarray(job_ids))


