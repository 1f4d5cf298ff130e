"""Enlarging a trained memory's product-key grid: ``memray grow CKPT --n-keys M --out DIR``.

A pool of ``n_keys = N`` has N² slots, slot (i, j) at row ``i * N + j``. Growing to M > N keys
per half keeps every learned slot: (i, j) moves to row ``i * M + j`` with its value, usage and
row-wise optimizer state, and sub-keys 0..N-1 keep their vectors. New sub-keys are zero vectors
(score exactly 0 for every query, with or without qk-norm, so they enter a lookup only where
every old candidate of that half scored below 0) and new rows, their usage and optimizer state
are zero (a new slot that is read adds nothing to the output at first). The dense optimizer's
moments of the sub-keys grow the same way; every other tensor is copied. The result is a run
directory ``DIR`` holding one committed checkpoint with the grown config, which ``memray train
--resume DIR`` continues (training grows the new keys and rows from there) and ``memray eval``
reads. The grown tables are built in this process's memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from memray.checkpoint import find_checkpoint
from memray.checkpoint.sharded import load_pool_shard, load_training_state, save_sharded_checkpoint
from memray.config import dump_yaml, from_dict
from memray.errors import InputError
from memray.model import TableShard

from .config import RunConfig


def _grow_rows(old: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Rows of an N²-row array at their places in an M²-row array of zeros."""
    new = torch.zeros((m * m, *old.shape[1:]), dtype=old.dtype)
    new.view(m, m, *old.shape[1:])[:n, :n] = old.view(n, n, *old.shape[1:])
    return new


def _grow_keys(old: torch.Tensor, m: int) -> torch.Tensor:
    """[heads, 2, N, half_dim] sub-keys -> [heads, 2, M, half_dim], the new ones zero."""
    new = torch.zeros((*old.shape[:2], m, *old.shape[3:]), dtype=old.dtype)
    new[:, :, : old.shape[2]] = old
    return new


def grow_checkpoint(path: str | Path, n_keys: int, out: str | Path) -> Path:
    """Write ``out/checkpoints/step-*`` : the checkpoint at ``path`` with an ``n_keys`` grid."""
    import yaml

    from memray.model import Transformer

    ckpt = find_checkpoint(path)
    ckpt, manifest, attrs, weights, moments = load_training_state(ckpt)
    config = from_dict(RunConfig, yaml.safe_load((ckpt / "config.yaml").read_text()))
    n = config.model.memory.n_keys
    if n_keys <= n:
        raise InputError(f"--n-keys {n_keys}: the checkpoint already has {n} keys per half; growing needs more")
    out = Path(out)
    if (out / "checkpoints").exists():
        raise InputError(f"{out} already holds checkpoints; choose another --out")
    grown = from_dict(RunConfig, {**yaml.safe_load(dump_yaml(config)), "run_dir": None})
    grown.model.memory.n_keys = n_keys
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(grown.model).state_dict().items()}
    dense, dense_moments = {}, {}
    for name, tensor in weights.items():
        target = shapes.get(name)
        if target is None or target == tensor.shape:
            dense[name] = tensor
        elif name.endswith("keys") and tensor.dim() == 4 and tensor.shape[2] == n and target[2] == n_keys:
            dense[name] = _grow_keys(tensor, n_keys)
        else:
            raise InputError(f"checkpoint {ckpt}: cannot grow '{name}' {tuple(tensor.shape)} -> {tuple(target)}")
    for key, tensor in moments.items():
        name = key.split(".", 1)[1]
        dense_moments[key] = _grow_keys(tensor, n_keys) if dense[name].shape != tensor.shape else tensor
    pools = {}
    for name, info in attrs.get("pools", {}).items():
        if info["num_rows"] != n * n:
            raise InputError(f"checkpoint {ckpt}: pool '{name}' has {info['num_rows']} rows, not n_keys² = {n * n}")
        arrays = load_pool_shard(ckpt, name, (0, info["num_rows"]), (0, info["dim"]), manifest)
        grown_arrays = {key: _grow_rows(value, n, n_keys) for key, value in arrays.items()}
        pools[name] = (TableShard(n_keys * n_keys, info["dim"]), grown_arrays)
    keep = {k: v for k, v in attrs.items() if k not in ("step", "pools")}
    keep.update(world_size=1, layout="unsharded", zero_stage=None)  # written here by one process
    keep["grown_from"] = {"checkpoint": str(ckpt.resolve()), "n_keys": n}
    return save_sharded_checkpoint(
        out / "checkpoints", manifest["step"], dense, dump_yaml(grown), pools, attrs=keep, dense_optimizer=dense_moments
    )
