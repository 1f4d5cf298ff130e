"""Value lookup (memory-layer embedding bag) on CPU: effective bandwidth against the copy floor.

Claim measured: memray's CPU lookup runs forward + backward within a small multiple of the time
a plain memory copy needs to move the same bytes, flat in the table size N, and faster than
``torch.nn.functional.embedding_bag``. Every timing is taken in this one process, methods
interleaved round by round, and reported as medians; ratios compare numbers from the same run.

Shapes: D = 256 (fp32), 2048 tokens x 128 lookups (heads x knn), N in {2^16, 2^20, 2^22}.

Bytes (the minimum traffic of the operation, the same for every method; U = distinct rows read):

* forward  = nnz * (8 index + 4 weight) + nnz * D * 4 (gathered rows) + B * D * 4 (output)
* backward = B * D * 4 (grad_out) + nnz * (8 + 4) (indices, weights) + nnz * 4 (weight grads)
             + U * D * 4 (each touched row read once, for the weight grads)
             + U * (D * 4 + 8) (row gradients and their row ids)

Effective GB/s = bytes / median time. The copy floor of a step is its bytes divided by the copy
bandwidth: read + write bytes per second of ``dst.copy_(src)`` on a 256 MiB fp32 buffer, timed
in the same interleaved rounds as each group of methods (column ``copy_gbps``).

Methods: ``memray[cpp]`` (the C++ kernels; what ``backend="auto"`` picks on CPU),
``memray[torch]`` (the pure-torch fallback), ``F.embedding_bag`` with ``sparse=True`` (its
uncoalesced sparse gradient, one value row per entry) and with a dense ``[N, D]`` gradient.
The options section (skip it with ``--no-options``) times the alternatives considered for the
CPU path at N = 2^20 side by side: the parts of the first torch backend, other backward
formulations (``--with-compile`` adds a torch.compile'd one), forward kernels, page-fault
handling of the fresh gradient buffer, and the C++ build's vector ISA.

    python benchmarks/bench_lookup.py            # full: 7 repetitions
    python benchmarks/bench_lookup.py --quick    # 3 repetitions
"""

import argparse
import csv
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from memray.kernels import _alloc, bag_backward, bag_forward, cpu_ext, embedding_bag

EB = sys.modules["memray.kernels.embedding_bag"]
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
NAME = "bench_lookup"

D, TOKENS, BAG_LEN = 256, 2048, 128
LOG2_ROWS = (16, 20, 22)
COPY_BYTES = 256 << 20


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


# Calls per method before timing. On this VM class freed 2 MiB blocks are handed back to the
# host (virtio-balloon free page reporting), so the first calls after a change in allocation
# pattern pay host-side page faults; a training loop runs in the steady state measured here.
WARMUP = 2


def interleaved_medians(fns, reps):
    """Median seconds per callable; every round calls each once, order rotated per round."""
    names = list(fns)
    for _ in range(WARMUP):  # first-touch page faults, lazy builds
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


class CopyFloor:
    """A large tensor copy timed in the same rounds as the methods it is the floor for.

    Timing it beside every group (not once up front) keeps the ratio honest when other work
    on a shared machine comes and goes during a run.
    """

    def __init__(self):
        self.src = torch.empty(COPY_BYTES // 4).uniform_()
        self.dst = torch.empty_like(self.src).zero_()
        self.samples = []  # read + write bytes per second, one per timed group

    def timed(self, fns, reps):
        """Medians of ``fns`` and the copy bandwidth measured among them."""
        medians = interleaved_medians({**fns, "__copy__": lambda: self.dst.copy_(self.src)}, reps)
        bps = 2 * COPY_BYTES / medians.pop("__copy__")
        self.samples.append(bps)
        return medians, bps

    def median_bps(self):
        return statistics.median(self.samples)


# ------------------------------------------------------------------------------------------------
# bytes
# ------------------------------------------------------------------------------------------------


def forward_bytes(nnz, bags, elem=4):
    return nnz * (8 + 4) + nnz * D * elem + bags * D * 4


def backward_bytes(nnz, bags, num_unique, elem=4):
    return bags * D * 4 + nnz * 12 + nnz * 4 + num_unique * D * elem + num_unique * (D * elem + 8)


# ------------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------------


def memray_step(backend, indices, weights, table, grad_out, backward):
    def run():
        w = weights.detach().requires_grad_(backward)
        t = table.detach().requires_grad_(backward)
        out = embedding_bag(indices, w, t, backend=backend)
        if backward:
            torch.autograd.grad(out, (w, t), grad_out)
        return out

    return run


def torch_step(sparse, indices, weights, table, grad_out, backward):
    flat_idx, flat_w = indices.reshape(-1), weights.reshape(-1)
    offsets = torch.arange(indices.shape[0], dtype=torch.int64) * indices.shape[1]

    def run():
        w = flat_w.detach().requires_grad_(backward)
        t = table.detach().requires_grad_(backward)
        out = F.embedding_bag(flat_idx, t, offsets, mode="sum", per_sample_weights=w, sparse=sparse)
        if backward:
            torch.autograd.grad(out, (w, t), grad_out)
        return out

    return run


# Alternatives for the CPU backward, kept here so that the choice in kernels/ stays measurable.


def option_gather_per_entry(grad_out, indices, weights, table, offsets):
    """The first torch backend: gather grad_out per entry, index_add into unique rows, vecdot."""
    nnz = indices.numel()
    bag_ids = EB._bag_ids(offsets, nnz)
    unique_rows, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    acc_rows = torch.zeros(unique_rows.numel(), D)
    grad_weights = torch.empty(nnz)
    for s in EB._chunks(nnz, D):
        grads = grad_out[bag_ids[s]]
        grad_weights[s] = torch.linalg.vecdot(table[indices[s]], grads)
        acc_rows.index_add_(0, inverse[s], grads.mul_(weights[s][:, None]))
    return grad_weights, unique_rows, acc_rows


def option_broadcast_bmm(grad_out, indices, weights, table, offsets):
    """Fixed-L form: grad_w by one row gather + bmm per chunk of bags; table grad by index_add of
    broadcast products, no per-entry gather of grad_out."""
    nnz, bags = indices.numel(), offsets.numel() - 1
    idx2d, w2d = indices.view(bags, BAG_LEN), weights.view(bags, BAG_LEN)
    unique_rows, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    acc_rows = torch.zeros(unique_rows.numel(), D)
    grad_weights = torch.empty(bags, BAG_LEN)
    step = max(1, EB._CHUNK_ELEMS // (BAG_LEN * D))
    for b0 in range(0, bags, step):
        b1 = min(bags, b0 + step)
        rows = table.index_select(0, idx2d[b0:b1].reshape(-1)).view(b1 - b0, BAG_LEN, D)
        torch.bmm(rows, grad_out[b0:b1, :, None], out=grad_weights[b0:b1, :, None])
        contrib = w2d[b0:b1, :, None] * grad_out[b0:b1, None, :]  # [bags, L, D]
        acc_rows.index_add_(0, inverse[b0 * BAG_LEN : b1 * BAG_LEN], contrib.view(-1, D))
    return grad_weights.view(nnz), unique_rows, acc_rows


def _compiled_backward():
    """The first torch backend's math written plainly, for torch.compile's C++ code generation."""

    def backward(grad_out, indices, weights, table, bag_ids, inverse, num_unique: int):
        grad_weights = (table[indices] * grad_out[bag_ids]).sum(-1)
        row_grads = torch.zeros(num_unique, table.shape[1]).index_add_(0, inverse, weights[:, None] * grad_out[bag_ids])
        return grad_weights, row_grads

    compiled = torch.compile(backward, dynamic=False)

    def run(grad_out, indices, weights, table, offsets):
        unique_rows, inverse = torch.unique(indices, sorted=True, return_inverse=True)
        bag_ids = EB._bag_ids(offsets, indices.numel())
        grad_weights, row_grads = compiled(grad_out, indices, weights, table, bag_ids, inverse, unique_rows.numel())
        return grad_weights, unique_rows, row_grads

    return run


def run_options(reps, gen, bags, copy, log2_rows=20, with_compile=False):
    """Alternatives for the CPU kernels at N = 2^20, timed side by side on the same inputs."""
    num_rows = 1 << log2_rows
    table = torch.empty(num_rows, D).uniform_(-1, 1)
    indices = torch.randint(0, num_rows, (bags * BAG_LEN,), generator=gen)
    weights = torch.rand(bags * BAG_LEN, generator=gen)
    grad_out = torch.randn(bags, D, generator=gen)
    offsets = torch.arange(bags + 1, dtype=torch.int64) * BAG_LEN
    # the parts of the first torch backend, on the inputs it would see
    bag_ids = EB._bag_ids(offsets, indices.numel())
    _, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    gathered_grads = grad_out[bag_ids]
    gathered_rows = table[indices]
    acc_rows = torch.zeros(inverse.max().item() + 1, D)
    parts = {
        "part: torch.unique(sorted, return_inverse)": lambda: torch.unique(indices, sorted=True, return_inverse=True),
        "part: grad_out[bag_ids] (per-entry gather)": lambda: grad_out[bag_ids],
        "part: table[indices] (per-entry gather)": lambda: table[indices],
        "part: vecdot(rows, grads)": lambda: torch.linalg.vecdot(gathered_rows, gathered_grads),
        "part: index_add_ into unique rows": lambda: acc_rows.index_add_(0, inverse, gathered_grads),
        "part: torch.sort(stable) + unique_consecutive": lambda: EB._row_segments(indices),
    }
    fns = {
        "gather per entry + index_add + vecdot (first torch backend)": lambda: option_gather_per_entry(
            grad_out, indices, weights, table, offsets
        ),
        "broadcast + bmm + index_add (fixed L)": lambda: option_broadcast_bmm(
            grad_out, indices, weights, table, offsets
        ),
        "sort + F.embedding_bag over grad_out + fused weight-grad op (torch backend)": lambda: bag_backward(
            grad_out, indices, weights, table, offsets, "torch"
        ),
    }
    if with_compile:
        compiled = _compiled_backward()
        fns["torch.compile of gather + index_add (inductor C++)"] = lambda: compiled(
            grad_out, indices, weights, table, offsets
        )
    ops = cpu_ext.load()
    if ops is not None:
        fns["sort + fused C++ kernel (cpp backend)"] = lambda: bag_backward(
            grad_out, indices, weights, table, offsets, "cpp"
        )
    reference = option_gather_per_entry(grad_out, indices, weights, table, offsets)
    for name, fn in fns.items():
        gw, rows, rg = fn()
        assert torch.equal(rows, reference[1]), name
        torch.testing.assert_close(gw, reference[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(rg, reference[2], atol=1e-4, rtol=1e-4)
    del reference
    bwd_bytes = backward_bytes(indices.numel(), bags, inverse.max().item() + 1)
    # The parts are timed on their own first: their [nnz, D] temporaries would otherwise crowd
    # the memory the alternatives run in.
    part_medians, part_copy = copy.timed(parts, reps)
    gathered_grads = gathered_rows = acc_rows = parts = None  # free them: the lambdas above are done
    medians, copy_bps = copy.timed(fns, reps)
    rows = [
        dict(
            section="options",
            log2_rows=log2_rows,
            method=name,
            pass_="backward (part)",
            ms=t * 1e3,
            bytes=bwd_bytes,
            gbps=bwd_bytes / t / 1e9,
            copy_gbps=part_copy / 1e9,
        )
        for name, t in part_medians.items()
    ] + [
        dict(
            section="options",
            log2_rows=log2_rows,
            method=name,
            pass_="backward",
            ms=t * 1e3,
            bytes=bwd_bytes,
            gbps=bwd_bytes / t / 1e9,
            copy_gbps=copy_bps / 1e9,
        )
        for name, t in medians.items()
    ]

    # Forward kernels: torch's F.embedding_bag against ours, on fp32 and bf16 tables.
    table_bf16 = table.to(torch.bfloat16)
    out = torch.empty(bags, D)
    fwd = {
        "F.embedding_bag, fp32 table": lambda: F.embedding_bag(
            indices, table, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True
        ),
        "torch backend (gather + index_add), bf16 table": lambda: bag_forward(
            indices, weights, table_bf16, offsets, "torch"
        ),
    }
    if ops is not None:
        fwd["C++ kernel, fp32 table"] = lambda: ops.bag_forward(indices, weights, table, offsets, out)
        fwd["C++ kernel, bf16 table"] = lambda: ops.bag_forward(indices, weights, table_bf16, offsets, out)
    medians, copy_bps = copy.timed(fwd, reps)
    for name, t in medians.items():
        fwd_bytes = forward_bytes(indices.numel(), bags, elem=2 if "bf16" in name else 4)
        rows.append(
            dict(
                section="options",
                log2_rows=log2_rows,
                method=name,
                pass_="forward kernel",
                ms=t * 1e3,
                bytes=fwd_bytes,
                gbps=fwd_bytes / t / 1e9,
                copy_gbps=copy_bps / 1e9,
            )
        )

    # Page faults on the fresh table-gradient buffer of every step, 4 KiB pages against pages
    # advised MADV_HUGEPAGE (what kernels/_alloc.py does for large CPU outputs).
    num_unique = inverse.max().item() + 1
    reused = torch.empty(num_unique, D)
    faults = {
        "fill a reused [U, D] buffer": lambda: reused.fill_(1.0),
        "torch.empty + fill (4 KiB page faults)": lambda: torch.empty(num_unique, D).fill_(1.0),
        "_alloc.empty + fill (huge-page advice)": lambda: _alloc.empty(
            num_unique, D, dtype=torch.float32, device="cpu"
        ).fill_(1.0),
    }
    medians, copy_bps = copy.timed(faults, reps)
    for name, t in medians.items():
        nbytes = num_unique * D * 4
        rows.append(
            dict(
                section="options",
                log2_rows=log2_rows,
                method=name,
                pass_="page faults",
                ms=t * 1e3,
                bytes=nbytes,
                gbps=nbytes / t / 1e9,
                copy_gbps=copy_bps / 1e9,
            )
        )
    reused = None  # free it: the lambdas above are done

    # Vector ISA: the default (AVX2 + FMA) build against a baseline x86-64 build of the same source.
    isa = cpu_ext._isa_flags()[0]
    if ops is not None and isa != "base":
        base = cpu_ext.build("base", [], namespace="memray_cpu_bag_base")
        bag_ids = EB._bag_ids(offsets, indices.numel())
        order, unique_rows, seg = EB._row_segments(indices)
        grad_w = torch.empty(indices.numel())
        row_grads = torch.empty(unique_rows.numel(), D)
        isa_fns = {}
        for label, lib in ((isa, ops), ("base x86-64", base)):
            isa_fns[f"ISA {label}: backward kernel (reused outputs)"] = lambda lib=lib: lib.bag_backward(
                grad_out, bag_ids, weights, table, order, seg, unique_rows, grad_w, row_grads
            )
            isa_fns[f"ISA {label}: forward kernel, bf16 table"] = lambda lib=lib: lib.bag_forward(
                indices, weights, table_bf16, offsets, out
            )
        medians, copy_bps = copy.timed(isa_fns, reps)
        for name, t in medians.items():
            nbytes = bwd_bytes if "backward" in name else forward_bytes(indices.numel(), bags, elem=2)
            rows.append(
                dict(
                    section="options",
                    log2_rows=log2_rows,
                    method=name,
                    pass_="ISA",
                    ms=t * 1e3,
                    bytes=nbytes,
                    gbps=nbytes / t / 1e9,
                    copy_gbps=copy_bps / 1e9,
                )
            )
    return rows


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(
        cpu=cpu,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        cuda=torch.cuda.is_available(),
        load_avg=os.getloadavg()[0],
    )


def write_results(out_dir, rows, summary):
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = ["section", "log2_rows", "method", "pass_", "ms", "bytes", "gbps", "copy_gbps", "x_copy_floor"]
    with open(out_dir / f"{NAME}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})
    m = summary["machine"]
    lines = [
        f"# {NAME}",
        "",
        f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}; load average "
        f"{m['load_avg']:.2f} at start, {summary['load_avg_end']:.2f} at end; "
        f"copy bandwidth (median over groups) {summary['copy_GBps']:.1f} GB/s (read + write). "
        f"Medians of {summary['reps']} repetitions; each group of rows timed with its own copy.",
        "",
        "| N | method | pass | ms | GB/s | copy GB/s | x copy floor |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| 2^{row['log2_rows']} | {row['method']} | {row['pass_']} | {row['ms']:.1f} | {row['gbps']:.1f} | "
            f"{row['copy_gbps']:.1f} | {row['x_copy_floor']:.1f} |"
        )
    (out_dir / f"{NAME}.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 7")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per timing (overrides --quick)")
    parser.add_argument("--log2-rows", type=int, nargs="+", default=list(LOG2_ROWS), help="table sizes 2^k")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="bags per call (128 lookups each)")
    parser.add_argument(
        "--no-options",
        dest="options",
        action="store_false",
        help="skip the side-by-side alternatives for the CPU kernels",
    )
    parser.add_argument(
        "--with-compile",
        action="store_true",
        help="also time a torch.compile'd backward among the options (compiles for ~15 s)",
    )
    parser.add_argument("--options-log2-rows", type=int, default=20, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS), help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    gen = torch.Generator().manual_seed(0)
    info = machine()
    backend = "cpp" if cpu_ext.available() else "torch"
    if backend != "cpp":
        print(f"C++ kernels unavailable ({cpu_ext.load_error}); timing the torch backend only", file=sys.stderr)

    copy = CopyFloor()
    rows = []
    bags = args.tokens
    nnz = bags * BAG_LEN
    for log2_rows in args.log2_rows:
        num_rows = 1 << log2_rows
        table = torch.empty(num_rows, D).uniform_(-1, 1)
        indices = torch.randint(0, num_rows, (bags, BAG_LEN), generator=gen)
        weights = torch.rand(bags, BAG_LEN, generator=gen)
        grad_out = torch.randn(bags, D, generator=gen)
        num_unique = torch.unique(indices).numel()
        methods = {f"memray[{backend}]": lambda bwd: memray_step(backend, indices, weights, table, grad_out, bwd)}
        if backend != "torch":
            methods["memray[torch]"] = lambda bwd: memray_step("torch", indices, weights, table, grad_out, bwd)
        methods["F.embedding_bag sparse"] = lambda bwd: torch_step(True, indices, weights, table, grad_out, bwd)
        methods["F.embedding_bag dense"] = lambda bwd: torch_step(False, indices, weights, table, grad_out, bwd)

        ours = memray_step(backend, indices, weights, table, grad_out, False)()
        torch.testing.assert_close(
            ours, torch_step(True, indices, weights, table, grad_out, False)(), atol=1e-4, rtol=1e-4
        )

        fwd_b = forward_bytes(nnz, bags)
        step_b = fwd_b + backward_bytes(nnz, bags, num_unique)
        for pass_, nbytes, bwd in (("forward", fwd_b, False), ("forward+backward", step_b, True)):
            fns = {name: make(bwd) for name, make in methods.items()}
            if pass_ == "forward":  # the two F.embedding_bag variants share one forward
                fns.pop("F.embedding_bag dense")
            medians, copy_bps = copy.timed(fns, reps)
            for name, t in medians.items():
                rows.append(
                    dict(
                        section="lookup",
                        log2_rows=log2_rows,
                        method=name,
                        pass_=pass_,
                        ms=t * 1e3,
                        bytes=nbytes,
                        gbps=nbytes / t / 1e9,
                        copy_gbps=copy_bps / 1e9,
                        x_copy_floor=t / (nbytes / copy_bps),
                    )
                )
                print(
                    f"N=2^{log2_rows:<2d} {pass_:16s} {name:24s} {t * 1e3:8.1f} ms  "
                    f"{nbytes / t / 1e9:6.1f} GB/s  {t / (nbytes / copy_bps):5.1f}x copy floor "
                    f"(copy {copy_bps / 1e9:.1f} GB/s)",
                    flush=True,
                )
        table = fns = None  # free them before the next size: the lambdas above are done

    if args.options:
        for row in run_options(reps, gen, bags, copy, args.options_log2_rows, args.with_compile):
            row["x_copy_floor"] = row["ms"] / 1e3 / (row["bytes"] / (row["copy_gbps"] * 1e9))
            rows.append(row)
            print(
                f"option: {row['method']:78s} {row['ms']:8.1f} ms  {row['x_copy_floor']:5.1f}x copy floor", flush=True
            )

    def pick(log2_rows, method, pass_):
        for row in rows:
            if (row["section"], row["log2_rows"], row["method"], row["pass_"]) == ("lookup", log2_rows, method, pass_):
                return row
        return None

    ours_name = f"memray[{backend}]"
    per_n = {}
    for log2_rows in args.log2_rows:
        ours_step = pick(log2_rows, ours_name, "forward+backward")
        ours_fwd = pick(log2_rows, ours_name, "forward")
        entry = dict(
            fwd_ms=round(ours_fwd["ms"], 2),
            fwd_GBps=round(ours_fwd["gbps"], 2),
            step_ms=round(ours_step["ms"], 2),
            step_GBps=round(ours_step["gbps"], 2),
            step_x_copy_floor=round(ours_step["x_copy_floor"], 2),
        )
        for other, key in (
            ("F.embedding_bag sparse", "speedup_vs_torch_sparse"),
            ("F.embedding_bag dense", "speedup_vs_torch_dense"),
            ("memray[torch]", "speedup_vs_memray_torch"),
        ):
            row = pick(log2_rows, other, "forward+backward")
            if row is not None and other != ours_name:
                entry[key] = round(row["ms"] / ours_step["ms"], 2)
        per_n[f"2^{log2_rows}"] = entry
    summary = dict(
        benchmark=NAME,
        backend=backend,
        reps=reps,
        machine=info,
        copy_GBps=round(copy.median_bps() / 1e9, 2),
        per_N=per_n,
        load_avg_end=os.getloadavg()[0],
    )
    if len(args.log2_rows) > 1:
        lo, hi = min(args.log2_rows), max(args.log2_rows)
        summary[f"step_ratio_2^{hi}_vs_2^{lo}"] = round(
            pick(hi, ours_name, "forward+backward")["ms"] / pick(lo, ours_name, "forward+backward")["ms"], 2
        )
    write_results(pathlib.Path(args.out), rows, summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
