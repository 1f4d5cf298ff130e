"""Training: the run config and the training loop."""
from .config import RunConfig, TrainerConfig, load_run_config
from .trainer import Trainer

__all__ = ["RunConfig", "TrainerConfig", "Trainer", "load_run_config"]
