"""Checkpoints: everything a run's future depends on, in a safe format, written atomically.

A checkpoint holds the protocol state (global model(s), strategy state, virtual clock and
pending events, counters — the RNG needs no state, every draw is keyed), the per-client
state store, and how many metrics rows and event-log bytes were written. It is saved
with ``torch.save`` of plain containers and tensors and loaded with
``torch.load(weights_only=True)``: dataclasses and named tuples are encoded as tagged
dicts and rebuilt only from fedsim's own packages or the run's plugins — never by
unpickling arbitrary objects from a run folder. A client-state store that has spilled to
disk is streamed into a folder beside its checkpoint instead (`store_entry`).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .clock import EventQueue
from .errors import FedsimError
from .state_store import ClientStateStore

CKPT_RE = re.compile(r"^ckpt-(\d{9})\.pt$")
# what `fedsim.runner` writes; a readable file without these is not a checkpoint (skipped like a corrupt one)
PAYLOAD_KEYS = frozenset({"format", "protocol", "param_dim", "protocol_state", "store", "driver", "rows", "events_bytes"})
TRUSTED_PREFIXES = ("fedsim.", "strategies.", "topologies.")


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def encode(obj: Any) -> Any:
    """Turns a state tree into plain containers of tensors and scalars (weights_only-safe)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj)).clone(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, EventQueue):
        return {"__eventqueue__": encode(obj.snapshot())}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"__dataclass__": _qualname(obj), "fields": fields}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return {"__namedtuple__": _qualname(obj), "items": [encode(v) for v in obj]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v) for v in obj]}
    if isinstance(obj, list):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: encode(v) for k, v in obj.items()}}
        return {"__items__": [[encode(k), encode(v)] for k, v in obj.items()]}
    if isinstance(obj, (set, frozenset)):
        return {"__set__": [encode(v) for v in sorted(obj)]}
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _resolve(qualname: str, trusted: tuple[str, ...]) -> type:
    module_name, _, name = qualname.partition(":")
    if not (module_name + ".").startswith(trusted) and module_name not in {t.rstrip(".") for t in trusted}:
        raise FedsimError(f"checkpoint refers to {qualname}, outside fedsim and the run's plugins")
    obj: Any = importlib.import_module(module_name)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise FedsimError(f"checkpoint refers to {qualname}, which is not a class")
    return obj


def decode(tree: Any, trusted: tuple[str, ...] = TRUSTED_PREFIXES) -> Any:
    """Inverse of `encode`; rebuilds classes only from trusted module prefixes."""
    if isinstance(tree, list):
        return [decode(v, trusted) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__ndarray__" in tree:
        return tree["__ndarray__"].numpy().astype(tree["dtype"], copy=True)
    if "__eventqueue__" in tree:
        return EventQueue.restore(decode(tree["__eventqueue__"], trusted))
    if "__dataclass__" in tree:
        cls = _resolve(tree["__dataclass__"], trusted)
        fields = {k: decode(v, trusted) for k, v in tree["fields"].items()}
        init = {f.name: fields[f.name] for f in dataclasses.fields(cls) if f.init and f.name in fields}
        obj = cls(**init)
        for f in dataclasses.fields(cls):
            if not f.init and f.name in fields:
                object.__setattr__(obj, f.name, fields[f.name])
        return obj
    if "__namedtuple__" in tree:
        return _resolve(tree["__namedtuple__"], trusted)(*[decode(v, trusted) for v in tree["items"]])
    if "__tuple__" in tree:
        return tuple(decode(v, trusted) for v in tree["__tuple__"])
    if "__dict__" in tree:
        return {k: decode(v, trusted) for k, v in tree["__dict__"].items()}
    if "__items__" in tree:
        return {decode(k, trusted): decode(v, trusted) for k, v in tree["__items__"]}
    if "__set__" in tree:
        return {decode(v, trusted) for v in tree["__set__"]}
    raise ValueError("checkpoint has an unknown entry")  # a damaged file: load_latest tries the previous one


def checkpoint_dir(run_dir: Path) -> Path:
    """Returns the folder holding a run's checkpoints."""
    return run_dir / "checkpoints"


def save(run_dir: Path, index: int, payload: dict[str, Any], keep: int) -> Path:
    """Writes checkpoint number `index` atomically (temp file + rename); keeps the newest `keep`."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{index:09d}.pt"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ckpt-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(encode(payload), tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    for store in [*folder.glob("store-*"), *folder.glob("memory-*")]:  # store folders whose checkpoint is gone
        if not (folder / f"ckpt-{store.name.rpartition('-')[2]}.pt").exists():
            shutil.rmtree(store, ignore_errors=True)
    return path


def store_entry(run_dir: Path, index: int, store: ClientStateStore, name: str = "store") -> Any:
    """Returns the client-state store's part of checkpoint `index`: its entries inline when
    they are all in memory, else the name of a folder beside the checkpoint into which they
    are streamed (so a spilled store is never read into memory at once)."""
    if not store.spilled:
        return store.snapshot()
    folder = checkpoint_dir(run_dir) / f"{name}-{index:09d}"
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    store.snapshot(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder.name


def restore_store(run_dir: Path, entry: Any, store: ClientStateStore) -> None:
    """Restores `store` from a checkpoint's `store_entry`."""
    store.restore(checkpoint_dir(run_dir) / entry if isinstance(entry, str) else entry)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Returns the run's checkpoint files, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CKPT_RE.match(p.name))


def load_latest(run_dir: Path, trusted: Iterable[str] = ()) -> tuple[dict[str, Any], Path]:
    """Loads the newest readable checkpoint, warning about (and skipping) corrupt ones and files
    that are not checkpoints; returns (payload, its path)."""
    prefixes = TRUSTED_PREFIXES + tuple(f"{m}." for m in trusted) + tuple(trusted)
    files = list_checkpoints(run_dir)
    if not files:
        raise FedsimError(f"{run_dir} has no checkpoint to resume from")
    for path in reversed(files):
        try:
            payload = decode(torch.load(path, weights_only=True), prefixes)
            if not isinstance(payload, dict) or not PAYLOAD_KEYS <= payload.keys():
                raise ValueError("not a fedsim checkpoint")
            return payload, path
        except FedsimError:
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable file: fall back to the previous one
            why = ": ".join(filter(None, [type(exc).__name__, str(exc).split(". ")[0]])).splitlines()[0]
            warnings.warn(f"checkpoint {path.name} is unreadable ({why}); trying the previous one", stacklevel=2)
    raise FedsimError(f"no readable checkpoint in {checkpoint_dir(run_dir)}")
