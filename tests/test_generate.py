"""Decoding with a KV cache against recomputing the whole sequence, sampling, and `memray generate`."""

import json

import pytest
import torch
from helpers import assert_one_line_error, memray_here

from memray.data import ByteTokenizer
from memray.generate import Sampling, TextStream, generate, generate_text
from memray.model import MemoryConfig, ModelConfig, Transformer


def model_of(ffn: str = "swiglu", memory_layers=(1,), seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=260,
        dim=32,
        n_layers=2,
        n_heads=4,
        max_seq_len=40,
        ffn=ffn,
        memory_layers=list(memory_layers),
        memory=MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=16),
    )
    return Transformer(config).eval()


@pytest.mark.parametrize("ffn,memory_layers", [("swiglu", (1,)), ("moe", ()), ("swiglu", (0, 1))])
def test_cached_logits_equal_recomputing_the_sequence(ffn, memory_layers):
    """A prefill, a chunk of several tokens after it (masked attention) and single tokens: the
    logits of every position equal the full sequence's, to fp32 rounding."""
    model = model_of(ffn, memory_layers)
    tokens = torch.randint(0, 260, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(3, 12)
        pieces = [model(tokens[:, :4], cache), model(tokens[:, 4:7], cache)]
        pieces += [model(tokens[:, i : i + 1], cache) for i in range(7, 12)]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="holds 12 positions"):
        model(tokens[:, :1], cache)


def test_cached_decoding_gives_the_recomputed_tokens():
    model = model_of()
    tokenizer = ByteTokenizer()
    prompts = ["The capital of X is", "ab", "Another prompt", "ab"]  # two of one length: one batch
    cached = generate(model, tokenizer, prompts, 12)
    assert cached == generate(model, tokenizer, prompts, 12, use_cache=False)
    assert cached[1] == cached[3] and all(0 < len(ids) <= 12 for ids in cached)
    # bounded by max_seq_len (40): a 30-token prompt leaves room for 9 new tokens
    (long,) = generate(model, tokenizer, ["x" * 29], 100)
    assert len(long) <= 40 - 31 + 1


def test_sampling_is_seeded_and_its_cuts_reach_greedy():
    model = model_of()
    tokenizer = ByteTokenizer()
    prompts = ["hello", "world!"]
    greedy = generate(model, tokenizer, prompts, 10)
    hot = Sampling(temperature=2.0, seed=3)
    first = generate(model, tokenizer, prompts, 10, hot)
    assert first == generate(model, tokenizer, prompts, 10, hot)
    assert first != generate(model, tokenizer, prompts, 10, Sampling(temperature=2.0, seed=4))
    assert generate(model, tokenizer, prompts, 10, Sampling(temperature=2.0, top_k=1)) == greedy
    assert generate(model, tokenizer, prompts, 10, Sampling(temperature=2.0, top_p=1e-6)) == greedy
    for bad in ({"temperature": -1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_text_stream_holds_back_a_partial_character():
    stream = TextStream(ByteTokenizer())
    snow = list("é".encode())  # two bytes
    assert stream.update([ord("a")]) == "a"
    assert stream.update([ord("a"), snow[0]]) == ""
    assert stream.update([ord("a"), *snow]) == "é"


def test_memray_generate_answers_as_memray_eval_does(tiny_run, tmp_path):
    """On the session's one-process tiny run (conftest)."""
    facts = tiny_run / "data" / "facts.jsonl"
    evaluated = memray_here("eval", tiny_run, "--facts", facts, "--limit", 5, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    examples = json.loads(evaluated.stdout)["examples"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(facts.read_text().splitlines()[:5]) + "\n")
    result = memray_here("generate", tiny_run, "--prompts", prompts, "--max-new-tokens", 16)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == [e["prompt"] for e in examples]
    assert [line["completion"].strip() for line in lines] == [e["predicted"] for e in examples]
    # one prompt streams the same text, then a newline
    streamed = memray_here("generate", tiny_run, "--prompt", examples[0]["prompt"], "--max-new-tokens", 16)
    assert streamed.returncode == 0 and streamed.stdout == lines[0]["completion"] + "\n"
    # sampled, the same seed twice
    options = ("--temperature", 1.5, "--top-p", 0.9, "--seed", 7)
    sampled = [memray_here("generate", tiny_run, "--prompts", prompts, *options).stdout for _ in range(2)]
    assert sampled[0] == sampled[1] and len(sampled[0].splitlines()) == 5


def test_memray_generate_errors_are_one_line(tiny_run, tmp_path):
    assert_one_line_error(memray_here("generate", tiny_run), "--prompt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    assert_one_line_error(memray_here("generate", tiny_run, "--prompts", bad), f"{bad}:2")
    assert_one_line_error(memray_here("generate", tmp_path / "nowhere", "--prompt", "x"), "nowhere")
    assert_one_line_error(memray_here("generate", tiny_run, "--prompt", "x", "--top-p", 0), "top-p")


def test_generate_text_decodes_up_to_eos():
    model = model_of()
    tokenizer = ByteTokenizer()
    (ids,) = generate(model, tokenizer, ["abc"], 8)
    (text,) = generate_text(model, tokenizer, ["abc"], 8)
    assert text == tokenizer.decode(ids)
