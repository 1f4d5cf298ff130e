"""Checkpoints of runs with sharded value pools.

``step-XXXXXXXX/`` holds ``model.safetensors`` and ``optimizer.safetensors`` (the dense weights and
their Adam moments, streamed to rank 0 one tensor at a time: no rank holds the whole model),
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from memray.distributed import collectives
from memray.errors import InputError, RunFailed, UserError

from . import (
    CONFIG,
    WEIGHTS,
    _sha256,
    begin_checkpoint,
    checkpoint_name,
    commit_checkpoint,
    find_checkpoint,
    read_manifest,
)
from .pools import STORE, prepare_pool, read_rows, verify_chunks, write_chunks
from .tensorfile import TensorFile, TensorFileWriter, TensorSpecs

OPTIMIZER = "optimizer.safetensors"
DENSE_FILES = {"weights": WEIGHTS, "optimizer": OPTIMIZER}


@dataclass
class DenseState:
    """The dense tensors of a checkpoint, produced one at a time.

    ``specs``: ``{"weights": {name: (dtype, shape)}, "optimizer": {...}}`` (a part may be absent:
    no file); ``tensors()`` yields ``(part, name, tensor)`` in that order, the tensor on the rank
    that writes (rank 0) and ``None`` elsewhere; where the tensors live partitioned over the ranks
    (ZeRO), each is assembled by a collective, so every rank iterates it in step."""

    specs: dict[str, TensorSpecs]
    tensors: Callable[[], Iterable[tuple[str, str, torch.Tensor | None]]]

    @classmethod
    def of(cls, weights: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor] | None = None) -> DenseState:
        """Tensors one process already holds whole (``optimizer``: none, no optimizer file)."""
        parts = {"weights": weights, **({"optimizer": optimizer} if optimizer is not None else {})}
        specs = {part: {k: (v.dtype, tuple(v.shape)) for k, v in d.items()} for part, d in parts.items()}
        return cls(specs, lambda: ((part, k, v) for part, d in parts.items() for k, v in d.items()))


def write_dense(tmp: Path, dense: DenseState, config_yaml: str, write: bool) -> tuple[dict[str, str], Exception | None]:
    """Stream ``dense`` into ``tmp`` (``model.safetensors``, ``optimizer.safetensors``) and write
    ``config.yaml``: (their checksums, the error that stopped the writing or None). Every rank
    calls it (``dense.tensors()`` may be collective, so a writer that fails still takes part to
    the end, and the error is raised when every rank knows); only the one with ``write`` writes,
    holding one tensor at a time."""
    writers, error = {}, None
    if write:
        try:
            writers = {part: TensorFileWriter(tmp / DENSE_FILES[part], specs) for part, specs in dense.specs.items()}
        except Exception as exc:  # noqa: BLE001 - reported by PendingCheckpoint.finish
            error = exc
    for part, name, tensor in dense.tensors():
        if writers and error is None:
            try:
                writers[part].write(name, tensor)
            except Exception as exc:  # noqa: BLE001 - as above
                error = exc
    if not write or error is not None:
        for writer in writers.values():
            writer.abort()
        return {}, error
    try:
        files = {DENSE_FILES[part]: writer.close() for part, writer in writers.items()}
        (tmp / CONFIG).write_text(config_yaml)
        return {**files, CONFIG: _sha256(tmp / CONFIG)}, None
    except Exception as exc:  # noqa: BLE001 - as above
        return {}, exc


def save_sharded_checkpoint(*args, **options) -> Path:
    """A whole save, in the foreground: :func:`start_sharded_checkpoint` (same arguments), then
    :meth:`PendingCheckpoint.finish` (collective). Returns the checkpoint directory."""
    return start_sharded_checkpoint(*args, **options).finish()


def start_sharded_checkpoint(
    root: Path,
    step: int,
    dense: DenseState | dict[str, torch.Tensor],
    config_yaml: str,
    pools: dict,
    *,
    group=None,
    keep_last: int = 0,
    attrs: dict | None = None,
    background: bool = False,
    extra_files: dict[str, Path] | None = None,
) -> PendingCheckpoint:
    """Collective over ``group``: ``pools`` maps name -> (:class:`memray.model.TableShard` this
    rank holds, {key: this rank's tensor}); ``dense``: the dense tensors (a dict: weights only,
    held whole by rank 0), written by rank 0 one tensor at a time.

    The collective part of a save (the temporary directory, the dense files, array metadata, the
    rows each rank must write); the pools' files are written now, or by a thread when
    ``background`` (on snapshots, so training may go on). ``extra_files`` (name -> path, e.g. the
    run's tokenizer) are copied in by rank 0 and checksummed with the rest.
    :meth:`PendingCheckpoint.finish` (collective) commits."""
    if not isinstance(dense, DenseState):
        dense = DenseState.of(dense)
    rank = collectives.rank_in(group)
    tmp = begin_checkpoint(root, step, fresh=rank == 0)
    collectives.barrier(group)
    files, dense_error = write_dense(tmp, dense, config_yaml, write=rank == 0)
    jobs = [
        job
        for name, (shard, tensors) in pools.items()
        for job in prepare_pool(tmp / STORE, name, tensors, shard, group, snapshot=background)
    ]
    shapes = {name: {"num_rows": s.num_rows, "dim": s.dim, "arrays": sorted(ts)} for name, (s, ts) in pools.items()}
    pending = PendingCheckpoint(root, tmp, step, shapes, attrs or {}, keep_last, group, rank)
    extra_files = extra_files if rank == 0 else None
    pending.start(functools.partial(write_chunks, tmp / STORE, jobs), files, background, extra_files, dense_error)
    return pending


class PendingCheckpoint:
    """A save whose files are being (or have been) written; ``finish()`` commits it."""

    def __init__(self, root, tmp, step, shapes, attrs, keep_last, group, rank):
        """``shapes``: pool name -> {"num_rows", "dim", "arrays": [array keys]} (the group's
        ``pools`` attribute)."""
        self.root, self.tmp, self.step = Path(root), tmp, step
        self.shapes = shapes
        self.attrs, self.keep_last, self.group, self.rank = attrs, keep_last, group, rank
        self._thread, self._result, self._error = None, {}, None

    def start(self, write_pools, files: dict[str, str], background: bool, extra_files=None, error=None) -> None:
        """Write this rank's files: ``write_pools()`` writes its chunks and returns their
        checksums; ``files``: checksums of what this rank already wrote (rank 0: the dense files
        and config), ``error``: what stopped that writing; ``extra_files`` (rank 0) are copied
        beside them."""

        def work():
            try:
                if error is not None:
                    raise error
                written = dict(files)
                for name, source in (extra_files or {}).items():
                    shutil.copyfile(source, self.tmp / name)
                    written[name] = _sha256(self.tmp / name)
                self._result = {"chunks": write_pools(), "files": written}
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


def load_training_state(path: str | Path) -> tuple[Path, dict, dict, TensorFile, TensorFile]:
    """(checkpoint, manifest, group attributes, dense weights, dense optimizer tensors) to resume
    from; files are checked here, chunks when each rank reads its rows. The dense tensors are
    read from their files one at a time, as they are asked for."""
    ckpt, manifest = verify_checkpoint(path, chunks=False)
    if OPTIMIZER not in manifest["files"] or not (ckpt / STORE).is_dir():
        raise InputError(f"checkpoint {ckpt} holds no training state to resume from (weights only)")
    try:
        weights, moments = TensorFile(ckpt / WEIGHTS), TensorFile(ckpt / OPTIMIZER)
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise InputError(f"checkpoint {ckpt}: cannot read its dense tensors: {exc}") from None
    return ckpt, manifest, pool_info(ckpt), weights, moments


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
