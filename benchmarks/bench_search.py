"""The product-key search's selection: the C++ kernel against torch's three ``topk`` calls.

Claim measured: ``memray.kernels.pk_search.pk_select`` (each half's top-k1 in one pass, then the
top-knn of the k1² sums with an early stop per line) selects the same scores as the torch path
(checked on every shape; slots differ only where two scores tie exactly, counted as
``rows_tie_order``: pk_select gives a tie to the lower slot) and takes less time. Both are timed on
the same random half scores ``[tokens * heads, 2, n_keys]`` (fp32), alternating, median of
``--reps``, one thread and all threads; the torch path is what ``ProductKeyMemory`` runs with
``backend: torch``: ``topk`` of each half, the k1² sums, ``topk`` of those.

    python benchmarks/bench_search.py [--quick] [--reps R] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import import_kernels, machine_info, write_table  # noqa: E402

NAME = "bench_search"
# (n_keys, knn, tokens, heads): the recall benchmark's layer, the README's layer, the paper's
SHAPES = [(256, 16, 4096, 4), (128, 32, 2048, 4), (1024, 32, 2048, 4)]


def torch_select(s: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    k1 = min(knn, s.shape[-1])
    s1, i1 = s[:, 0].topk(k1, dim=-1)
    s2, i2 = s[:, 1].topk(k1, dim=-1)
    _, pos = (s1[:, :, None] + s2[:, None, :]).flatten(1).topk(knn, dim=-1)
    return i1.gather(-1, pos // k1), i2.gather(-1, pos % k1)


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    kernels = import_kernels()
    pk_select = kernels.pk_select
    if not kernels.cpu_ext.available():
        print(f"error: the C++ kernels are unavailable: {kernels.cpu_ext.load_error}", file=sys.stderr)
        sys.exit(2)
    reps = args.reps or (3 if args.quick else 15)
    shapes = SHAPES[:1] if args.quick else SHAPES
    threads = sorted({1, torch.get_num_threads()})
    rows = []
    generator = torch.Generator().manual_seed(0)
    for n_keys, knn, tokens, heads in shapes:
        scores = torch.randn(tokens * heads, 2, n_keys, generator=generator)
        ours, theirs = pk_select(scores, knn), torch_select(scores, knn)
        # the selected scores, best first, must be the same; slots may differ only where scores
        # tie exactly (pk_select gives a tie to the lower slot, torch.topk in no stated order)
        picked = [scores[:, 0].gather(1, i) + scores[:, 1].gather(1, j) for i, j in (ours, theirs)]
        same = torch.equal(*picked)
        ties = int((ours[0] * n_keys + ours[1] != theirs[0] * n_keys + theirs[1]).any(1).sum())
        for t in threads:
            torch.set_num_threads(t)
            cpp = median_ms(lambda: pk_select(scores, knn), reps)
            ref = median_ms(lambda: torch_select(scores, knn), reps)
            rows.append(
                {
                    "n_keys": n_keys,
                    "knn": knn,
                    "tokens": tokens,
                    "heads": heads,
                    "threads": t,
                    "cpp_ms": cpp,
                    "torch_ms": ref,
                    "speedup": ref / cpp,
                    "same_scores": same,
                    "rows_tie_order": ties,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        torch.set_num_threads(threads[-1])
    fields = [
        "n_keys",
        "knn",
        "tokens",
        "heads",
        "threads",
        "cpp_ms",
        "torch_ms",
        "speedup",
        "same_scores",
        "rows_tie_order",
    ]
    write_table(
        pathlib.Path(args.out),
        NAME + ("_quick" if args.quick else ""),
        rows,
        fields,
        title=f"Product-key selection: C++ pk_select vs torch topk x3 (median of {reps}, fp32 random scores)",
        machine=machine_info(),
    )
    print(
        json.dumps(
            {
                "benchmark": NAME,
                "speedup": {f"{r['n_keys']}/{r['knn']}/{r['threads']}t": r["speedup"] for r in rows},
                "same_scores": all(r["same_scores"] for r in rows),
            }
        )
    )
    if not all(r["same_scores"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
