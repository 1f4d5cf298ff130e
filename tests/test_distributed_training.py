"""Training on several real processes (gloo, DeepSpeed ZeRO on CPU) against one process.

The single-process loss curve of the tiny model is the reference; 2 and 3 ranks at ZeRO 1, 2
and 3 must reproduce it within 1e-4 with the same global batch and seed. Each world size runs
its stages in one spawn (processes and the process group are reused; each stage builds a fresh
model and engine).

The runs are fp32. A sharded run sums each gradient in another order than one process does,
so weights differ by rounding (~1e-6 after a few Adam steps); that stays invisible in the loss
unless it flips a near-tie in a product-key top-k selection. With 4,096 slots (n_keys 64) such a
flip happened at 3 ranks, ZeRO-3: one of 1,024 head selections differed at step 5 (scores of the
8th and 9th slot 1.8e-8 apart) and the curves parted by 1.4e-4. The model here reads 256 slots
of 1,024 values (a table of 262k parameters, more than the 231k dense ones, so a collective of
the table would be the largest collective of a step).
"""

import json

import pytest
import torch
import torch.distributed as dist
from helpers import assert_one_line_error, memray, memray_here, read_metrics, watch_collectives

from memray.distributed import init_distributed, spawn
from memray.train import Trainer, load_run_config

pytestmark = pytest.mark.slow

STEPS = 20
TOL = 1e-4
OVERRIDES = [f"train.steps={STEPS}", "model.memory.v_dim=1024"]


def _config(*extra):
    return load_run_config("tiny", [*OVERRIDES, *extra])


def _curve(trainer: Trainer) -> list[tuple[float, float, float]]:
    """(loss, dense gradient norm, value gradient norm) per step: the norms are sensitive to the
    scale of the gradients, which the adaptive optimizers' updates are not."""
    trainer.model.train()
    steps = [trainer.train_step(*trainer.batches.next()) for _ in range(STEPS)]
    return [(s["loss"], s["grad_norm"], s["value_grad_norm"]) for s in steps]


def _stages_worker(layout_stages):
    ctx = init_distributed("gloo")
    calls = []
    watch_collectives(
        lambda _name, tensors, group, _caller: calls.extend(
            (t.numel(), t.untyped_storage().data_ptr(), group) for t in tensors
        )
    )
    out = []
    for layout, stage in layout_stages:
        config = _config(
            f"distributed.workers={ctx.world_size}", f"distributed.zero_stage={stage}", f"model.memory.layout={layout}"
        )
        trainer = Trainer(config, run_dir="unused", progress=False, context=ctx)
        calls.clear()
        curve = _curve(trainer)
        table = trainer.tables["layer1"]
        storages = {table.weight.untyped_storage().data_ptr()}
        engine_params = {id(p) for p in trainer.dense.engine.module.parameters()}
        out.append(
            {
                "layout": layout,
                "stage": stage,
                "curve": curve,
                "table_in_engine": id(table.weight) in engine_params,
                "shard_numel": table.weight.numel(),
                "table_numel": table.num_rows * table.dim,
                "shard_bound": (
                    -(-table.num_rows // ctx.world_size) * table.dim
                    if layout == "row"
                    else table.num_rows * -(-table.dim // ctx.world_size)
                ),
                "collectives_on_table": sum(1 for _, ptr, _ in calls if ptr in storages),
                # everything outside the memory group is DeepSpeed's (and the loss's all-reduce)
                "largest_collective": max(n for n, _, group in calls if group is not ctx.memory_group),
            }
        )
    dist.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def reference_curve():
    return _curve(Trainer(_config(), run_dir="unused", progress=False))


@pytest.mark.parametrize(
    "world,layout_stages",
    [
        (2, [("row", 0), ("row", 1), ("row", 2), ("row", 3)]),
        (3, [("row", 1), ("row", 2), ("row", 3), ("column", 2)]),
    ],
)
def test_sharded_training_reproduces_single_process(world, layout_stages, reference_curve):
    results = spawn(_stages_worker, world, layout_stages)
    for rank, runs in enumerate(results):
        for run in runs:
            what = f"world {world} rank {rank} {run['layout']} ZeRO-{run['stage']}"
            diff = max(abs(a[0] - b[0]) for a, b in zip(run["curve"], reference_curve))
            assert diff <= TOL, f"{what}: loss curve differs by {diff}"
            for i, name in ((1, "dense"), (2, "value")):
                rel = max(abs(a[i] - b[i]) / b[i] for a, b in zip(run["curve"], reference_curve))
                assert rel <= 1e-4, f"{what}: {name} gradient norm differs by {rel:.1e} (relative)"
            # the value table stays outside DeepSpeed: never in the engine, never in a collective,
            # and each rank stores only its shard
            assert not run["table_in_engine"], what
            assert run["collectives_on_table"] == 0, what
            assert run["largest_collective"] < run["table_numel"], what
            assert run["shard_numel"] <= run["shard_bound"], what
    assert reference_curve[-1][0] < reference_curve[0][0] - 1.0  # it trains


def _train_processes(workers: int, run_dir) -> dict:
    result = memray(
        "train",
        "tiny",
        "--workers",
        workers,
        "--set",
        "distributed.launcher=processes",
        "--set",
        "train.log_every=1",
        "--run-dir",
        run_dir,
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])  # stdout: the result only


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    run = tmp_path_factory.mktemp("four") / "run"
    assert _train_processes(4, run)["step"] == 20
    return run


@pytest.mark.parametrize("workers", [1, 4])
def test_local_processes_give_the_single_process_losses(workers, tiny_run, four_ranks, tmp_path):
    """`memray train --workers N` on local processes reproduces one process (tests/test_ray.py:
    Ray Train workers reproduce the same curves)."""
    run = four_ranks if workers == 4 else tmp_path / "run"
    if workers != 4:
        assert _train_processes(workers, run)["step"] == 20
    one, many = read_metrics(tiny_run), read_metrics(run)
    assert [m["step"] for m in many] == list(range(1, 21))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, many)) <= TOL
    last = many[-1]
    served = last["lookup/layer1/rows_served"]
    assert len(served) == workers and sum(served) == 8 * 64 * 2 * 8  # batch x seq x heads x knn, row layout
    assert sum(served) == sum(one[-1]["lookup/layer1/rows_served"])
    if workers > 1:
        assert min(last["lookup/layer1/bytes_sent"]) > 0
    else:
        assert last["lookup/layer1/bytes_sent"] == [0.0]


def test_sharded_checkpoint_reads_as_the_single_process_one(tiny_run, four_ranks, tmp_path):
    """The pools of a 4-rank run, written shard by shard into memory.zarr, load, inspect, export
    and evaluate like the single-process run's."""
    from safetensors.torch import load_file

    from memray.checkpoint.model import load_trained_model

    assert (four_ranks / "checkpoints" / "step-00000020" / "memory.zarr").is_dir()
    one_model, many_model = load_trained_model(tiny_run).model, load_trained_model(four_ranks).model
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (one_model(tokens) - many_model(tokens)).abs().max() <= 1e-4
    assert torch.equal(one_model.pools["layer1"].usage_count, many_model.pools["layer1"].usage_count)
    # inspect reads both alike, and `--slot` reports one slot
    one_info, many_info = (
        json.loads(memray_here("inspect", run, "--json", "--slot", "7").stdout)["pools"]["layer1"]
        for run in (tiny_run, four_ranks)
    )
    assert many_info["lookups"] == one_info["lookups"] == 20 * 8 * 64 * 16
    assert many_info["slot"]["usage_count"] == one_info["slot"]["usage_count"]
    assert len(many_info["shard_map"]) == 4
    png = tmp_path / "usage.png"
    assert memray_here("inspect", four_ranks, "--usage-png", png).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # export gathers the shards into one safetensors file
    exported = memray_here("export", four_ranks, "--out", tmp_path / "many.safetensors")
    assert exported.returncode == 0, exported.stderr
    flat = load_file(str(tmp_path / "many.safetensors"))
    assert torch.equal(flat["pools.layer1.weight"], many_model.pools["layer1"].weight.detach())
    evaluated = memray_here(
        "eval", four_ranks, "--facts", four_ranks / "data" / "facts.jsonl", "--limit", "5", "--json"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["total"] == 5


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--workers", "5", "--set", "model.memory.n_keys=2", "--set", "model.memory.knn=4"], "model.memory.n_keys"),
        (["--workers", "4", "--set", "model.memory.parallel_size=2"], "model.memory.parallel_size"),
        (["--workers", "3", "--set", "train.batch_size=2"], "train.batch_size"),
        (
            ["--workers", "2", "--set", "model.memory.layout=column", "--set", "model.memory.v_dim=1"],
            "model.memory.v_dim",
        ),
    ],
)
def test_bad_world_size_is_one_line_before_any_process(args, needle, tmp_path):
    assert_one_line_error(memray_here("train", "tiny", "--run-dir", tmp_path / "r", *args), needle)
    assert not (tmp_path / "r").exists()


def test_more_local_processes_than_gpus_is_one_line(monkeypatch, tmp_path):
    """On a machine with one GPU, NCCL and two local processes: one line naming the key, before any
    process starts (each would take cuda:<local rank>, and the second has no device)."""
    import torch.distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    args = ["--workers", "2", "--set", "distributed.launcher=processes", "--run-dir", tmp_path / "r"]
    assert_one_line_error(memray_here("train", "tiny", *args), "distributed.workers", "has 1")
    assert not (tmp_path / "r").exists()
