"""FLOPs per token, and the quality benchmark's matching of models on them."""

import json
import pathlib
import subprocess
import sys

import pytest

from memray.model import MemoryConfig, ModelConfig, MoEConfig
from memray.model.flops import flops_per_token


def test_flops_of_dense_memory_and_moe_blocks():
    d, seq = 64, 32
    dense = ModelConfig(dim=d, n_layers=2, n_heads=2, max_seq_len=seq, ffn_hidden=96, vocab_size=259)
    f = flops_per_token(dense, seq)
    assert f["ffn"] == 2 * (2 * 3 * d * 96)
    assert f["attention"] == 2 * (2 * 4 * d * d + 2 * 2 * d * seq / 2)
    assert f["total"] == f["attention"] + f["ffn"] + 2 * d * 259
    memory = ModelConfig(
        dim=d,
        n_layers=2,
        n_heads=2,
        max_seq_len=seq,
        ffn_hidden=96,
        memory_layers=[1],
        memory=MemoryConfig(n_keys=16, heads=2, knn=4, k_dim=32, swilu=True),
    )
    m = flops_per_token(memory, seq)
    expected = 2 * d * 2 * 32 + 2 * 2 * 16 * 32 + 2 * 4**2 + 2 * 2 * 4 * d + 2 * d * d + d + 2 * d * d
    assert m["memory"] == expected and m["ffn"] == f["ffn"] / 2  # the table's size costs nothing
    moe = ModelConfig(
        dim=d, n_layers=2, n_heads=2, max_seq_len=seq, ffn="moe", moe=MoEConfig(num_experts=8, top_k=2, hidden=48)
    )
    assert flops_per_token(moe, seq)["moe"] == 2 * (2 * d * 8 + 2 * 2 * 3 * d * 48)


@pytest.mark.slow
def test_factual_recall_smoke_matches_models(tmp_path):
    """A few steps of three of the benchmark's models: its output, and the dense and MoE models
    matched to Memory+ in FLOPs per token (and the MoE in parameters)."""
    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "factual_recall.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--quick",
            "--steps",
            "4",
            "--eval-sample",
            "40",
            "--points",
            "1",
            "--models",
            "dense,memory_plus,moe",
            "--entities",
            "60",
            "--facts-sweep",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    flops, params = summary["flops_per_token"], summary["params"]
    assert abs(flops["dense"] / flops["memory_plus"] - 1) < 0.02
    assert abs(flops["moe"] / flops["memory_plus"] - 1) < 0.02
    assert abs(params["moe"] / params["memory_plus"] - 1) < 0.05
    assert set(summary["recall"]) == {"dense", "memory_plus", "moe"}
    assert (tmp_path / "factual_recall_quick.csv").read_text().startswith("model,n_keys")
    assert (tmp_path / "factual_recall_quick_curve.png").read_bytes()[:4] == b"\x89PNG"
    # --facts-sweep: each model on the 300 facts of the setting and on 500 (more than it holds)
    assert set(summary["recall_by_facts"]) == {f"{m}@{n}" for m in ("dense", "memory_plus", "moe") for n in (300, 500)}
    assert (tmp_path / "factual_recall_quick_facts.png").read_bytes()[:4] == b"\x89PNG"


def test_recall_floor_is_the_commonest_answer_of_each_attribute():
    """The floor the benchmark reports: what a model that memorised nothing would score."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
    from factual_recall import prior_recall

    from memray.data import Fact

    facts = [Fact(f"P{i} Q was born in", city, {"attribute": "city"}) for i, city in enumerate("AAAB")]
    facts += [Fact(f"P{i} Q plays the", instrument, {"attribute": "instrument"}) for i, instrument in enumerate("XYY")]
    assert prior_recall(facts, facts) == 5 / 7  # the three A's and the two Y's
    assert prior_recall(facts, [facts[3], facts[4]]) == 0.0
    unlabelled = [Fact(f.prompt, f.answer) for f in facts]  # a facts file: grouped by the relation words
    assert prior_recall(unlabelled, unlabelled) == 5 / 7


@pytest.mark.parametrize("seed", [0, 1])
def test_recall_floor_of_a_facts_file_infers_each_relation(seed):
    """Without ``attribute`` fields the relation is the template a prompt shares with the most
    others once the entity is taken out, wherever the name stands and however long it is: the
    floor equals the labelled one. Prompts that share nothing give no floor at all."""
    import random

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
    from factual_recall import attributes, prior_recall

    from memray.data import Fact

    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "so", "tu", "vel", "zar"]
    names = {" ".join(rng.choice(syllables).title() + rng.choice(syllables) for _ in range(rng.randint(1, 3)))
             for _ in range(60)}  # fmt: skip
    relations = {
        "headquarters": ("The headquarters of {} is in", ["Paris", "Oslo", "Lima", "Rome"]),
        "founded": ("{} was founded in", ["1901", "1950", "1999"]),
        "ceo": ("Who runs {}? Its chief is", ["Ana", "Bo", "Cy", "Di", "Ed"]),
    }
    labelled = [
        Fact(template.format(name), rng.choice(answers[: rng.randint(1, len(answers))]), {"attribute": relation})
        for name in sorted(names)
        for relation, (template, answers) in relations.items()
    ]
    unlabelled = [Fact(f.prompt, f.answer) for f in labelled]
    assert attributes(unlabelled).count(None) == 0 and len(set(attributes(unlabelled))) == 3
    assert prior_recall(unlabelled, unlabelled) == prior_recall(labelled, labelled)
    assert prior_recall(unlabelled, unlabelled[:20]) == prior_recall(labelled, labelled[:20])
    # the old grouping (all but the first two words) left long names in the key: a floor near 1
    assert prior_recall(labelled, labelled) < 0.9
    unrelated = [Fact(f"{w} {rng.random()}", "x") for w in ("alpha", "beta", "gamma", "delta")]
    assert prior_recall(unrelated, unrelated) is None


BENCHMARK = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "factual_recall.py"


@pytest.mark.parametrize(
    "content,where",
    [('{"prompt": "A was born in", "answer": "Oslo"}\n{"prompt": "B"}\n', ":2:"), ("not json\n", ":1:")],
)
def test_factual_recall_rejects_a_malformed_facts_file_in_one_line(tmp_path, content, where):
    from helpers import assert_one_line_error

    facts = tmp_path / "facts.jsonl"
    facts.write_text(content)
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--facts", str(facts), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error(result, f"{facts}{where}")


def test_factual_recall_refuses_a_facts_file_too_small_to_test_capacity(tmp_path):
    from helpers import assert_one_line_error

    from memray.data import generate_facts, write_facts

    facts = tmp_path / "few.jsonl"
    write_facts(facts, generate_facts(20, 5))
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--facts", str(facts), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error(result, str(facts), "100 facts", "1,000")


def test_zeroing_the_memory_output_is_a_memory_layer_that_outputs_nothing():
    """The benchmark's ``memory_zeroed``: the logits of a model whose Memory+ output projection
    is zero, and different from the model's own; a dense model is untouched."""
    import torch

    sys.path.insert(0, str(BENCHMARK.parent))
    from factual_recall import memory_zeroed

    from memray.model import Transformer

    config = ModelConfig(
        dim=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=16,
        memory_layers=[1],
        memory=MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=16, swilu=True),
    )
    torch.manual_seed(0)
    model = Transformer(config)
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        own = model(tokens)
        with memory_zeroed(model):
            zeroed = model(tokens)
        out_proj = model.blocks[1].ffn.out_proj
        out_proj.weight.zero_()
        out_proj.bias.zero_()
        assert torch.equal(zeroed, model(tokens))
        assert not torch.allclose(own, zeroed)
        dense = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=16))
        before = dense(tokens)
        with memory_zeroed(dense):
            assert torch.equal(dense(tokens), before)
