"""memray finetune: what each mode trains, sparse-memory's row selection, sharded equality."""

import csv
import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch
from helpers import assert_one_line_error, memray, memray_here, read_metrics, sets

from memray.checkpoint.model import load_trained_model
from memray.data import generate_facts, write_facts
from memray.train import Trainer
from memray.train import finetune as finetune_module
from memray.train.finetune import finetune_config


@pytest.fixture(scope="module")
def new_facts(tmp_path_factory):
    """Facts about people the tiny run never saw (another seed of its generator)."""
    path = tmp_path_factory.mktemp("new") / "new.jsonl"
    write_facts(path, generate_facts(50, 2, seed=7))
    return path


def trainer_for(base, facts, mode, run_dir, *overrides, **options) -> Trainer:
    config = finetune_config(
        str(base), str(facts), mode, ["distributed.workers=0", "train.steps=4", *overrides], **options
    )
    return Trainer(config, run_dir=run_dir, progress=False)


def dense_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_dense_parameters()}


def test_sparse_memory_updates_only_the_top_rows_by_tf_idf(tiny_run, new_facts, tmp_path, monkeypatch):
    t = 8
    trainer = trainer_for(tiny_run, new_facts, "sparse-memory", tmp_path / "ft", slots_per_batch=t)
    assert trainer.config.optim.value_optimizer == "lazy_adam"  # stateful: its state must stay too
    ((name, table),) = trainer.tables.items()
    base_counts = table.usage_count.clone()  # the base checkpoint's, as loaded
    assert base_counts.sum() > 0
    seen = {}

    def recording_top_rows(rows, idf, k, tbl):
        chosen, read = top_rows(rows, idf, k, tbl)
        seen.update(rows=rows.clone(), chosen=chosen.clone())
        return chosen, read

    top_rows = finetune_module.top_rows
    monkeypatch.setattr(finetune_module, "top_rows", recording_top_rows)
    trainer.model.train()
    trainer.finetune.config.slots_per_batch = 4 * t  # optimizer state on more rows than step 2 keeps
    trainer.train_step(*trainer.batches.next())
    trainer.finetune.config.slots_per_batch = t
    first = set(seen["chosen"].tolist())
    state = trainer.value_optimizer.state[table.weight]
    before = {key: value.clone() for key, value in state.items() if torch.is_tensor(value) and value.dim()}
    assert set(before) >= {"exp_avg", "exp_avg_sq"}
    weight = table.weight.detach().clone()
    stats = trainer.train_step(*trainer.batches.next())

    # the rows kept are the top t by c_i * log((U + 1) / (u_i + 1)), ties by row: brute force
    rows, counts = torch.unique(seen["rows"], return_counts=True)
    total = int(base_counts.sum())
    scored = [
        (-c * math.log((total + 1) / (int(base_counts[r]) + 1)), r) for r, c in zip(rows.tolist(), counts.tolist())
    ]
    expected = {r for _, r in sorted(scored)[:t]}
    chosen = set(seen["chosen"].tolist())
    assert len(rows) > t and chosen == expected
    assert stats[f"finetune/{name}/rows_read"] == len(rows) and stats[f"finetune/{name}/rows_updated"] == t
    assert first - chosen, "the second step must leave some rows of the first untouched for this test to bite"

    changed = (table.weight.detach() != weight).any(dim=1).nonzero().flatten().tolist()
    assert set(changed) == chosen  # every kept row moved, no other
    others = torch.ones(table.num_rows, dtype=torch.bool)
    others[list(chosen)] = False
    assert torch.equal(table.weight.detach()[others], weight[others])
    for key, value in before.items():
        assert torch.equal(state[key][others], value[others]), key
        assert not torch.equal(state[key][list(chosen)], value[list(chosen)]), key


@pytest.mark.parametrize("mode", ["memory", "memory-keys", "lora", "full"])
def test_each_mode_trains_what_it_says_and_saves_a_normal_checkpoint(tiny_run, new_facts, tmp_path, mode):
    options = {"train_keys": True} if mode == "memory-keys" else {}
    trainer = trainer_for(tiny_run, new_facts, mode.removesuffix("-keys"), tmp_path / "ft", **options)
    base = load_trained_model(tiny_run).model
    start = dense_state(trainer.model)
    ((name, table),) = trainer.tables.items()
    values = table.weight.detach().clone()
    assert torch.equal(values, base.value_tables()[name].weight)
    batch = trainer.batches.next()
    with torch.no_grad():  # adapters start at zero: the adapted model is the base model
        assert torch.equal(trainer.model(batch[0]), base(batch[0]))
    result = trainer.fit()
    after = dense_state(trainer.model)
    moved = {n for n in start if not torch.equal(start[n], after[n])}
    lora = {n for n in start if n.endswith((".lora_a", ".lora_b"))}
    if mode == "full":
        assert moved == set(start) - lora
    elif mode == "lora":
        assert lora and moved == lora
    elif mode == "memory-keys":
        assert moved == {n for n in start if n.endswith(".keys")}
    else:
        assert moved == set()
    assert torch.equal(table.weight.detach(), values) == (mode == "lora")
    saved = load_trained_model(result["checkpoint"]).model  # an ordinary checkpoint of its config
    with torch.no_grad():
        trainer.model.eval()
        assert torch.equal(saved(batch[0]), trainer.model(batch[0]))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["row", "column"])
def test_two_ranks_select_the_same_rows_and_reach_the_same_losses(tiny_run, new_facts, tmp_path, layout):
    # row layout: each rank ranks the rows it owns, the global top t is chosen from the gathered
    # candidates; column layout: every rank sees every lookup and ranks all rows itself
    common = ("--mode", "sparse-memory", "--steps", "8", "--slots-per-batch", "16", "--no-progress")
    options = sets("train.log_every=1", "distributed.launcher=processes", f"model.memory.layout={layout}")
    one = memray("finetune", tiny_run, "--data", new_facts, "--out", tmp_path / "one", "--workers", "0", *common)
    two = memray(
        "finetune", tiny_run, "--data", new_facts, "--out", tmp_path / "two", "--workers", "2", *common, *options
    )
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(m1) == len(m2) == 8
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a["step"], a["loss"], b["loss"])
        assert a["finetune/layer1/rows_read"] == b["finetune/layer1/rows_read"] > 16
        assert a["finetune/layer1/rows_updated"] == b["finetune/layer1/rows_updated"] == 16
    base = load_trained_model(tiny_run).model.value_tables()["layer1"].weight
    tables = [load_trained_model(tmp_path / run).model.value_tables()["layer1"].weight for run in ("one", "two")]
    # the same rows moved (a different choice at any step moves other rows), by the same amounts
    moved = [set((w != base).any(dim=1).nonzero().flatten().tolist()) for w in tables]
    assert moved[0] == moved[1] and 16 <= len(moved[0]) < base.shape[0]
    torch.testing.assert_close(tables[0], tables[1], rtol=0, atol=1e-5)


def test_finetune_errors_are_one_line(tiny_run, new_facts, tmp_path):
    out = tmp_path / "out"
    sparse = ("--out", out, "--mode", "sparse-memory", "--workers", "0")
    assert_one_line_error(memray_here("finetune", tiny_run, "--data", new_facts, "--out", out), "--mode")
    assert_one_line_error(
        memray_here("finetune", tiny_run, "--data", new_facts, *sparse, "--lora-rank", "4"),
        "--lora-rank applies to --mode lora",
    )
    assert_one_line_error(memray_here("finetune", tiny_run, "--data", tmp_path / "missing.jsonl", *sparse), "missing")
    assert_one_line_error(memray_here("finetune", tmp_path, "--data", new_facts, *sparse), str(tmp_path))
    assert_one_line_error(
        memray_here("finetune", tiny_run, "--data", new_facts, *sparse, "--set", "optim.value_update=backward"),
        "value_update",
    )
    assert not out.exists()


@pytest.mark.slow
def test_continual_benchmark_smoke(tiny_run, tmp_path):
    """The benchmark's plumbing at a few steps: every run of the grids, one chosen per mode."""
    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "continual.py"
    args = ["--base", tiny_run, "--modes", "full,sparse-memory", "--lrs", "full=1e-4", "--lrs", "sparse-memory=30,300"]
    args += ["--slots", "16", "--steps", "2", "--points", "1", "--new", "10", "--workdir", tmp_path / "work"]
    result = subprocess.run(
        [sys.executable, script, *map(str, args), "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["new_facts"] == 10 and summary["steps"] == 2 and summary["sparse-memory_slots"] == 16
    with open(tmp_path / "continual.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["mode"], float(r["lr"])) for r in rows] == [
        ("full", 1e-4),
        ("sparse-memory", 30),
        ("sparse-memory", 300),
    ]
    assert sorted(r["mode"] for r in rows if r["chosen"] == "True") == ["full", "sparse-memory"]
    assert (tmp_path / "continual_curve.png").read_bytes()[:4] == b"\x89PNG"
