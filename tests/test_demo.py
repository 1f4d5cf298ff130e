"""The demo's promise: a memory model memorises the synthetic facts it trains on."""

import json

import pytest

from memray.checkpoint.model import load_trained_model
from memray.data import read_facts
from memray.evaluate import fact_recall
from memray.train import load_run_config


@pytest.mark.demo
def test_demo_recalls_at_least_90_percent_of_2000_facts(demo_run):
    """The `demo` config trained for its steps (conftest trains it in the background)."""
    config = load_run_config("demo")
    assert config.data.num_entities * config.data.num_attributes >= 2000
    facts = read_facts(demo_run / "data" / "facts.jsonl")
    assert len(facts) >= 2000
    model, _, ckpt, _ = load_trained_model(demo_run)  # what `memray eval` sees
    assert ckpt.name == f"step-{config.train.steps:08d}"
    recall = fact_recall(model, facts)
    print(json.dumps({k: recall[k] for k in ("recall", "correct", "total")}))
    assert recall["recall"] >= 0.90
