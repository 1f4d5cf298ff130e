"""Full value-table step (forward + backward + optimizer) against the table size N.

Claim measured: memray's row-sparse step costs in proportion to the rows a batch reads, not to
the table: much faster than the paper's dense AdamW at large N, nearly flat in N, and within a
small multiple of the time a memory copy needs to move the bytes the step must touch.

Shapes: D = 256 fp32 (``--dim``), 2048 tokens x 128 lookups (heads x knn), uniform random rows,
N in {2^16, 2^18, 2^20, 2^22} (``--quick`` drops 2^18 and cuts repetitions). A method whose
[N, D] tensors would not fit in the device's free memory is skipped and listed. One step: the weighted
bag lookup, a backward from a fixed upstream gradient (weights' gradient included, as a memory
layer needs it), then the optimizer step, then ``zero_grad``.

Methods:
* ``dense_adamw`` — the reference's way: ``F.embedding_bag`` with a dense [N, D] gradient and
  ``torch.optim.AdamW`` over the whole table with torch's default implementation.
* ``dense_adamw_fused`` — the same with ``fused=True``, torch's fastest CPU AdamW, reported
  beside it so the speedups can be read against either.
* ``torch_sparse_adam`` — ``F.embedding_bag(sparse=True)`` and ``torch.optim.SparseAdam``.
* ``memray_<optimizer>`` — ``memray.kernels.embedding_bag`` (row-sparse gradient) and each
  row-sparse optimizer of ``memray.optim``.
* ``memray_<optimizer>_in_backward`` — the same rule applied by the lookup's backward as it sums
  each row's gradient (``RowSparseOptimizer.update_in_backward``, ``optim.value_update:
  backward``): each touched row read and written once, no stored row gradient. Row-wise Adagrad's
  is timed interleaved with ``memray_rowwise_adagrad`` and both copy floors.
* ``copy_floor`` — ``dst.copy_(src)`` of a buffer of half the bytes the row-wise Adagrad step
  must touch (a copy reads and writes each byte once, so it moves exactly those bytes);
  ``copy_floor_in_backward`` the same for the bytes the in-backward step must touch.

Bytes the row-wise Adagrad step must touch (U = distinct rows read, b = 4 bytes per value):
forward: indices+weights 12·nnz, gathered rows nnz·D·b, output B·D·4; backward: upstream
gradient B·D·4, indices+weights 12·nnz, weight gradients 4·nnz, each touched row once U·D·b,
row gradients and ids U·(D·4 + 8); optimizer: row gradients U·D·4, rows read and written
2·U·D·b, accumulators read and written 2·U·4. In backward: the same forward; upstream gradient,
indices, weights and their gradients as above, each touched row read and written 2·U·D·b,
accumulators 2·U·4 and the rows' squared gradient norms U·4.

All timings come from this one process; memray_rowwise_adagrad and copy_floor are interleaved
round by round. Medians are reported; ratios compare numbers of the same run.

    python benchmarks/bench_value_step.py --quick
    python benchmarks/bench_value_step.py --device cuda     # the GPU variant (torch + triton only)
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))  # memray from this checkout where it is not installed (GPU hosts)
from common import import_kernels, machine_info, synchronize, write_table  # noqa: E402

from memray.optim import LazyAdam, LazyAdamW, RowSparseSGD, RowWiseAdagrad  # noqa: E402

embedding_bag = import_kernels().embedding_bag

NAME = "bench_value_step"
D, TOKENS, BAG_LEN = 256, 2048, 128
VALUE_LR = 1e-3

MEMRAY_OPTIMIZERS = {
    "rowwise_adagrad": lambda p: RowWiseAdagrad([p], lr=VALUE_LR),
    "lazy_adam": lambda p: LazyAdam([p], lr=VALUE_LR, betas=(0.9, 0.95)),
    "lazy_adamw": lambda p: LazyAdamW([p], lr=VALUE_LR, betas=(0.9, 0.95), weight_decay=0.1),
    "sgd": lambda p: RowSparseSGD([p], lr=VALUE_LR),
}


def memory_needed(method: str, num_rows: int, dim: int) -> int:
    """Bytes of [N, D] fp32 tensors a method holds at once: table, dense gradient, two moments,
    and for torch's default (unfused) AdamW one more [N, D] temporary inside its step."""
    table = num_rows * dim * 4
    return {
        "dense_adamw": 5 * table,
        "dense_adamw_fused": 4 * table,
        "torch_sparse_adam": 3 * table,
        "memray_lazy_adam": 3 * table,
        "memray_lazy_adamw": 3 * table,
    }.get(method, table)


def memory_available(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def touched_bytes(nnz: int, bags: int, unique: int, dim: int, b: int = 4) -> int:
    forward = 12 * nnz + nnz * dim * b + bags * dim * 4
    backward = bags * dim * 4 + 12 * nnz + 4 * nnz + unique * dim * b + unique * (dim * 4 + 8)
    optimizer = unique * dim * 4 + 2 * unique * dim * b + 2 * unique * 4
    return forward + backward + optimizer


def touched_bytes_in_backward(nnz: int, bags: int, unique: int, dim: int, b: int = 4) -> int:
    forward = 12 * nnz + nnz * dim * b + bags * dim * 4
    backward = bags * dim * 4 + 12 * nnz + 4 * nnz + 2 * unique * dim * b + 2 * unique * 4 + unique * 4
    return forward + backward


def timed(fns: dict, reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each callable after warm-up calls; rounds interleave the callables.

    Three warm-up calls: the first steps of a new table size pay first-touch page faults of the
    optimizer state and fresh gradient buffers, which is not the steady state being measured.
    """
    for _ in range(3):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


class Step:
    """One method's state (table, optimizer) and its step function."""

    def __init__(self, method: str, num_rows: int, indices, weights, upstream):
        dim = upstream.shape[1]
        self.table = torch.nn.Parameter(torch.empty(num_rows, dim, device=indices.device).normal_(0, dim**-0.5))
        self.indices, self.weights, self.upstream = indices, weights, upstream
        self.method = method
        flat = indices.reshape(-1)
        offsets = torch.arange(indices.shape[0], dtype=torch.int64, device=indices.device) * indices.shape[1]
        if method.startswith("dense_adamw"):
            fused = method == "dense_adamw_fused"
            self.optimizer = torch.optim.AdamW(
                [self.table], lr=VALUE_LR, betas=(0.9, 0.95), weight_decay=0.1, fused=fused
            )
            self.lookup = lambda w: F.embedding_bag(
                flat, self.table, offsets, mode="sum", per_sample_weights=w.reshape(-1)
            )
        elif method == "torch_sparse_adam":
            self.optimizer = torch.optim.SparseAdam([self.table], lr=VALUE_LR, betas=(0.9, 0.95))
            self.lookup = lambda w: F.embedding_bag(
                flat, self.table, offsets, mode="sum", per_sample_weights=w.reshape(-1), sparse=True
            )
        elif method.endswith("_in_backward"):
            self.optimizer = MEMRAY_OPTIMIZERS[method.removeprefix("memray_").removesuffix("_in_backward")](self.table)
            update = self.optimizer.update_in_backward(self.table)
            self.lookup = lambda w: embedding_bag(indices, w, self.table, row_update=update)
        else:
            self.optimizer = MEMRAY_OPTIMIZERS[method.removeprefix("memray_")](self.table)
            self.lookup = lambda w: embedding_bag(indices, w, self.table)

    def __call__(self):
        w = self.weights.detach().requires_grad_(True)
        out = self.lookup(w)
        out.backward(self.upstream)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N in {2^16, 2^20, 2^22}, 3 repetitions")
    parser.add_argument("--reps", type=int, help="repetitions per timing")
    parser.add_argument("--log2-rows", type=int, nargs="+", help="table sizes 2^k")
    parser.add_argument("--methods", nargs="+", help="subset of methods to time")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU variant)")
    parser.add_argument("--dim", type=int, default=D, help=f"value dim D (default {D})")
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT") or str(HERE / "results"),
        help="results folder (default: $OUT, else benchmarks/results)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dim = args.dim
    name = (NAME if device.type == "cpu" else f"{NAME}_{device.type}") + ("" if dim == D else f"_d{dim}")
    reps = args.reps or (3 if args.quick else 7)
    log2_rows = args.log2_rows or ([16, 20, 22] if args.quick else [16, 18, 20, 22])
    methods = args.methods or ["dense_adamw", "dense_adamw_fused", "torch_sparse_adam"] + [
        f"memray_{n}" for n in MEMRAY_OPTIMIZERS
    ] + ["memray_lazy_adam_in_backward"]
    # timed with memray_rowwise_adagrad, interleaved
    paired = "memray_rowwise_adagrad_in_backward"
    gen = torch.Generator().manual_seed(0)
    info = machine_info(device)
    rows = []
    skipped: list[str] = []
    for k in log2_rows:
        num_rows = 1 << k
        indices = torch.randint(0, num_rows, (TOKENS, BAG_LEN), generator=gen).to(device)
        weights = torch.rand(TOKENS, BAG_LEN, generator=gen).to(device)
        upstream = torch.randn(TOKENS, dim, generator=gen).to(device)
        unique = torch.unique(indices).numel()
        nbytes = touched_bytes(indices.numel(), TOKENS, unique, dim)
        nbytes_in_backward = touched_bytes_in_backward(indices.numel(), TOKENS, unique, dim)
        results = {}
        for method in methods:
            need, free = memory_needed(method, num_rows, dim), memory_available(device)
            if need > 0.85 * free:
                skipped.append(f"{method} at 2^{k}: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
                print(f"2^{k}: {method} skipped ({skipped[-1]})", file=sys.stderr, flush=True)
                continue
            fns = {method: Step(method, num_rows, indices, weights, upstream)}
            if method == "memray_rowwise_adagrad":
                fns[paired] = Step(paired, num_rows, indices, weights, upstream)
                for floor, size in (("copy_floor", nbytes), ("copy_floor_in_backward", nbytes_in_backward)):
                    src = torch.empty(size // 8, device=device).uniform_()
                    dst = torch.zeros_like(src)
                    fns[floor] = functools.partial(dst.copy_, src)
            timings = timed(fns, reps, device)
            results.update(timings)
            del fns
            gc.collect()
            line = ", ".join(f"{m} {t * 1e3:.1f} ms" for m, t in timings.items())
            print(f"2^{k}: {line}", file=sys.stderr, flush=True)
        for method, seconds in results.items():
            rows.append(
                {
                    "log2_rows": k,
                    "method": method,
                    "ms": seconds * 1e3,
                    "unique_rows": unique,
                    "touched_MB": (nbytes_in_backward if "in_backward" in method else nbytes) / 1e6,
                    "x_rowwise_adagrad": seconds / results.get("memray_rowwise_adagrad", float("nan")),
                }
            )
    by = {(r["log2_rows"], r["method"]): r["ms"] for r in rows}

    def ratio(a, b):
        return by[a] / by[b] if a in by and b in by else None

    def dense_baseline(k):
        """torch's default AdamW, or the fused one where the default does not fit in memory."""
        return "dense_adamw" if (k, "dense_adamw") in by else "dense_adamw_fused"

    summary = {
        "benchmark": name,
        "machine": info,
        "reps": reps,
        "speedup_vs_dense_2p20": ratio((20, dense_baseline(20)), (20, "memray_rowwise_adagrad")),
        "speedup_vs_dense_2p22": ratio((22, dense_baseline(22)), (22, "memray_rowwise_adagrad")),
        "dense_baseline_2p20": dense_baseline(20),
        "dense_baseline_2p22": dense_baseline(22),
        "speedup_vs_fused_dense_2p20": ratio((20, "dense_adamw_fused"), (20, "memray_rowwise_adagrad")),
        "speedup_vs_fused_dense_2p22": ratio((22, "dense_adamw_fused"), (22, "memray_rowwise_adagrad")),
        "speedup_vs_sparse_adam_2p20": ratio((20, "torch_sparse_adam"), (20, "memray_rowwise_adagrad")),
        "flatness_2p22_over_2p16": ratio((22, "memray_rowwise_adagrad"), (16, "memray_rowwise_adagrad")),
        "floor_ratio_2p20": ratio((20, "memray_rowwise_adagrad"), (20, "copy_floor")),
        "floor_ratio_2p22": ratio((22, "memray_rowwise_adagrad"), (22, "copy_floor")),
        "floor_ratio_2p16": ratio((16, "memray_rowwise_adagrad"), (16, "copy_floor")),
        "floor_ratio_flatness_2p22_over_2p16": None,
        # the update in the lookup's backward: against the step's floor above, and against its own
        "speedup_in_backward_2p22": ratio((22, "memray_rowwise_adagrad"), (22, paired)),
        "speedup_vs_fused_dense_in_backward_2p22": ratio((22, "dense_adamw_fused"), (22, paired)),
        "floor_ratio_in_backward_2p20": ratio((20, paired), (20, "copy_floor")),
        "floor_ratio_in_backward_2p22": ratio((22, paired), (22, "copy_floor")),
        "own_floor_ratio_in_backward_2p22": ratio((22, paired), (22, "copy_floor_in_backward")),
        "speedup_lazy_adam_in_backward_2p22": ratio((22, "memray_lazy_adam"), (22, "memray_lazy_adam_in_backward")),
        "rowwise_adagrad_ms": {f"2^{k}": by.get((k, "memray_rowwise_adagrad")) for k in log2_rows},
        "rowwise_adagrad_in_backward_ms": {f"2^{k}": by.get((k, paired)) for k in log2_rows},
        "skipped": skipped,
    }
    if summary["floor_ratio_2p22"] and summary["floor_ratio_2p16"]:
        # time per byte the step must touch: flat when the step scales with its own traffic
        summary["floor_ratio_flatness_2p22_over_2p16"] = summary["floor_ratio_2p22"] / summary["floor_ratio_2p16"]
    write_table(
        pathlib.Path(args.out),
        name,
        rows,
        ["log2_rows", "method", "ms", "x_rowwise_adagrad", "unique_rows", "touched_MB"],
        title=f"Value-table step on {device.type}, D = {dim} fp32, {TOKENS} tokens x {BAG_LEN} lookups; "
        f"medians of {reps}",
        machine=info,
        summary=summary,
    )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
