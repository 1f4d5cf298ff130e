"""Finetuning a trained model on new data: ``memray finetune CKPT --data NEW --out DIR --mode M``.

A finetuning run is an ordinary training run (:class:`memray.train.Trainer`, one process or N
ranks, any launcher) whose config has a ``finetune`` section: it starts from the weights and
usage counts of the base checkpoint ``finetune.base`` (not its optimizer state or step), and
trains only what its mode says:

* ``full``: every parameter.
* ``lora``: the low-rank adapters of :mod:`memray.model.lora` (``model.lora_rank``) on the
  attention and SwiGLU projections; the rest, value pools included, stays as it was.
* ``memory``: the value pools (and the memory layers' sub-keys with ``finetune.train_keys``).
* ``sparse-memory`` (sparse memory finetuning): the value pools, of which each step updates only
  the ``t = finetune.slots_per_batch`` rows per pool that this batch reads most *relative to how
  much the base model's training read them*. With ``c_i`` the lookups of row ``i`` in this step's
  global batch, ``u_i`` the base checkpoint's usage count of row ``i`` and ``U`` the pool's total,
  a row's score is the TF-IDF ``c_i * log((U + 1) / (u_i + 1))``; rows are ranked by score, ties
  by row index, and the top ``t`` keep their gradient; every other row of the step's gradient is
  dropped before clipping, so neither it nor its optimizer state changes (row-sparse optimizers
  touch only the rows of a gradient). A sharded pool ranks on each rank the rows it owns and keeps
  the global top ``t`` of the gathered candidates, so the rows chosen do not depend on the world
  size or layout. The base counts are read from the base checkpoint (a run continued from its own
  checkpoint reads them again), so the ranking does not drift as finetuning adds usage.

The result is a normal run directory whose checkpoints every command reads (``memray eval``,
``generate``, ``export``, ``inspect``, ``train --resume``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from memray.checkpoint import CONFIG, find_checkpoint
from memray.checkpoint.sharded import load_pool_shard, load_training_state
from memray.config import apply_overrides, from_dict, read_yaml
from memray.data import saved_tokenizer
from memray.distributed import collectives
from memray.errors import InputError
from memray.model import Transformer
from memray.model.lora import is_lora_parameter

from .checkpointer import check_same_model
from .config import RunConfig
from .dense import load_dense_weights


class Finetune:
    """What a finetuning run adds to the trainer: the base checkpoint's weights, which
    parameters train, and (sparse-memory) each step's choice of the rows every pool updates.

    Built by the trainer on every rank before its optimizers (it sets ``requires_grad``);
    ``begin_step`` before each forward, ``select`` after each backward (collective when pools
    are sharded)."""

    def __init__(self, config: RunConfig, model: Transformer, tables: dict, shapes: dict, tokenizer):
        """``shapes``: the model's dense state's tensor shapes; ``tables``: pool name -> table;
        ``tokenizer``: the new data's (checked against the base run's)."""
        self.config, self.model, self.tables = config.finetune, model, tables
        background = self._load_base(shapes)
        check_same_tokenizer(self.checkpoint, tokenizer, config.data.path)
        self._freeze()
        self.idf = (
            {name: _idf(background[name], table) for name, table in tables.items()}
            if self.config.mode == "sparse-memory"
            else None
        )

    def _load_base(self, shapes: dict) -> dict[str, torch.Tensor]:
        """Load the base weights and usage counts into the model; each pool's base counts."""
        ckpt, manifest, attrs, weights, _ = load_training_state(self.config.base)
        # adapters a base without them lacks start as LoRALinear initialises them (no change)
        wanted = {k: v for k, v in shapes.items() if not (is_lora_parameter(k) and k not in weights)}
        check_same_model(ckpt, attrs, weights, wanted, self.tables)
        load_dense_weights(self.model, weights)
        background = {}
        for name, table in self.tables.items():
            arrays = load_pool_shard(ckpt, name, table.row_range, table.col_range, manifest)
            with torch.no_grad():
                table.weight.copy_(arrays["weight"])
                table.usage_count.copy_(arrays["usage_count"])
                table.usage_mass.copy_(arrays["usage_mass"])
            background[name] = arrays["usage_count"].to(table.usage_count.device)
        self.checkpoint = ckpt
        return background

    def _freeze(self) -> None:
        mode = self.config.mode
        if mode == "full":
            return
        for name, p in self.model.named_dense_parameters():
            if mode == "lora":
                p.requires_grad_(is_lora_parameter(name))
            else:  # memory, sparse-memory
                p.requires_grad_(self.config.train_keys and name.endswith(".keys"))
        for table in self.tables.values():
            table.weight.requires_grad_(mode != "lora")

    def trainable(self) -> int:
        """Parameters this run updates (a pool counts whole, though a step touches few rows)."""
        dense = sum(p.numel() for p in self.model.dense_parameters() if p.requires_grad)
        return dense + sum(t.num_rows * t.dim for t in self.tables.values() if t.weight.requires_grad)

    def begin_step(self) -> None:
        if self.idf is not None:
            for table in self.tables.values():
                table.step_rows = []

    def select(self) -> dict[str, float]:
        """Keep in each pool's gradient only the rows this step updates (sparse-memory; nothing
        to do in the other modes). Returns ``finetune/<pool>/rows_read`` and ``rows_updated``."""
        if self.idf is None:
            return {}
        out = {}
        for name, table in self.tables.items():
            rows = torch.cat(table.step_rows) if table.step_rows else table.usage_count.new_zeros(0)
            table.step_rows = None
            chosen, read = top_rows(rows, self.idf[name], self.config.slots_per_batch, table)
            keep_rows(table.weight, chosen)
            out[f"finetune/{name}/rows_read"] = read
            out[f"finetune/{name}/rows_updated"] = min(read, self.config.slots_per_batch)
        return out


def _shards_rows(table) -> bool:
    """Whether the ranks holding ``table`` hold different rows (row layout on several ranks)."""
    return table.layout == "row" and table.world > 1


def _idf(counts: torch.Tensor, table) -> torch.Tensor:
    """``log((U + 1) / (u + 1))`` per row of this process's usage buffers (fp64), ``U`` the
    whole pool's total count."""
    total = counts.sum()
    if _shards_rows(table):
        total = collectives.sum_over(total, table.group)
    return torch.log((total.double() + 1) / (counts.double() + 1))


def _ranked(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Order of (score descending, row ascending)."""
    by_row = torch.argsort(rows, stable=True)
    by_score = torch.argsort(scores[by_row], descending=True, stable=True)
    return by_row[by_score]


def top_rows(rows: torch.Tensor, idf: torch.Tensor, t: int, table) -> tuple[torch.Tensor, int]:
    """The top ``t`` rows (relative to ``table.row_range``, those this process holds) by TF-IDF
    of this step's lookups ``rows`` (this process's, relative to ``row_range``), over the whole
    pool (collective for row-sharded pools); and how many distinct rows the pool read."""
    unique, counts = torch.unique(rows, return_counts=True)
    scores = counts.double() * idf[unique]
    first = table.row_range[0]
    order = _ranked(scores, unique)[:t]
    rows_global, scores = unique[order] + first, scores[order]
    read = unique.numel()
    if _shards_rows(table):
        rows_global = collectives.gather_rows(rows_global, table.group)
        scores = collectives.gather_rows(scores, table.group)
        rows_global = rows_global[_ranked(scores, rows_global)[:t]]
        read = int(collectives.sum_over(torch.tensor(read), table.group))
    local = rows_global - first
    return local[(local >= 0) & (local < table.shard.rows)], read


@torch.no_grad()
def keep_rows(weight: torch.Tensor, rows: torch.Tensor) -> None:
    """Drop every row of ``weight``'s sparse gradient but ``rows``."""
    if weight.grad is None:
        return
    grad = weight.grad.coalesce()
    keep = torch.isin(grad.indices()[0], rows)
    weight.grad = torch.sparse_coo_tensor(
        grad.indices()[:, keep], grad.values()[keep], grad.shape, is_coalesced=True, check_invariants=False
    )


# -- the run's config -------------------------------------------------------------------------
def data_source(path: str) -> str:
    """The data source of ``--data``: ``memray ingest`` shards (a directory), a facts JSONL
    file (``.jsonl``/``.json``) or a UTF-8 text file (anything else)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"--data {path}: no such file or directory")
    if p.is_dir():
        return "arrow"
    return "facts" if p.suffix in (".jsonl", ".json") else "text"


def finetune_config(
    base: str,
    data: str,
    mode: str,
    overrides: list[str] | None = None,
    *,
    slots_per_batch: int | None = None,
    lora_rank: int | None = None,
    train_keys: bool = False,
) -> RunConfig:
    """The run config of finetuning checkpoint ``base`` (or a run directory's newest) on ``data``
    in ``mode``: the base run's config with the finetune section, the new data, then
    ``overrides`` (``a.b=c``, as ``memray train --set``): optimizers and learning rates are the
    base run's unless they say otherwise."""
    ckpt = find_checkpoint(base).resolve()
    raw = read_yaml(ckpt / CONFIG)
    source = data_source(data)
    raw["name"] = f"{raw.get('name') or 'run'}-{mode}"
    raw["run_dir"] = None
    raw["data"] = {**raw.get("data", {}), "source": source, "path": str(Path(data).resolve())}
    section = {"mode": mode, "base": str(ckpt), "train_keys": train_keys}
    if slots_per_batch is not None:
        section["slots_per_batch"] = slots_per_batch
    raw["finetune"] = section
    if mode == "lora":
        raw.setdefault("model", {})["lora_rank"] = lora_rank or raw.get("model", {}).get("lora_rank") or 8
    return from_dict(RunConfig, apply_overrides(raw, list(overrides or [])))


def check_same_tokenizer(ckpt: Path, tokenizer, data: str | None) -> None:
    """InputError unless the new data is tokenized as the base model's training data was."""
    base = saved_tokenizer(ckpt)
    same = base.name == tokenizer.name and (
        base.path is None or Path(base.path).read_bytes() == Path(tokenizer.path).read_bytes()
    )
    if not same:
        raise InputError(
            f"data {data}: tokenized by the {tokenizer.name} tokenizer, but the base checkpoint {ckpt} "
            f"was trained with {'its' if base.path else 'the'} {base.name} tokenizer "
            "(ingest the new data with the base run's tokenizer)"
        )


def lr_note(config: RunConfig) -> str:
    """One log line of what a finetuning run trains, at which rates."""
    f, o, m = config.finetune, config.optim, config.model.memory
    value_lr = f"value lr {m.value_lr if m.value_lr is not None else o.lr:g} ({o.value_optimizer})"
    what = {
        "full": f"lr {o.lr:g}, {value_lr}",
        "lora": f"rank {config.model.lora_rank}, lr {o.lr:g}",
        "memory": value_lr + (f", keys lr {o.lr:g}" if f.train_keys else ""),
        "sparse-memory": f"{f.slots_per_batch} rows per pool and step, {value_lr}",
    }[f.mode]
    return f"finetuning ({f.mode}: {what}) from {f.base}"


__all__ = ["Finetune", "data_source", "finetune_config", "keep_rows", "lr_note", "top_rows"]
