"""The training loop, on one process or on the ranks of a process group.

One step: forward and loss (fp32 or bf16 autocast), backward, gradient clipping of the dense
parameters and, separately, of the value pools, a dense step and a value-pool step (row-sparse
unless the paper's dense AdamW is chosen), then the schedules.

The trainer orchestrates and delegates: the value pools come from :func:`memray.model.build_pools`
(unsharded :class:`memray.model.ValueTable` on one process, ``context=None``;
:class:`memray.distributed.ShardedValueTable` shards on N ranks, ``context`` a
:class:`memray.distributed.DistContext`) and are given to the model; the dense parameters train
in a :class:`memray.train.dense.DenseTraining` (a torch AdamW on one process, a DeepSpeed ZeRO
engine on N ranks); a :class:`Checkpointer` saves and restores; a :class:`MetricsProcessor`
measures; a :class:`RunDirectory` writes. Every rank builds the same global batch and takes its
balanced share of the sequences; its loss is its tokens' summed loss over the global batch's
token count, so the gradients (averaged over ranks by DeepSpeed for dense parameters, summed
over ranks by the lookups for the pools, then divided by N) are those of the single-process run
on the same global batch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from memray.checkpoint.model import load_trained_model
from memray.config import dump_yaml
from memray.data import PackedBatches, load_documents
from memray.data.packing import IGNORE_INDEX, Position
from memray.distributed import ShardedValueTable, collectives
from memray.distributed.plan import balanced_ranges
from memray.errors import ConfigError
from memray.evaluate import fact_recall
from memray.model import Transformer, build_pools, count_parameters
from memray.optim import build_value_optimizer, clip_grads, lr_factor

from .checkpointer import Checkpointer
from .config import BACKWARD_NEEDS_ONE_PROCESS, RunConfig
from .deepspeed import DeepSpeedDense
from .dense import LocalDense
from .finetune import Finetune, lr_note
from .metrics import MetricsProcessor
from .rundir import RunDirectory, resolve_run_dir


class Trainer:
    def __init__(self, config: RunConfig, run_dir: str | Path | None = None, progress: bool = True, context=None):
        """``context``: this rank's :class:`memray.distributed.DistContext`; None for one process."""
        self.config = config
        self.context = context
        self.rank, self.world = (context.rank, context.world_size) if context else (0, 1)
        self.device = context.device if context else config.train.torch_device()
        self.run_dir = resolve_run_dir(config, run_dir)
        self.progress = progress and self.rank == 0
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        torch.manual_seed(config.seed)
        documents, self.facts, self.tokenizer = load_documents(config.data)
        if config.model.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(
                "model.vocab_size",
                f"{config.model.vocab_size} is smaller than the {self.tokenizer.name} "
                f"tokenizer's {self.tokenizer.vocab_size} ids",
            )
        # the global batch is the same on any number of ranks; each rank builds only its rows of it
        shares = balanced_ranges(config.train.batch_size, self.world)
        self.batches = PackedBatches(
            documents,
            config.data.seq_len,
            config.train.batch_size,
            self.tokenizer.pad_id,
            config.seed,
            rows=slice(*shares[self.rank]),
        )
        o = config.optim
        group = context.memory_group if context else None
        # sums over the ranks holding the other parts of the pools (None: one process holds all)
        self.memory_sum = functools.partial(collectives.sum_over, group=group) if context else None
        if context is None:
            pools = build_pools(config.model, sparse_grad=o.sparse_values, device=self.device)
        else:
            pools = build_pools(
                config.model, ShardedValueTable, group=group, sparse_grad=o.sparse_values, device=self.device
            )
        self.model = Transformer(config.model, device=self.device, pools=pools)
        self.tables = self.model.value_tables()
        # before ZeRO-3 partitions the parameters in place
        dense_shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        # finetuning: the base checkpoint's weights, and what trains (before the optimizers)
        self.finetune = None
        if config.finetune.mode != "off":
            self.finetune = Finetune(config, self.model, self.tables, dense_shapes, self.tokenizer)
        if context is None:
            self.dense = LocalDense(self.model, o)
        elif config.finetune.mode not in ("off", "full"):
            # few dense parameters train, or none: replicas averaging their gradients
            self.dense = LocalDense(self.model, o, world=self.world)
        else:
            self.dense = DeepSpeedDense(self.model, config, max(b - a for a, b in shares), self.world)
        self.value_optimizer = build_value_optimizer(o, self.tables.values(), all_reduce=self.memory_sum)
        # value_update: backward: each pool's lookup updates the rows it read in its backward
        self.backward_updates = []
        if o.value_update == "backward" and self.value_optimizer is not None:
            if context is not None:
                raise ConfigError("optim.value_update", BACKWARD_NEEDS_ONE_PROCESS.format(workers=self.world))
            for table in self.tables.values():
                table.row_update = self.value_optimizer.update_in_backward(table.weight)
                self.backward_updates.append(table.row_update)
        self.step = 0
        self.tokens = 0
        # called on every rank after each committed checkpoint with (path, last logged metrics):
        # the Ray launcher reports checkpoints to Ray Train through it
        self.on_checkpoint = None
        self._last_metrics: dict = {}
        self.resumed_from: Path | None = None  # the checkpoint ``resume`` loaded
        self.run = RunDirectory(self.run_dir, writer=self.rank == 0, echo=not self.progress)
        self.checkpointer = Checkpointer(
            self.run.checkpoints,
            dense=self.dense,
            tables=self.tables,
            value_optimizer=self.value_optimizer,
            group=group,
            rank=self.rank,
            config_yaml=dump_yaml(config),
            tokenizer_path=self.tokenizer.path,
            every=config.train.checkpoint_every,
            keep_last=config.train.keep_last,
            background=config.train.async_checkpoint,
            on_commit=self._committed,
            shapes=dense_shapes,
            attrs={
                "world_size": self.world,
                "layout": config.model.memory.layout if context else "unsharded",
                "zero_stage": config.distributed.zero_stage if context else None,
                # what the dense parameters compute in (the checkpoint holds their fp32 masters)
                "dense_dtype": str(self.dense.compute_dtype).removeprefix("torch."),
            },
        )
        self.metrics = MetricsProcessor(self.tables)

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over all ranks (a copy of it on one process)."""
        return collectives.sum_over(x)

    def _progress(self) -> dict:
        """What a checkpoint records of the run's position besides the step."""
        return {
            "tokens": self.tokens,
            "data_position": {"epoch": self.batches.position.epoch, "batch": self.batches.position.batch},
        }

    def _committed(self, path: Path) -> None:
        self.run.log(f"saved {path}")
        if self.on_checkpoint is not None:
            self.on_checkpoint(path, {k: v for k, v in self._last_metrics.items() if not isinstance(v, list)})

    def save(self) -> Path:
        """A committed checkpoint of the current state (collective)."""
        return self.checkpointer.save(self.step, self._progress(), final=True)

    def resume(self, path: str | Path) -> Path:
        """Continue from a checkpoint of this run's model saved on any number of ranks and either
        layout (collective): weights, optimizer state, usage, step, tokens and data position."""
        self.model.eval()  # the engine's state-creating idle steps must not count usage
        ckpt, attrs = self.checkpointer.load(path)
        self.resumed_from = ckpt
        self.step, self.tokens = attrs["step"], attrs["tokens"]
        self.batches.position = Position(**attrs["data_position"])
        self.metrics.reset_usage()
        return ckpt

    # -- training -----------------------------------------------------------------------------
    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """One optimizer step on a global batch of which ``inputs``/``targets`` are this rank's rows."""
        c = self.config
        factor = lr_factor(self.step, c.train.steps, c.optim.warmup_steps, c.optim.min_lr_ratio)
        if self.value_optimizer is not None and c.optim.value_lr_schedule == "cosine":
            for group in self.value_optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
        num_targets = int(self._sum((targets != IGNORE_INDEX).sum()))  # over the global batch
        device = self.device
        inputs, targets = inputs.to(device), targets.to(device)
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if c.train.precision == "bf16"
            else contextlib.nullcontext()
        )
        if self.finetune is not None:
            self.finetune.begin_step()
        with autocast:
            loss = self.dense.loss_sum(inputs, targets) / max(num_targets, 1)
            # x world: DeepSpeed averages dense gradients over ranks; pools' are divided below
            total = loss * self.world + self.model.aux_loss()
        self.dense.backward(total)
        values = [t.weight for t in self.tables.values()]
        if self.world > 1:
            for p in values:
                if p.grad is not None:
                    (p.grad._values() if p.grad.is_sparse else p.grad).div_(self.world)
        selection = self.finetune.select() if self.finetune is not None else {}
        if self.backward_updates:  # the pools were updated in the backward, which measured their norms
            value_norm = math.sqrt(sum(update.take_norm()[0] ** 2 for update in self.backward_updates))
        else:
            value_norm = clip_grads(values, c.optim.value_grad_clip, self.memory_sum)
        grad_norm = self.dense.step(c.optim.lr * factor)
        if self.value_optimizer is not None:
            self.value_optimizer.step()
            self.value_optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = float(self._sum(loss.detach()))
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            "value_grad_norm": value_norm,
            "lr": c.optim.lr * factor,
            **selection,
        }

    def fit(self) -> dict:
        c = self.config
        with contextlib.ExitStack() as stack:
            run = stack.enter_context(self.run.open(c, self.tokenizer, self.facts))
            bar = stack.enter_context(
                tqdm(
                    total=c.train.steps,
                    initial=self.step,
                    desc=c.name,
                    disable=not self.progress,
                    file=sys.stderr,
                    dynamic_ncols=True,
                )
            )
            params = count_parameters(self.model)
            where = (
                f" on {self.world} ranks (ZeRO-{c.distributed.zero_stage}, {c.model.memory.layout} layout,"
                f" dense weights in {str(self.dense.compute_dtype).removeprefix('torch.')})"
                if self.context
                else ""
            )
            sizes = f"{params['dense']:,} dense + {params['memory']:,} memory parameters"
            run.log(f"run {c.name} in {self.run_dir}{where}: {sizes}")
            if self.finetune is not None:
                run.log(f"{lr_note(c)}: {self.finetune.trainable():,} trainable parameters")
            if self.resumed_from is not None:
                run.log(f"continuing from {self.resumed_from} (step {self.step})")
            num_tokens = c.train.batch_size * c.data.seq_len  # the global batch
            self.model.train()
            self.metrics.reset_window()
            while self.step < c.train.steps:
                stats = self.train_step(*self.batches.next())
                self.tokens += num_tokens
                tokens_per_s = self.metrics.count(num_tokens)
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                if self.step % c.train.log_every == 0 or self.step == c.train.steps:
                    value_lr = self.value_optimizer.param_groups[0]["lr"] if self.value_optimizer else None
                    self._last_metrics = self.metrics.record(
                        {
                            "step": self.step,
                            **stats,
                            "value_lr": value_lr,
                            "tokens": self.tokens,
                            "epoch": self.batches.position.epoch,
                        }
                    )
                    run.write_metrics(self._last_metrics)
                    run.log(
                        f"step {self.step} loss {stats['loss']:.4f} tokens/s {self._last_metrics['tokens_per_s']:,.0f}"
                    )
                if self.checkpointer.due(self.step, c.train.steps):
                    self.checkpointer.save(self.step, self._progress())
            checkpoint = self.save()
            result = {
                "run_dir": str(self.run_dir),
                "checkpoint": str(checkpoint),
                "step": self.step,
                "loss": self._last_metrics.get("loss"),
            }
            if c.train.eval_facts and self.facts and self.rank == 0:
                model = self.model if self.context is None else load_trained_model(checkpoint).model
                recall = fact_recall(model, self.facts[: c.train.eval_facts], self.tokenizer)
                result["recall"] = recall["recall"]
                run.log(f"recall {recall['recall']:.3f} ({recall['correct']}/{recall['total']} training facts)")
        return result
