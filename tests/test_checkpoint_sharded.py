"""Zarr checkpoints of sharded pools: saved by 2 real ranks, read back onto any sharding."""

import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import assert_one_line_error, memray_here

from memray.checkpoint import pools as pool_store
from memray.checkpoint.sharded import load_pool_shard, save_sharded_checkpoint, verify_checkpoint
from memray.distributed import ShardedValueTable, balanced_ranges, collectives, init_distributed, spawn
from memray.errors import InputError, RunFailed
from memray.optim import LazyAdam

ROWS, DIM, CHUNK_ROWS = 1001, 13, 7  # chunk boundaries fall inside both ranks' ranges


def _save_worker(root):
    ctx = init_distributed("gloo")
    table = ShardedValueTable(ROWS, DIM, group=ctx.memory_group, init_seed=5)
    pool_store.CHUNK_BYTES = CHUNK_ROWS * DIM * 4
    optimizer = LazyAdam([table.weight], lr=0.01, state_dtype="bf16")  # bf16 moments: stored as uint16
    generator = torch.Generator().manual_seed(ctx.rank)
    for _ in range(3):
        indices = torch.randint(ROWS, (40, 6), generator=generator)
        table(indices, torch.rand(40, 6, generator=generator), record=True).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    state = optimizer.state[table.weight]
    tensors = {
        "weight": table.weight.detach(),
        "usage_count": table.usage_count,
        "usage_mass": table.usage_mass,
        **state,
    }
    path = save_sharded_checkpoint(
        root,
        3,
        {"dense.w": torch.ones(2)},
        "name: t\n",
        {"values": (table.shard, tensors)},
        group=ctx.memory_group,
        attrs={"world_size": ctx.world_size, "layout": "row"},
    )
    full = {k: collectives.gather_rows(v.detach()) for k, v in tensors.items()}
    dist.destroy_process_group()
    return str(path), {k: (v.view(torch.int16) if v.dtype == torch.bfloat16 else v).numpy() for k, v in full.items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    path, full = spawn(_save_worker, 2, str(root))[0]
    return path, full


@pytest.mark.parametrize("world", [1, 3, 4])
@pytest.mark.parametrize("layout", ["row", "column"])
def test_restore_onto_any_world_size_and_layout_is_bit_identical(saved, world, layout):
    path, full = saved
    for rank in range(world):
        if layout == "row":
            rows, cols = balanced_ranges(ROWS, world)[rank], (0, DIM)
        else:
            rows, cols = (0, ROWS), balanced_ranges(DIM, world)[rank]
        shard = load_pool_shard(path, "values", rows, cols)
        assert set(shard) == set(full)
        for key, tensor in shard.items():
            expected = full[key][rows[0] : rows[1]]
            if expected.ndim == 2:
                expected = expected[:, cols[0] : cols[1]]
            got = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()
            assert got.dtype == expected.dtype and np.array_equal(got, expected), (world, layout, rank, key)
    assert (full["row_step"] > 0).any() and (full["usage_count"] > 0).any()  # the state is not trivial


def test_every_chunk_has_one_writer_and_a_checksum(saved):
    path, _ = saved
    _, manifest = verify_checkpoint(path)
    weight_chunks = [k for k in manifest["chunks"] if k.startswith("values/weight/")]
    assert len(weight_chunks) == -(-ROWS // CHUNK_ROWS)


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_damaged_chunk_is_named(saved, damage, tmp_path):
    import shutil

    path = tmp_path / "copy"
    shutil.copytree(saved[0], path)
    # bf16 moments: 14 rows per chunk; chunk 35 holds rows 490-503, across the ranks' boundary (501)
    chunk = path / "memory.zarr" / "values" / "exp_avg" / "c" / "35" / "0"
    if damage == "flip":
        data = bytearray(chunk.read_bytes())
        data[5] ^= 0x01
        chunk.write_bytes(bytes(data))
    else:
        chunk.unlink()
    for check in (lambda: verify_checkpoint(path), lambda: load_pool_shard(path, "values", (480, 520), (0, DIM))):
        with pytest.raises(InputError) as info:
            check()
        assert "'values/exp_avg'" in str(info.value) and "chunk 35/0" in str(info.value)
    load_pool_shard(path, "values", (0, 400), (0, DIM))  # rows of intact chunks still read


class _Payload:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['MEMRAY_PWNED'], 'w').write('x')",))


def test_loading_never_unpickles(saved, tmp_path, monkeypatch):
    import shutil

    path = tmp_path / "copy"
    shutil.copytree(saved[0], path)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MEMRAY_PWNED", str(marker))
    for planted in (path / "optimizer.pt", path / "memory.zarr" / "values" / "weight.pkl", path / "model.pt"):
        planted.write_bytes(pickle.dumps(_Payload()))
    verify_checkpoint(path)
    load_pool_shard(path, "values", (0, ROWS), (0, DIM))
    assert not marker.exists()


def test_verify_command(saved, tmp_path):
    import shutil
    import subprocess
    import sys

    path = tmp_path / "copy"
    shutil.copytree(saved[0], path)
    run = lambda: subprocess.run(
        [sys.executable, "-m", "memray.cli", "verify", str(path)], capture_output=True, text=True
    )  # noqa: E731
    ok = run()
    assert ok.returncode == 0 and "chunks match" in ok.stdout, ok.stderr
    chunk = path / "memory.zarr" / "values" / "weight" / "c" / "3" / "0"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0x80
    chunk.write_bytes(bytes(data))
    bad = run()
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "'values/weight' chunk 3/0" in lines[0], bad.stderr


_WRITER = """
import sys, torch
from memray.checkpoint.sharded import save_sharded_checkpoint
from memray.model import ValueTable
root, rows = sys.argv[1], int(sys.argv[2])
for step in (1, 2):
    table = ValueTable(rows if step == 2 else 64, 256)
    save_sharded_checkpoint(root, step, {}, "name: t\\n", {"values": (table.shard, {"weight": table.weight.detach()})})
    print("saved", step, flush=True)
"""


def test_killed_save_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL the writer while it writes step 2 (1 GiB of chunks): step 1 still verifies and
    loads, the partial directory is not taken for a checkpoint, and saving step 2 again works."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from memray.checkpoint import find_checkpoint

    root = tmp_path / "checkpoints"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(root), str(1 << 20)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout.readline().strip() == "saved 1"
    partial = root / ".tmp-step-00000002" / "memory.zarr" / "values" / "weight" / "c"
    deadline = time.time() + 120
    while not (partial.is_dir() and any(partial.iterdir())) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert not (root / "step-00000002").exists(), "the save finished before the kill: nothing was tested"
    assert find_checkpoint(root).name == "step-00000001"
    verify_checkpoint(root)
    assert load_pool_shard(root, "values", (0, 64), (0, 256))["weight"].shape == (64, 256)
    subprocess.run([sys.executable, "-c", _WRITER, str(root), "4096"], check=True, capture_output=True)
    assert find_checkpoint(root).name == "step-00000002" and not (root / ".tmp-step-00000002").exists()


def test_bench_checkpoint_smoke(tmp_path):
    """The benchmark's plumbing at a toy size: every method saves and loads, files and figures appear."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_checkpoint.py"
    spec = importlib.util.spec_from_file_location("bench_checkpoint", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    summary = bench.main(["--log2-rows", "10", "--reps", "1", "--out", str(tmp_path), "--dir", str(tmp_path)])
    assert summary["save_memray_vs_raw"] > 0 and summary["load_memray_vs_torch"] > 0
    assert "| load | memray |" in (tmp_path / "bench_checkpoint.md").read_text()


@pytest.mark.parametrize("layout", ["row", "column"])
def test_offline_restore_writes_each_ranks_part(saved, layout, tmp_path):
    from safetensors.torch import load_file

    from memray.checkpoint.sharded import restore_offline

    path, full = saved
    summary = restore_offline(path, tmp_path / "r", 3, layout)
    for rank, entry in enumerate(summary["ranks"]):
        (r0, r1), (c0, c1) = entry["ranges"]["values"]["rows"], entry["ranges"]["values"]["cols"]
        tensors = load_file(str(tmp_path / "r" / entry["file"]))
        for key, expected in full.items():
            got = tensors[f"values/{key}"]
            got = (got.view(torch.int16) if got.dtype == torch.bfloat16 else got).numpy()
            want = expected[r0:r1] if expected.ndim == 1 else expected[r0:r1, c0:c1]
            assert np.array_equal(got, want), (layout, rank, key)


def test_offline_restore_names_a_damaged_chunk(saved, tmp_path):
    import shutil

    path = tmp_path / "copy"
    shutil.copytree(saved[0], path)
    (path / "memory.zarr" / "values" / "usage_count" / "c" / "2").unlink()
    result = memray_here("restore", path, "--out", tmp_path / "r", "--world-size", "2")
    assert_one_line_error(result, "'values/usage_count' chunk 2 is missing")


def test_a_failed_background_save_commits_nothing_and_keeps_its_cause(tmp_path, monkeypatch):
    """A save whose files fail (here: no space left) raises from finish() with the original
    exception and its traceback as the cause, and leaves no committed checkpoint."""
    import errno

    from memray.checkpoint import sharded
    from memray.model import ValueTable

    def disk_full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sharded, "write_chunks", disk_full)
    table = ValueTable(64, 8)
    pools = {"values": (table.shard, {"weight": table.weight.detach()})}
    pending = sharded.start_sharded_checkpoint(tmp_path, 1, {}, "name: t\n", pools, background=True)
    with pytest.raises(RunFailed, match="step 1 was not saved: OSError") as info:
        pending.finish()
    cause = info.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC and cause.__traceback__ is not None
    assert not (tmp_path / "step-00000001").exists()
