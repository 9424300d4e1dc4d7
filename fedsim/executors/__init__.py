"""Executors: where client jobs run (serial in-process; Ray actors; vmap cohorts)."""
from .base import Executor, Job, JobResult, Worker, WorkerSpec

__all__ = ["Executor", "Job", "JobResult", "Worker", "WorkerSpec"]
