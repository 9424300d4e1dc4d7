"""The run folder: config.yaml, metrics.jsonl, events.jsonl, summary.json, curves.png.

Rows are appended one line at a time and flushed, so a crash loses nothing already
evaluated; `read_jsonl` drops a truncated last line (a kill mid-write).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from .clock import to_seconds
from .errors import FedsimError


def _clean(value: Any) -> Any:
    """Returns `value` as JSON can hold it: tensors and numpy scalars as Python numbers, NaN and
    ±inf as null (JSON has neither; a stand-in number would read as a real measurement)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):
        return _clean(value.item())
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_atomic(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    """Returns runs/<name>-<YYYYmmdd-HHMMSS>, with a suffix if that folder already exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


MARKER = ".fedsim-run"  # written into every run folder fedsim creates: the proof that it may delete it
LOCK = ".fedsim-lock"  # flock'ed by the one process that writes the folder
# written through a temporary file .NAME.* and a rename (`write_atomic`, `checkpoint.save_atomic`)
ATOMIC_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "final_model.pt")


def is_run_dir(path: Path) -> bool:
    """True when `path` is a folder fedsim created as a run folder (it holds the marker)."""
    return (path / MARKER).is_file()


class RunDirLock:
    """An exclusive lock on a run folder: ``fcntl.flock`` on its lock file, held by one
    process at a time. It is released by `release` (or the context's end) and by the OS when
    the process ends in any way, so a killed run never leaves a stale lock."""

    def __init__(self, path: Path):
        import fcntl

        self.path = path
        self.created = False  # whether the process made the folder (set by `prepare_run_dir`)
        try:
            self._fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise FedsimError(f"cannot write the run folder {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise FedsimError(f"run folder {path} is in use by another fedsim process (pid {holder}); "
                              f"wait for it to end or stop it") from None
        except BaseException:
            os.close(self._fd)
            raise
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Releases the lock (closing its file); the lock file stays."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def empty_folder(path: Path, keep: tuple[str, ...] = (), ignore_errors: bool = False) -> None:
    """Deletes everything in folder `path` but the entries named in `keep`."""
    for item in path.iterdir():
        if item.name in keep:
            continue
        try:
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
        except OSError:
            if not ignore_errors:
                raise


def check_run_dir(path: Path, overwrite: bool) -> None:
    """Raises FedsimError unless `path` may become a run folder: absent, an empty folder, or
    (with `overwrite`) a run folder fedsim created — it holds the marker. Touches nothing."""
    if path.exists() and not path.is_dir():
        raise FedsimError(f"--out {path} is a file, not a folder")
    if not path.is_dir() or not set(os.listdir(path)) - {LOCK}:
        return
    if not overwrite:
        raise FedsimError(f"run folder {path} already exists; pass --overwrite to replace it (or --resume)")
    if not is_run_dir(path):
        raise FedsimError(f"{path} is not a run folder fedsim created (no {MARKER} file): fedsim deletes only its "
                          f"own run folders; delete it yourself or choose another --out")


def prepare_run_dir(path: Path, overwrite: bool) -> RunDirLock:
    """Creates the run folder, or empties an existing one `check_run_dir` allows, writes its
    marker and returns the lock on it, held, with ``created`` telling whether this call made
    the folder (FedsimError if another process holds it, or if the folder cannot be written).
    A folder fedsim did not create is never deleted."""
    check_run_dir(path, overwrite)
    created = True  # by this process: only its own mkdir succeeds
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        created = False
    except OSError as exc:
        raise FedsimError(f"cannot create the run folder {path}: {exc.strerror or exc}") from None
    try:
        lock = RunDirLock(path)
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    try:
        check_run_dir(path, overwrite)  # again, now that no other fedsim process can change it
        empty_folder(path, keep=(LOCK,))
        (path / MARKER).write_text("a fedsim run folder: `fedsim run --overwrite` may delete it\n")
    except BaseException as exc:
        lock.release()
        if created:
            shutil.rmtree(path, ignore_errors=True)
        if isinstance(exc, OSError):
            raise FedsimError(f"cannot write the run folder {path}: {exc}") from None
        raise
    lock.created = created
    return lock


def folder_write_problem(path: Path) -> str | None:
    """Returns why files cannot be created in folder `path` (a reason such as 'Permission
    denied'), or None if they can. Folders it makes to find out are removed again."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    made = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            made.append(folder)
        with tempfile.TemporaryFile(dir=made[-1] if made else path):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        for folder in reversed(made):
            folder.rmdir()
    return None


def atomic_temp_files(path: Path) -> list[Path]:
    """Returns the temporary files that atomic writes killed midway left in `path`."""
    return sorted(p for name in ATOMIC_FILES for p in path.glob(f".{name}.*"))


def write_config(path: Path, resolved: dict[str, Any]) -> None:
    """Writes the fully resolved config to path/config.yaml."""
    write_atomic(path / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))


class JsonlLog:
    """Append-only JSON-lines file, flushed after every row."""

    def __init__(self, path: Path, fsync: bool = False):
        self.path = path
        self._fh = path.open("a")
        self._fsync = fsync

    def append(self, row: dict[str, Any]) -> None:
        """Writes one row as a JSON line and flushes it."""
        self._fh.write(json.dumps(_clean(row)) + "\n")
        self._fh.flush()
        if self._fsync:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Closes the file."""
        if not self._fh.closed:
            self._fh.close()


class EventLog(JsonlLog):
    """events.jsonl: one row per dispatch, arrival, aggregation… on the virtual clock."""

    def write(self, time_ticks: int, kind: str, **fields: Any) -> None:
        """Appends an event at virtual time `time_ticks`."""
        self._fh.write(json.dumps(_clean({"time": to_seconds(time_ticks), "kind": kind, **fields})) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Reads a JSON-lines file, dropping a truncated or corrupt last line."""
    rows = []
    lines = path.read_text().splitlines() if path.exists() else []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise FedsimError(f"{path}: line {i + 1} is not valid JSON") from None
    return rows


def iter_runs(paths: list[str | Path]) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """Yields (run folder, metrics rows) for each run folder, raising FedsimError if unreadable."""
    for p in map(Path, paths):
        metrics = p / "metrics.jsonl"
        if not metrics.is_file():
            raise FedsimError(f"{p} is not a run folder (no metrics.jsonl)")
        yield p, read_jsonl(metrics)


def write_summary(path: Path, rows: list[dict[str, Any]], totals: dict[str, Any]) -> dict[str, Any]:
    """Writes summary.json: the last metrics row plus run totals; returns it."""
    summary = {"final": rows[-1] if rows else {}, **totals}
    write_atomic(path / "summary.json", json.dumps(_clean(summary), indent=2) + "\n")
    return summary
