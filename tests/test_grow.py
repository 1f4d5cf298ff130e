"""memray grow: a larger product-key grid that keeps what the memory learned."""

import json

import torch
from click.testing import CliRunner

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
