"""DeepSpeed ZeRO for the dense parameters: the only module of memray that imports deepspeed.

The engine wraps the transformer *without* its value pools (they are sharded tables given to the
model from outside, see ``Transformer(pools=...)``): inside the engine ZeRO-3 would partition a
pool and stage 0 would all-reduce its gradient, while a pool must stay where its rows live and
be updated row-sparsely. The dense optimizer is a client ``torch.optim.AdamW`` (DeepSpeed's own
optimizers compile C++ ops first), with memray's decay groups and lr schedule.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch
from torch import nn

from memray.model import Transformer
from memray.optim import dense_param_groups

from .config import RunConfig


def prepare_environment() -> None:
    """DeepSpeed picks its accelerator on import: CPU unless a GPU is present."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def prebuild() -> None:
    """Build the shared-memory comm op DeepSpeed compiles on its first init (CPU), once."""
    prepare_environment()
    if os.environ["DS_ACCELERATOR"] == "cpu":
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        ShareMemCommBuilder().load(verbose=False)


class LossModule(nn.Module):
    """What the engine runs: ``forward(inputs, targets) -> summed token loss`` of the transformer
    (pools excluded from its parameters), so ZeRO-3 gathers parameters inside the engine call."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        logits = self.model(inputs)
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="sum")


def ds_config(config: RunConfig, micro_batch: int, world_size: int, bf16: bool) -> dict:
    o = config.optim
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "zero_optimization": {"stage": config.distributed.zero_stage, "overlap_comm": False},
        "gradient_clipping": o.grad_clip or 0.0,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def build_engine(model: Transformer, config: RunConfig, micro_batch: int, world_size: int):
    """The DeepSpeed engine over ``model``'s dense parameters and its client AdamW."""
    prepare_environment()
    import deepspeed

    o = config.optim
    wrapper = LossModule(model)
    named = [(n, p) for n, p in wrapper.named_parameters()]
    optimizer = torch.optim.AdamW(dense_param_groups(named, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    bf16 = config.train.precision == "bf16" and torch.cuda.is_available()
    if config.distributed.zero_stage == 3 and model.head is None:
        # the tied output projection reads the embedding outside the embedding's own forward
        deepspeed.zero.register_external_parameter(model, model.embed.weight)
    # DeepSpeed prints build messages on stdout, which carries a command's result: keep it clean
    with contextlib.redirect_stdout(sys.stderr):
        engine, optimizer, _, _ = deepspeed.initialize(
            model=wrapper, optimizer=optimizer, config=ds_config(config, micro_batch, world_size, bf16)
        )
    # ZeRO calls a collective that torch renamed; the warning says nothing to a user of memray
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor` is deprecated", category=FutureWarning)
    return engine


def consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """The transformer's full dense weights on every rank (ZeRO-3 gathers its partitions)."""
    import deepspeed

    module = engine.module.model
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
