"""Training throughput of a Memory+ model against a dense model of equal FLOPs per token.

The models are those of ``factual_recall.py`` (4 blocks of 128 dims; Memory+ in block 2 with
``--n-keys``² slots; the dense model's FFNs widened to the same FLOPs per token). Both train on
the same batches in the same processes, in alternating blocks of steps, so drifts of a shared
machine hit both alike; the median step time of each gives its tokens/s. Run on one process and
on 2 ranks (local processes: DeepSpeed ZeRO-1 for the dense parameters, the value table sharded
by rows). The memory layer's overhead is dense tokens/s / Memory+ tokens/s - 1.

    python benchmarks/e2e_throughput.py [--quick]          # 128² slots -> results/e2e_throughput.*
    python benchmarks/e2e_throughput.py --n-keys 256       # factual_recall.py's size -> e2e_throughput_256.*
    python benchmarks/e2e_throughput.py --device cuda --precision bf16 --n-keys 1024 --dim 1024 --layers 8 \
        --set model.memory.k_dim=512                       # one GPU, one process -> e2e_throughput_1024_cuda.*

``--set KEY=VALUE`` (repeatable) changes both models before the dense one is matched.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import torch  # noqa: E402
from common import machine_info, write_table  # noqa: E402
from factual_recall import BASE, matched, model_overrides  # noqa: E402

from memray.model import Transformer, count_parameters  # noqa: E402
from memray.model.flops import flops_per_token  # noqa: E402
from memray.train import Trainer, load_run_config  # noqa: E402

NAME = "e2e_throughput"


def configs(n_keys: int, batch: int, extra: list[str] = ()) -> dict:
    import torch

    base = [*BASE, *extra]
    plus = [*base, *model_overrides("memory_plus", n_keys)]
    reference = load_run_config("demo", plus)
    seq_len = reference.data.seq_len
    with torch.device("meta"):
        params = count_parameters(Transformer(reference.model))["total"]
    flops = flops_per_token(reference.model, seq_len)["total"]
    dense = [*base, *matched("dense", base, flops, params, seq_len)]
    common = [
        "data.source=synthetic",
        "data.num_entities=400",
        "data.num_attributes=5",
        f"train.batch_size={batch}",
        "train.steps=1000000",
    ]
    return {"dense": [*dense, *common], "memory_plus": [*plus, *common]}


def time_models(overrides: dict, blocks: int, block_steps: int, context=None, run_dir=None) -> dict:
    """Median seconds per step of each model, trained in alternating blocks in this process."""
    trainers = {
        name: Trainer(load_run_config("demo", o), run_dir=f"{run_dir}/{name}", progress=False, context=context)
        for name, o in overrides.items()
    }
    times = {name: [] for name in trainers}
    for trainer in trainers.values():  # warm-up: first steps build kernels and optimizer state
        for _ in range(3):
            trainer.train_step(*trainer.batches.next())
    for _ in range(blocks):
        for name, trainer in trainers.items():
            for _ in range(block_steps):
                inputs, targets = trainer.batches.next()
                start = time.perf_counter()
                trainer.train_step(inputs, targets)
                times[name].append(time.perf_counter() - start)
    first = next(iter(trainers.values())).config
    tokens = first.train.batch_size * first.data.seq_len
    return {
        name: {
            "step_s": statistics.median(t),
            "tokens_per_s": tokens / statistics.median(t),
            "steps": len(t),
            "flops_per_token": flops_per_token(trainers[name].config.model, first.data.seq_len)["total"],
        }
        for name, t in times.items()
    }


def _ranked(overrides, blocks, block_steps, run_dir):
    from memray.distributed import init_distributed, shutdown_distributed

    context = init_distributed("gloo")
    try:
        return time_models(overrides, blocks, block_steps, context, run_dir)
    finally:
        shutdown_distributed()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n-keys", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one process: one GPU)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--dim", type=int, help="model dim of both models (default 128)")
    parser.add_argument("--layers", type=int, help="blocks of both models (default 4)")
    parser.add_argument("--batch", type=int, default=32, help="sequences of 128 tokens per step")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--one-process", action="store_true", help="leave out the 2-rank run")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    blocks, block_steps = (3, 4) if args.quick else (8, 5)
    extra = [f"train.device={args.device}", f"train.precision={args.precision}", *args.set]
    if args.dim:
        extra += [f"model.dim={args.dim}"]
    if args.layers:
        extra += [f"model.n_layers={args.layers}", f"model.memory_layers=[{args.layers // 2}]"]
    overrides = configs(args.n_keys, args.batch, extra)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["1 process"] = time_models(overrides, blocks, block_steps, run_dir=tmp)
        if args.device == "cpu" and not args.one_process:  # 2 ranks of one GPU would share it: CPUs only
            from memray.distributed import spawn

            results["2 ranks"] = spawn(_ranked, 2, overrides, blocks, block_steps, tmp)[0]
    rows = [
        {"setting": setting, "model": name, **r} for setting, result in results.items() for name, r in result.items()
    ]
    ratio = {s: r["memory_plus"]["tokens_per_s"] / r["dense"]["tokens_per_s"] for s, r in results.items()}
    for row in rows:
        row["x_dense"] = ratio[row["setting"]] if row["model"] == "memory_plus" else 1.0
    name = NAME if args.n_keys == 128 else f"{NAME}_{args.n_keys}"  # 128: the default, the README's figure
    if args.device != "cpu":
        name = f"{name}_{args.device}"
    config = load_run_config("demo", overrides["memory_plus"])
    write_table(
        pathlib.Path(args.out),
        name,
        rows,
        ["setting", "model", "flops_per_token", "step_s", "tokens_per_s", "x_dense", "steps"],
        title=f"Training tokens/s at equal FLOPs per token (Memory+ {args.n_keys}² slots, dim {config.model.dim}, "
        f"{config.model.n_layers} blocks, batch {args.batch} x {config.data.seq_len} tokens, {args.precision} on "
        f"{args.device}; medians of alternating blocks{', quick' if args.quick else ''})",
        machine=machine_info(torch.device(args.device)),
    )
    summary = {
        "benchmark": name,
        "memory_plus_over_dense": ratio,
        "memory_overhead_percent": {s: 100 * (1 / r - 1) for s, r in ratio.items()},
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
