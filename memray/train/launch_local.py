"""Training on N local processes without Ray: ``memray train CONFIG --workers N``.

``train_worker`` is the body of one rank and does not care who started it: the local launcher
here (``torch.multiprocessing``-style spawn, gloo on CPU) or Ray Train workers, which call the
same function.
"""
from __future__ import annotations

from pathlib import Path

from .config import RunConfig
from .trainer import Trainer, default_run_dir


def train_worker(config: RunConfig, run_dir: str, progress: bool = False) -> dict:
    """Join the process group described by the environment, train, leave the group."""
    from memray.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed(config.distributed.backend)
    try:
        return Trainer(config, run_dir, progress=progress, context=ctx).fit()
    finally:
        shutdown_distributed()


def train_local(config: RunConfig, run_dir: str | Path | None = None, progress: bool = False) -> dict:
    """Train on ``config.distributed.workers`` local processes; rank 0's result."""
    from memray.distributed import spawn

    config.check_world()  # before any process starts
    run_dir = str(run_dir or config.run_dir or default_run_dir(config))
    return spawn(train_worker, config.distributed.workers, config, run_dir, progress)[0]
