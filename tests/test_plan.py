"""`memray plan`: per-rank memory and all-to-all traffic of a sharded value table, on paper."""

import json

import pytest
from helpers import assert_one_line_error, memray_here

from memray.distributed.plan import (
    BYTE_UNITS,
    balanced_ranges,
    expected_owners,
    fewest_ranks,
    lookup_traffic,
    make_plan,
    parse_quantity,
    per_rank_memory,
)
from memray.errors import UserError

GIB = 2**30
PAPER = dict(memory_params=128 * 10**9, value_dim=4096, gpu_mem=80 * GIB, dense_params=8 * 10**9)


def run_plan(*args):
    return memray_here("plan", *args)


@pytest.mark.parametrize("n,w", [(10, 3), (7, 7), (100, 8), (5, 1), (13, 4)])
def test_balanced_ranges_cover_contiguously_larger_first(n, w):
    ranges = balanced_ranges(n, w)
    sizes = [stop - start for start, stop in ranges]
    assert len(ranges) == w and ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert sizes == [n // w + 1] * (n % w) + [n // w] * (w - n % w)


@pytest.mark.parametrize("n,w", [(3, 4), (5, 0)])
def test_balanced_ranges_reject_impossible_splits(n, w):
    with pytest.raises(ValueError):
        balanced_ranges(n, w)


def test_expected_owners_limits():
    assert expected_owners(1, 128) == 1
    assert expected_owners(64, 1) == pytest.approx(1)
    assert expected_owners(8, 10_000) == pytest.approx(8)
    assert expected_owners(2, 2) == pytest.approx(1.5)


def test_lookup_traffic_hand_computed():
    # W=2, T=10, L=3, D=8, fp32: off-rank entries 15, bags 10·(1−1/8)·8·4 = 280.
    row = lookup_traffic("row", 2, 10, 3, 8, 4)
    assert row == pytest.approx(
        {"forward_bytes": 12 * 15 + 280, "backward_bytes": 280 + 4 * 15, "total_bytes": 800, "bytes_per_token": 80}
    )
    # all-gathered entries 30, output slices 10·8·4/2 = 160.
    column = lookup_traffic("column", 2, 10, 3, 8, 4)
    assert column == pytest.approx(
        {"forward_bytes": 12 * 30 + 160, "backward_bytes": 160 + 4 * 30, "total_bytes": 800, "bytes_per_token": 80}
    )
    # W=4, T=2, L=2, D=4, 2-byte bags: E_off = 3·(1 − 9/16) = 21/16, bags 2·21/16·4·2 = 21; entries 3.
    assert lookup_traffic("row", 4, 2, 2, 4, 2)["total_bytes"] == pytest.approx(36 + 21 + 21 + 12)
    # entries 12, output slices 2·4·2·3/4 = 12.
    assert lookup_traffic("column", 4, 2, 2, 4, 2)["total_bytes"] == pytest.approx(144 + 12 + 12 + 48)


@pytest.mark.parametrize("layout", ["row", "column"])
def test_lookup_traffic_is_zero_on_one_rank(layout):
    assert set(lookup_traffic(layout, 1, 1000, 128, 4096, 2).values()) == {0}


@pytest.mark.parametrize("world,lookups,dim", [(2, 16, 16), (64, 16, 64)])
def test_row_layout_cheaper_for_small_dims(world, lookups, dim):
    row, column = (lookup_traffic(layout, world, 1, lookups, dim, 4)["total_bytes"] for layout in ("row", "column"))
    assert row < column


def test_column_layout_cheaper_at_paper_scale():
    row, column = (lookup_traffic(layout, 64, 1, 4 * 32, 4096, 2) for layout in ("row", "column"))
    assert column["total_bytes"] < row["total_bytes"]
    assert column["forward_bytes"] == pytest.approx(0.105e6, rel=0.01)  # design §3: ~0.1 MB per token
    assert row["forward_bytes"] == pytest.approx(0.45e6, rel=0.01)  # ~0.5 MB


def test_per_rank_memory_hand_computed():
    # 10 rows x 4 over 3 ranks, T = 3 tokens per rank, L = 4 (> W); lazy_adam fp32 state; 3 dense params.
    kw = dict(memory_layers=1, value_bytes=2, optimizer="lazy_adam", dense_params=3)
    row = per_rank_memory("row", 3, 10, 4, 3, 4, **kw)  # 4 rows x 4 cols owned
    assert row == {
        "values": 32,
        "optimizer": 16 * 8 + 4 * 4,
        "value_grad": 0,
        "buffers": 2 * (12 * 3 * 4 + 3 * 3 * 4 * 4),
        "dense": 6 + 12,
        "total": 32 + 144 + 576 + 18,
    }
    column = per_rank_memory("column", 3, 10, 4, 3, 4, **kw)  # 10 rows x 2 cols owned
    assert column == {
        "values": 40,
        "optimizer": 20 * 8 + 10 * 4,
        "value_grad": 0,
        "buffers": 12 * 3 * 3 * 4 + 3 * 3 * 2 * 4 + 3 * 4 * 4,
        "dense": 18,
        "total": 40 + 200 + 552 + 18,
    }
    adamw = per_rank_memory("row", 3, 10, 4, 3, 4, **{**kw, "optimizer": "adamw", "pools": 2})
    assert (adamw["values"], adamw["optimizer"], adamw["value_grad"]) == (64, 2 * 16 * 8, 64)


@pytest.mark.parametrize("layout", ["row", "column"])
def test_fewest_ranks_fits_and_one_fewer_does_not(layout):
    args = (layout, 31_250_000, 4096, 16384, 128)
    opts = dict(memory_layers=3, value_bytes=2, dense_params=8 * 10**9)
    world = fewest_ranks(80 * GIB, *args, **opts)
    assert world is not None and world > 1
    assert per_rank_memory(layout, world, *args[1:], **opts)["total"] <= 0.9 * 80 * GIB
    assert per_rank_memory(layout, world - 1, *args[1:], **opts)["total"] > 0.9 * 80 * GIB


@pytest.mark.parametrize("layout", ["row", "column"])
def test_fewest_ranks_never_grows_with_the_gpu(layout):
    args = (layout, 2_000_000, 1024, 8192, 64)
    answers = [fewest_ranks(gib * GIB, *args, memory_layers=2, dense_params=10**9) for gib in range(8, 200, 8)]
    assert None not in answers[3:]
    finite = [float("inf") if a is None else a for a in answers]
    assert finite == sorted(finite, reverse=True) and finite[0] > finite[-1]


def test_make_plan_reports_both_layouts():
    plan = make_plan(**PAPER)
    assert plan["rows"] == 31_250_000 and plan["lookups"] == 128
    assert plan["cheaper_traffic"] == "column"
    for name, entry in plan["layouts"].items():
        assert entry["fits"] and entry["world"] == entry["fewest_ranks"]
        assert entry["traffic"]["total_bytes"] == pytest.approx(
            3 * lookup_traffic(name, entry["world"], entry["tokens_per_rank"], 128, 4096)["total_bytes"]
        )
    assert plan["fewest"] == {"ranks": plan["layouts"]["column"]["world"], "layout": "column"}
    at = make_plan(**PAPER, world=5000)  # more ranks than value columns: no column layout
    assert at["layouts"]["row"]["world"] == 5000 and at["layouts"]["column"]["memory"] is None
    assert at["fewest"] == plan["fewest"]


@pytest.mark.parametrize(
    "text,units,value",
    [
        ("128e9", None, 128 * 10**9),
        ("1.07B", None, 1_070_000_000),
        ("4M", None, 4_000_000),
        ("2000", None, 2000),
        ("80GiB", BYTE_UNITS, 80 * GIB),
        ("80GB", BYTE_UNITS, 80 * 10**9),
        ("85899345920", BYTE_UNITS, 80 * GIB),
    ],
)
def test_parse_quantity(text, units, value):
    assert (parse_quantity(text, "--x", units) if units else parse_quantity(text, "--x")) == value


@pytest.mark.parametrize("text", ["eighty", "-5", "0", "1.5", "12Q", ""])
def test_parse_quantity_rejects(text):
    with pytest.raises(UserError, match="--x"):
        parse_quantity(text, "--x")


def test_cli_prints_fewest_gpus_and_json():
    result = run_plan("--memory-params", "128e9", "--gpu-mem", "80GiB")
    assert result.returncode == 0, result.stderr
    assert "row layout" in result.stdout and "column layout" in result.stdout
    fewest = make_plan(**PAPER)["fewest"]
    assert result.stdout.strip().splitlines()[-1] == f"fewest GPUs that hold it: {fewest['ranks']} (column layout)"
    as_json = run_plan("--memory-params", "128e9", "--gpu-mem", "80GiB", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["fewest"] == fewest


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--memory-params", "128e9", "--gpu-mem", "eighty"], "--gpu-mem"),
        (["--memory-params", "-1", "--gpu-mem", "80GiB"], "--memory-params"),
        (["--memory-params", "1000", "--gpu-mem", "80GiB"], "--value-dim"),  # D = 4096 > 1000 params
        (["--memory-params", "128e9", "--gpu-mem", "80GiB", "--world", "0"], "--world"),
    ],
)
def test_cli_bad_values_exit_2_with_one_line(args, needle):
    assert_one_line_error(run_plan(*args), needle)
