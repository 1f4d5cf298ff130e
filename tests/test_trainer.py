"""The single-process training loop on the tiny config."""

import json

import pytest
import torch

from memray.checkpoint.model import load_trained_model
from memray.train import Trainer, load_run_config


def tiny(tmp_path, *overrides):
    return Trainer(load_run_config("tiny", list(overrides)), run_dir=tmp_path, progress=False)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_runs_repeat_exactly(tmp_path):
    tiny(tmp_path / "a", "train.log_every=1").fit()
    tiny(tmp_path / "b", "train.log_every=1").fit()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert a == b  # same seed, same losses, bit for bit
    assert sum(a[-3:]) / 3 < 0.8 * sum(a[:3]) / 3


@pytest.mark.parametrize(
    "optimizer", ["sparse_adam", "adagrad", "sgd", "adamw", "rowwise_adagrad", "lazy_adam", "lazy_adamw"]
)
def test_value_step_touches_only_rows_read(tmp_path, optimizer):
    trainer = tiny(tmp_path, f"optim.value_optimizer={optimizer}", "model.memory.value_weight_decay=0.0")
    table = trainer.model.pools["layer1"]
    assert table.sparse_grad == (optimizer != "adamw")
    before = table.weight.detach().clone()
    counts = table.usage_count.clone()
    trainer.train_step(*trainer.batches.next())
    read = table.usage_count > counts
    changed = (table.weight != before).any(-1)
    assert read.any() and not read.all()
    assert not (changed & ~read).any(), "a row that was not read changed"
    assert changed[read].float().mean() > 0.9


def test_a_failing_run_closes_its_files_and_keeps_what_it_logged(tmp_path):
    trainer = tiny(tmp_path, "train.log_every=1")
    step = trainer.train_step

    def fails_at_step_3(*batch):
        if trainer.step == 2:
            raise RuntimeError("boom")
        return step(*batch)

    trainer.train_step = fails_at_step_3
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert trainer.run._metrics.closed and trainer.run._log.closed
    assert len(losses(tmp_path)) == 2


def test_bf16_value_pools_train_and_reload(tmp_path):
    trainer = tiny(tmp_path, "model.memory.value_dtype=bf16", "train.steps=4")
    table = trainer.model.pools["layer1"]
    before = table.weight.detach().clone()
    trainer.fit()
    assert table.weight.dtype == torch.bfloat16 and not torch.equal(table.weight, before)
    reloaded = load_trained_model(tmp_path).model.pools["layer1"].weight
    assert reloaded.dtype == torch.bfloat16 and torch.equal(reloaded, table.weight.detach())


def test_bf16_autocast_trains(tmp_path):
    result = tiny(tmp_path, "train.precision=bf16", "train.steps=6").fit()
    assert result["step"] == 6 and torch.isfinite(torch.tensor(result["loss"]))


def test_checkpoint_reloads_the_same_model(tmp_path):
    trainer = tiny(tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.keep_last=1")
    result = trainer.fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000004"]  # keep_last=1 removed step 2
    model, config, ckpt, manifest = load_trained_model(tmp_path)
    assert manifest["step"] == 4 and str(ckpt) == result["checkpoint"] and config == trainer.config.model
    tokens = torch.randint(0, 259, (2, 16))
    trainer.model.eval()
    torch.testing.assert_close(model(tokens), trainer.model(tokens), rtol=0, atol=0)
    assert torch.equal(model.pools["layer1"].usage_count, trainer.model.pools["layer1"].usage_count)


def test_moe_and_dense_models_train(tmp_path):
    for name, extra in (("dense", ["model.memory_layers=[]"]), ("moe", ["model.memory_layers=[]", "model.ffn=moe"])):
        result = tiny(tmp_path / name, "train.steps=3", *extra).fit()
        assert result["step"] == 3


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "lazy_adam"])
def test_value_update_in_backward_trains_as_the_step_does_and_resumes(tmp_path, optimizer):
    """The pools' rule applied inside the lookup's backward: the same losses and tables, bit for
    bit, as the step after the backward; its optimizer state is checkpointed and resumed."""
    common = ["train.log_every=1", "optim.value_grad_clip=null", f"optim.value_optimizer={optimizer}"]
    stepped = tiny(tmp_path / "step", *common)
    stepped.fit()
    overrides = [*common, "optim.value_update=backward", "train.checkpoint_every=10", "train.keep_last=0"]
    in_backward = tiny(tmp_path / "backward", *overrides)
    in_backward.fit()
    assert losses(tmp_path / "backward") == losses(tmp_path / "step")
    for name, table in in_backward.tables.items():
        assert table.weight.grad is None
        assert torch.equal(table.weight, stepped.tables[name].weight)
    norms = [json.loads(line)["value_grad_norm"] for line in (tmp_path / "backward" / "metrics.jsonl").open()]
    reference = [json.loads(line)["value_grad_norm"] for line in (tmp_path / "step" / "metrics.jsonl").open()]
    assert norms == pytest.approx(reference, rel=1e-5)
    resumed = tiny(tmp_path / "resumed", *overrides)
    resumed.resume(tmp_path / "backward" / "checkpoints" / "step-00000010")
    resumed.fit()
    assert losses(tmp_path / "resumed") == losses(tmp_path / "backward")[10:]
