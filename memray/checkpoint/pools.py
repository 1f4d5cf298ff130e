"""Value pools in a Zarr v3 group: written shard by shard, read back onto any sharding.

``memory.zarr/<pool>/weight`` is the whole ``[num_rows, dim]`` table and ``<pool>/<key>`` each
row-indexed tensor beside it (optimizer state such as ``exp_avg`` [N, D] or ``sum_sq`` [N],
usage counts), chunked by rows (``chunk_rows``), uncompressed. bf16 tensors are stored as
uint16 with the attribute ``"memray_dtype": "bfloat16"``.

Every rank writes the chunks whose first row it owns in the row layout of the saving run; the
rows of such a chunk that the next rank owns are sent to it first (at most ``chunk_rows`` rows
per rank boundary), and a run with the column layout first moves its slices into whole rows.
So no chunk file has two writers. Each writer hashes its chunk files; rank 0 gathers the
SHA-256 of every chunk into the manifest that the checkpoint's ``COMMITTED`` file covers.

Reading needs no process group: :func:`read_rows` reads the rows and columns one rank owns
under any world size and layout, touching only the chunks that hold them, each checked against
its checksum (a missing or altered chunk is an error naming the array and the chunk). Chunk
files are written and read directly (the arrays' only codec is little-endian ``bytes``, so a
chunk file is the chunk's raw bytes); zarr creates the metadata, and any Zarr v3 reader reads
the arrays.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from memray.distributed import collectives
from memray.distributed.plan import balanced_ranges
from memray.errors import InputError
from memray.files import sha256_file
from memray.model.values import TableShard

STORE = "memory.zarr"
CHUNK_BYTES = 64 << 20  # target size of one chunk file
IO_THREADS = 4


def chunk_rows_for(num_rows: int, row_bytes: int) -> int:
    return max(1, min(num_rows, CHUNK_BYTES // max(row_bytes, 1)))


def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), "bfloat16"
    return t.numpy(), str(t.dtype).removeprefix("torch.")


def _from_numpy(a: np.ndarray, dtype_name: str) -> torch.Tensor:
    if dtype_name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _chunk_path(array_dir: Path, chunk: int, ndim: int) -> Path:
    return array_dir.joinpath("c", str(chunk), *(["0"] if ndim == 2 else []))


def _to_row_layout(local: torch.Tensor, shard: TableShard, group) -> torch.Tensor:
    """This rank's rows (row layout of the saving world) of a tensor sharded like ``shard``."""
    if shard.layout != "column" or shard.world == 1:
        return local
    ranges = balanced_ranges(shard.num_rows, shard.world)
    if local.dim() == 1:  # per-row state is whole on every column rank
        start, stop = ranges[shard.rank]
        return local[start:stop]
    width = local.shape[1]
    send = torch.cat([local[a:b].reshape(-1) for a, b in ranges])
    mine = ranges[shard.rank][1] - ranges[shard.rank][0]
    recv = collectives.exchange(send, [(b - a) * width for a, b in ranges], [mine * w for w in shard.col_widths], group)
    pieces = recv.split([mine * w for w in shard.col_widths])
    return torch.cat([p.view(mine, w) for p, w in zip(pieces, shard.col_widths)], dim=1)


def _with_next_rows(rows: torch.Tensor, ranges, chunk_rows: int, rank: int, group) -> torch.Tensor:
    """Hand the rows before this rank's first chunk boundary to the previous rank and append
    the next rank's: the result holds whole chunks only (``chunk_rows`` <= every shard)."""
    world = len(ranges)
    if world == 1:
        return rows
    # rank r sends to r - 1 the rows from its start to the end of the chunk holding its start
    my_start, my_stop = ranges[rank]
    head = 0 if my_start % chunk_rows == 0 else min(my_stop, (my_start // chunk_rows + 1) * chunk_rows) - my_start
    heads = [int(h) for h in collectives.gather_from_ranks(torch.tensor(head), group)]
    width = rows[0:1].numel()
    send_splits = [0] * world
    if rank > 0:
        send_splits[rank - 1] = head * width
    recv_splits = [0] * world
    if rank + 1 < world:
        recv_splits[rank + 1] = heads[rank + 1] * width
    recv = collectives.exchange(rows[:head].reshape(-1), send_splits, recv_splits, group)
    return torch.cat([rows[head:], recv.view(-1, *rows.shape[1:])])


def create_array(store: Path, array_path: str, shape, chunk_rows: int, dtype: np.dtype, dtype_name: str) -> None:
    """The Zarr metadata of an array memray writes: chunked by rows, raw little-endian chunks."""
    import zarr

    array = zarr.open_group(str(store), mode="a").create_array(
        array_path,
        shape=tuple(shape),
        chunks=(chunk_rows, *shape[1:]),
        dtype=dtype,
        compressors=None,
        fill_value=0,
        overwrite=True,
    )
    array.attrs["memray_dtype"] = dtype_name


def array_info(store: Path, array_path: str) -> tuple[list[int], int, np.dtype, str]:
    """(shape, rows per chunk, little-endian numpy dtype, memray dtype name) of an array memray
    wrote; InputError for one it cannot read."""
    try:
        meta = json.loads((store / array_path / "zarr.json").read_text())
        shape, chunk_rows = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        memray_dtype = meta.get("attributes", {}).get("memray_dtype", meta["data_type"])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise InputError(f"checkpoint {store.parent}: array '{array_path}' cannot be opened ({exc})") from None
    if meta.get("codecs") != [{"name": "bytes", "configuration": {"endian": "little"}}]:
        raise InputError(
            f"checkpoint {store.parent}: array '{array_path}' has codecs {meta.get('codecs')}, "
            "not the raw little-endian chunks memray writes"
        )
    return shape, chunk_rows, dtype, memray_dtype


def write_chunk(store: Path, array_path: str, chunk: int, chunk_rows: int, block: np.ndarray) -> tuple[str, str]:
    """Chunk ``chunk`` of an array from ``block`` (its rows, little-endian; a short last block is
    padded to a whole chunk): (path relative to the store, SHA-256)."""
    if block.shape[0] < chunk_rows:
        block = np.concatenate([block, np.zeros((chunk_rows - block.shape[0], *block.shape[1:]), block.dtype)])
    raw = memoryview(np.ascontiguousarray(block)).cast("B")  # no copy for whole chunks
    path = _chunk_path(store / array_path, chunk, block.ndim)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(raw)
    return str(path.relative_to(store)), hashlib.sha256(raw).hexdigest()


def prepare_pool(
    store: Path, name: str, tensors: dict[str, torch.Tensor], shard: TableShard, group=None, snapshot: bool = False
) -> list[tuple[str, int, int, np.ndarray]]:
    """The collective half of writing this rank's part of pool ``name`` (``tensors``: key -> this
    rank's part, as ``shard`` describes it): array metadata (rank 0), the rows exchanged so this
    rank holds whole chunks. Returns (array path, first chunk, chunk rows, rows
    as little-endian numpy) per array, for :func:`write_chunks`; with ``snapshot`` the rows are
    copies, so training may change the tensors while the chunks are written."""
    world, rank, num_rows = shard.world, shard.rank, shard.num_rows
    ranges = balanced_ranges(num_rows, world)
    my_start, _ = ranges[rank]
    jobs = []
    for key, local in tensors.items():
        rows = _to_row_layout(local, shard, group)
        array_path = f"{name}/{key}"
        shape = (num_rows, *rows.shape[1:])
        row_bytes = rows[0:1].numel() * rows.element_size() if rows.numel() else 1
        # no larger than the smallest shard: a chunk then spans at most two ranks' rows
        chunk_rows = min(chunk_rows_for(num_rows, row_bytes), num_rows // world)
        sample, dtype_name = _to_numpy(rows[:0])
        if rank == 0:
            create_array(store, array_path, shape, chunk_rows, sample.dtype, dtype_name)
        if world > 1:
            collectives.barrier(group)
            rows = _with_next_rows(rows, ranges, chunk_rows, rank, group)  # a new tensor
        elif snapshot:
            rows = rows.detach().clone()
        # now rows = global rows [first chunk * chunk_rows, ...): whole chunks, the first one
        # starting in my range
        data, _ = _to_numpy(rows)
        jobs.append(
            (
                array_path,
                -(-my_start // chunk_rows),
                chunk_rows,
                data.astype(data.dtype.newbyteorder("<"), copy=False),
            )
        )
    return jobs


def write_chunks(store: Path, jobs) -> dict[str, str]:
    """The local half, after :func:`prepare_pool`: chunk files written directly (the arrays' only codec
    is little-endian ``bytes``, so a chunk file is the chunk's raw bytes, the last one padded to
    a whole chunk) and hashed from the same buffers. Thread-safe; needs no process group."""
    written = {}
    for array_path, first_chunk, chunk_rows, data in jobs:
        begin = first_chunk * chunk_rows

        def write_one(chunk: int, array_path=array_path, chunk_rows=chunk_rows, begin=begin, data=data):
            block = data[chunk * chunk_rows - begin : (chunk + 1) * chunk_rows - begin]
            return write_chunk(store, array_path, chunk, chunk_rows, block)

        written.update(_in_threads(write_one, range(first_chunk, -(-(begin + data.shape[0]) // chunk_rows))))
    return written


def _in_threads(fn, items) -> list:
    """``[fn(item) ...]`` on a few threads: file I/O and hashing release the GIL, so writing or
    reading one chunk overlaps hashing another."""
    items = list(items)
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(len(items), IO_THREADS)) as pool:
        return list(pool.map(fn, items))


def verify_chunks(store: Path, checksums: dict[str, str]) -> None:
    """Raise InputError naming the array and chunk of the first missing or altered chunk file."""
    for rel, digest in sorted(checksums.items()):
        path = store / rel
        array, chunk = rel.split("/c/")
        if not path.is_file():
            raise InputError(f"checkpoint {store.parent}: array '{array}' chunk {chunk} is missing")
        if sha256_file(path) != digest:
            raise InputError(f"checkpoint {store.parent}: array '{array}' chunk {chunk} is damaged (checksum mismatch)")


def read_rows(
    store: Path, name: str, key: str, rows: tuple[int, int], cols: tuple[int, int] | None, checksums: dict[str, str]
) -> torch.Tensor:
    """Rows ``[a, b)`` (and columns ``[c, d)`` of a 2-D array) of ``<name>/<key>``: each chunk
    holding them is read once, checked against its SHA-256 and copied out."""
    array_path = f"{name}/{key}"
    shape, chunk_rows, dtype, memray_dtype = array_info(store, array_path)
    whole_rows = len(shape) == 1 or cols is None or tuple(cols) == (0, shape[1])
    index = (slice(None),) if whole_rows else (slice(None), slice(*cols))
    width = shape[1:] if len(index) == 1 else [cols[1] - cols[0]]
    # torch's allocator backs large tensors with huge pages: far fewer page faults than numpy's
    native = dtype.newbyteorder("=")
    out = torch.empty((rows[1] - rows[0], *width), dtype=torch.from_numpy(np.zeros(0, native)).dtype).numpy()

    def read_chunk(chunk: int) -> None:
        rel = f"{array_path}/c/{chunk}" + ("/0" if len(shape) == 2 else "")
        path = store / rel
        if rel not in checksums:
            raise InputError(
                f"checkpoint {store.parent}: array '{array_path}' chunk {rel.split('/c/')[1]} is not in the manifest"
            )
        if not path.is_file():
            raise InputError(f"checkpoint {store.parent}: array '{array_path}' chunk {rel.split('/c/')[1]} is missing")
        lo, hi = max(rows[0], chunk * chunk_rows), min(rows[1], (chunk + 1) * chunk_rows)
        whole = lo == chunk * chunk_rows and hi - lo == chunk_rows and len(index) == 1
        # a whole chunk of whole rows is read straight into the output; others through a buffer
        raw = memoryview(out[lo - rows[0] : hi - rows[0]]).cast("B") if whole else bytearray(path.stat().st_size)
        with open(path, "rb") as handle:
            complete = handle.readinto(raw) == len(raw) and not handle.read(1)
        if not complete or hashlib.sha256(raw).hexdigest() != checksums[rel]:
            raise InputError(
                f"checkpoint {store.parent}: array '{array_path}' chunk {rel.split('/c/')[1]} is damaged "
                "(checksum mismatch)"
            )
        if not whole:
            block = np.frombuffer(raw, dtype=dtype).reshape(chunk_rows, *shape[1:])
            out[lo - rows[0] : hi - rows[0]] = block[
                (slice(lo - chunk * chunk_rows, hi - chunk * chunk_rows), *index[1:])
            ]

    _in_threads(read_chunk, range(rows[0] // chunk_rows, -(-rows[1] // chunk_rows)))
    return _from_numpy(out, memray_dtype)


class RowReader:
    """Rows of one array read in increasing order, a chunk at a time (each chunk checked against
    its checksum as it is read), keeping only the chunk last read: a pass over an array of any
    size holds one chunk of it."""

    def __init__(self, store: Path, name: str, key: str, checksums: dict[str, str]):
        self.store, self.name, self.key, self.checksums = Path(store), name, key, checksums
        self.shape, self.chunk_rows, self.dtype, self.dtype_name = array_info(self.store, f"{name}/{key}")
        self._chunk, self._rows = -1, None

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as little-endian numpy (bf16 as uint16)."""
        parts, size = [], self.chunk_rows
        while start < stop:
            chunk = start // size
            if chunk != self._chunk:
                span = (chunk * size, min(self.shape[0], (chunk + 1) * size))
                self._rows = _to_numpy(read_rows(self.store, self.name, self.key, span, None, self.checksums))[0]
                self._chunk = chunk
            end = min(stop, (chunk + 1) * size)
            parts.append(self._rows[start - chunk * size : end - chunk * size])
            start = end
        if not parts:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        data = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return data.astype(self.dtype, copy=False)
