"""The dense parameters' training: the loss, and one interface for the two ways they train.

Everything but the value pools (attention, FFNs, embeddings, the memory layers' keys, query and
output projections) is trained by a :class:`DenseTraining`: :class:`LocalDense` on one process
(a torch AdamW), :class:`memray.train.deepspeed.DeepSpeedDense` on N ranks (a DeepSpeed ZeRO
engine). The trainer and the checkpointer depend only on this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from memray.checkpoint.sharded import DenseState
from memray.data.packing import IGNORE_INDEX
from memray.model import Transformer
from memray.optim import OptimConfig, build_dense_optimizer, clip_grads


def summed_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss: cross-entropy summed over every target token (padding ignored);
    the trainer divides by the global batch's target count."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


class DenseTraining(ABC):
    """Forward, backward and optimizer step of the dense parameters, and their state."""

    @abstractmethod
    def loss_sum(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The model's :func:`summed_token_loss` on this rank's rows."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self, lr: float) -> float | None:
        """Clip, step at ``lr`` and clear the gradients; the gradient norm before clipping."""

    @property
    @abstractmethod
    def compute_dtype(self) -> torch.dtype:
        """The dtype the dense parameters are held and computed in (their masters are fp32)."""

    @abstractmethod
    def checkpoint_state(self) -> DenseState:
        """What a checkpoint holds of the dense parameters, whole and the same on any world size
        and ZeRO stage: ``weights`` (every dense parameter as its fp32 master, also where the
        model computes in bf16, and any buffer) and ``optimizer`` (``exp_avg.<param>`` and
        ``exp_avg_sq.<param>``, fp32; zeros before the first step), one tensor at a time
        (collective on N ranks)."""

    @abstractmethod
    def optimizer_steps(self) -> int | None:
        """The step count of the Adam moments' bias correction (None before the first step)."""

    @abstractmethod
    def restore(self, weights: Mapping[str, torch.Tensor], moments: Mapping[str, torch.Tensor], steps: int) -> None:
        """Load what :meth:`checkpoint_state` saved on any world size (tensors are read from the
        mappings one at a time), the moments at Adam step count ``steps`` (collective)."""


def moment_specs(named: list[tuple[str, torch.Tensor]], shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """The ``optimizer`` part of :meth:`DenseTraining.checkpoint_state`: fp32 ``exp_avg`` and
    ``exp_avg_sq`` of each parameter (``shapes``: where a parameter's own shape is not its real
    one, e.g. ZeRO-3's placeholders)."""
    return {
        f"{key}.{name}": (torch.float32, tuple((shapes or {}).get(name, p.shape)))
        for name, p in named
        for key in MOMENTS
    }


MOMENTS = ("exp_avg", "exp_avg_sq")


def adam_state(step: int, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> dict:
    """A torch Adam(W) state entry, as its own steps make it."""
    return {"step": torch.tensor(float(step), dtype=torch.float32), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class LocalDense(DenseTraining):
    """Dense parameters on one process: a torch AdamW with decay groups over the parameters that
    train (``requires_grad``; none: no optimizer, and a step does nothing).

    ``world > 1``: the model is replicated on ``world`` ranks that each hold a part of the batch
    (the finetuning modes that train few dense parameters, or none); each step first averages
    the gradients over the ranks, in one all-reduce, so every replica takes the same step."""

    def __init__(self, model: Transformer, config: OptimConfig, world: int = 1):
        self.model, self.grad_clip, self.world = model, config.grad_clip, world
        self.named = model.named_dense_parameters()
        self.trainable = [(name, p) for name, p in self.named if p.requires_grad]
        self.optimizer = build_dense_optimizer(self.trainable, config) if self.trainable else None

    def loss_sum(self, inputs, targets):
        return summed_token_loss(self.model(inputs), targets)

    def backward(self, loss):
        loss.backward()

    def _average_gradients(self) -> None:
        from memray.distributed import collectives

        params = [p for _, p in self.trainable]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        flat = collectives.sum_over(flat).div_(self.world)
        for p, part in zip(params, flat.split([p.numel() for p in params])):
            p.grad = part.view_as(p).clone()

    def step(self, lr: float) -> float | None:
        if self.optimizer is None:
            return None
        if self.world > 1:
            self._average_gradients()
        norm = clip_grads([p for _, p in self.trainable], self.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(iter(self.model.dense_parameters())).dtype

    def checkpoint_state(self) -> DenseState:
        weights = {k: v.detach() for k, v in self.model.state_dict().items() if not k.startswith("pools.")}
        moments = {}
        for name, p in self.named:
            state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
            for key in MOMENTS:
                moments[f"{key}.{name}"] = state[key].detach().float() if key in state else torch.zeros_like(p).float()
        return DenseState.of(weights, moments)

    def optimizer_steps(self) -> int | None:
        states = self.optimizer.state.values() if self.optimizer is not None else ()
        return next((int(state["step"]) for state in states if "step" in state), None)

    def restore(self, weights, moments, steps):
        load_dense_weights(self.model, weights)
        # torch Adam(W) state as its own steps would have made it, then the saved values
        for name, p in self.trainable:
            self.optimizer.state[p] = adam_state(
                steps, *(moments[f"{key}.{name}"].to(device=p.device, dtype=p.dtype).clone() for key in MOMENTS)
            )


@torch.no_grad()
def load_dense_weights(model: Transformer, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` (any of the model's dense parameters and buffers) into ``model``, one
    tensor at a time (a checkpoint's file is read as each is copied)."""
    state = model.state_dict()
    for name in weights:
        state[name].copy_(weights[name])
