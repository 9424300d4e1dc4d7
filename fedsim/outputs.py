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


def prepare_run_dir(path: Path, overwrite: bool) -> Path:
    """Creates the run folder; refuses a non-empty existing one unless `overwrite`."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
            raise FedsimError(f"run folder {path} already exists; pass --overwrite to replace it (or --resume)")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


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
