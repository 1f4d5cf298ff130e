"""The run directory: where a run is written, and what rank 0 writes there.

``RUN/config.yaml`` (the resolved config), ``RUN/tokenizer.json`` (a BPE the data was encoded
with, for evaluation), ``RUN/data/facts.jsonl`` (the facts a run trains on, when it has any),
``RUN/metrics.jsonl`` (one JSON object per logged step), the same scalars as TensorBoard event
files (``RUN/events.out.tfevents.*``, with ``train.tensorboard``), ``RUN/log.txt`` and
``RUN/checkpoints/``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from datetime import datetime
from pathlib import Path

from memray.config import dump_yaml
from memray.data import write_facts
from memray.data.tokenizer import TOKENIZER_FILE

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
LOG = "log.txt"


def resolve_run_dir(config, run_dir: str | Path | None = None) -> Path:
    """The one rule for where a run goes: ``run_dir`` if given, else the config's ``run_dir``,
    else ``runs/<config name>-<timestamp>``."""
    if run_dir:
        return Path(run_dir)
    if config.run_dir:
        return Path(config.run_dir)
    return Path("runs") / f"{config.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


class RunDirectory(contextlib.AbstractContextManager):
    """Rank 0's writer of a run directory (on other ranks every method does nothing). Opened as a
    context manager, it writes the config, tokenizer and facts and keeps the metrics and log
    files open until it is closed, also when training fails."""

    def __init__(self, path: Path, writer: bool, echo: bool):
        """``writer``: this process writes (rank 0); ``echo``: log lines go to stderr too."""
        self.path, self.writer, self.echo = Path(path), writer, echo
        self._files = contextlib.ExitStack()
        self._metrics = self._log = self._events = None

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def open(self, config, tokenizer, facts) -> RunDirectory:
        if not self.writer:
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        dump_yaml(config, self.path / "config.yaml")
        if tokenizer.path is not None:  # a BPE: evaluation decodes with it
            shutil.copyfile(tokenizer.path, self.path / TOKENIZER_FILE)
        if facts is not None:
            (self.path / "data").mkdir(exist_ok=True)
            write_facts(self.path / "data" / "facts.jsonl", facts)
        self._metrics = self._files.enter_context((self.path / METRICS).open("a"))
        self._log = self._files.enter_context((self.path / LOG).open("a"))
        if config.train.tensorboard:
            self._events = self._open_events()
        return self

    def _open_events(self):
        """A TensorBoard writer into the run directory, or None (and a log line) without tensorboard."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.log("tensorboard is not installed: no event files (pip install tensorboard; train.tensorboard: false)")
            return None
        writer = SummaryWriter(log_dir=str(self.path))
        self._files.callback(writer.close)
        return writer

    def __exit__(self, *exc) -> None:
        self._files.close()

    def log(self, message: str) -> None:
        if not self.writer:
            return
        line = f"{datetime.now().isoformat(timespec='seconds')} {message}"
        self._log.write(line + "\n")
        self._log.flush()
        if self.echo:
            print(line, file=sys.stderr)

    def write_metrics(self, record: dict) -> None:
        if not self.writer:
            return
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._events is not None:
            for tag, value in scalars(record):
                self._events.add_scalar(tag, value, record["step"])
            self._events.flush()


def scalars(record: dict):
    """(tag, number) of a metrics record for TensorBoard: its numbers, and per-rank lists as
    ``<name>/rank<r>``; the step, flags and missing values are left out."""
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            yield key, value
        elif isinstance(value, list):
            for rank, item in enumerate(value):
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    yield f"{key}/rank{rank}", item
