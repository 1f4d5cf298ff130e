"""Training: the run config, the training loop, and local multi-process launching."""

from .config import DistributedConfig, RunConfig, TrainerConfig, load_run_config
from .launch_local import train_local, train_worker
from .trainer import Trainer

__all__ = [
    "DistributedConfig",
    "RunConfig",
    "TrainerConfig",
    "Trainer",
    "load_run_config",
    "train_local",
    "train_worker",
]
