"""Checkpoints: everything a run's future depends on, in a safe format, written atomically.

A checkpoint holds the protocol state (global model(s), strategy state, virtual clock and
pending events, counters — the RNG needs no state, every draw is keyed), the per-client
state store, and how many metrics rows and event-log bytes were written. It is saved
with ``torch.save`` of plain containers and tensors and loaded with
``torch.load(weights_only=True)``: dataclasses and named tuples are encoded as tagged
dicts and rebuilt only as the state classes registered with `@checkpointable`
(`fedsim.state_types`) — a checkpoint is data, safe to load from a stranger: it cannot
name a function to call or a module to import. A client-state store that has spilled to
disk is streamed into a folder beside its checkpoint instead (`store_entry`).
"""
from __future__ import annotations

import dataclasses
import errno
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .clock import EventQueue
from .errors import FedsimError
from .outputs import atomic_temp_files
from .state_store import SPILL_PREFIX, ClientStateStore
from .state_types import lookup, qualified_name, registered

CKPT_RE = re.compile(r"^ckpt-(\d{9})\.pt$")
STORE_RE = re.compile(r"^(store|memory)-(\d{9})$")
# what `fedsim.runner` writes; a readable file without these is not a checkpoint (skipped like a corrupt one)
PAYLOAD_KEYS = frozenset({"format", "protocol", "param_dim", "protocol_state", "store", "driver", "rows", "events_bytes"})


def _class_tag(obj: Any) -> str:
    cls = type(obj)
    if not registered(cls):
        raise FedsimError(f"cannot checkpoint a {qualified_name(cls)}: a state class must be registered with "
                          f"@checkpointable (from fedsim.state_types import checkpointable)")
    return qualified_name(cls)


def encode(obj: Any) -> Any:
    """Turns a state tree into plain containers of tensors and scalars (weights_only-safe);
    dataclasses and named tuples must be `checkpointable` (FedsimError otherwise)."""
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
        return {"__dataclass__": _class_tag(obj), "fields": fields}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return {"__namedtuple__": _class_tag(obj), "items": [encode(v) for v in obj]}
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


def _state_class(name: Any, dataclass: bool) -> type:
    """Returns the registered state class a checkpoint entry names. Nothing is imported or
    looked up by attribute: a name that is not registered is refused (FedsimError)."""
    cls = lookup(name) if isinstance(name, str) else None
    if cls is None:
        shown = repr(name if isinstance(name, str) else type(name).__name__)[:120]
        raise FedsimError(f"it names {shown}, which is not a registered state class "
                          f"(@checkpointable, fedsim/state_types.py); refusing to load it")
    if dataclass != dataclasses.is_dataclass(cls):
        raise ValueError(f"{name} stored as the wrong kind of class")
    return cls


def _dataclass(cls: type, fields: Any) -> Any:
    if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
        raise ValueError(f"{qualified_name(cls)} has malformed fields")
    known = {f.name: f for f in dataclasses.fields(cls)}
    odd = sorted(set(fields) - set(known))
    if odd:
        raise ValueError(f"{qualified_name(cls)} has no field {odd[0][:40]!r}")
    values = {k: decode(v) for k, v in fields.items()}
    obj = cls(**{k: v for k, v in values.items() if known[k].init})
    for k, v in values.items():
        if not known[k].init:
            object.__setattr__(obj, k, v)
    return obj


def _ndarray(tree: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(str(tree["dtype"]))
    if dtype.kind not in "biufc":  # numbers only: never object arrays
        raise ValueError(f"array of dtype {dtype} in a checkpoint")
    return tree["__ndarray__"].numpy().astype(dtype, copy=True)


def decode(tree: Any) -> Any:
    """Inverse of `encode`. Builds only registered state classes (`fedsim.state_types`),
    with the file's values as their fields; raises FedsimError for a class name that is not
    registered and ValueError (or another exception) for an entry that is malformed."""
    if isinstance(tree, list):
        return [decode(v) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__ndarray__" in tree:
        return _ndarray(tree)
    if "__eventqueue__" in tree:
        return EventQueue.restore(decode(tree["__eventqueue__"]))
    if "__dataclass__" in tree:
        return _dataclass(_state_class(tree["__dataclass__"], dataclass=True), tree["fields"])
    if "__namedtuple__" in tree:
        cls = _state_class(tree["__namedtuple__"], dataclass=False)
        items = tree["items"]
        if not isinstance(items, list) or len(items) > len(cls._fields):
            raise ValueError(f"{qualified_name(cls)} has malformed items")
        return cls(*[decode(v) for v in items])
    if "__tuple__" in tree:
        return tuple(decode(v) for v in tree["__tuple__"])
    if "__dict__" in tree:
        return {k: decode(v) for k, v in tree["__dict__"].items()}
    if "__items__" in tree:
        return {decode(k): decode(v) for k, v in tree["__items__"]}
    if "__set__" in tree:
        return {decode(v) for v in tree["__set__"]}
    raise ValueError("checkpoint has an unknown entry")  # a damaged file: load_latest tries the previous one


def checkpoint_dir(run_dir: Path) -> Path:
    """Returns the folder holding a run's checkpoints."""
    return run_dir / "checkpoints"


class _Sink:
    """A file for ``torch.save`` that keeps the OSError of a failed write: torch reports it
    only as ``RuntimeError: [enforce fail at inline_container.cc]``, without the cause."""

    def __init__(self, fh: Any):
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save``s `obj` to `path` through a temporary file (fsync, rename), so `path` is
    whole or absent; a failed write (a full disk) raises its OSError, never torch's bare
    RuntimeError, and leaves no temporary file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            sink = _Sink(fh)
            try:
                torch.save(obj, sink)  # type: ignore[arg-type]
            except RuntimeError as exc:
                if sink.error is not None:
                    raise sink.error from None
                if "inline_container" in str(exc) or "PytorchStreamWriter" in str(exc):  # its writer failed
                    raise OSError(errno.EIO, f"torch.save could not write {path.name} ({exc})") from None
                raise
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(run_dir: Path, index: int, payload: dict[str, Any], keep: int) -> Path:
    """Writes checkpoint number `index` atomically (temp file + rename); keeps the newest `keep`."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{index:09d}.pt"
    save_atomic(encode(payload), path)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    for store in _orphan_stores(folder):
        shutil.rmtree(store, ignore_errors=True)
    return path


def _orphan_stores(folder: Path) -> list[Path]:
    """Returns the store and memory folders in `folder` whose checkpoint is gone."""
    found = [*folder.glob("store-*"), *folder.glob("memory-*")]
    return [s for s in sorted(found) if STORE_RE.match(s.name)
            and not (folder / f"ckpt-{s.name.rpartition('-')[2]}.pt").exists()]


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
    """Restores `store` from a checkpoint's `store_entry`: its entries, or the name of a
    store folder beside the checkpoint (FedsimError for any other name: never a path)."""
    if isinstance(entry, str):
        if not STORE_RE.match(entry):
            raise FedsimError(f"checkpoint names the client-state folder {entry[:80]!r}, not a store-NNNNNNNNN folder")
        entry = checkpoint_dir(run_dir) / entry
    store.restore(entry)


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Deletes what a run killed midway leaves behind: checkpoint and store temporaries,
    store folders whose checkpoint is gone, temporaries of atomic writes, and spilled client
    state in the run folder; returns what it removed. Only for the process holding the run
    folder's lock (another run's temporaries are live)."""
    folder = checkpoint_dir(run_dir)
    found = atomic_temp_files(run_dir) + sorted(run_dir.glob(f"{SPILL_PREFIX}*"))
    if folder.is_dir():
        found += sorted(folder.glob(".ckpt-*.tmp")) + sorted(folder.glob(".store-*.tmp")) + sorted(folder.glob(".memory-*.tmp"))
        found += _orphan_stores(folder)
    for path in found:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    return found


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Returns the run's checkpoint files, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CKPT_RE.match(p.name))


def _import_builtin_state_classes() -> None:
    """Imports the modules of fedsim's own state classes, so that they are registered: every
    built-in protocol and strategy (with the blocks, compressors… they use) and the runner.
    (Plugins register theirs when the run's config imports them.)"""
    from . import runner  # noqa: F401 - DriverState
    from .registry import import_all

    import_all("fedsim.protocols")
    import_all("fedsim.strategies")


def load_latest(run_dir: Path) -> tuple[dict[str, Any], Path]:
    """Loads the newest readable checkpoint, warning about (and skipping) corrupt ones and files
    that are not checkpoints; returns (payload, its path). Raises FedsimError for a file that
    names a class outside the registered state classes (`fedsim.state_types`)."""
    files = list_checkpoints(run_dir)
    if not files:
        raise FedsimError(f"{run_dir} has no checkpoint to resume from")
    _import_builtin_state_classes()
    for path in reversed(files):
        try:
            payload = decode(torch.load(path, weights_only=True))
            if not isinstance(payload, dict) or not PAYLOAD_KEYS <= payload.keys():
                raise ValueError("not a fedsim checkpoint")
            return payload, path
        except FedsimError as exc:
            raise FedsimError(f"checkpoint {path}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any unreadable file: fall back to the previous one
            why = ": ".join(filter(None, [type(exc).__name__, str(exc).split(". ")[0]])).splitlines()[0]
            warnings.warn(f"checkpoint {path.name} is unreadable ({why}); trying the previous one", stacklevel=2)
    raise FedsimError(f"no readable checkpoint in {checkpoint_dir(run_dir)}")
