"""The resolved configuration of a training run: one object, one YAML file."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from memray.config import load_config
from memray.data import ByteTokenizer, DataConfig
from memray.errors import ConfigError
from memray.model import ModelConfig
from memray.optim import OptimConfig


@dataclass(kw_only=True)
class TrainerConfig:
    steps: int = 20
    batch_size: int = 16  # sequences per step
    precision: Literal["fp32", "bf16"] = "fp32"
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    keep_last: int = 2  # committed checkpoints kept (0: all)
    eval_facts: int = 0  # at the end, exact-match recall on up to this many training facts
    threads: int | None = None  # torch intra-op threads; None: torch's default

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "keep_last", "eval_facts"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")


@dataclass(kw_only=True)
class RunConfig:
    name: str = "run"
    seed: int = 0
    run_dir: str | None = None  # None: runs/<name>-<timestamp>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self):
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError("data.seq_len", f"{self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.model.vocab_size < ByteTokenizer.vocab_size:
            raise ConfigError("model.vocab_size", f"must be >= {ByteTokenizer.vocab_size} for the byte tokenizer")


def load_run_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    return load_config(RunConfig, name_or_path, overrides)
