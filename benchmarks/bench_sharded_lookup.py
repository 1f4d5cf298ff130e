"""Sharded value tables on real processes: traffic against the formula, step time, and scale.

Claims measured:

1. ``traffic`` — bytes one rank sends per token per memory layer (forward + backward), counted
   by the table itself, equal ``memray.distributed.plan.lookup_traffic`` within 10% for both
   layouts (uniform random rows, as the formula assumes; the formula leaves out the few bytes
   of split counts).
2. ``step`` — the median time of one lookup step (forward, backward, row-wise Adagrad) on 1, 2
   and 4 processes, with the same tokens per rank (weak scaling; on a 2-core box 4 processes
   share 2 cores, so this shows the overhead of the exchange, not a speedup).
3. ``scale`` — a whole model (dim 256, 4 blocks, one memory layer, v_dim 256) trained on 2
   workers (row layout, row-wise Adagrad, ZeRO-2) with a 2^22-row table (1.07B value
   parameters) and with a 2^16-row table: tokens/s and peak resident memory per worker. The
   2^16 table is timed before and after the 2^22 one in the same processes (medians of both),
   so the ratio compares numbers of one run. Target: the big table's step at most 1.5x slower.

    python benchmarks/bench_sharded_lookup.py            # all sections (~3 min on 2 cores)
    python benchmarks/bench_sharded_lookup.py --quick    # smaller shapes, 2^20 rows in ``scale``
    python benchmarks/bench_sharded_lookup.py --backend nccl --sections traffic,step   # GPUs

Results: ``benchmarks/results/bench_sharded_lookup.{csv,md}`` (or ``--out``); the last line
printed is JSON with the key figures.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, write_table  # noqa: E402

from memray.distributed import ShardedValueTable, init_distributed, lookup_traffic, spawn  # noqa: E402
from memray.optim import RowWiseAdagrad  # noqa: E402

NAME = "bench_sharded_lookup"
FIELDS = [
    "section",
    "layout",
    "world",
    "rows",
    "dim",
    "tokens_per_rank",
    "lookups",
    "measured_bytes_per_token",
    "formula_bytes_per_token",
    "ratio",
    "step_ms",
    "tokens_per_s",
    "peak_rss_mib",
]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _lookup_worker(backend, layout, rows, dim, tokens, lookups, warmup, reps) -> dict:
    ctx = init_distributed(backend)
    table = ShardedValueTable(rows, dim, group=ctx.memory_group, layout=layout, init_seed=0, device=ctx.device)
    optimizer = RowWiseAdagrad([{"params": [table.weight], "row_dim": table.dim}], lr=0.01, all_reduce=table.all_reduce)
    generator = torch.Generator().manual_seed(1000 + ctx.rank)
    times, sent = [], []
    for rep in range(warmup + reps):
        indices = torch.randint(rows, (tokens, lookups), generator=generator).to(ctx.device)
        weights = torch.rand(tokens, lookups, generator=generator).to(ctx.device).requires_grad_()
        upstream = torch.randn(tokens, dim, generator=generator).to(ctx.device)
        dist.barrier()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        table(indices, weights).backward(upstream)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        stats = table.stats.reset()
        if rep >= warmup:
            times.append(elapsed)
            sent.append(stats.bytes_sent)
    dist.destroy_process_group()
    return {"step_s": statistics.median(times), "bytes_per_token": statistics.mean(sent) / tokens}


def _scale_config(log2_rows: int, workers: int):
    from memray.train import load_run_config

    n_keys = 2 ** (log2_rows // 2)
    return load_run_config(
        "tiny",
        [
            "model.dim=256",
            "model.n_layers=4",
            "model.n_heads=4",
            "model.max_seq_len=128",
            "model.memory_layers=[2]",
            f"model.memory.n_keys={n_keys}",
            "model.memory.heads=2",
            "model.memory.knn=16",
            "model.memory.k_dim=64",
            "data.seq_len=128",
            "data.num_entities=200",
            "train.batch_size=8",
            "train.steps=1000",
            "optim.value_optimizer=rowwise_adagrad",
            "model.memory.value_lr=0.01",
            f"distributed.workers={workers}",
            "distributed.zero_stage=2",
        ],
    )


def _scale_worker(sizes, warmup, reps) -> dict:
    from memray.train import Trainer

    ctx = init_distributed("gloo")
    out = {}
    for log2_rows in sizes:
        trainer = Trainer(_scale_config(log2_rows, ctx.world_size), run_dir="unused", progress=False, context=ctx)
        trainer.model.train()
        times = []
        for rep in range(warmup + reps):
            inputs, targets = trainer.batches.next()
            dist.barrier()
            start = time.perf_counter()
            trainer.train_step(inputs, targets)
            if rep >= warmup:
                times.append(time.perf_counter() - start)
        # the process's peak so far: sizes are run small first, so it is this size's peak
        out.setdefault(log2_rows, {"times": [], "rss": _peak_rss_mib(), "tokens": inputs.numel()})
        out[log2_rows]["times"] += times
        del trainer
    dist.destroy_process_group()
    return {
        k: {"step_s": statistics.median(v["times"]), "rss_mib": v["rss"], "tokens": v["tokens"]} for k, v in out.items()
    }


def run_traffic_and_step(backend, worlds, rows, dim, tokens, lookups, warmup, reps) -> list[dict]:
    out = []
    for layout in ("row", "column"):
        for world in worlds:
            ranks = spawn(_lookup_worker, world, backend, layout, rows, dim, tokens, lookups, warmup, reps)
            measured = statistics.mean(r["bytes_per_token"] for r in ranks)
            formula = lookup_traffic(layout, world, tokens, lookups, dim)["bytes_per_token"]
            step = max(r["step_s"] for r in ranks)  # a step ends when its slowest rank does
            out.append(
                {
                    "section": "traffic+step",
                    "layout": layout,
                    "world": world,
                    "rows": rows,
                    "dim": dim,
                    "tokens_per_rank": tokens,
                    "lookups": lookups,
                    "measured_bytes_per_token": measured,
                    "formula_bytes_per_token": formula,
                    "ratio": measured / formula if formula else 1.0,
                    "step_ms": step * 1e3,
                    "tokens_per_s": world * tokens / step,
                }
            )
    return out


def run_scale(small, big, warmup, reps) -> list[dict]:
    ranks = spawn(_scale_worker, 2, [small, big, small], warmup, reps)
    out = []
    for log2_rows in (small, big):
        step = max(r[log2_rows]["step_s"] for r in ranks)
        out.append(
            {
                "section": "scale",
                "layout": "row",
                "world": 2,
                "rows": 2**log2_rows,
                "dim": 256,
                "tokens_per_rank": ranks[0][log2_rows]["tokens"] // 2,
                "step_ms": step * 1e3,
                "tokens_per_s": ranks[0][log2_rows]["tokens"] / step,
                "peak_rss_mib": max(r[log2_rows]["rss_mib"] for r in ranks),
            }
        )
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions")
    parser.add_argument("--sections", default="traffic,step,scale", help="comma-separated: traffic,step,scale")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    quick = args.quick
    rows_out: list[dict] = []
    summary: dict = {"benchmark": NAME}
    if sections & {"traffic", "step"}:
        worlds = [2] if sections == {"traffic"} else [1, 2, 4]
        tokens, lookups = (256, 32) if quick else (2048, 32)
        table = run_traffic_and_step(
            args.backend, worlds, 1 << 16, 256, tokens, lookups, warmup=1 if quick else 3, reps=2 if quick else 15
        )
        rows_out += table
        multi = [r for r in table if r["world"] > 1]
        summary["traffic_ratio_min"] = min(r["ratio"] for r in multi)
        summary["traffic_ratio_max"] = max(r["ratio"] for r in multi)
        for r in table:
            summary[f"step_ms/{r['layout']}/w{r['world']}"] = r["step_ms"]
    if "scale" in sections:
        big = 20 if quick else 22
        scale = run_scale(16, big, warmup=2, reps=3 if quick else 10)
        rows_out += scale
        summary[f"scale_slowdown_2^{big}_vs_2^16"] = scale[1]["step_ms"] / scale[0]["step_ms"]
        summary[f"scale_rss_mib_2^{big}"] = scale[1]["peak_rss_mib"]
        summary["scale_rss_mib_2^16"] = scale[0]["peak_rss_mib"]
    machine = machine_info()
    write_table(
        args.out,
        NAME,
        rows_out,
        FIELDS,
        machine=machine,
        summary=summary,
        title="Sharded lookups on local processes (gloo unless noted): bytes sent per token per memory "
        "layer against the formula, median step times, and a 2^16- vs 2^22-row table on 2 workers.",
    )
    summary["machine"] = machine
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
