"""The `ray` section: which Ray cluster the Ray executor runs on (`executor.kind: ray`).

Kept apart from the executor so that reading a config never imports Ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

from .checks import Ge, Gt, OneOf
from .schema import knob


@dataclass
class RaySection:
    """`ray`: the Ray cluster used by `executor.kind: ray` (ignored by other executors)."""

    address: Optional[str] = knob(
        None,
        "null: start a private local Ray for this run and stop it at the end; 'auto': attach to "
        "the cluster started with `ray start` on this machine; 'HOST:PORT' or 'ray://HOST:10001': "
        "attach to that cluster (left running at the end).",
    )
    code: Annotated[str, OneOf(("auto", "path", "upload"))] = knob(
        "auto",
        "How Ray workers import this checkout's fedsim, strategies and topologies: 'path' puts the "
        "checkout on their PYTHONPATH (nodes that share this file system), 'upload' ships the "
        "packages with the runtime environment (nodes on other machines); 'auto' picks 'path' "
        "when every node runs on this machine.",
    )
    num_cpus: Annotated[Optional[int], Ge(1)] = knob(
        None, "CPUs of a local Ray started for the run (default: all of this machine's)."
    )
    num_gpus: Annotated[Optional[int], Ge(0)] = knob(
        None, "GPUs of a local Ray started for the run (default: all visible ones)."
    )
    object_store_memory: Annotated[Optional[int], Gt(0)] = knob(
        None, "Object-store bytes of a local Ray started for the run (default: Ray's choice)."
    )
