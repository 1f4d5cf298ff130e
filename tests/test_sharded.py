"""Sharded value tables on real processes (gloo): they must equal the unsharded layer.

Each world size runs in one spawn; inside it every case checks both layouts. Rows (49) and the
value dim (29) are divisible by none of the world sizes 2, 3, 4.
"""

import pytest
import torch
import torch.distributed as dist

from memray.distributed import ParallelDims, ShardedValueTable, init_distributed, spawn
from memray.errors import ConfigError
from memray.kernels import embedding_bag
from memray.model import MemoryConfig, ProductKeyMemory

TOL = 1e-5
DIM, V_DIM = 32, 29
CONFIG = MemoryConfig(n_keys=7, heads=2, knn=4, k_dim=16, v_dim=V_DIM, qk_norm=True, value_lr=None)


def _shard_of(full: torch.Tensor, table: ShardedValueTable) -> torch.Tensor:
    (r0, r1), (c0, c1) = table.row_range, table.col_range
    return full[r0:r1, c0:c1]


def _dense(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_dense() if grad.is_sparse else grad


def _layer_case(ctx, layout: str, tokens_per_rank: list[int]) -> dict:
    """A whole memory layer: outputs and every gradient against the unsharded layer."""
    rank = ctx.rank
    torch.manual_seed(0)
    reference = ProductKeyMemory(DIM, CONFIG)
    torch.manual_seed(0)
    table = ShardedValueTable(
        CONFIG.num_slots, V_DIM, group=ctx.memory_group, layout=layout, init_seed=reference.values.init_seed
    )
    sharded = ProductKeyMemory(DIM, CONFIG, values=table)
    sharded.load_state_dict(
        {k: v for k, v in reference.state_dict().items() if not k.startswith("value_table.")}, strict=False
    )
    errors = {"init": (table.weight - _shard_of(reference.values.weight, table)).abs().max().item()}

    generator = torch.Generator().manual_seed(1)
    total = sum(tokens_per_rank)
    x = torch.randn(total, DIM, generator=generator)
    g = torch.randn(total, DIM, generator=generator)
    start = sum(tokens_per_rank[:rank])
    mine = slice(start, start + tokens_per_rank[rank])

    y_ref = reference(x)
    (y_ref * g).sum().backward()
    y = sharded(x[mine])
    (y * g[mine]).sum().backward()
    errors["forward"] = (y - y_ref[mine]).abs().max().item() if y.numel() else 0.0
    # the pool's gradient: this rank's part of the unsharded layer's
    errors["values"] = (
        (_dense(table.weight.grad) - _shard_of(_dense(reference.values.weight.grad), table)).abs().max().item()
    )
    # dense gradients come from this rank's tokens only: summed over ranks they are the batch's
    references = dict(reference.named_parameters())
    assert set(references) - set(dict(sharded.named_parameters())) == {"value_table.weight"}
    for name, p in sharded.named_parameters():
        grad = (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
        dist.all_reduce(grad)
        errors[name] = (grad - references[name].grad).abs().max().item()
    served = torch.tensor([table.stats.rows_served])
    dist.all_reduce(served)
    errors["rows_served_total"] = int(served)
    return errors


def _one_rank_case(ctx, layout: str) -> dict:
    """Every lookup of every rank lands in rank 0's rows; ranks hold uneven token counts."""
    rank, world = ctx.rank, ctx.world_size
    num_rows, dim, lookups = 49, V_DIM, 6
    table = ShardedValueTable(num_rows, dim, group=ctx.memory_group, layout=layout, init_seed=123)
    full = table.full_weight()
    hi = 49 // world if world > 1 else 49  # rank 0 owns at least 49 // world rows
    generator = torch.Generator().manual_seed(7)
    counts = [3 + 2 * r for r in range(world)]
    indices = torch.randint(0, hi, (sum(counts), lookups), generator=generator)
    weights = torch.randn(sum(counts), lookups, generator=generator)
    grads = torch.randn(sum(counts), dim, generator=generator)
    start = sum(counts[:rank])
    mine = slice(start, start + counts[rank])

    ref_table = full.clone().requires_grad_()
    ref_w = weights.clone().requires_grad_()
    y_ref = embedding_bag(indices, ref_w, ref_table, sparse_grad=False, backend="torch")
    (y_ref * grads).sum().backward()
    w = weights[mine].clone().requires_grad_()
    y = table(indices[mine], w)
    (y * grads[mine]).sum().backward()
    return {
        "forward": (y - y_ref[mine]).abs().max().item(),
        "weights": (w.grad - ref_w.grad[mine]).abs().max().item(),
        "values": (_dense(table.weight.grad) - _shard_of(ref_table.grad, table)).abs().max().item(),
        "rows_served": table.stats.rows_served,
    }


def _equivalence_worker():
    ctx = init_distributed("gloo")
    world = ctx.world_size
    out = {}
    for layout in ("row", "column"):
        out[f"{layout}/layer"] = _layer_case(ctx, layout, [5 + 3 * r for r in range(world)])
        out[f"{layout}/layer-empty-rank0"] = _layer_case(ctx, layout, [0] + [4] * (world - 1)) if world > 1 else {}
        out[f"{layout}/one-rank"] = _one_rank_case(ctx, layout)
    dist.destroy_process_group()
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_layer_equals_unsharded(world):
    results = spawn(_equivalence_worker, world)
    lookups = CONFIG.heads * CONFIG.knn
    for rank, cases in enumerate(results):
        for case, errors in cases.items():
            for key, value in errors.items():
                if key == "rows_served_total":
                    tokens = sum(5 + 3 * r for r in range(world)) if case.endswith("/layer") else 4 * (world - 1)
                    # row layout: every lookup is served once; column: once by every rank
                    assert value == tokens * lookups * (1 if case.startswith("row") else world), (case, value)
                elif key == "rows_served":
                    if case.startswith("row"):
                        assert (value > 0) == (rank == 0), (rank, case, value)  # only rank 0 serves
                else:
                    assert value <= TOL, f"world {world} rank {rank} {case} {key}: {value}"


@pytest.mark.parametrize(
    "world,memory,rows,dim,layout,key",
    [
        (4, 2, 64, 8, "row", "model.memory.parallel_size"),  # checked before any process starts
        (4, None, 3, 8, "row", "model.memory.n_keys"),  # more ranks than rows
        (4, None, 64, 3, "column", "model.memory.v_dim"),  # more ranks than value columns
        (0, None, 64, 8, "row", "distributed.workers"),
    ],
)
def test_bad_world_sizes_are_config_errors(world, memory, rows, dim, layout, key):
    with pytest.raises(ConfigError) as info:
        ParallelDims(world, memory).check_table(rows, dim, layout)
    assert info.value.key == key


@pytest.mark.slow
def test_bench_traffic_matches_the_formula(tmp_path):
    """bench_sharded_lookup's traffic section: bytes counted by the tables, 2 ranks, both layouts,
    within 10% of memray.distributed.plan.lookup_traffic (the claim the benchmark reports)."""
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_sharded_lookup.py"
    spec = importlib.util.spec_from_file_location("bench_sharded_lookup", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_sharded_lookup"] = bench  # its workers are pickled by module name
    spec.loader.exec_module(bench)
    summary = bench.main(["--quick", "--sections", "traffic", "--out", str(tmp_path)])
    assert 0.9 <= summary["traffic_ratio_min"] <= summary["traffic_ratio_max"] <= 1.1
    assert summary["step_ms/row/w2"] > 0 and summary["step_ms/column/w2"] > 0
    assert "| traffic+step | column | 2 |" in (tmp_path / "bench_sharded_lookup.md").read_text()


def _usage_metrics_worker(layout: str) -> dict:
    """One logged window of lookups on a 4,096-row table: the metrics from the rows read, and
    from the whole table's usage counts (the definition), and the largest collective of the
    record."""
    from helpers import watch_collectives

    from memray.distributed import collectives
    from memray.model import usage_metrics
    from memray.train.metrics import MetricsProcessor

    ctx = init_distributed("gloo")
    table = ShardedValueTable(4096, 8, group=ctx.memory_group, layout=layout)
    metrics = MetricsProcessor({"pool": table})
    g = torch.Generator().manual_seed(ctx.rank)
    for _ in range(3):  # rows read twice, by several lookups and ranks, weights of 0 included
        rows = torch.randint(0, 64, (10, 3), generator=g) * 61
        weights = torch.rand(10, 3, generator=g) * (torch.rand(10, 3, generator=g) > 0.2)
        table(rows, weights, record=True)
    sizes = []
    watch_collectives(lambda _name, tensors, _group, _caller: sizes.extend(t.numel() for t in tensors))
    window = metrics.record({"step": 1})
    sizes_of_record = list(sizes)
    whole = (table.usage_count, table.usage_mass)
    if layout == "row":
        whole = tuple(collectives.gather_rows(t, ctx.memory_group) for t in whole)
    dist.destroy_process_group()
    return {
        "window": {k.removeprefix("memory/pool/"): v for k, v in window.items() if k.startswith("memory/pool/")},
        "definition": usage_metrics(*whole),
        "largest_collective": max(sizes_of_record),
    }


@pytest.mark.parametrize("layout", ["row", "column"])
def test_usage_metrics_cost_the_rows_read_not_the_table(layout):
    """A logged step's usage metrics come from the rows the window read (gathered where ranks
    hold different rows), never from the whole usage arrays: equal to the definition over the
    whole table, with no collective near the table's 4,096 rows."""
    for result in spawn(_usage_metrics_worker, 2, layout):
        assert result["window"].keys() == result["definition"].keys()
        for key, value in result["definition"].items():
            assert result["window"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        assert result["largest_collective"] <= 2 * 10 * 3 * 3  # the rows the two ranks read


def _traffic_worker(layout: str) -> dict:
    ctx = init_distributed("gloo")
    table = ShardedValueTable(49, V_DIM, group=ctx.memory_group, layout=layout)
    tokens = 6 if ctx.rank == 0 else 0  # rank 1 looks nothing up, but serves rows and gets bags
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 49, (tokens, 4), generator=g)
    weights = torch.rand(tokens, 4, generator=g, requires_grad=True)
    table(rows, weights).sum().backward()
    stats = table.stats.reset()
    dist.destroy_process_group()
    return {"sent": stats.bytes_sent, "received": stats.bytes_received}


@pytest.mark.parametrize("layout", ["row", "column"])
def test_traffic_counters_add_up_when_a_rank_sends_nothing(layout):
    """Every byte a rank sends is a byte another receives, also where a rank has no tokens (its
    messages have no rows, whose size must still count what it receives)."""
    stats = spawn(_traffic_worker, 2, layout)
    assert sum(s["sent"] for s in stats) == sum(s["received"] for s in stats) > 0
    assert stats[1]["received"] > 0
