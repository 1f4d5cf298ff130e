"""DeepSpeed ZeRO for the dense parameters: the only module of memray that imports deepspeed.

:class:`DeepSpeedDense` is the :class:`memray.train.dense.DenseTraining` of N ranks. The engine
wraps the transformer *without* its value pools (they are sharded tables given to the model from
outside, see ``Transformer(pools=...)``): inside the engine ZeRO-3 would partition a pool and
stage 0 would all-reduce its gradient, while a pool must stay where its rows live and be updated
row-sparsely. The dense optimizer is a client ``torch.optim.AdamW`` (DeepSpeed's own optimizers
compile C++ ops first), with memray's decay groups and lr schedule. ``train.precision: bf16``
runs DeepSpeed's bf16 engine on any device (its CPU accelerator runs it too): bf16 parameters,
fp32 masters in the optimizer.

Checkpoints hold the fp32 masters and Adam moments whole, assembled one parameter at a time,
and load onto any world size and stage. Public DeepSpeed calls do most of it
(``safe_get_full_fp32_param``, ``safe_get_full_optimizer_state``, the ``safe_set_*`` calls,
``zero.GatheredParameters``, the engine's forward, backward and step). What still depends on
DeepSpeed 0.19.8's internals, each in one place:

* ZeRO-1/2 link parameters to their optimizer-state slices only after the first step of the
  first parameter group: :func:`_link_optimizer_state` links again (``_hp_optimizer_states_linked``,
  ``_lazy_init_hp_params_optimizer_state``: private).
* Under ZeRO the client optimizer's state exists only after DeepSpeed's first step; no public
  call creates it, so a restore takes one step that changes nothing (:func:`_create_optimizer_state`:
  every lr 0, the loss x 0, one token per rank, value-pool lookups included).
* Stage 0 in bf16 wraps the client optimizer in ``FP16_UnfusedOptimizer``, whose masters are its
  ``fp32_groups`` beside ``fp16_groups`` (attributes, no accessor); it also steps once with zero
  gradients when built, so its moments' step count runs one ahead of the run's
  (:meth:`DeepSpeedDense.optimizer_steps` saves the count itself).
* ZeRO-3's ``safe_set_full_*`` fail when the group size does not divide a tensor:
  :func:`_local_partition` pads as ZeRO-3 does and the ``safe_set_local_*`` calls take the slice.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import nn

from memray.checkpoint.sharded import DenseState
from memray.kernels.cpu_ext import this_interpreters_ninja
from memray.model import Transformer
from memray.optim import build_dense_optimizer, grad_norm

from .config import RunConfig
from .dense import MOMENTS, DenseTraining, adam_state, moment_specs, summed_token_loss


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
    # the bf16 engine on any device: DeepSpeed's CPU accelerator runs it, so the path a GPU
    # takes is the one the CPU tests take
    bf16 = config.train.precision == "bf16"
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

    def __init__(self, model: Transformer, config: RunConfig, micro_batch: int, world_size: int):
        """``micro_batch``: the most rows any rank holds."""
        # what a checkpoint holds, named and shaped before ZeRO-3 leaves placeholders in the
        # parameters and bf16 casts them: every dense tensor in fp32 (the masters), and buffers
        self._specs = {
            k: (torch.float32 if v.is_floating_point() else v.dtype, tuple(v.shape))
            for k, v in model.state_dict().items()
            if not k.startswith("pools.")
        }
        self._shapes = {name: tuple(p.shape) for name, p in model.named_dense_parameters()}
        self.engine = build_engine(model, config, micro_batch, world_size)
        self.stage = self.engine.zero_optimization_stage()
        self.named = list(self.engine.module.model.named_parameters())
        self.bf16 = self.engine.bfloat16_enabled()
        # ZeRO stage 0 in bf16: DeepSpeed's FP16_UnfusedOptimizer keeps an fp32 master per bf16
        # parameter (its fp32_groups beside fp16_groups); the client AdamW steps the masters
        self._masters = {}
        if self.stage == 0 and self.bf16:
            wrapper = self.engine.optimizer
            for lp_group, hp_group in zip(wrapper.fp16_groups, wrapper.fp32_groups):
                self._masters.update({id(lp): hp for lp, hp in zip(lp_group, hp_group)})

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def loss_sum(self, inputs, targets):
        return self.engine(inputs, targets)

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self, lr: float) -> float | None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        norm = None
        if self.stage == 0:
            # stage 0 holds every averaged gradient on every rank and reports no norm itself
            norm = grad_norm(list(self.engine.module.parameters()))
        self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    # -- checkpoints: the fp32 masters and moments, whole, one parameter at a time ------------
    def _base_state(self) -> dict:
        """The client AdamW's state (keyed by whatever tensors DeepSpeed hands it)."""
        return (self.engine.optimizer.optimizer if self.stage else self.engine.optimizer).state

    def _stepped(self) -> bool:
        """Whether the dense optimizer has stepped. Asked of the state itself: ZeRO-3 hands the
        base optimizer its flat fp32 partitions only for the length of a step (its
        ``param_groups`` are empty in between). (The stage-0 bf16 wrapper steps once with zero
        gradients when it is built: its moments are zeros until the first real step.)"""
        return any("exp_avg" in state for state in self._base_state().values())

    def optimizer_steps(self) -> int | None:
        steps = [int(state["step"]) for state in self._base_state().values() if "step" in state]
        return max(steps) if steps else None

    def _stage0_master(self, p) -> torch.Tensor:
        """At stage 0, the tensor the client AdamW steps for parameter ``p``: the bf16 wrapper's
        fp32 copy, or ``p`` itself in fp32."""
        return self._masters.get(id(p), p)

    def _master(self, p) -> torch.Tensor:
        """Parameter ``p``'s fp32 master, whole (collective under ZeRO)."""
        from deepspeed.utils import safe_get_full_fp32_param

        if self.stage == 0:
            return self._stage0_master(p).detach()
        return safe_get_full_fp32_param(p)

    def _moment(self, p, key: str) -> torch.Tensor | None:
        """``exp_avg``/``exp_avg_sq`` of parameter ``p``, whole (collective under ZeRO), or None."""
        from deepspeed.utils import safe_get_full_optimizer_state

        if self.stage == 0:
            return self._base_state().get(self._stage0_master(p), {}).get(key)
        return safe_get_full_optimizer_state(p, key)

    def checkpoint_state(self) -> DenseState:
        main = self.engine.global_rank == 0
        params = dict(self.named)
        specs = {"weights": self._specs, "optimizer": moment_specs(self.named, self._shapes)}

        def tensors():
            stepped = self._stepped()
            if stepped:
                _link_optimizer_state(self.engine)
            buffers = dict(self.engine.module.model.named_buffers())
            for name, (dtype, shape) in self._specs.items():
                value = self._master(params[name]) if name in params else buffers[name]
                yield "weights", name, value.detach().to("cpu", dtype).reshape(shape) if main else None
            for name, p in self.named:
                for key in MOMENTS:
                    value = self._moment(p, key) if stepped else None
                    shape = self._shapes[name]
                    if main:
                        value = torch.zeros(shape) if value is None else value.detach().to("cpu", torch.float32)
                    yield "optimizer", f"{key}.{name}", value.reshape(shape) if main else None

        return DenseState(specs, tensors)

    def restore(self, weights, moments, steps):
        restore(self, weights, moments, steps)


def _link_optimizer_state(engine) -> None:
    """ZeRO-1/2 link each parameter to its slice of the optimizer state once, after the first
    step of the first parameter group, when the other groups have no state yet (DeepSpeed
    0.19.8: ``stage_1_and_2``); linking again once every group has state makes every slice
    reachable to ``safe_get_full_optimizer_state``. DeepSpeed offers no public call for this:
    it is the one place memray uses a private member of DeepSpeed."""
    if engine.zero_optimization_stage() in (1, 2):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


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


def _create_optimizer_state(engine) -> None:
    """One step that changes no weight (every lr 0, the loss x 0, one token per rank): under
    ZeRO, DeepSpeed creates the client optimizer's state for its flat partitions in its first
    step and offers no public call that does it otherwise."""
    groups = engine.optimizer.param_groups
    lrs = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = 0.0
    tokens = torch.zeros(1, 1, dtype=torch.long, device=next(engine.module.parameters()).device)
    with torch.enable_grad():
        engine.backward(engine(tokens, tokens) * 0.0)
    engine.step()
    for g, lr in zip(groups, lrs):
        g["lr"] = lr
    _link_optimizer_state(engine)


@torch.no_grad()
def restore(dense: DeepSpeedDense, weights, moments, steps: int) -> None:
    """Load dense weights (fp32 masters) and Adam moments saved by any world size and stage
    (collective), one parameter at a time.

    Stage 0: the masters (the parameters themselves in fp32; the wrapper's fp32 copies in bf16)
    and the client AdamW's state are set directly, and each bf16 parameter is its master rounded,
    as after a step. ZeRO 1-3: once DeepSpeed has made the optimizer state
    (:func:`_create_optimizer_state`), the masters and moments go into the partitions through
    DeepSpeed's ``safe_set_*`` calls, and the model's parameters are set to the masters (ZeRO-3:
    inside ``GatheredParameters``, which re-partitions them)."""
    import deepspeed
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    engine, stage = dense.engine, dense.stage
    if stage == 0:
        base = dense._base_state()
        for name, p in dense.named:
            master = dense._stage0_master(p)
            master.copy_(weights[name])
            if master is not p:
                p.copy_(master)
            base[master] = adam_state(steps, *(moments[f"{key}.{name}"].to(master).clone() for key in MOMENTS))
        return
    _create_optimizer_state(engine)
    for name, p in dense.named:
        value = weights[name]
        if stage == 3:
            safe_set_local_fp32_param(p, _local_partition(p, value))
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if engine.global_rank == 0:
                    p.copy_(value)
        else:
            safe_set_full_fp32_param(p, value.float())
            p.copy_(value)
        for key in MOMENTS:
            moment = moments[f"{key}.{name}"]
            if stage == 3:
                safe_set_local_optimizer_state(p, _local_partition(p, moment), key)
            else:
                safe_set_full_optimizer_state(p, moment.float(), key)
    for state in dense._base_state().values():
        if "step" in state:
            state["step"] = torch.tensor(float(steps), dtype=torch.float32) if torch.is_tensor(state["step"]) else steps
