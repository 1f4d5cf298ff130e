"""The demo's promise: a memory model memorises the synthetic facts it trains on."""

import json

import pytest
from helpers import memray_here

from memray.checkpoint.model import load_trained_model
from memray.data import ByteTokenizer, read_facts
from memray.evaluate import fact_recall, greedy_answers
from memray.train import load_run_config


@pytest.mark.demo
def test_demo_recalls_at_least_90_percent_of_2000_facts(demo_run, tmp_path):
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
    # `memray generate` answers the demo's prompts as `memray eval` does
    asked = tmp_path / "prompts.jsonl"
    asked.write_text("".join(json.dumps({"prompt": f.prompt}) + "\n" for f in facts[:20]))
    result = memray_here("generate", demo_run, "--prompts", asked, "--max-new-tokens", 16)
    assert result.returncode == 0, result.stderr
    completions = [json.loads(line)["completion"].strip() for line in result.stdout.splitlines()]
    evaluated = greedy_answers(model, ByteTokenizer(), [f.prompt for f in facts[:20]], 16)  # memray eval's
    assert completions == [a.strip() for a in evaluated]
    assert sum(c == f.answer for c, f in zip(completions, facts)) >= 18
