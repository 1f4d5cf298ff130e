"""Value lookup on a GPU: Triton kernels checked against the reference, then timed.

Claim measured: memray's Triton lookup is exact against ``embedding_bag_reference`` on CUDA
(fp32 and bf16, awkward shapes, every output element written) and moves bytes at a useful
fraction of the device's copy bandwidth, compared with ``torch.nn.functional.embedding_bag``.

Needs only torch and triton (no ray, deepspeed or zarr, and no ``pip install`` of this
project: without one, ``kernels/`` is imported from the checkout as ``memray_kernels``).

Sections:

1. checks: forward output, weight gradient and row-sparse table gradient against the fp64
   reference on the same (rounded) inputs, with output buffers NaN-poisoned.
2. timings (medians, methods interleaved round by round): forward, backward alone (graph
   kept) and forward + backward of memray (``triton``) and ``F.embedding_bag`` (sparse and
   dense gradient; the dense one only where an [N, D] gradient takes under an eighth of the
   device's memory), 128 lookups per token, by default D in {256, 1024}, tokens in {2048,
   16384}, N in {2^16, 2^20, 2^22}, fp32 and bf16 tables (``--dims``, ``--log2-rows``,
   ``--tokens`` choose others); plus a device-to-device copy (read + write bytes). Bytes are
   defined as in bench_lookup.py (the minimum traffic, the same for every method).

Results go to ``$OUT`` when set, else benchmarks/results/: gpu_lookup.csv and .md; the last
line printed is JSON with the key figures and ratios.

    python benchmarks/gpu_lookup.py            # needs CUDA
    python benchmarks/gpu_lookup.py --quick
    python benchmarks/gpu_lookup.py --device cpu --backend cpp --smoke   # the plumbing, on CPU
"""

import argparse
import csv
import json
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import import_kernels  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
NAME = "gpu_lookup"
DIMS = (256, 1024)
BAG_LEN = 128
LOG2_ROWS = (16, 20, 22)
TOKENS = (2048, 16384)
COPY_BYTES = 1 << 30
# Mirrors tests/tolerances.py (a test keeps the two equal).
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


# ------------------------------------------------------------------------------------------------
# 1. checks
# ------------------------------------------------------------------------------------------------


def _csr_offsets(lengths, device):
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return offsets.to(device)


def check_cases(smoke=False):
    """(name, num_rows, dim, indices builder) for awkward and realistic shapes.

    Each builder takes a generator and returns ``(indices, offsets)`` on CPU; offsets None means
    the fixed [B, L] form.
    """

    def fixed(num_rows, bags, bag_len):
        return lambda g: (torch.randint(0, num_rows, (bags, bag_len), generator=g), None)

    def csr(num_rows, lengths):
        return lambda g: (torch.randint(0, num_rows, (sum(lengths),), generator=g), lengths)

    def near_end(num_rows):
        rows = [num_rows - 1, 0, num_rows - 2, 65_537 % num_rows, num_rows - 1, 32_768 % num_rows]
        return lambda _generator: (torch.tensor(rows).view(2, 3), None)

    bags = 13 if smoke else 63  # smoke: the Triton interpreter runs every program in Python
    cases = [
        (f"fixed B{bags} L7 D33", 1000, 33, fixed(1000, bags, 7)),
        ("D1", 5, 1, fixed(5, 3, 2)),
        ("D130 (two 128-wide blocks)", 6, 130, fixed(6, 9, 3)),
        ("duplicates-heavy", 3, 64, fixed(3, 20 if smoke else 100, 32)),
        ("csr empty bags and long segments", 50, 48, csr(50, [0, 3, 0, 300, 1, 0, 17, 0])),
        ("rows near the end of 70000", 70_000, 3, near_end(70_000)),
    ]
    if not smoke:
        cases.append(("memory layer: 2048 x 128 on 2^20 x 256", 1 << 20, 256, fixed(1 << 20, 2048, 128)))
    return cases


def run_checks(K, device, backend, smoke=False):
    """Every case x dtype against the fp64 reference; returns rows with the max errors."""
    embedding_bag, reference, alloc = K.embedding_bag, K.embedding_bag_reference, K._alloc
    gen = torch.Generator().manual_seed(0)
    rows = []
    original_empty = alloc.empty

    def nan_empty(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    alloc.empty = nan_empty  # unwritten output elements show up as NaN
    try:
        for name, num_rows, dim, build in check_cases(smoke):
            indices, lengths = build(gen)
            offsets = None if lengths is None else _csr_offsets(lengths, device)
            indices = indices.to(device)
            for table_dtype, weight_dtype in (
                (torch.float32, torch.float32),
                (torch.bfloat16, torch.float32),
                (torch.bfloat16, torch.bfloat16),
            ):
                table = torch.randn(num_rows, dim, generator=gen).to(device=device, dtype=table_dtype)
                weights = torch.randn(indices.shape, generator=gen).to(device=device, dtype=weight_dtype)
                w = weights.clone().requires_grad_()
                t = table.clone().requires_grad_()
                out = embedding_bag(indices, w, t, offsets, backend=backend)
                grad_out = torch.randn(out.shape, generator=gen).to(device=device, dtype=out.dtype)
                grad_w, grad_t = torch.autograd.grad(out, (w, t), grad_out)

                w64 = weights.double().requires_grad_()
                t64 = table.double().requires_grad_()
                ref = reference(indices, w64, t64, offsets)
                ref_gw, ref_gt = torch.autograd.grad(ref, (w64, t64), grad_out.double())

                tol_dtype = torch.bfloat16 if torch.bfloat16 in (table_dtype, weight_dtype) else torch.float32
                touched = torch.unique(indices.reshape(-1))
                errors = dict(
                    out=_max_err(out, ref),
                    grad_weights=_max_err(grad_w, ref_gw),
                    grad_table=_max_err(grad_t.to_dense(), ref_gt),
                )
                ok = (
                    _close(out, ref, tol_dtype)
                    and _close(grad_w, ref_gw, tol_dtype)
                    and _close(grad_t.to_dense(), ref_gt, tol_dtype)
                    and grad_t.is_sparse
                    and torch.equal(grad_t._indices()[0], touched)
                    and not any(bool(torch.isnan(x).any()) for x in (out, grad_w, grad_t._values()))
                )
                rows.append(
                    dict(
                        case=name,
                        table_dtype=str(table_dtype).removeprefix("torch."),
                        weight_dtype=str(weight_dtype).removeprefix("torch."),
                        ok=ok,
                        **errors,
                    )
                )
    finally:
        alloc.empty = original_empty
    return rows


def _max_err(actual, expected):
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def _close(actual, expected, dtype):
    try:
        torch.testing.assert_close(actual.to(expected.dtype), expected, **TOL[dtype])
        return True
    except AssertionError:
        return False


# ------------------------------------------------------------------------------------------------
# 2. timings
# ------------------------------------------------------------------------------------------------


def forward_bytes(nnz, bags, elem, dim):
    return nnz * (8 + 4) + nnz * dim * elem + bags * dim * 4


def backward_bytes(nnz, bags, num_unique, elem, dim):
    return bags * dim * 4 + nnz * 12 + nnz * 4 + num_unique * dim * elem + num_unique * (dim * elem + 8)


def _device_memory(device) -> int:
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 1 << 62


def interleaved_medians(fns, reps, sync):
    names = list(fns)
    for name in names:
        fns[name]()
    sync()
    times = {name: [] for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _memray_fns(K, backend, indices, weights, table, grad_out):
    def forward():
        return K.embedding_bag(indices, weights, table, backend=backend)

    def step():
        w, t = weights.detach().requires_grad_(), table.detach().requires_grad_()
        out = K.embedding_bag(indices, w, t, backend=backend)
        torch.autograd.grad(out, (w, t), grad_out)

    w, t = weights.detach().requires_grad_(), table.detach().requires_grad_()
    kept = K.embedding_bag(indices, w, t, backend=backend)

    def backward():
        torch.autograd.grad(kept, (w, t), grad_out, retain_graph=True)

    return forward, backward, step


def _torch_fns(sparse, indices, weights, table, grad_out):
    # F.embedding_bag takes per-sample weights only in the table's dtype, and returns that dtype
    flat_idx, flat_w = indices.reshape(-1), weights.reshape(-1).to(table.dtype)
    grad_out = grad_out.to(table.dtype)
    bags = indices.shape[0]
    offsets = torch.arange(bags, dtype=torch.int64, device=indices.device) * indices.shape[1]

    def call(w, t):
        return F.embedding_bag(flat_idx, t, offsets, mode="sum", per_sample_weights=w, sparse=sparse)

    def forward():
        return call(flat_w, table)

    def step():
        w, t = flat_w.detach().requires_grad_(), table.detach().requires_grad_()
        torch.autograd.grad(call(w, t), (w, t), grad_out)

    w, t = flat_w.detach().requires_grad_(), table.detach().requires_grad_()
    kept = call(w, t)

    def backward():
        torch.autograd.grad(kept, (w, t), grad_out, retain_graph=True)

    return forward, backward, step


def _time_shape(K, device, backend, reps, log2_rows, dim, dtype, tokens_list, gen, copy_bps, sync) -> list[dict]:
    """Every method and pass at one table shape (the table lives only inside this call)."""
    rows = []
    table = torch.empty(1 << log2_rows, dim, device=device, dtype=dtype).uniform_(-1, 1)
    elem = table.element_size()
    dense_fits = table.numel() * 4 * 8 <= _device_memory(device)
    for bags in tokens_list:
        indices = torch.randint(0, 1 << log2_rows, (bags, BAG_LEN), device=device, generator=gen)
        weights = torch.rand(bags, BAG_LEN, device=device, generator=gen)
        grad_out = torch.randn(bags, dim, device=device, generator=gen)
        nnz, num_unique = indices.numel(), torch.unique(indices).numel()
        methods = {
            f"memray[{backend}]": _memray_fns(K, backend, indices, weights, table, grad_out),
            "F.embedding_bag sparse": _torch_fns(True, indices, weights, table, grad_out),
        }
        if dense_fits:
            methods["F.embedding_bag dense"] = _torch_fns(False, indices, weights, table, grad_out)
        fwd_b = forward_bytes(nnz, bags, elem, dim)
        bwd_b = backward_bytes(nnz, bags, num_unique, elem, dim)
        for p, (pass_, nbytes) in enumerate(
            (("forward", fwd_b), ("backward", bwd_b), ("forward+backward", fwd_b + bwd_b))
        ):
            fns = {name: fns3[p] for name, fns3 in methods.items()}
            if pass_ == "forward":
                fns.pop("F.embedding_bag dense", None)
            for name, t in interleaved_medians(fns, reps, sync).items():
                rows.append(
                    dict(
                        log2_rows=log2_rows,
                        dim=dim,
                        tokens=bags,
                        dtype=str(dtype).removeprefix("torch."),
                        method=name,
                        pass_=pass_,
                        ms=t * 1e3,
                        bytes=nbytes,
                        gbps=nbytes / t / 1e9,
                        x_copy_floor=t / (nbytes / copy_bps),
                    )
                )
    return rows


def run_timings(K, device, backend, reps, log2_rows_list, tokens_list, dtypes, dims=DIMS, copy_bytes=COPY_BYTES):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)
    src = torch.empty(copy_bytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_bps = 2 * copy_bytes / interleaved_medians({"copy": lambda: dst.copy_(src)}, max(reps, 5), sync)["copy"]
    src = dst = None  # free them: the copy timing is done
    rows = []
    for log2_rows in log2_rows_list:
        for dim in dims:
            for dtype in dtypes:
                rows += _time_shape(K, device, backend, reps, log2_rows, dim, dtype, tokens_list, gen, copy_bps, sync)
    return copy_bps, rows


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------


def summarize(check_rows, copy_bps, rows, backend):
    """Key figures: checks passed, copy bandwidth, and per shape our GB/s and speed-ups."""
    ours = f"memray[{backend}]"
    index = {(r["log2_rows"], r["dim"], r["tokens"], r["dtype"], r["method"], r["pass_"]): r for r in rows}
    shapes = {}
    for (log2_rows, dim, tokens, dtype, method, pass_), r in index.items():
        if method != ours:
            continue
        entry = shapes.setdefault(f"2^{log2_rows} x {dim} x {tokens} tok {dtype}", {})
        entry[f"{pass_}_GBps"] = round(r["gbps"], 1)
        entry[f"{pass_}_of_copy"] = round(1 / r["x_copy_floor"], 3)  # achieved / copy bandwidth
        entry[f"{pass_}_x_copy_floor"] = round(r["x_copy_floor"], 2)
        for other in ("F.embedding_bag sparse", "F.embedding_bag dense"):
            o = index.get((log2_rows, dim, tokens, dtype, other, pass_))
            if o is not None:
                entry[f"{pass_}_speedup_vs_{other.split()[-1]}"] = round(o["ms"] / r["ms"], 2)
    return dict(
        benchmark=NAME,
        backend=backend,
        checks_passed=sum(r["ok"] for r in check_rows),
        checks_total=len(check_rows),
        copy_GBps=round(copy_bps / 1e9, 1) if copy_bps else None,
        shapes=shapes,
    )


def write_results(out_dir, device_name, check_rows, rows, summary):
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = ["log2_rows", "dim", "tokens", "dtype", "method", "pass_", "ms", "bytes", "gbps", "x_copy_floor"]
    with open(out_dir / f"{NAME}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})
    lines = [
        f"# {NAME}",
        "",
        f"Device: {device_name}. Copy bandwidth {summary['copy_GBps']} GB/s (read + write).",
        "",
        f"Checks: {summary['checks_passed']} / {summary['checks_total']} passed.",
        "",
        "| case | table | weights | ok | max err out | max err grad w | max err grad table |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in check_rows:
        lines.append(
            f"| {r['case']} | {r['table_dtype']} | {r['weight_dtype']} | {'yes' if r['ok'] else 'NO'} | "
            f"{r['out']:.2e} | {r['grad_weights']:.2e} | {r['grad_table']:.2e} |"
        )
    lines += [
        "",
        "| N | D | tokens | dtype | method | pass | ms | GB/s | x copy floor |",
        "|---|---:|---:|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| 2^{r['log2_rows']} | {r['dim']} | {r['tokens']} | {r['dtype']} | {r['method']} | {r['pass_']} | "
            f"{r['ms']:.3f} | {r['gbps']:.1f} | {r['x_copy_floor']:.2f} |"
        )
    (out_dir / f"{NAME}.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, fp32 and bf16 at 2048 tokens")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu runs the plumbing only")
    parser.add_argument("--backend", default="triton", help="memray backend to check and time")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repetition (for tests)")
    parser.add_argument("--out", default=None, help="results folder (default: $OUT, else benchmarks/results)")
    parser.add_argument("--dims", type=int, nargs="+", help=f"value dims to time (default {list(DIMS)})")
    parser.add_argument("--log2-rows", type=int, nargs="+", help=f"table sizes 2^k to time (default {list(LOG2_ROWS)})")
    parser.add_argument("--tokens", type=int, nargs="+", help=f"tokens per batch to time (default {list(TOKENS)})")
    parser.add_argument("--skip-checks", action="store_true", help="timings only (the checks ran elsewhere)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_lookup: no CUDA device (use --device cpu --backend cpp --smoke to run the plumbing)", file=sys.stderr
        )
        return 2
    K = import_kernels()
    out_dir = args.out or os.environ.get("OUT") or (REPO / "benchmarks" / "results")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"

    check_rows = [] if args.skip_checks else run_checks(K, device, args.backend, smoke=args.smoke)
    for r in check_rows:
        print(
            f"check {'ok ' if r['ok'] else 'BAD'} {r['case']:42s} {r['table_dtype']:8s} {r['weight_dtype']:8s} "
            f"out {r['out']:.1e} gw {r['grad_weights']:.1e} gt {r['grad_table']:.1e}",
            flush=True,
        )

    copy_bytes = COPY_BYTES
    dtypes = [torch.float32, torch.bfloat16]
    if args.smoke:
        reps, log2_rows, tokens, dims = 1, [10], [16], [16, 33]
        copy_bytes = 1 << 24
    elif args.quick:
        reps, log2_rows, tokens, dims = 5, list(LOG2_ROWS), [TOKENS[0]], list(DIMS)
    else:
        reps, log2_rows, tokens, dims = 20, list(LOG2_ROWS), list(TOKENS), list(DIMS)
    log2_rows, tokens, dims = args.log2_rows or log2_rows, args.tokens or tokens, args.dims or dims
    copy_bps, rows = run_timings(K, device, args.backend, reps, log2_rows, tokens, dtypes, dims, copy_bytes)
    for r in rows:
        print(
            f"N=2^{r['log2_rows']:<2d} D={r['dim']:<5d} {r['tokens']:6d} tok {r['dtype']:8s} {r['pass_']:16s} "
            f"{r['method']:24s} "
            f"{r['ms']:9.3f} ms {r['gbps']:8.1f} GB/s {r['x_copy_floor']:6.2f}x copy floor",
            flush=True,
        )
    summary = summarize(check_rows, copy_bps, rows, args.backend)
    summary["device"] = device_name
    write_results(out_dir, device_name, check_rows, rows, summary)
    print(json.dumps(summary))
    return 0 if summary["checks_passed"] == summary["checks_total"] else 1


if __name__ == "__main__":
    sys.exit(main())
