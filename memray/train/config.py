"""The resolved configuration of a training run: one object, one YAML file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from memray.config import load_config
from memray.data import ByteTokenizer, DataConfig
from memray.distributed.context import ParallelDims
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
    async_checkpoint: bool = False  # write periodic checkpoints from snapshots while training goes on
    eval_facts: int = 0  # at the end, exact-match recall on up to this many training facts
    threads: int | None = None  # torch intra-op threads; None: torch's default
    # TensorBoard event files of the logged metrics beside metrics.jsonl (`tensorboard --logdir RUN`)
    tensorboard: bool = True
    # one process (distributed.workers: 0) trains here; auto: a CUDA GPU when there is one. N ranks
    # train on their process group's device (a GPU per rank under NCCL).
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "keep_last", "eval_facts"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")

    def torch_device(self) -> torch.device:
        """The device a single-process run trains on, where it runs (a config written on a machine
        without a GPU may train on one)."""
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device", "cuda was asked for, but torch sees no CUDA GPU here")
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(auto if self.device == "auto" else self.device)


BACKWARD_NEEDS_ONE_PROCESS = (
    "backward runs on one process (--workers 0); {workers} workers shard the pools, whose rows "
    "get their gradients from the all-to-all after the lookup's backward"
)


@dataclass(kw_only=True)
class DistributedConfig:
    """How many processes train, and how (``memray train --workers N`` sets ``workers``)."""

    workers: int = 2  # 0: one process, no Ray, no process group; N >= 1: N ranks, DeepSpeed + sharded pools
    # ray: Ray Train workers (an embedded local Ray unless --address); processes: local processes, no Ray
    launcher: Literal["ray", "processes"] = "ray"
    zero_stage: int = 1  # DeepSpeed ZeRO stage for the dense parameters (0-3)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with GPUs, else gloo
    use_gpu: bool = False  # ray: one GPU per worker
    cpus_per_worker: float = 1.0  # ray: CPUs reserved per worker
    max_failures: int = 0  # ray: restarts of the workers from the newest committed checkpoint

    def __post_init__(self):
        if self.workers < 0:
            raise ConfigError("workers", f"must be >= 0, got {self.workers}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.max_failures < 0:
            raise ConfigError("max_failures", f"must be >= 0, got {self.max_failures}")
        if self.max_failures and self.launcher != "ray":
            raise ConfigError("max_failures", "restarts need launcher: ray")
        if self.cpus_per_worker <= 0:
            raise ConfigError("cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")


FINETUNE_MODES = ("full", "lora", "memory", "sparse-memory")


@dataclass(kw_only=True)
class FinetuneConfig:
    """Training that starts from another run's weights (``memray finetune``), and what trains.

    ``mode``: off (ordinary training); full (every parameter); lora (low-rank adapters of rank
    ``model.lora_rank`` on the attention and SwiGLU projections, nothing else); memory (the value
    pools, and the memory layers' sub-keys with ``train_keys``); sparse-memory (per step, only the
    ``slots_per_batch`` rows of each pool that the batch reads most relative to the base
    checkpoint's usage: TF-IDF, :mod:`memray.train.finetune`)."""

    mode: Literal["off", "full", "lora", "memory", "sparse-memory"] = "off"
    base: str | None = None  # the checkpoint whose weights (and usage counts) the run starts from
    # sparse-memory: rows updated per pool and step (t); 3000 won on the demo's 16,384-slot pool,
    # whose batches read ~11,400 distinct rows (benchmarks/continual.py)
    slots_per_batch: int = 3000
    train_keys: bool = False  # memory: the sub-keys train too

    def __post_init__(self):
        if self.mode not in ("off", *FINETUNE_MODES):
            raise ConfigError("mode", f"{self.mode!r} is not one of off, {', '.join(FINETUNE_MODES)}")
        if self.mode != "off" and not self.base:
            raise ConfigError("base", f"mode {self.mode} starts from a checkpoint: set finetune.base")
        if self.slots_per_batch < 1:
            raise ConfigError("slots_per_batch", f"must be >= 1, got {self.slots_per_batch}")
        if self.train_keys and self.mode != "memory":
            raise ConfigError("train_keys", f"applies to mode memory, not {self.mode}")


@dataclass(kw_only=True)
class RunConfig:
    name: str = "run"
    seed: int = 0
    run_dir: str | None = None  # None: runs/<name>-<timestamp>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self):
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError("data.seq_len", f"{self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        # ingested shards carry their own tokenizer, checked against the model when they are opened
        if self.data.source != "arrow" and self.model.vocab_size < ByteTokenizer.vocab_size:
            raise ConfigError("model.vocab_size", f"must be >= {ByteTokenizer.vocab_size} for the byte tokenizer")
        if self.optim.value_update == "backward":
            for pool, layers in self.model.memory_pools.items():
                if len(layers) > 1:
                    raise ConfigError(
                        "optim.value_update",
                        f"backward needs each pool read by one layer; pool '{pool}' is read by blocks {layers}",
                    )

        f = self.finetune
        if f.mode in ("memory", "sparse-memory") and not self.model.memory_layers:
            raise ConfigError("finetune.mode", f"{f.mode} trains memory layers; the model has none")
        if f.mode == "sparse-memory":
            if not self.optim.sparse_values:
                raise ConfigError(
                    "optim.value_optimizer", "sparse-memory finetuning needs a row-sparse value optimizer, not adamw"
                )
            if self.optim.value_update == "backward":
                raise ConfigError(
                    "optim.value_update",
                    "sparse-memory finetuning ranks the rows a whole batch read before any is updated: use step",
                )
        if f.mode == "lora" and not self.model.lora_rank:
            raise ConfigError("model.lora_rank", "lora finetuning needs adapters: set model.lora_rank >= 1")

    def with_absolute_paths(self) -> RunConfig:
        """This config with ``data.path`` made absolute against the current directory: for
        workers whose working directory is not the caller's (Ray workers and jobs)."""
        import copy
        from pathlib import Path

        out = copy.deepcopy(self)
        if out.data.path:
            out.data.path = str(Path(out.data.path).expanduser().resolve())
        if out.finetune.base:
            out.finetune.base = str(Path(out.finetune.base).expanduser().resolve())
        return out

    def check_world(self) -> None:
        """A run on ``distributed.workers`` ranks must give every rank rows of the batch and of
        every value pool: checked by the launchers before any process starts."""
        workers = self.distributed.workers
        if workers < 1:
            return
        if self.optim.value_update == "backward":
            raise ConfigError("optim.value_update", BACKWARD_NEEDS_ONE_PROCESS.format(workers=workers))
        dims = ParallelDims(workers, self.model.memory.parallel_size)
        if self.model.memory_layers:
            dims.check_table(
                self.model.memory.num_slots, self.model.memory.v_dim or self.model.dim, self.model.memory.layout
            )
        if self.train.batch_size < workers:
            raise ConfigError(
                "train.batch_size", f"{self.train.batch_size} sequences cannot be split over {workers} workers"
            )


def load_run_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    return load_config(RunConfig, name_or_path, overrides)
