"""Training on N local processes without Ray: ``memray train CONFIG --workers N``.

``train_worker`` is the body of one rank and does not care who started it: the local launcher
here (``torch.multiprocessing``-style spawn, gloo on CPU) or Ray Train workers, which call the
same function. ``check_launch`` is what every launcher checks before any process starts.
"""

from __future__ import annotations

from pathlib import Path

from memray.errors import ConfigError

from .config import RunConfig
from .rundir import CHECKPOINTS, resolve_run_dir
from .trainer import Trainer


def check_launch(config: RunConfig, resume: str | Path | None, run_dir: str | Path) -> str | None:
    """Refuse, in one line and before any process starts, a run its ranks could not do: a world
    size that leaves a rank without rows, a missing or uncommitted checkpoint. Returns the
    checkpoint to start from, absolute (or None).

    The rerun rule, the same for every launcher: a run directory that already holds a committed
    checkpoint continues from its newest one (``resume`` only says where a *new* run directory
    starts from), so running a command again after a crash, a stop or a lost driver continues
    the run instead of training it again over its own checkpoints."""
    from memray.checkpoint import committed_checkpoints, find_checkpoint

    config.check_world()
    own = committed_checkpoints(Path(run_dir) / CHECKPOINTS)
    if own:
        resume = own[-1]
    if not resume:
        return None
    return str(find_checkpoint(resume).resolve())


def check_local_gpus(config: RunConfig) -> None:
    """Under NCCL each local process trains on its own GPU (``cuda:<local rank>``): refuse more
    processes than this machine has GPUs, in one line, before any starts."""
    import torch
    import torch.distributed as dist

    from memray.distributed.context import default_backend

    backend = config.distributed.backend
    if (default_backend() if backend == "auto" else backend) != "nccl":
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and dist.is_nccl_available() else 0
    workers = config.distributed.workers
    if workers > gpus:
        raise ConfigError(
            "distributed.workers",
            f"{workers} local processes under NCCL need a GPU each; this machine has {gpus} "
            f"(--workers {gpus}, or distributed.backend=gloo)",
        )


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
    from memray.distributed import spawn

    check_local_gpus(config)
    run_dir = str(resolve_run_dir(config, run_dir))
    resume = check_launch(config, resume, run_dir)
    return spawn(train_worker, config.distributed.workers, config, run_dir, progress, resume)[0]
