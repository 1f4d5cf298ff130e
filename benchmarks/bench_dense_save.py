"""Peak host memory of each rank while a checkpoint saves the dense weights and Adam moments.

Claim measured: a save streams the dense state to rank 0 one parameter at a time, so no rank's
memory grows by more than a small multiple of the largest parameter, whatever the model's size;
in particular ZeRO-3 never gathers the whole model on every rank. Baseline, in the same run: every
rank assembling every parameter's fp32 master and both moments before anything is written (what
checkpoints cost before they streamed: ~12 bytes per dense parameter on every rank).

Each (stage, method) runs in fresh processes (2 ranks, gloo, DeepSpeed on its CPU accelerator,
bf16): build the trainer, take one step (so the moments exist), then sample the process's
resident memory every 2 ms during the save; the figure is the peak above the level before it.

    python benchmarks/bench_dense_save.py [--quick] [--dim D] [--layers L] [--stages 0 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, write_table  # noqa: E402

NAME = "bench_dense_save"
MiB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """The highest resident memory seen while active, sampled on a thread."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def grown(self) -> int:
        return self.peak - self.base


def _gather_everything(dense) -> dict:
    """The baseline: every rank assembles every master and both moments, and holds them all at
    once (collective)."""
    from memray.train.deepspeed import _link_optimizer_state
    from memray.train.dense import MOMENTS

    _link_optimizer_state(dense.engine)
    held = {}
    for name, p in dense.named:
        held[name] = dense._master(p).detach().float().cpu().clone()
        for key in MOMENTS:
            held[f"{key}.{name}"] = dense._moment(p, key).detach().float().cpu().clone()
    return held


def _rank(stage: int, method: str, overrides: list[str], run_dir: str) -> dict:
    import torch

    from memray.distributed import init_distributed, shutdown_distributed
    from memray.train import Trainer, load_run_config

    ctx = init_distributed("gloo")
    try:
        config = load_run_config(
            "tiny", [*overrides, f"distributed.zero_stage={stage}", f"distributed.workers={ctx.world_size}"]
        )
        trainer = Trainer(config, run_dir=run_dir, progress=False, context=ctx)
        trainer.model.train()
        trainer.train_step(*trainer.batches.next())
        trainer.checkpointer.on_commit = None  # the run directory's log is not open outside fit()
        params = sum(getattr(p, "ds_numel", p.numel()) for _, p in trainer.dense.named)
        largest = max(getattr(p, "ds_numel", p.numel()) for _, p in trainer.dense.named)
        torch.distributed.barrier()
        started = time.perf_counter()
        with PeakMemory() as memory:
            if method == "streamed":
                trainer.save()
            else:
                held = _gather_everything(trainer.dense)
                del held
        seconds = time.perf_counter() - started
        return {"rank": ctx.rank, "grown": memory.grown, "params": params, "largest": largest, "seconds": seconds}
    finally:
        shutdown_distributed()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 3])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results")
    args = parser.parse_args(argv)
    dim = args.dim or (256 if args.quick else 1024)
    layers = args.layers or (2 if args.quick else 6)
    overrides = [
        f"model.dim={dim}",
        f"model.n_layers={layers}",
        "model.n_heads=8",
        "model.memory_layers=[1]",
        "train.precision=bf16",
        "train.batch_size=2",
        "data.seq_len=32",
        "distributed.launcher=processes",
        "train.tensorboard=false",
    ]
    from memray.distributed import spawn

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            for method in ("streamed", "gathered"):
                results = spawn(_rank, args.workers, stage, method, overrides, f"{tmp}/{stage}-{method}")
                for r in results:
                    state = 12 * r["params"]  # fp32 master + two fp32 moments per dense parameter
                    rows.append(
                        {
                            "zero_stage": stage,
                            "method": method,
                            "rank": r["rank"],
                            "dense_params": r["params"],
                            "state_MiB": state / MiB,
                            "rank_share_MiB": state / args.workers / MiB,
                            "largest_param_MiB": 12 * r["largest"] / MiB,
                            "peak_growth_MiB": r["grown"] / MiB,
                            "growth_over_state": r["grown"] / state,
                            "seconds": r["seconds"],
                        }
                    )
    streamed = [r for r in rows if r["method"] == "streamed"]
    gathered = [r for r in rows if r["method"] == "gathered"]
    summary = {
        "benchmark": NAME,
        "dense_params": rows[0]["dense_params"],
        "state_MiB": rows[0]["state_MiB"],
        "largest_param_MiB": rows[0]["largest_param_MiB"],
        "streamed_peak_growth_max_MiB": max(r["peak_growth_MiB"] for r in streamed),
        "streamed_growth_over_state_max": max(r["growth_over_state"] for r in streamed),
        "streamed_growth_over_rank_share_max": max(r["peak_growth_MiB"] / r["rank_share_MiB"] for r in streamed),
        "gathered_peak_growth_min_MiB": min(r["peak_growth_MiB"] for r in gathered),
    }
    machine = machine_info()
    fields = [
        "zero_stage",
        "method",
        "rank",
        "dense_params",
        "state_MiB",
        "rank_share_MiB",
        "largest_param_MiB",
        "peak_growth_MiB",
        "growth_over_state",
        "seconds",
    ]
    write_table(
        args.out,
        NAME,
        rows,
        fields,
        machine=machine,
        summary=summary,
        title=f"Peak resident-memory growth per rank during a save of the dense state ({args.workers} ranks, "
        f"dim {dim}, {layers} layers, bf16 engine): memray's streamed save against every rank assembling the "
        "whole state (state: fp32 master + 2 moments per dense parameter).",
    )
    summary["machine"] = machine
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
