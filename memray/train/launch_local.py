"""Training on N local processes without Ray: ``memray train CONFIG --workers N``.

``train_worker`` is the body of one rank and does not care who started it: the local launcher
here (``torch.multiprocessing``-style spawn, gloo on CPU) or Ray Train workers, which call the
same function.
"""

from __future__ import annotations

from pathlib import Path

from .config import RunConfig
from .trainer import ZERO3_RESUME, Trainer, default_run_dir


def train_worker(
    config: RunConfig, run_dir: str, progress: bool = False, resume: str | None = None, on_checkpoint=None
) -> dict:
    """Join the process group described by the environment (or the one already initialised, as
    under Ray Train), train (from ``resume``, a checkpoint of any world size), leave a group it
    created. ``on_checkpoint(path, metrics)`` runs on every rank after each committed save."""
    import torch.distributed as dist

    from memray.distributed import init_distributed, shutdown_distributed

    created = not dist.is_initialized()
    ctx = init_distributed(config.distributed.backend)
    try:
        trainer = Trainer(config, run_dir, progress=progress, context=ctx)
        trainer.on_checkpoint = on_checkpoint
        if resume:
            trainer.resume(resume)
        return trainer.fit()
    finally:
        if created:
            shutdown_distributed()


def train_local(
    config: RunConfig, run_dir: str | Path | None = None, progress: bool = False, resume: str | Path | None = None
) -> dict:
    """Train on ``config.distributed.workers`` local processes; rank 0's result."""
    from memray.checkpoint import find_checkpoint
    from memray.distributed import spawn

    config.check_world()  # before any process starts
    if resume and config.distributed.zero_stage == 3:
        raise ZERO3_RESUME
    resume = str(find_checkpoint(resume)) if resume else None  # a missing checkpoint: one line, no spawn
    run_dir = str(run_dir or config.run_dir or default_run_dir(config))
    return spawn(train_worker, config.distributed.workers, config, run_dir, progress, resume)[0]
