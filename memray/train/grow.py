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
reads.

The pools are grown chunk by chunk, from Zarr to Zarr: each job writes a run of the grown
array's chunks, reading the old rows they need in order (one old and one new chunk resident),
so memory stays a few chunks per job whatever the pool's size. Jobs run on a few threads here,
or as Ray tasks (``memray grow --ray``; the output must then be on storage the nodes share).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from memray.checkpoint import begin_checkpoint, committed_checkpoints, find_checkpoint
from memray.checkpoint.pools import STORE, RowReader, array_info, chunk_rows_for, create_array, write_chunk
from memray.checkpoint.sharded import DenseState, PendingCheckpoint, load_training_state, pool_info, write_dense
from memray.config import dump_yaml, from_dict
from memray.data.tokenizer import TOKENIZER_FILE
from memray.errors import InputError

from .config import RunConfig

TASK_CHUNKS = 8  # grown chunks per job (a Ray task, or a thread here)
THREADS = 4  # jobs at once without Ray


def grown_rows(old: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Rows of an N²-row array at their places in an M²-row array of zeros (in memory: the
    definition the chunked grow of the pools is tested against)."""
    new = torch.zeros((m * m, *old.shape[1:]), dtype=old.dtype)
    new.view(m, m, *old.shape[1:])[:n, :n] = old.view(n, n, *old.shape[1:])
    return new


def _grow_keys(old: torch.Tensor, m: int) -> torch.Tensor:
    """[heads, 2, N, half_dim] sub-keys -> [heads, 2, M, half_dim], the new ones zero."""
    new = torch.zeros((*old.shape[:2], m, *old.shape[3:]), dtype=old.dtype)
    new[:, :, : old.shape[2]] = old
    return new


def grow_chunks(
    source: str, target: str, name: str, key: str, n: int, m: int, chunks: tuple[int, int], checksums: dict
) -> dict[str, str]:
    """Write chunks ``[a, b)`` of the grown array ``<name>/<key>`` in the store ``target`` (its
    metadata already there) from the N²-row array in the store ``source``: grown row i·M + j
    holds old row i·N + j for i, j < N, every other row zeros. Old rows are read in order, each
    old chunk checked against ``checksums``. Returns the written chunks' checksums."""
    reader = RowReader(Path(source), name, key, checksums)
    shape, chunk_rows, dtype, _ = array_info(Path(target), f"{name}/{key}")
    written = {}
    for chunk in range(*chunks):
        lo, hi = chunk * chunk_rows, min(m * m, (chunk + 1) * chunk_rows)
        block = np.zeros((hi - lo, *shape[1:]), dtype)
        for i in range(lo // m, min(n, -(-hi // m))):  # the grid rows this chunk meets
            start, stop = max(lo, i * m), min(hi, i * m + n)
            if start < stop:
                block[start - lo : stop - lo] = reader.rows(i * n + start - i * m, i * n + stop - i * m)
        rel, digest = write_chunk(Path(target), f"{name}/{key}", chunk, chunk_rows, block)
        written[rel] = digest
    return written


def _in_threads(fn, jobs: list[tuple]) -> list:
    with ThreadPoolExecutor(max(1, min(THREADS, os.cpu_count() or 1, len(jobs)))) as pool:
        return list(pool.map(lambda job: fn(*job), jobs))


def grow_checkpoint(path: str | Path, n_keys: int, out: str | Path, map_files=None) -> Path:
    """Write ``out/checkpoints/step-*``: the checkpoint at ``path`` with an ``n_keys`` grid.
    ``map_files(fn, jobs)`` runs the pools' jobs (``memray.launch.tasks.map_files``: Ray
    tasks); without it, a few threads of this process."""
    import yaml

    from memray.model import Transformer

    ckpt = find_checkpoint(path)
    ckpt, manifest, attrs, weights, moments = load_training_state(ckpt)
    config = from_dict(RunConfig, yaml.safe_load((ckpt / "config.yaml").read_text()))
    n, m = config.model.memory.n_keys, n_keys
    if m <= n:
        raise InputError(f"--n-keys {m}: the checkpoint already has {n} keys per half; growing needs more")
    out = Path(out).resolve()
    if committed_checkpoints(out / "checkpoints"):
        raise InputError(f"{out} already holds checkpoints; choose another --out")
    grown = from_dict(RunConfig, {**yaml.safe_load(dump_yaml(config)), "run_dir": None})
    grown.model.memory.n_keys = m
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(grown.model).state_dict().items()}
    dense, dense_moments = {}, {}
    for name, tensor in weights.items():
        target = shapes.get(name)
        if target is None or target == tensor.shape:
            dense[name] = tensor
        elif name.endswith("keys") and tensor.dim() == 4 and tensor.shape[2] == n and target[2] == m:
            dense[name] = _grow_keys(tensor, m)
        else:
            raise InputError(f"checkpoint {ckpt}: cannot grow '{name}' {tuple(tensor.shape)} -> {tuple(target)}")
    for key, tensor in moments.items():
        name = key.split(".", 1)[1]
        dense_moments[key] = _grow_keys(tensor, m) if dense[name].shape != tensor.shape else tensor

    root = out / "checkpoints"
    tmp = begin_checkpoint(root, manifest["step"], fresh=True)
    source, target = ckpt.resolve() / STORE, tmp / STORE
    checksums = manifest.get("chunks", {})
    jobs, pools = [], {}
    for name, info in pool_info(ckpt).get("pools", {}).items():
        if info["num_rows"] != n * n:
            raise InputError(f"checkpoint {ckpt}: pool '{name}' has {info['num_rows']} rows, not n_keys² = {n * n}")
        pools[name] = {**info, "num_rows": m * m}
        for key in info["arrays"]:
            shape, _, dtype, dtype_name = array_info(source, f"{name}/{key}")
            chunk_rows = chunk_rows_for(m * m, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
            create_array(target, f"{name}/{key}", (m * m, *shape[1:]), chunk_rows, dtype, dtype_name)
            mine = {k: v for k, v in checksums.items() if k.startswith(f"{name}/{key}/c/")}
            count = -(-m * m // chunk_rows)
            for a in range(0, count, TASK_CHUNKS):
                jobs.append((str(source), str(target), name, key, n, m, (a, min(count, a + TASK_CHUNKS)), mine))

    def write_pools() -> dict[str, str]:
        return {k: v for part in (map_files or _in_threads)(grow_chunks, jobs) for k, v in part.items()}

    keep = {k: v for k, v in attrs.items() if k not in ("step", "pools")}
    keep.update(world_size=1, layout="unsharded", zero_stage=None)  # one writer: this process
    keep["grown_from"] = {"checkpoint": str(ckpt.resolve()), "n_keys": n}
    extra = {TOKENIZER_FILE: ckpt / TOKENIZER_FILE} if TOKENIZER_FILE in manifest["files"] else None
    files, error = write_dense(tmp, DenseState.of(dense, dense_moments), dump_yaml(grown), write=True)
    pending = PendingCheckpoint(root, tmp, manifest["step"], pools, keep, 0, None, 0)
    pending.start(write_pools, files, background=False, extra_files=extra, error=error)
    return pending.finish()
