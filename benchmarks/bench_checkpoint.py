"""Checkpoint save and restore throughput of a value pool against raw files and torch.save.

Claim measured: writing a pool into a memray checkpoint (Zarr chunks, a SHA-256 per chunk, fsync
of every file, COMMITTED) and reading it back (every chunk checked) runs at >= 50% of the speed
of writing and reading the same bytes as plain files, in the same run.

The pool: ``weight`` [N, 256] fp32 and a row-wise Adagrad accumulator [N] fp32 (N = 2^20: 1 GiB;
``--quick``: 2^18). Methods, interleaved round by round (medians of ``--reps`` rounds):

* ``raw``: each tensor's bytes to its own file in one ``write``, fsync; read with one
  ``readinto`` into a preallocated tensor.
* ``memray``: ``save_sharded_checkpoint`` (one process) and ``load_pool_shard`` of all rows.
* ``torch``: ``torch.save`` of the tensors (pickle; fsync), ``torch.load(weights_only=True)``.

Each save starts after ``os.sync()`` (no dirty pages left by the one before: the kernel would
otherwise throttle whichever method comes next) and ends with its files fsynced. Reads follow the
writes, so all three read from the page cache alike (the disk's read speed is not what is
compared). GB/s = bytes of the tensors / seconds.

    python benchmarks/bench_checkpoint.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, write_table  # noqa: E402

from memray.checkpoint.sharded import load_pool_shard, save_sharded_checkpoint  # noqa: E402
from memray.model import ValueTable  # noqa: E402

NAME = "bench_checkpoint"
DIM = 256


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--log2-rows", type=int, default=None)
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results")
    parser.add_argument(
        "--dir", type=pathlib.Path, default=None, help="where to write (default: a temporary directory)"
    )
    args = parser.parse_args(argv)
    log2_rows = args.log2_rows or (18 if args.quick else 20)
    reps = args.reps or (2 if args.quick else 5)
    table = ValueTable(1 << log2_rows, DIM)
    tensors = {"weight": table.weight.detach(), "optim.sum_sq": torch.rand(1 << log2_rows)}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    work = pathlib.Path(tempfile.mkdtemp(dir=args.dir))
    times = {f"{m}_{op}": [] for m in ("raw", "memray", "torch") for op in ("save", "load")}
    try:
        for rep in range(reps):
            for method in ("raw", "memray", "torch"):
                target = work / f"{method}-{rep}"
                target.mkdir()
                os.sync()  # every save starts with no dirty pages left by the one before
                start = time.perf_counter()
                if method == "raw":
                    for key, t in tensors.items():
                        with open(target / key, "wb") as handle:
                            handle.write(t.numpy().data)
                        _fsync(target / key)
                elif method == "memray":
                    save_sharded_checkpoint(target, 1, {}, "name: bench\n", {"values": (table.shard, tensors)})
                else:
                    torch.save(tensors, target / "state.pt")
                    _fsync(target / "state.pt")
                times[f"{method}_save"].append(time.perf_counter() - start)
                start = time.perf_counter()
                if method == "raw":
                    loaded = {}
                    for key, t in tensors.items():
                        loaded[key] = torch.empty_like(t)
                        with open(target / key, "rb") as handle:
                            handle.readinto(loaded[key].numpy().data.cast("B"))
                elif method == "memray":
                    loaded = load_pool_shard(target, "values", (0, table.num_rows), (0, DIM))
                else:
                    loaded = torch.load(target / "state.pt", weights_only=True)
                times[f"{method}_load"].append(time.perf_counter() - start)
                assert len(loaded) >= len(tensors)
                del loaded
                shutil.rmtree(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    summary = {"benchmark": NAME, "bytes": nbytes}
    for op in ("save", "load"):
        for method in ("raw", "memray", "torch"):
            seconds = statistics.median(times[f"{method}_{op}"])
            rows.append(
                {
                    "op": op,
                    "method": method,
                    "median_s": seconds,
                    "GBps": nbytes / seconds / 1e9,
                    "vs_raw": statistics.median(times[f"raw_{op}"]) / seconds,
                }
            )
        summary[f"{op}_memray_vs_raw"] = rows[-2]["vs_raw"]
        summary[f"{op}_memray_vs_torch"] = statistics.median(times[f"torch_{op}"]) / statistics.median(
            times[f"memray_{op}"]
        )
    machine = machine_info()
    write_table(
        args.out,
        NAME,
        rows,
        ["op", "method", "median_s", "GBps", "vs_raw"],
        machine=machine,
        summary=summary,
        title=f"Save and restore of a 2^{log2_rows} x {DIM} fp32 pool + one fp32 per row "
        f"({nbytes / 2**30:.2f} GiB), medians of {reps} interleaved rounds.",
    )
    summary["machine"] = machine
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
