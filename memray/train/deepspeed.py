"""DeepSpeed ZeRO for the dense parameters: the only module of memray that imports deepspeed.

:class:`DeepSpeedDense` is the :class:`memray.train.dense.DenseTraining` of N ranks. The engine
wraps the transformer *without* its value pools (they are sharded tables given to the model from
outside, see ``Transformer(pools=...)``): inside the engine ZeRO-3 would partition a pool and
stage 0 would all-reduce its gradient, while a pool must stay where its rows live and be updated
row-sparsely. The dense optimizer is a client ``torch.optim.AdamW`` (DeepSpeed's own optimizers
compile C++ ops first), with memray's decay groups and lr schedule.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import nn

from memray.kernels.cpu_ext import this_interpreters_ninja
from memray.model import Transformer
from memray.optim import build_dense_optimizer, grad_norm

from .config import RunConfig
from .dense import DenseTraining, summed_token_loss


def prepare_environment() -> None:
    """DeepSpeed picks its accelerator on import: CPU unless a GPU is present."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def prebuild() -> None:
    """Build the shared-memory comm op DeepSpeed compiles on its first init (CPU), once."""
    prepare_environment()
    if os.environ["DS_ACCELERATOR"] == "cpu":
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        # the same ninja as every other memray process, or one of them rebuilds the op (~30 s)
        with this_interpreters_ninja():
            ShareMemCommBuilder().load(verbose=False)


class LossModule(nn.Module):
    """What the engine runs: ``forward(inputs, targets) -> summed token loss`` of the transformer
    (pools excluded from its parameters), so ZeRO-3 gathers parameters inside the engine call."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return summed_token_loss(self.model(inputs), targets)


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

    wrapper = LossModule(model)
    optimizer = build_dense_optimizer(list(wrapper.named_parameters()), config.optim)
    bf16 = config.train.precision == "bf16" and torch.cuda.is_available()
    if config.distributed.zero_stage == 3 and model.head is None:
        # the tied output projection reads the embedding outside the embedding's own forward
        deepspeed.zero.register_external_parameter(model, model.embed.weight)
    # DeepSpeed prints op-build messages on stdout, which carries a command's result, and a
    # failing run's one-line error must stay one line: they are dropped (warnings still log)
    # (the comm op's build, if the cache lacks it, uses the same ninja as prebuild())
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), this_interpreters_ninja():
        engine, optimizer, _, _ = deepspeed.initialize(
            model=wrapper, optimizer=optimizer, config=ds_config(config, micro_batch, world_size, bf16)
        )
    # ZeRO calls a collective that torch renamed; the warning says nothing to a user of memray
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor` is deprecated", category=FutureWarning)
    return engine


class DeepSpeedDense(DenseTraining):
    """Dense parameters in a DeepSpeed engine (ZeRO stage from the config)."""

    def __init__(self, model: Transformer, config: RunConfig, micro_batch: int, world_size: int, rows: int):
        """``micro_batch``: the most rows any rank holds; ``rows``: this rank's (the restore's
        idle steps run on that many sequences)."""
        self.engine = build_engine(model, config, micro_batch, world_size)
        self._sample_shape = (rows, config.data.seq_len)

    def loss_sum(self, inputs, targets):
        return self.engine(inputs, targets)

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self, lr: float) -> float | None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        norm = None
        if self.engine.zero_optimization_stage() == 0:
            # stage 0 holds every averaged gradient on every rank and reports no norm itself
            norm = grad_norm(list(self.engine.module.parameters()))
        self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return consolidated_state_dict(self.engine)

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        return full_adam_moments(self.engine)

    def restore(self, weights, moments, step):
        device = next(self.engine.module.parameters()).device
        tokens = torch.zeros(self._sample_shape, dtype=torch.long, device=device)
        restore(self.engine, weights, moments, step, (tokens, tokens))


def consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """The transformer's full dense weights on every rank (ZeRO-3 gathers its partitions)."""
    import deepspeed

    module = engine.module.model
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _named(engine):
    return list(engine.module.model.named_parameters())


def _link_optimizer_state(engine) -> None:
    """ZeRO-1/2 link each parameter to its slice of the optimizer state once, after the first
    step of the first parameter group, when the other groups have no state yet (DeepSpeed
    0.19.8: ``stage_1_and_2`` and ``bf16_optimizer`` alike); linking again once every group has
    state makes every slice reachable to ``safe_get_full_optimizer_state``. DeepSpeed offers no
    public call for this: it is the one place memray uses a private member of DeepSpeed."""
    if engine.zero_optimization_stage() in (1, 2):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def full_adam_moments(engine) -> dict[str, torch.Tensor]:
    """Every dense parameter's whole ``exp_avg``/``exp_avg_sq`` on every rank (collective under
    ZeRO: partitions are assembled), keyed ``<moment>.<parameter name>``: independent of the
    world size and ZeRO stage that saved them."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if _has_state(engine):
        _link_optimizer_state(engine)
    out = {}
    stage = engine.zero_optimization_stage()
    for name, p in _named(engine):
        shape = p.ds_shape if stage == 3 else p.shape  # ZeRO-3 leaves an empty placeholder in p
        for key in ("exp_avg", "exp_avg_sq"):
            if stage == 0:
                value = engine.optimizer.state.get(p, {}).get(key)
            else:
                value = safe_get_full_optimizer_state(p, key) if _has_state(engine) else None
            out[f"{key}.{name}"] = (
                torch.zeros(shape) if value is None else value.detach().float().cpu().clone().view(shape)
            )
    return out


def _has_state(engine) -> bool:
    """Whether the dense optimizer has stepped. Asked of the state itself: ZeRO-3 hands the base
    optimizer its flat fp32 partitions only for the length of a step (its ``param_groups`` are
    empty in between), so looking the groups' parameters up finds nothing."""
    base = engine.optimizer.optimizer if engine.zero_optimization_stage() else engine.optimizer
    return any(bool(state) for state in base.state.values())


def _local_partition(p, full: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a whole fp32 tensor of parameter ``p``: partitions are
    equal slices of the flattened tensor padded to a multiple of the group size. (DeepSpeed
    0.19.8's ``safe_set_full_*`` for ZeRO-3 slices the unpadded tensor, which fails on the last
    rank when the size does not divide; the ``safe_set_local_*`` calls take the slice.)"""
    from deepspeed import comm

    size = p.ds_tensor.numel()
    rank = comm.get_rank(group=p.ds_process_group)
    flat = full.detach().float().flatten()[rank * size : (rank + 1) * size]
    return torch.nn.functional.pad(flat, (0, size - flat.numel()))


def _idle_step(engine, sample) -> None:
    """A forward, backward and optimizer step that changes no weight: loss x 0, every lr 0."""
    groups = engine.optimizer.param_groups
    lrs = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = 0.0
    engine.backward(engine(*sample) * 0.0)
    engine.step()
    for g, lr in zip(groups, lrs):
        g["lr"] = lr
    _link_optimizer_state(engine)


def restore(engine, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], step: int, sample) -> None:
    """Load dense weights and Adam moments saved by any world size and stage (collective).

    Only DeepSpeed's own paths touch its partitions: an idle step (every lr 0, loss x 0, on
    ``sample`` = (inputs, targets)) creates the optimizer state; the saved weights go into the
    fp32 master partitions (ZeRO) or the parameters (stage 0); a second idle step lets DeepSpeed
    copy the masters into the model's parameters; then the saved moments and step count replace
    what the idle steps made of them."""
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    stage = engine.zero_optimization_stage()
    named = _named(engine)
    _idle_step(engine, sample)
    for name, p in named:
        if stage == 0:
            p.data.copy_(weights[name].to(p.dtype))
        elif stage == 3:  # see _local_partition
            safe_set_local_fp32_param(p, _local_partition(p, weights[name]))
        else:
            safe_set_full_fp32_param(p, weights[name].float())
    _idle_step(engine, sample)
    base = engine.optimizer.optimizer if stage else engine.optimizer
    for name, p in named:
        for key in ("exp_avg", "exp_avg_sq"):
            value = moments[f"{key}.{name}"]
            if stage == 0:
                base.state[p][key].copy_(value)
            elif stage == 3:
                safe_set_local_optimizer_state(p, _local_partition(p, value), key)
            else:
                safe_set_full_optimizer_state(p, value.float(), key)
    for state in base.state.values():
        if "step" in state:
            state["step"] = torch.tensor(float(step), dtype=torch.float32) if torch.is_tensor(state["step"]) else step
