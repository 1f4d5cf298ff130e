"""The dense parameters' training: the loss, and one interface for the two ways they train.

Everything but the value pools (attention, FFNs, embeddings, the memory layers' keys, query and
output projections) is trained by a :class:`DenseTraining`: :class:`LocalDense` on one process
(a torch AdamW), :class:`memray.train.deepspeed.DeepSpeedDense` on N ranks (a DeepSpeed ZeRO
engine). The trainer and the checkpointer depend only on this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

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

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's dense weights, whole (collective on N ranks)."""

    @abstractmethod
    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """``exp_avg.<param>`` and ``exp_avg_sq.<param>`` of every dense parameter, whole (zeros
        before the first step): independent of the world size and ZeRO stage (collective)."""

    @abstractmethod
    def restore(self, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], step: int) -> None:
        """Load what :meth:`state_dict` and :meth:`optimizer_state` returned, saved by any world
        size, as of optimizer step ``step`` (collective)."""


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

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith("pools.")}

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.named:
            state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{key}.{name}"] = (
                    state[key].detach().clone() if key in state else torch.zeros_like(p, dtype=torch.float32)
                )
        return out

    def restore(self, weights, moments, step):
        self.model.load_state_dict(weights, strict=False)
        # torch Adam(W) state as its own first step would create it, then the saved values
        for name, p in self.trainable:
            state = self.optimizer.state[p]
            state["step"] = torch.tensor(float(step), dtype=torch.float32)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = moments[f"{key}.{name}"].to(device=p.device, dtype=p.dtype).clone()
