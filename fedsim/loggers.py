"""Metric sinks (`run.loggers`): CSV, TensorBoard and Weights & Biases, fed the rows of metrics.jsonl.

metrics.jsonl stays the record of a run; a logger receives the same rows as they are written
(NaN and ±inf as null / empty), starting from the rows a resumed run kept:

* ``csv``: ``metrics.csv`` in the run folder, rewritten from the kept rows on a resume, so it
  always holds what metrics.jsonl holds; a metric that first appears later widens the header.
* ``tensorboard``: event files in ``tensorboard/`` (``torch.utils.tensorboard``; needs the
  ``tensorboard`` package, extra ``fedsim[tensorboard]``). The step is the evaluation's index
  (0, 1, …); a resume purges the steps after its checkpoint, so TensorBoard shows each step once.
* ``wandb``: a Weights & Biases run in ``wandb/`` (extra ``fedsim[wandb]``), offline unless the
  ``WANDB_MODE`` environment variable says otherwise; its config is the resolved config.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import os
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from .errors import ConfigError
from .outputs import JsonlLog, _clean, write_atomic

NAMES = ("csv", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger -> the package (and extra) it needs


class Sink(Protocol):
    """Receives each metrics row (already cleaned: JSON values) and is closed at the run's end."""

    def append(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def check_loggers(names: Sequence[str]) -> None:
    """Raises ConfigError (run.loggers) when a logger's optional package is not installed."""
    for name in names:
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError("run.loggers", f"{name!r} needs the {package} package: "
                              f"pip install 'fedsim[{name}]' (or drop it from run.loggers)")


class CsvSink:
    """metrics.csv: one line per row; rewritten whole when a row brings a new column."""

    def __init__(self, path: Path, kept: Sequence[dict[str, Any]]):
        self.path = path
        self.rows = [dict(r) for r in kept]
        self.header: list[str] = []
        self._rewrite()

    def _line(self, row: Mapping[str, Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(["" if row.get(k) is None else row[k] for k in self.header])
        return buf.getvalue()

    def _rewrite(self) -> None:
        for row in self.rows:
            self.header += [k for k in row if k not in self.header]
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(self.header)
        write_atomic(self.path, buf.getvalue() + "".join(self._line(r) for r in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if any(k not in self.header for k in row):
            self._rewrite()
            return
        with self.path.open("a") as fh:
            fh.write(self._line(row))

    def close(self) -> None:
        pass


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    """Event files in tensorboard/: each numeric metric a scalar, step = the evaluation's index."""

    def __init__(self, folder: Path, kept: Sequence[dict[str, Any]]):
        from torch.utils.tensorboard import SummaryWriter

        self.step = len(kept)
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=self.step if kept else None)

    def append(self, row: dict[str, Any]) -> None:
        for key, value in _scalars(row).items():
            self.writer.add_scalar(key, value, global_step=self.step)
        self.writer.flush()
        self.step += 1

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run in wandb/ (offline unless WANDB_MODE says otherwise); step = the evaluation's index."""

    def __init__(self, run_dir: Path, kept: Sequence[dict[str, Any]], name: str, config: Mapping[str, Any]):
        import wandb

        self.step = len(kept)
        # wandb keeps its runs in <dir>/wandb/: the run folder's wandb/
        self.run = wandb.init(dir=str(run_dir), mode=os.environ.get("WANDB_MODE", "offline"), project="fedsim",
                              name=name, config=dict(config), reinit=True)

    def append(self, row: dict[str, Any]) -> None:
        self.run.log(_scalars(row), step=self.step)
        self.step += 1

    def close(self) -> None:
        self.run.finish()


class MetricsLog:
    """metrics.jsonl and the run's loggers: every row goes to all of them."""

    def __init__(self, out_dir: Path, loggers: Sequence[str], kept: Sequence[dict[str, Any]],
                 config: Mapping[str, Any] | None = None):
        check_loggers(loggers)
        self.jsonl = JsonlLog(out_dir / "metrics.jsonl")
        self.sinks: list[Sink] = []
        kept = [_clean(r) for r in kept]
        try:
            for name in dict.fromkeys(loggers):
                if name == "csv":
                    self.sinks.append(CsvSink(out_dir / "metrics.csv", kept))
                elif name == "tensorboard":
                    self.sinks.append(TensorBoardSink(out_dir / "tensorboard", kept))
                elif name == "wandb":
                    self.sinks.append(WandbSink(out_dir, kept, out_dir.name, config or {}))
                else:  # the config's check lists the names
                    raise ConfigError("run.loggers", f"unknown logger {name!r} (known: {', '.join(NAMES)})")
        except BaseException:
            self.close()
            raise

    def append(self, row: dict[str, Any]) -> None:
        """Writes `row` to metrics.jsonl, then to each logger."""
        self.jsonl.append(row)
        clean = _clean(row)
        for sink in self.sinks:
            sink.append(clean)

    def close(self) -> None:
        """Closes metrics.jsonl and every logger."""
        self.jsonl.close()
        for sink in self.sinks:
            sink.close()
