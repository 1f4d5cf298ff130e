"""Saving and restoring everything a run needs to continue: the trainer's checkpointer.

One :class:`Checkpointer` per run holds references to every stateful piece — the dense weights
and their Adam moments (through the run's :class:`memray.train.dense.DenseTraining`), each value
pool with its usage counts and the value optimizer's state for it — and writes them as one
committed checkpoint (``RUN/checkpoints/step-XXXXXXXX``, :mod:`memray.checkpoint.sharded`): dense
tensors streamed to rank 0 one at a time (no rank holds the whole model), pools shard by shard
by every rank. The run's progress (tokens seen, data position) travels in the checkpoint's
attributes. Periodic saves may run in the background: the collective part (the dense tensors
among it) happens in the step, a thread writes the pools' files from snapshots, and the save is
committed at the next one. A checkpoint loads onto any world size and layout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from memray.checkpoint.sharded import PendingCheckpoint, load_pool_shard, load_training_state, start_sharded_checkpoint
from memray.checkpoint.tensorfile import TensorFile
from memray.data.tokenizer import TOKENIZER_FILE
from memray.errors import InputError
from memray.optim import row_state_keys

from .dense import DenseTraining


class Checkpointer:
    def __init__(
        self,
        folder: Path,
        *,
        dense: DenseTraining,
        tables: dict,
        value_optimizer,
        group,
        rank: int,
        config_yaml: str,
        tokenizer_path: Path | None,
        every: int,
        keep_last: int,
        background: bool,
        attrs: dict,
        shapes: dict[str, tuple[int, ...]],
        on_commit: Callable[[Path], None] | None = None,
    ):
        """``tables``: pool name -> value table; ``group``: the memory-parallel group (None on one
        process); ``every``: steps between periodic saves (0: none); ``keep_last``: committed
        checkpoints kept (0: all); ``attrs``: what every checkpoint records of the run (world
        size, layout, ZeRO stage); ``shapes``: the dense state's tensor shapes (what a checkpoint
        must hold to be this model's); ``on_commit(path)``: called on every rank for each commit."""
        self.folder, self.dense, self.tables, self.value_optimizer = Path(folder), dense, tables, value_optimizer
        self.group, self.rank, self.config_yaml = group, rank, config_yaml
        self.extra_files = {TOKENIZER_FILE: tokenizer_path} if tokenizer_path is not None else None
        self.every, self.keep_last, self.background, self.attrs = every, keep_last, background, attrs
        self.on_commit, self.shapes = on_commit, shapes
        self._pending: PendingCheckpoint | None = None

    def due(self, step: int, last_step: int) -> bool:
        """A periodic save falls on ``step`` (the last step's save is the final one)."""
        return bool(self.every) and step % self.every == 0 and step < last_step

    def save(self, step: int, progress: dict, final: bool = False) -> Path | None:
        """Save the state as of ``step`` (collective); ``progress``: the run's JSON-able position
        (tokens, data position). A save in the background is committed by the next call; a
        final or foreground one before returning, and its path is returned."""
        self.wait()
        pending = self._start(step, progress, background=self.background and not final)
        if self.background and not final:
            self._pending = pending
            return None
        return self._commit(pending)

    def wait(self) -> Path | None:
        """Commit the save still being written, if any (collective)."""
        pending, self._pending = self._pending, None
        return self._commit(pending) if pending is not None else None

    def _commit(self, pending: PendingCheckpoint) -> Path:
        path = pending.finish()
        if self.on_commit is not None:
            self.on_commit(path)
        return path

    def _start(self, step: int, progress: dict, background: bool) -> PendingCheckpoint:
        row_keys = row_state_keys(self.value_optimizer) if self.value_optimizer is not None else frozenset()
        pools, scalars = {}, {}
        for name, table in self.tables.items():
            tensors = {
                "weight": table.weight.detach(),
                "usage_count": table.usage_count,
                "usage_mass": table.usage_mass,
            }
            for key, value in self._value_state(table).items():
                if key in row_keys:
                    tensors[f"optim.{key}"] = value
                else:  # per table: e.g. torch optimizers' step counts
                    scalars.setdefault(name, {})[key] = float(value)
            pools[name] = (table.shard, tensors)
        attrs = {
            **self.attrs,
            **progress,
            "value_optimizer_scalars": scalars,
            "dense_optimizer_steps": self.dense.optimizer_steps(),
        }
        return start_sharded_checkpoint(
            self.folder,
            step,
            self.dense.checkpoint_state(),
            self.config_yaml,
            pools,
            group=self.group,
            keep_last=self.keep_last,
            attrs=attrs,
            background=background,
            extra_files=self.extra_files,
        )

    def _value_state(self, table) -> dict:
        if self.value_optimizer is None:
            return {}
        return self.value_optimizer.state.get(table.weight, {})

    def load(self, path: str | Path) -> tuple[Path, dict]:
        """Restore every piece from a checkpoint saved on any number of ranks and either layout
        (collective): each rank reads only its rows and columns of every pool, and the dense
        tensors one at a time. Returns the checkpoint and its attributes (step, and the
        ``progress`` it was saved with)."""
        ckpt, manifest, attrs, weights, moments = load_training_state(path)
        check_same_model(ckpt, attrs, weights, self.shapes, self.tables)
        # the Adam step count of the moments (checkpoints that do not record it: the run's step)
        steps = attrs.get("dense_optimizer_steps")
        self.dense.restore(weights, moments, attrs["step"] if steps is None else steps)
        for name, table in self.tables.items():
            arrays = load_pool_shard(ckpt, name, table.row_range, table.col_range, manifest)
            with torch.no_grad():
                table.weight.copy_(arrays.pop("weight"))
                table.usage_count.copy_(arrays.pop("usage_count"))
                table.usage_mass.copy_(arrays.pop("usage_mass"))
            table.weight.grad = None
            if self.value_optimizer is not None:
                state = {k.removeprefix("optim."): v.to(table.weight.device) for k, v in arrays.items()}
                scalars = attrs.get("value_optimizer_scalars", {}).get(name, {})
                state.update({k: torch.tensor(v) for k, v in scalars.items()})
                self.value_optimizer.state[table.weight] = state
        return ckpt, attrs


def check_same_model(
    ckpt: Path, attrs: dict, weights: TensorFile, shapes: dict[str, tuple[int, ...]], tables: dict
) -> None:
    """InputError naming the first tensor or pool whose shape differs between checkpoint ``ckpt``
    (its ``attrs`` and dense ``weights``, not read) and a model of dense tensor ``shapes`` and
    value pools ``tables`` (a checkpoint of another model config), before anything is loaded."""
    other = f"checkpoint {ckpt} holds another model (compare its config.yaml with this run's)"
    for name, shape in shapes.items():
        if name not in weights:
            raise InputError(f"{other}: it has no '{name}'")
        if weights.shape(name) != shape:
            raise InputError(f"{other}: '{name}' is {list(weights.shape(name))} there, {list(shape)} here")
    extra = sorted(set(weights) - set(shapes))
    if extra:
        raise InputError(f"{other}: it has '{extra[0]}', which this model lacks")
    pools = attrs.get("pools", {})
    for name, table in tables.items():
        saved = pools.get(name)
        here = [table.shard.num_rows, table.shard.dim]
        if saved is None:
            raise InputError(f"{other}: it has no value pool '{name}' (it has {sorted(pools)})")
        if [saved["num_rows"], saved["dim"]] != here:
            raise InputError(
                f"{other}: pool '{name}' is {[saved['num_rows'], saved['dim']]} there, {here} here"
                + (" (memray grow enlarges a pool)" if saved["num_rows"] < here[0] else "")
            )
