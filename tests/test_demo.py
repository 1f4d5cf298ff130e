"""The demo's promise: a memory model memorises the synthetic facts it trains on."""

import json

import pytest

from memray.checkpoint.model import load_trained_model
from memray.data import read_facts
from memray.evaluate import fact_recall
from memray.train import Trainer, load_run_config


@pytest.mark.demo
def test_demo_recalls_at_least_90_percent_of_2000_facts(tmp_path):
    config = load_run_config("demo")
    assert config.data.num_entities * config.data.num_attributes >= 2000
    result = Trainer(config, run_dir=tmp_path, progress=False).fit()
    facts = read_facts(tmp_path / "data" / "facts.jsonl")
    assert len(facts) >= 2000
    model, _, _, _ = load_trained_model(result["checkpoint"])  # what `memray eval` sees
    recall = fact_recall(model, facts)
    print(json.dumps({k: recall[k] for k in ("recall", "correct", "total")}))
    assert recall["recall"] >= 0.90
