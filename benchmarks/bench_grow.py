"""Peak memory of ``memray grow`` on a large pool: chunk by chunk against the whole table in memory.

Claim measured: growing a 2^22 x 256 fp32 pool (4 GiB, with a row-wise optimizer accumulator)
to a larger product-key grid peaks below 25% of the pool's bytes in resident memory, and writes
arrays bit-equal to the in-memory grow.

The benchmark writes a training checkpoint of the tiny model with one pool of N = n_keys² rows
(``--log2-rows``, even; default 22, ``--quick`` 16) of ``--dim`` values, then, each in its own
process so that each peak is its own:

* ``chunked``: ``memray grow CKPT --n-keys M --out DIR`` (M = n_keys · 17/16): what users run;
* ``in_memory``: the whole of every pool array read (``load_pool_shard``) and grown in memory
  (``memray.train.grow.grown_rows``), printing the SHA-256 of each grown array's bytes.

Peak RSS is the child's ``ru_maxrss``; seconds are wall time of the child. The chunked result
is read back row block by row block and hashed: equal digests mean bit-equal arrays.

    python benchmarks/bench_grow.py [--quick] [--log2-rows L] [--dim D] [--dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, write_table  # noqa: E402

NAME = "bench_grow"

IN_MEMORY = """
import hashlib, json, sys
from memray.checkpoint import read_manifest
from memray.checkpoint.sharded import load_pool_shard, pool_info
from memray.checkpoint.pools import _to_numpy
from memray.train.grow import grown_rows
ckpt, n, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
path, manifest = read_manifest(ckpt)
digests = {}
for name, info in pool_info(path)["pools"].items():
    for key, old in load_pool_shard(path, name, (0, info["num_rows"]), None, manifest).items():
        digests[f"{name}/{key}"] = hashlib.sha256(_to_numpy(grown_rows(old, n, m))[0].data).hexdigest()
        del old
print(json.dumps(digests))
"""


# runs one command and writes its peak RSS (KiB) to a file: a fresh parent per measured child
PEAK_OF = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def _child(args: list[str], work: pathlib.Path) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run a child Python; (result, seconds, its own peak RSS in bytes)."""
    peak_file = work / "peak"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", PEAK_OF, str(peak_file), sys.executable, *args], capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{args[:3]} failed:\n{result.stderr[-3000:]}")
    return result, seconds, int(peak_file.read_text()) * 1024


def _write_checkpoint(root: pathlib.Path, log2_rows: int, dim: int) -> tuple[pathlib.Path, int, int]:
    """A committed checkpoint of the tiny model with one 2^log2_rows x dim pool; (path, pool bytes, n)."""
    from memray.checkpoint.sharded import DenseState, save_sharded_checkpoint
    from memray.config import dump_yaml
    from memray.model import Transformer, build_pools
    from memray.train import load_run_config

    n = 1 << (log2_rows // 2)
    config = load_run_config("tiny", [f"model.memory.n_keys={n}", f"model.memory.v_dim={dim}"])
    pools = build_pools(config.model)
    model = Transformer(config.model, pools=pools)
    tensors = {
        name: (table.shard, {"weight": table.weight.detach(), "optim.sum_sq": torch.rand(table.num_rows)})
        for name, table in pools.items()
    }
    nbytes = sum(t.numel() * t.element_size() for _, ts in tensors.values() for t in ts.values())
    path = save_sharded_checkpoint(
        root, 1, DenseState.of(model.state_dict(), {}), dump_yaml(config), tensors, attrs={"tokens": 0}
    )
    return path, nbytes, n


def _chunked_digests(ckpt: pathlib.Path, block_rows: int = 1 << 16) -> dict[str, str]:
    """SHA-256 of every pool array's bytes, read back in row blocks."""
    from memray.checkpoint import read_manifest
    from memray.checkpoint.pools import STORE, RowReader
    from memray.checkpoint.sharded import pool_info

    path, manifest = read_manifest(ckpt)
    digests = {}
    for name, info in pool_info(path)["pools"].items():
        for key in info["arrays"]:
            reader, digest = RowReader(path / STORE, name, key, manifest["chunks"]), hashlib.sha256()
            for start in range(0, info["num_rows"], block_rows):
                digest.update(reader.rows(start, min(info["num_rows"], start + block_rows)).data)
            digests[f"{name}/{key}"] = digest.hexdigest()
    return digests


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--log2-rows", type=int, default=None, help="pool rows = 2^L (L even)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results")
    parser.add_argument("--dir", type=pathlib.Path, default=None, help="where to write (default: a temporary dir)")
    args = parser.parse_args(argv)
    log2_rows = args.log2_rows or (16 if args.quick else 22)
    if log2_rows % 2:
        parser.error("--log2-rows must be even (the pool has n_keys² rows)")
    work = pathlib.Path(tempfile.mkdtemp(dir=args.dir))
    try:
        ckpt, nbytes, n = _write_checkpoint(work / "source" / "checkpoints", log2_rows, args.dim)
        m = n + max(1, n // 16)
        _, chunked_s, chunked_peak = _child(
            ["-m", "memray.cli", "grow", str(ckpt), "--n-keys", str(m), "--out", str(work / "grown")], work
        )
        result, memory_s, memory_peak = _child(["-c", IN_MEMORY, str(ckpt), str(n), str(m)], work)
        in_memory = json.loads(result.stdout.strip().splitlines()[-1])
        chunked = _chunked_digests(work / "grown")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        {"method": "chunked", "peak_rss_GiB": chunked_peak / 2**30, "vs_pool_bytes": chunked_peak / nbytes},
        {"method": "in_memory", "peak_rss_GiB": memory_peak / 2**30, "vs_pool_bytes": memory_peak / nbytes},
    ]
    rows[0]["seconds"], rows[1]["seconds"] = chunked_s, memory_s
    summary = {
        "benchmark": NAME,
        "pool": f"2^{log2_rows} x {args.dim}",
        "pool_GiB": nbytes / 2**30,
        "n_keys": f"{n} -> {m}",
        "chunked_peak_vs_pool": chunked_peak / nbytes,
        "chunked_peak_vs_in_memory": chunked_peak / memory_peak,
        "chunked_s_vs_in_memory": chunked_s / memory_s,
        "bit_equal": chunked == in_memory,
        "arrays": len(chunked),
    }
    machine = machine_info()
    write_table(
        args.out,
        NAME + ("_quick" if args.quick else ""),
        rows,
        ["method", "peak_rss_GiB", "vs_pool_bytes", "seconds"],
        machine=machine,
        summary=summary,
        title=f"memray grow of a 2^{log2_rows} x {args.dim} fp32 pool + one fp32 per row "
        f"({nbytes / 2**30:.2f} GiB; n_keys {n} -> {m}): peak resident memory of the process that grows it.",
    )
    summary["machine"] = machine
    print(json.dumps(summary))
    if not summary["bit_equal"]:
        raise SystemExit("the chunked grow differs from the in-memory grow")
    return summary


if __name__ == "__main__":
    main()
