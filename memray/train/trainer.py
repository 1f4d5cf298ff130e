"""Single-process training loop.

One step: forward and loss (fp32 or bf16 autocast), backward, separate gradient clipping for
the dense parameters and the value pools, a dense AdamW step and a value-pool step (row-sparse
unless the paper's dense AdamW is chosen), then the schedules. Everything a run produces goes to
its run directory: ``config.yaml``, ``metrics.jsonl``, ``log.txt``, ``checkpoints/``.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from memray.checkpoint import save_checkpoint
from memray.config import dump_yaml
from memray.data import ByteTokenizer, PackedBatches, load_documents, write_facts
from memray.evaluate import fact_recall
from memray.model import Transformer, count_parameters, usage_metrics
from memray.optim import build_value_optimizer, clip_grads, dense_param_groups, lr_factor

from .config import RunConfig


def default_run_dir(config: RunConfig) -> Path:
    return Path("runs") / f"{config.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


class Trainer:
    def __init__(self, config: RunConfig, run_dir: str | Path | None = None, progress: bool = True):
        self.config = config
        self.run_dir = Path(run_dir or config.run_dir or default_run_dir(config))
        self.progress = progress
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        torch.manual_seed(config.seed)
        self.tokenizer = ByteTokenizer()
        documents, self.facts = load_documents(config.data, self.tokenizer)
        self.batches = PackedBatches(documents, config.data.seq_len, config.train.batch_size, self.tokenizer.pad_id, config.seed)
        self.model = Transformer(config.model)
        for table in self.model.pools.values():
            table.sparse_grad = config.optim.sparse_values
        o = config.optim
        self.dense_params = self.model.dense_parameters()
        pool_ids = {id(p) for p in self.model.pools.parameters()}
        named = [(n, p) for n, p in self.model.named_parameters() if id(p) not in pool_ids]
        self.optimizer = torch.optim.AdamW(
            dense_param_groups(named, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps
        )
        self.value_optimizer = build_value_optimizer(o, self.model.pools.values())
        self.step = 0
        self.tokens = 0
        self._usage_snapshot = {name: (t.usage_count.clone(), t.usage_mass.clone()) for name, t in self.model.pools.items()}

    # -- run directory -------------------------------------------------------------------------
    def _open_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(self.config, self.run_dir / "config.yaml")
        if self.facts is not None:
            (self.run_dir / "data").mkdir(exist_ok=True)
            write_facts(self.run_dir / "data" / "facts.jsonl", self.facts)
        self._metrics = (self.run_dir / "metrics.jsonl").open("a")
        self._log = (self.run_dir / "log.txt").open("a")

    def log(self, message: str) -> None:
        line = f"{datetime.now().isoformat(timespec='seconds')} {message}"
        self._log.write(line + "\n")
        self._log.flush()
        if not self.progress:
            print(line, file=sys.stderr)

    def _usage_window(self) -> dict[str, float]:
        """Usage metrics of each pool over the lookups since the previous log line."""
        out = {}
        for name, table in self.model.pools.items():
            count0, mass0 = self._usage_snapshot[name]
            out.update(usage_metrics(table.usage_count - count0, table.usage_mass - mass0, prefix=f"memory/{name}/"))
            self._usage_snapshot[name] = (table.usage_count.clone(), table.usage_mass.clone())
        return out

    def save(self) -> Path:
        return save_checkpoint(
            self.run_dir / "checkpoints", self.step, self.model.state_dict(), dump_yaml(self.config),
            keep_last=self.config.train.keep_last,
        )

    # -- training -----------------------------------------------------------------------------
    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        c = self.config
        factor = lr_factor(self.step, c.train.steps, c.optim.warmup_steps, c.optim.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = c.optim.lr * factor
        if self.value_optimizer is not None and c.optim.value_lr_schedule == "cosine":
            for group in self.value_optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
        autocast = (
            torch.autocast("cpu" if inputs.device.type == "cpu" else inputs.device.type, dtype=torch.bfloat16)
            if c.train.precision == "bf16" else contextlib.nullcontext()
        )
        with autocast:
            loss = self.model.loss(inputs, targets)
            total = loss + self.model.aux_loss()
        total.backward()
        grad_norm = clip_grads(self.dense_params, c.optim.grad_clip)
        value_norm = clip_grads([t.weight for t in self.model.pools.values()], c.optim.value_grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.value_optimizer is not None:
            self.value_optimizer.step()
            self.value_optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": loss.item(), "grad_norm": grad_norm, "value_grad_norm": value_norm, "lr": c.optim.lr * factor}

    def fit(self) -> dict:
        c = self.config
        self._open_run_dir()
        params = count_parameters(self.model)
        self.log(f"run {c.name} in {self.run_dir}: {params['dense']:,} dense + {params['memory']:,} memory parameters")
        bar = tqdm(total=c.train.steps, desc=c.name, disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        window_start, window_tokens = time.perf_counter(), 0
        last = {}
        self.model.train()
        try:
            while self.step < c.train.steps:
                inputs, targets = self.batches.next()
                stats = self.train_step(inputs, targets)
                num_tokens = inputs.numel()
                self.tokens += num_tokens
                window_tokens += num_tokens
                elapsed = time.perf_counter() - window_start
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{window_tokens / max(elapsed, 1e-9):,.0f}")
                if self.step % c.train.log_every == 0 or self.step == c.train.steps:
                    value_lr = self.value_optimizer.param_groups[0]["lr"] if self.value_optimizer else None
                    last = {"step": self.step, **stats, "value_lr": value_lr, "tokens": self.tokens,
                            "tokens_per_s": window_tokens / max(elapsed, 1e-9), "epoch": self.batches.position.epoch,
                            **self._usage_window()}
                    self._metrics.write(json.dumps(last) + "\n")
                    self._metrics.flush()
                    self.log(f"step {self.step} loss {stats['loss']:.4f} tokens/s {last['tokens_per_s']:,.0f}")
                    window_start, window_tokens = time.perf_counter(), 0
                if c.train.checkpoint_every and self.step % c.train.checkpoint_every == 0 and self.step < c.train.steps:
                    self.log(f"saved {self.save()}")
            checkpoint = self.save()
            self.log(f"saved {checkpoint}")
        finally:
            bar.close()
        result = {"run_dir": str(self.run_dir), "checkpoint": str(checkpoint), "step": self.step, "loss": last.get("loss")}
        if c.train.eval_facts and self.facts:
            recall = fact_recall(self.model, self.facts[: c.train.eval_facts], self.tokenizer)
            result["recall"] = recall["recall"]
            self.log(f"recall {recall['recall']:.3f} ({recall['correct']}/{recall['total']} training facts)")
        self._metrics.close()
        self._log.close()
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
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise InputError(f"checkpoint {ckpt}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return model, config, ckpt, manifest


CONFIG_NAME = "config.yaml"
