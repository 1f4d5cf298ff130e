"""The training loop, on one process or on the ranks of a process group.

One step: forward and loss (fp32 or bf16 autocast), backward, gradient clipping of the dense
parameters and, separately, of the value pools, a dense AdamW step and a value-pool step
(row-sparse unless the paper's dense AdamW is chosen), then the schedules.

On one process (``context=None``) the model owns its pools and a torch AdamW trains the rest. On
N ranks (``context``: a :class:`memray.distributed.DistContext`) the pools are
:class:`memray.distributed.ShardedValueTable` shards given to the model from outside, and the
dense parameters train in a DeepSpeed ZeRO engine (``memray.train.deepspeed``). Every rank
builds the same global batch and takes its balanced share of the sequences; its loss is its
tokens' summed loss over the global batch's token count, so the gradients (averaged over ranks
by DeepSpeed for dense parameters, summed over ranks by the lookups for the pools, then
divided by N) are those of the single-process run on the same global batch.

Everything a run produces goes to its run directory, written by rank 0: ``config.yaml``,
``metrics.jsonl``, ``log.txt``, ``checkpoints/``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from memray.checkpoint.sharded import load_pool_shard, load_training_state, start_sharded_checkpoint
from memray.config import dump_yaml
from memray.data import PackedBatches, load_documents, write_facts
from memray.data.packing import IGNORE_INDEX, Position
from memray.data.tokenizer import TOKENIZER_FILE
from memray.distributed.plan import balanced_ranges
from memray.errors import ConfigError
from memray.evaluate import fact_recall
from memray.model import Transformer, count_parameters, usage_metrics
from memray.model.transformer import pool_names
from memray.optim import build_value_optimizer, clip_grads, dense_param_groups, grad_norm, lr_factor

from .config import RunConfig


# Restoring Adam moments into ZeRO-3 partitions is not exact yet; checkpoints do not depend on
# the stage that wrote them, so a ZeRO-3 run resumes at stage 0-2.
ZERO3_RESUME = ConfigError(
    "distributed.zero_stage",
    "resuming into ZeRO-3 is not supported yet: resume with stage "
    "0, 1 or 2 (checkpoints do not depend on the stage that wrote them)",
)


def default_run_dir(config: RunConfig) -> Path:
    return Path("runs") / f"{config.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


class _LocalDense:
    """Dense parameters on one process: a torch AdamW with decay groups."""

    def __init__(self, model: Transformer, config: RunConfig):
        o = config.optim
        pool_ids = {id(t.weight) for t in model.value_tables().values()}
        named = [(n, p) for n, p in model.named_parameters() if id(p) not in pool_ids]
        self.model, self.grad_clip = model, o.grad_clip
        self.optimizer = torch.optim.AdamW(
            dense_param_groups(named, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps
        )

    def loss_sum(self, inputs, targets):
        logits = self.model(inputs)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    def backward(self, loss):
        loss.backward()

    def step(self, lr: float) -> float:
        norm = clip_grads(self.model.dense_parameters(), self.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The dense weights (the pools are saved with their shards)."""
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith("pools.")}

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """``exp_avg.<param>`` and ``exp_avg_sq.<param>`` of every dense parameter (zeros before
        the first step)."""
        return _adam_moments(self.optimizer, self._named())

    def restore(self, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], step: int, sample) -> None:
        self.model.load_state_dict(weights, strict=False)
        _set_adam_moments(self.optimizer, self._named(), moments, step)

    def _named(self):
        pools = {id(t.weight) for t in self.model.value_tables().values()}
        return [(n, p) for n, p in self.model.named_parameters() if id(p) not in pools]


def _adam_moments(optimizer, named) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in named:
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{key}.{name}"] = (
                state[key].detach().clone() if key in state else torch.zeros_like(p, dtype=torch.float32)
            )
    return out


def _set_adam_moments(optimizer, named, moments: dict[str, torch.Tensor], step: int) -> None:
    """torch Adam(W) state as its own first step would create it, then the saved values."""
    for name, p in named:
        state = optimizer.state[p]
        state["step"] = torch.tensor(float(step), dtype=torch.float32)
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = moments[f"{key}.{name}"].to(device=p.device, dtype=p.dtype).clone()


class _DeepSpeedDense:
    """Dense parameters in a DeepSpeed engine (ZeRO stage from the config)."""

    def __init__(self, model: Transformer, config: RunConfig, micro_batch: int, world_size: int):
        from . import deepspeed as ds

        self._ds = ds
        self.engine = ds.build_engine(model, config, micro_batch, world_size)

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
        return self._ds.consolidated_state_dict(self.engine)

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        return self._ds.full_adam_moments(self.engine)

    def restore(self, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], step: int, sample) -> None:
        self._ds.restore(self.engine, weights, moments, step, sample)


class Trainer:
    def __init__(self, config: RunConfig, run_dir: str | Path | None = None, progress: bool = True, context=None):
        """``context``: this rank's :class:`memray.distributed.DistContext`; None for one process."""
        self.config = config
        self.context = context
        self.rank, self.world = (context.rank, context.world_size) if context else (0, 1)
        self.device = context.device if context else torch.device("cpu")
        self.run_dir = Path(run_dir or config.run_dir or default_run_dir(config))
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
        if context is None:
            self.model = Transformer(config.model)
            self.dense = _LocalDense(self.model, config)
        else:
            from memray.distributed import ShardedValueTable

            m = config.model.memory
            pools = {
                name: ShardedValueTable(
                    m.num_slots,
                    m.v_dim or config.model.dim,
                    group=context.memory_group,
                    layout=m.layout,
                    init_std=m.value_init_std,
                    backend=m.backend,
                    lr=m.value_lr,
                    weight_decay=m.value_weight_decay,
                    sparse_grad=o.sparse_values,
                    device=context.device,
                )
                for name in pool_names(config.model)
            }
            self.model = Transformer(config.model, device=context.device, pools=pools)
            self.dense = _DeepSpeedDense(self.model, config, max(b - a for a, b in shares), self.world)
        self.tables = self.model.value_tables()
        for table in self.tables.values():
            table.sparse_grad = o.sparse_values
        self.value_optimizer = build_value_optimizer(o, self.tables.values())
        self.step = 0
        self.tokens = 0
        # called on every rank after each committed checkpoint with (path, last logged metrics):
        # the Ray launcher reports checkpoints to Ray Train through it
        self.on_checkpoint = None
        self._usage_snapshot = {name: self._usage(table) for name, table in self.tables.items()}

    # -- collectives (no-ops on one process) -----------------------------------------------------
    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.context is not None:
            x = x.clone()
            dist.all_reduce(x)
        return x

    def _usage(self, table) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(table, "gather_usage"):
            return table.gather_usage()
        return table.usage_count.clone(), table.usage_mass.clone()

    def _lookup_window(self, steps: int) -> dict:
        """Per-rank lookup load since the last log line: rows served and bytes per step."""
        out = {}
        for name, table in self.tables.items():
            stats = getattr(table, "stats", None)
            if stats is None:
                continue
            s = stats.reset()
            mine = torch.tensor([s.rows_served, s.bytes_sent, s.bytes_received], dtype=torch.float64)
            every = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(every, mine)
            per_rank = torch.stack(every) / max(steps, 1)
            served = per_rank[:, 0]
            out[f"lookup/{name}/rows_served"] = served.tolist()
            out[f"lookup/{name}/bytes_sent"] = per_rank[:, 1].tolist()
            out[f"lookup/{name}/bytes_received"] = per_rank[:, 2].tolist()
            out[f"lookup/{name}/imbalance"] = float(served.max() / served.mean()) if served.sum() > 0 else 1.0
        return out

    # -- run directory -------------------------------------------------------------------------
    def _open_run_dir(self) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(self.config, self.run_dir / "config.yaml")
        if getattr(self.tokenizer, "path", None) is not None:  # a BPE: evaluation decodes with it
            shutil.copyfile(self.tokenizer.path, self.run_dir / TOKENIZER_FILE)
        if self.facts is not None:
            (self.run_dir / "data").mkdir(exist_ok=True)
            write_facts(self.run_dir / "data" / "facts.jsonl", self.facts)
        self._metrics = (self.run_dir / "metrics.jsonl").open("a")
        self._log = (self.run_dir / "log.txt").open("a")

    def _close_run_dir(self) -> None:
        if self.rank == 0:
            self._metrics.close()
            self._log.close()

    def log(self, message: str) -> None:
        if self.rank != 0:
            return
        line = f"{datetime.now().isoformat(timespec='seconds')} {message}"
        self._log.write(line + "\n")
        self._log.flush()
        if not self.progress:
            print(line, file=sys.stderr)

    def _usage_window(self) -> dict[str, float]:
        """Usage metrics of each pool over the lookups since the previous log line."""
        out = {}
        for name, table in self.tables.items():
            count0, mass0 = self._usage_snapshot[name]
            count, mass = self._usage(table)
            out.update(usage_metrics(count - count0, mass - mass0, prefix=f"memory/{name}/"))
            self._usage_snapshot[name] = (count, mass)
        return out

    def save(self) -> Path:
        """A committed checkpoint (collective on N ranks): dense weights and the dense optimizer's
        moments (rank 0), and ``memory.zarr`` with every pool, its usage and its optimizer state,
        written shard by shard; step, tokens and data position in the group's attributes."""
        return self.start_save(background=False).finish()

    def start_save(self, background: bool):
        """Begin a save (collective); with ``background`` the files are written from snapshots by
        a thread while training goes on, and the returned save's ``finish()`` commits it."""
        dense, moments = self.dense.state_dict(), self.dense.optimizer_state()
        pools, scalars = {}, {}
        for name, table in self.tables.items():
            tensors = {
                "weight": table.weight.detach(),
                "usage_count": table.usage_count,
                "usage_mass": table.usage_mass,
            }
            state = self.value_optimizer.state.get(table.weight, {}) if self.value_optimizer is not None else {}
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == table.weight.shape[0]:
                    tensors[f"optim.{key}"] = value
                else:  # e.g. torch optimizers' step counts
                    scalars.setdefault(name, {})[key] = float(value)
            pools[name] = (table, tensors)
        c = self.config
        attrs = {
            "world_size": self.world,
            "layout": c.model.memory.layout if self.context else "unsharded",
            "zero_stage": c.distributed.zero_stage if self.context else None,
            "tokens": self.tokens,
            "data_position": {"epoch": self.batches.position.epoch, "batch": self.batches.position.batch},
            "value_optimizer_scalars": scalars,
        }
        return start_sharded_checkpoint(
            self.run_dir / "checkpoints",
            self.step,
            dense if self.rank == 0 else None,
            dump_yaml(c),
            pools,
            group=self.context.memory_group if self.context else None,
            keep_last=c.train.keep_last,
            attrs=attrs,
            dense_optimizer=moments if self.rank == 0 else None,
            background=background,
            extra_files={TOKENIZER_FILE: self.tokenizer.path} if getattr(self.tokenizer, "path", None) else None,
        )

    def resume(self, path: str | Path) -> Path:
        """Continue from a checkpoint of this run's model saved on any number of ranks and either
        layout (collective): weights, optimizer state, usage, step, tokens and data position."""
        if self.context is not None and self.config.distributed.zero_stage == 3:
            raise ZERO3_RESUME
        ckpt, manifest, attrs, weights, moments = load_training_state(path)
        rows = len(self.batches.rows)
        sample = (
            torch.zeros(rows, self.config.data.seq_len, dtype=torch.long, device=self.device),
            torch.zeros(rows, self.config.data.seq_len, dtype=torch.long, device=self.device),
        )
        self.model.eval()  # the engine's state-creating step must not count usage
        self.dense.restore(weights, moments, attrs["step"], sample)
        for name, table in self.tables.items():
            row_range = getattr(table, "row_range", (0, table.num_rows))
            col_range = getattr(table, "col_range", (0, table.dim))
            arrays = load_pool_shard(ckpt, name, row_range, col_range, manifest)
            with torch.no_grad():
                table.weight.copy_(arrays.pop("weight"))
                table.usage_count.copy_(arrays.pop("usage_count"))
                table.usage_mass.copy_(arrays.pop("usage_mass"))
            table.weight.grad = None
            if self.value_optimizer is not None:
                state = {k.removeprefix("optim."): v.to(table.weight.device) for k, v in arrays.items()}
                state.update(
                    {k: torch.tensor(v) for k, v in attrs.get("value_optimizer_scalars", {}).get(name, {}).items()}
                )
                self.value_optimizer.state[table.weight] = state
        self.step, self.tokens = attrs["step"], attrs["tokens"]
        self.batches.position = Position(**attrs["data_position"])
        self._usage_snapshot = {name: self._usage(table) for name, table in self.tables.items()}
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
        reduce = next(iter(self.tables.values())).all_reduce if self.context is not None and self.tables else None
        value_norm = clip_grads(values, c.optim.value_grad_clip, reduce)
        grad_norm = self.dense.step(c.optim.lr * factor)
        if self.value_optimizer is not None:
            self.value_optimizer.step()
            self.value_optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = float(self._sum(loss.detach()))
        return {"loss": loss, "grad_norm": grad_norm, "value_grad_norm": value_norm, "lr": c.optim.lr * factor}

    def _committed(self, path: Path, metrics: dict) -> None:
        self.log(f"saved {path}")
        if self.on_checkpoint is not None:
            self.on_checkpoint(path, {k: v for k, v in metrics.items() if not isinstance(v, list)})

    def fit(self) -> dict:
        c = self.config
        self._open_run_dir()
        params = count_parameters(self.model)
        where = (
            f" on {self.world} ranks (ZeRO-{c.distributed.zero_stage}, {c.model.memory.layout} layout)"
            if self.context
            else ""
        )
        self.log(
            f"run {c.name} in {self.run_dir}{where}: {params['dense']:,} dense + {params['memory']:,} memory parameters"
        )
        bar = tqdm(total=c.train.steps, desc=c.name, disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
        last, pending = {}, None
        self.model.train()
        try:
            while self.step < c.train.steps:
                inputs, targets = self.batches.next()
                stats = self.train_step(inputs, targets)
                num_tokens = c.train.batch_size * c.data.seq_len  # the global batch
                self.tokens += num_tokens
                window_tokens += num_tokens
                window_steps += 1
                elapsed = time.perf_counter() - window_start
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{window_tokens / max(elapsed, 1e-9):,.0f}")
                if self.step % c.train.log_every == 0 or self.step == c.train.steps:
                    value_lr = self.value_optimizer.param_groups[0]["lr"] if self.value_optimizer else None
                    last = {
                        "step": self.step,
                        **stats,
                        "value_lr": value_lr,
                        "tokens": self.tokens,
                        "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                        "epoch": self.batches.position.epoch,
                        **self._usage_window(),
                        **self._lookup_window(window_steps),
                    }
                    if self.rank == 0:
                        self._metrics.write(json.dumps(last) + "\n")
                        self._metrics.flush()
                    self.log(f"step {self.step} loss {stats['loss']:.4f} tokens/s {last['tokens_per_s']:,.0f}")
                    window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
                if c.train.checkpoint_every and self.step % c.train.checkpoint_every == 0 and self.step < c.train.steps:
                    if pending is not None:
                        self._committed(pending.finish(), last)
                    pending = self.start_save(background=c.train.async_checkpoint)
                    if not c.train.async_checkpoint:
                        self._committed(pending.finish(), last)
                        pending = None
            if pending is not None:
                self._committed(pending.finish(), last)
            checkpoint = self.save()
            self._committed(checkpoint, last)
        finally:
            bar.close()
        result = {
            "run_dir": str(self.run_dir),
            "checkpoint": str(checkpoint),
            "step": self.step,
            "loss": last.get("loss"),
        }
        if c.train.eval_facts and self.facts and self.rank == 0:
            model = self.model if self.context is None else load_trained_model(checkpoint)[0]
            recall = fact_recall(model, self.facts[: c.train.eval_facts], self.tokenizer)
            result["recall"] = recall["recall"]
            self.log(f"recall {recall['recall']:.3f} ({recall['correct']}/{recall['total']} training facts)")
        self._close_run_dir()
        return result


def load_trained_model(path: str | Path) -> tuple[Transformer, RunConfig, Path, dict]:
    """Rebuild a model from a checkpoint (or a run directory's newest one), without pickle."""
    import yaml

    from memray.checkpoint import load_checkpoint
    from memray.config import from_dict
    from memray.errors import ConfigError, InputError

    ckpt, manifest, config_text, tensors = load_checkpoint(path)
    try:
        config = from_dict(RunConfig, yaml.safe_load(config_text))
    except (yaml.YAMLError, ConfigError) as exc:
        raise InputError(f"checkpoint {ckpt}: {CONFIG_NAME} is invalid: {exc}") from None
    with torch.device("meta"):
        model = Transformer(config.model)
    model.to_empty(device="cpu")
    model.init_weights()  # derived buffers (rotary tables); weights are overwritten below
    if (ckpt / "memory.zarr").is_dir():  # pools of a sharded run, written shard by shard
        from memray.checkpoint.sharded import load_pool_shard, verify_checkpoint

        verify_checkpoint(ckpt)
        for name, table in model.value_tables().items():
            arrays = load_pool_shard(ckpt, name, (0, table.num_rows), (0, table.dim), manifest)
            tensors.update({f"pools.{name}.{key}": arrays[key] for key in ("weight", "usage_count", "usage_mass")})
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise InputError(
            f"checkpoint {ckpt}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.eval()
    return model, config, ckpt, manifest


CONFIG_NAME = "config.yaml"
