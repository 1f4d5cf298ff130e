"""Checkpoints of runs with sharded value pools.

``step-XXXXXXXX/`` holds ``model.safetensors`` (the dense weights, written by rank 0),
``config.yaml``, ``memory.zarr/`` (every pool and its row-indexed state, written shard by shard:
:mod:`memray.checkpoint.pools`) and ``COMMITTED``: the manifest with the SHA-256 of every file
and of every chunk, written last after all ranks finished. The group's attributes record the
step, the saving world size and layout and each pool's shape, so a reader needs nothing else.
"""

from __future__ import annotations

import functools
import json
import shutil
import threading
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from memray.distributed import collectives
from memray.errors import InputError, RunFailed, UserError

from . import (
    WEIGHTS,
    _sha256,
    begin_checkpoint,
    checkpoint_name,
    commit_checkpoint,
    find_checkpoint,
    read_manifest,
    write_weights,
)
from .pools import STORE, prepare_pool, read_rows, verify_chunks, write_chunks

OPTIMIZER = "optimizer.safetensors"


def save_sharded_checkpoint(*args, **options) -> Path:
    """A whole save, in the foreground: :func:`start_sharded_checkpoint` (same arguments), then
    :meth:`PendingCheckpoint.finish` (collective). Returns the checkpoint directory."""
    return start_sharded_checkpoint(*args, **options).finish()


def start_sharded_checkpoint(
    root: Path,
    step: int,
    dense_state: dict[str, torch.Tensor] | None,
    config_yaml: str,
    pools: dict,
    *,
    group=None,
    keep_last: int = 0,
    attrs: dict | None = None,
    dense_optimizer: dict[str, torch.Tensor] | None = None,
    background: bool = False,
    extra_files: dict[str, Path] | None = None,
) -> PendingCheckpoint:
    """Collective over ``group``: ``pools`` maps name -> (:class:`memray.model.TableShard` this
    rank holds, {key: this rank's tensor}). Rank 0 writes the dense weights (``dense_state``)
    and the dense optimizer's tensors (``dense_optimizer``, to ``optimizer.safetensors``; both
    ignored elsewhere).

    The collective part of a save (the temporary directory, array metadata, the rows each rank
    must write); the files are written now, or by a thread when ``background`` (on snapshots,
    so training may go on). ``extra_files`` (name -> path, e.g. the run's tokenizer) are copied
    in by rank 0 and checksummed with the rest. :meth:`PendingCheckpoint.finish` (collective) commits."""
    rank = collectives.rank_in(group)
    tmp = begin_checkpoint(root, step, fresh=rank == 0)
    collectives.barrier(group)
    jobs = [
        job
        for name, (shard, tensors) in pools.items()
        for job in prepare_pool(tmp / STORE, name, tensors, shard, group, snapshot=background)
    ]
    dense = None
    if rank == 0:
        dense = [
            {k: v.detach().clone() if background else v for k, v in d.items()} if d is not None else None
            for d in (dense_state or {}, dense_optimizer)
        ]
    shapes = {name: {"num_rows": s.num_rows, "dim": s.dim, "arrays": sorted(ts)} for name, (s, ts) in pools.items()}
    pending = PendingCheckpoint(root, tmp, step, config_yaml, shapes, attrs or {}, keep_last, group, rank)
    extra_files = extra_files if rank == 0 else None
    pending.start(functools.partial(write_chunks, tmp / STORE, jobs), dense, background, extra_files)
    return pending


class PendingCheckpoint:
    """A save whose files are being (or have been) written; ``finish()`` commits it."""

    def __init__(self, root, tmp, step, config_yaml, shapes, attrs, keep_last, group, rank):
        """``shapes``: pool name -> {"num_rows", "dim", "arrays": [array keys]} (the group's
        ``pools`` attribute)."""
        self.root, self.tmp, self.step, self.config_yaml = Path(root), tmp, step, config_yaml
        self.shapes = shapes
        self.attrs, self.keep_last, self.group, self.rank = attrs, keep_last, group, rank
        self._thread, self._result, self._error = None, {}, None

    def start(self, write_pools, dense, background: bool, extra_files: dict[str, Path] | None = None) -> None:
        """Write this rank's files: ``write_pools()`` writes its chunks and returns their
        checksums; ``dense`` (rank 0: [weights, optimizer tensors or None]) and ``extra_files``
        (rank 0) beside them."""

        def work():
            try:
                files = {}
                for name, source in (extra_files or {}).items():
                    shutil.copyfile(source, self.tmp / name)
                    files[name] = _sha256(self.tmp / name)
                if dense is not None:  # rank 0: dense weights and optimizer beside the pools
                    files.update(write_weights(self.tmp, dense[0], self.config_yaml))
                    if dense[1] is not None:
                        save_file(
                            {k: v.detach().contiguous().cpu() for k, v in dense[1].items()}, str(self.tmp / OPTIMIZER)
                        )
                        files[OPTIMIZER] = _sha256(self.tmp / OPTIMIZER)
                self._result = {"chunks": write_pools(), "files": files}
            except Exception as exc:  # raised by finish(), with its traceback, once every rank knows
                self._error = exc
                self._result = {"error": f"{type(exc).__name__}: {exc}"}

        if background:
            self._thread = threading.Thread(target=work, name=f"checkpoint-{self.step}", daemon=True)
            self._thread.start()
        else:
            work()

    def finish(self) -> Path:
        """Wait for this rank's files, gather every rank's checksums, commit on rank 0 (collective)."""
        import zarr

        if self._thread is not None:
            self._thread.join()
        parts = collectives.gather_objects(self._result, self.group)
        errors = [(rank, p["error"]) for rank, p in enumerate(parts) if "error" in p]
        if errors:
            # nothing is committed; the rank that failed raises its own exception (its traceback
            # shows where the files failed), the others say which rank it was
            message = f"checkpoint step {self.step} was not saved"
            if isinstance(self._error, UserError):  # e.g. a damaged chunk read while saving
                raise self._error
            if self._error is not None:
                details = "".join(traceback.format_exception(self._error))
                raise RunFailed(f"{message}: {errors[0][1]}", details) from self._error
            raise RunFailed(f"{message}: rank {errors[0][0]}: {errors[0][1]}")
        final = self.root / checkpoint_name(self.step)
        if self.rank == 0:
            store = zarr.open_group(str(self.tmp / STORE), mode="a")
            store.attrs.update({"step": self.step, **self.attrs, "pools": self.shapes})
            files = dict(self._result["files"])
            files.update(
                {str(p.relative_to(self.tmp)): _sha256(p) for p in sorted((self.tmp / STORE).rglob("zarr.json"))}
            )
            chunks = {k: v for p in parts for k, v in p["chunks"].items()}
            final = commit_checkpoint(self.root, self.tmp, self.step, files, keep_last=self.keep_last, chunks=chunks)
        collectives.barrier(self.group)
        return final


def verify_checkpoint(path: str | Path, chunks: bool = True) -> tuple[Path, dict]:
    """Check every file (and chunk) against the manifest; InputError names the first damage."""
    ckpt, manifest = read_manifest(path)
    for rel, digest in sorted(manifest["files"].items()):
        if not (ckpt / rel).is_file():
            raise InputError(f"checkpoint {ckpt}: {rel} is missing")
        if _sha256(ckpt / rel) != digest:
            raise InputError(f"checkpoint {ckpt}: {rel} is damaged (checksum mismatch)")
    if chunks:
        verify_chunks(ckpt / STORE, manifest.get("chunks", {}))
    return ckpt, manifest


def load_training_state(path: str | Path) -> tuple[Path, dict, dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(checkpoint, manifest, group attributes, dense weights, dense optimizer tensors) to resume
    from; files are checked here, chunks when each rank reads its rows."""
    ckpt, manifest = verify_checkpoint(path, chunks=False)
    if OPTIMIZER not in manifest["files"] or not (ckpt / STORE).is_dir():
        raise InputError(f"checkpoint {ckpt} holds no training state to resume from (weights only)")
    return ckpt, manifest, pool_info(ckpt), load_file(str(ckpt / WEIGHTS)), load_file(str(ckpt / OPTIMIZER))


def pool_info(ckpt: Path) -> dict:
    """Attributes of the checkpoint's Zarr group (step, world size, layout, pools)."""
    import zarr

    try:
        return dict(zarr.open_group(str(ckpt / STORE), mode="r").attrs)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as exc:
        raise InputError(f"checkpoint {ckpt}: {STORE} cannot be opened ({exc})") from None


def load_pool_shard(
    path: str | Path,
    name: str,
    row_range: tuple[int, int],
    col_range: tuple[int, int] | None,
    manifest: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Every array of pool ``name`` restricted to rows ``row_range`` (and, for [N, D] arrays,
    columns ``col_range``): what one rank of any world size and layout holds. Only the chunks
    holding those rows are read, each checked against the manifest first."""
    ckpt = find_checkpoint(path)
    if manifest is None:
        ckpt, manifest = read_manifest(ckpt)
    info = pool_info(ckpt).get("pools", {})
    if name not in info:
        raise InputError(f"checkpoint {ckpt}: no value pool '{name}' (it has {sorted(info)})")
    return {
        key: read_rows(ckpt / STORE, name, key, row_range, col_range, manifest.get("chunks", {}))
        for key in info[name]["arrays"]
    }


def restore_offline(path: str | Path, out: str | Path, world_size: int, layout: str = "row") -> dict:
    """Reshard a checkpoint's pools for ``world_size`` ranks of ``layout`` without any process
    group: ``out/rank-XXXXX.safetensors`` holds rank r's shard of every pool array
    (``<pool>/<array>``), read one rank at a time (only the chunks holding its rows; each chunk
    checked), and ``out/restore.json`` the source, step, layout, every rank's row and column
    ranges and every file's SHA-256, written last."""
    from memray.distributed.plan import balanced_ranges

    ckpt, manifest = read_manifest(path)
    pools = pool_info(ckpt).get("pools", {})
    if not pools:
        raise InputError(f"checkpoint {ckpt} holds no value pools to restore")
    if layout not in ("row", "column"):
        raise InputError(f"--layout must be row or column, got {layout!r}")
    for name, info in pools.items():
        limit = info["num_rows"] if layout == "row" else info["dim"]
        if not 1 <= world_size <= limit:
            raise InputError(
                f"--world-size {world_size}: pool '{name}' has {limit} "
                f"{'rows' if layout == 'row' else 'value columns'} to split"
            )
    out = Path(out)
    if (out / "restore.json").exists():
        raise InputError(f"{out} already holds a restore (restore.json); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    ranks = []
    for rank in range(world_size):
        tensors, ranges = {}, {}
        for name, info in pools.items():
            if layout == "row":
                rows, cols = balanced_ranges(info["num_rows"], world_size)[rank], (0, info["dim"])
            else:
                rows, cols = (0, info["num_rows"]), balanced_ranges(info["dim"], world_size)[rank]
            ranges[name] = {"rows": list(rows), "cols": list(cols)}
            for key, tensor in load_pool_shard(ckpt, name, rows, cols, manifest).items():
                tensors[f"{name}/{key}"] = tensor.contiguous()
        file = out / f"rank-{rank:05d}.safetensors"
        save_file(tensors, str(file))
        ranks.append({"file": file.name, "sha256": _sha256(file), "ranges": ranges})
    summary = {
        "source": str(ckpt),
        "step": manifest["step"],
        "world_size": world_size,
        "layout": layout,
        "ranks": ranks,
    }
    tmp = out / "restore.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "restore.json")
    return summary
