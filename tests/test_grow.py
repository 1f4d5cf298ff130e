"""memray grow: a larger product-key grid that keeps what the memory learned."""

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_one_line_error, memray_here

from memray.checkpoint import committed_checkpoints, find_checkpoint
from memray.checkpoint.model import load_trained_model
from memray.cli import main
from memray.data import ByteTokenizer, read_facts
from memray.evaluate import greedy_answers
from memray.train import Trainer, load_run_config

FACTS = [
    "data.num_entities=16",
    "data.num_attributes=2",
    "train.steps=300",
    "train.log_every=100",
    "model.memory.n_keys=12",
    "optim.lr=0.005",
    "model.memory.value_lr=0.02",
    "optim.value_optimizer=lazy_adam",
]


def _recalled(model, facts) -> set[str]:
    answers = greedy_answers(model, ByteTokenizer(), [f.prompt for f in facts], max_new_tokens=24)
    return {f.prompt for f, a in zip(facts, answers) if a.strip() == f.answer.strip()}


def test_grown_memory_keeps_slots_and_recall(tmp_path):
    Trainer(load_run_config("tiny", FACTS), run_dir=tmp_path / "run", progress=False).fit()
    facts = read_facts(tmp_path / "run" / "data" / "facts.jsonl")
    before_model, config, _, _ = load_trained_model(tmp_path / "run")
    before = _recalled(before_model, facts)
    assert len(before) >= 0.5 * len(facts), len(before)  # something to keep

    result = CliRunner().invoke(main, ["grow", str(tmp_path / "run"), "--n-keys", "20", "--out", str(tmp_path / "big")])
    assert result.exit_code == 0, result.output
    after_model, grown, _, _ = load_trained_model(tmp_path / "big")
    assert grown.memory.n_keys == 20 and config.memory.n_keys == 12
    old, new = before_model.pools["layer1"].weight.detach(), after_model.pools["layer1"].weight.detach()
    assert new.shape[0] == 400
    moved = torch.tensor([i * 20 + j for i in range(12) for j in range(12)])
    assert torch.equal(new[moved], old)  # slot (i, j) -> i * M + j
    fresh = torch.ones(400, dtype=torch.bool)
    fresh[moved] = False
    assert not new[fresh].any()
    keys_old = before_model.blocks[1].ffn.keys.detach()
    keys_new = after_model.blocks[1].ffn.keys.detach()
    assert torch.equal(keys_new[:, :, :12], keys_old) and not keys_new[:, :, 12:].any()

    after = _recalled(after_model, facts)
    print(json.dumps({"facts": len(facts), "recalled_before": len(before), "recalled_after": len(after)}))
    assert before <= after  # every fact recalled before growing is recalled after it
    # the facts live in the memory: the same slots shuffled lose most of them
    with torch.no_grad():
        weight = after_model.pools["layer1"].weight
        weight[moved] = weight[moved[torch.randperm(len(moved), generator=torch.Generator().manual_seed(0))]]
    assert len(_recalled(after_model, facts)) < len(before) / 2

    # training continues from the grown checkpoint (dense moments and value state grew too)
    resumed = Trainer(
        load_run_config("tiny", [*FACTS, "model.memory.n_keys=20", "train.steps=305"]),
        run_dir=tmp_path / "more",
        progress=False,
    )
    resumed.resume(tmp_path / "big")
    assert resumed.step == 300
    out = resumed.fit()
    assert out["step"] == 305 and out["loss"] < 10


def test_grow_refuses_shrinking(tmp_path):
    Trainer(load_run_config("tiny", ["train.steps=2"]), run_dir=tmp_path / "run", progress=False).fit()
    result = CliRunner().invoke(main, ["grow", str(tmp_path / "run"), "--n-keys", "8", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--n-keys 8" in result.output


def _pool_arrays(ckpt) -> dict[str, torch.Tensor]:
    from memray.checkpoint.sharded import load_pool_shard, pool_info

    pools = pool_info(find_checkpoint(ckpt))["pools"]
    return {
        f"{name}/{key}": tensor
        for name, info in pools.items()
        for key, tensor in load_pool_shard(ckpt, name, (0, info["num_rows"]), None).items()
    }


@pytest.mark.parametrize(
    "overrides,m",
    [
        (["model.memory.value_dtype=bf16", "optim.value_optimizer=adagrad"], 19),
        (["model.memory.n_keys=9", "model.memory_layers=[0, 1]"], 16),
    ],
)
def test_chunked_grow_equals_the_in_memory_grow(tmp_path, monkeypatch, overrides, m):
    """Every pool array grown chunk by chunk (chunks that cut grid rows anywhere, several jobs per
    array) is bit-equal to the whole-array grow, for bf16 values, row-wise and [N, D] optimizer
    state, two pools."""
    from memray.checkpoint import pools as pool_files
    from memray.train import grow

    Trainer(load_run_config("tiny", ["train.steps=3", *overrides]), run_dir=tmp_path / "run", progress=False).fit()
    monkeypatch.setattr(pool_files, "CHUNK_BYTES", 7 * 64 * 4 + 4)  # 7-row chunks of a 64-wide fp32 array
    monkeypatch.setattr(grow, "TASK_CHUNKS", 3)
    grow.grow_checkpoint(tmp_path / "run", m, tmp_path / "big")
    before, after = _pool_arrays(tmp_path / "run"), _pool_arrays(tmp_path / "big")
    assert sorted(before) == sorted(after) and len(before) >= 3
    n = round(next(iter(before.values())).shape[0] ** 0.5)
    for name, old in before.items():
        assert torch.equal(after[name], grow.grown_rows(old, n, m)), name
    assert memray_here("verify", tmp_path / "big").returncode == 0


def test_grow_names_a_damaged_chunk_and_commits_nothing(tmp_path):
    Trainer(load_run_config("tiny", ["train.steps=2"]), run_dir=tmp_path / "run", progress=False).fit()
    chunk = find_checkpoint(tmp_path / "run") / "memory.zarr" / "layer1" / "weight" / "c" / "0" / "0"
    good = chunk.read_bytes()
    chunk.write_bytes(good[:-4])
    result = memray_here("grow", tmp_path / "run", "--n-keys", 20, "--out", tmp_path / "big")
    assert_one_line_error(result, "'layer1/weight' chunk 0/0 is damaged")
    assert not committed_checkpoints(tmp_path / "big" / "checkpoints")
    chunk.write_bytes(good)  # repaired: the same command now succeeds
    assert memray_here("grow", tmp_path / "run", "--n-keys", 20, "--out", tmp_path / "big").returncode == 0


@pytest.mark.slow
def test_bench_grow_smoke(tmp_path):
    from helpers import load_benchmark

    summary = load_benchmark("bench_grow").main(["--log2-rows", "8", "--dim", "16", "--out", str(tmp_path)])
    assert summary["bit_equal"] and summary["arrays"] == 2
    assert "| chunked |" in (tmp_path / "bench_grow.md").read_text()
