"""Executors: where client jobs run (serial in-process; Ray actors; vmap cohorts)."""
from .base import Executor, Job, Worker, WorkerSpec

__all__ = ["Executor", "Job", "Worker", "WorkerSpec"]
