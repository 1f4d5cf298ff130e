"""Hugging Face transformers: a memray model exported and loaded with AutoModelForCausalLM, and
Memory+ layers retrofitted into a randomly initialised Llama (nothing is downloaded)."""

import pytest
import torch
from helpers import assert_one_line_error, memray_here

from memray.checkpoint.model import load_trained_model
from memray.data import ByteTokenizer, generate_facts
from memray.generate import generate
from memray.model import MemoryConfig
from memray.optim import LazyAdam

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_export_loads_in_transformers_with_memrays_logits_and_tokens(tiny_run, tmp_path):
    run_dir = tiny_run  # the session's one-process tiny run (conftest)
    result = memray_here("export", run_dir, "--format", "hf", "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "model.safetensors", "modeling_memray.py", "generation_config.json"):
        assert (tmp_path / "hf" / name).exists(), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    ours = load_trained_model(run_dir).model
    tokens = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), atol=1e-5, rtol=0)
    tokenizer = ByteTokenizer()
    for prompt in ("Fiboun Nabunis was born in", "The favorite color of"):
        ids = torch.tensor([tokenizer.encode(prompt + tokenizer.prompt_suffix, bos=True)])
        produced = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :].tolist()
        assert produced == generate(ours, tokenizer, [prompt], 12)[0]
    with pytest.raises(ValueError, match="unpadded"):
        hf(tokens, attention_mask=torch.zeros_like(tokens))
    # the pools are exported whole, up to a stated size
    too_big = memray_here("export", run_dir, "--format", "hf", "--out", tmp_path / "x", "--max-pool-gib", 1e-6)
    assert_one_line_error(too_big, "GiB")


def llama(seed=0):
    config = transformers.LlamaConfig(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def fact_batch(facts, tokenizer):
    """Inputs [facts, L] (right-padded) and labels: the answer and EOS, -100 elsewhere."""
    prompts = [tokenizer.encode(f.prompt + tokenizer.prompt_suffix, bos=True) for f in facts]
    answers = [tokenizer.encode(f.answer, eos=True) for f in facts]
    length = max(len(p) + len(a) for p, a in zip(prompts, answers))
    inputs = torch.full((len(facts), length), tokenizer.pad_id)
    labels = torch.full((len(facts), length), -100)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        inputs[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
    return inputs, labels


def greedy_recall(model, inputs, labels) -> float:
    """Greedy decoding reproduces a fact's answer and EOS exactly when every answer position's
    argmax, given the true prefix, is the answer's token: one batched forward."""
    with torch.no_grad():
        predicted = model(inputs).logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    wrong = (predicted != target) & (target != -100)
    return float((~wrong.any(-1)).float().mean())


def test_retrofit_keeps_the_function_then_learns_facts_in_memory_only(tmp_path):
    from memray.integrations.hf import add_memory, load_memory, save_memory

    model = llama()
    tokens = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(tokens).logits
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    config = MemoryConfig(n_keys=32, heads=4, knn=8, k_dim=32, swilu=True, qk_norm=True)
    params = add_memory(model, [1], config)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before)  # max abs diff 0 at step 0

    for p in model.parameters():
        p.requires_grad_(False)
    for p in (*params.values, *params.other):
        p.requires_grad_(True)
    tokenizer = ByteTokenizer()
    facts = generate_facts(40, 5, seed=1)[:200]
    inputs, labels = fact_batch(facts, tokenizer)
    (table,) = params.values
    values = LazyAdam(params.values, lr=5e-2, betas=(0.9, 0.95))
    other = torch.optim.AdamW(params.other, lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(150):
        model(inputs, labels=labels).loss.backward()
        for optimizer in (values, other):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    assert greedy_recall(model, inputs, labels) >= 0.9
    # only memory trained: the Llama's own weights are untouched, and so are the slots never read
    state = model.state_dict()
    for key, value in dense.items():
        assert torch.equal(state[key.replace(".mlp.", ".mlp.ffn.") if ".layers.1.mlp." in key else key], value)
    # a step on two facts writes only the slots those two read, and only their optimizer state
    memory = model.model.layers[1].mlp.memory
    counts = memory.values.usage_count.clone()
    snapshot = [table.detach().clone(), *(v.clone() for v in values.state[table].values())]
    model.train()
    model(inputs[:2], labels=labels[:2]).loss.backward()
    values.step()
    read = memory.values.usage_count > counts
    assert 0 < int(read.sum()) < table.shape[0]
    for old, new in zip(snapshot, [table.detach(), *values.state[table].values()]):
        assert torch.equal(old[~read], new[~read])
    assert (table.detach()[read] != snapshot[0][read]).any(-1).float().mean() > 0.9

    # the memory alone saves and loads into the same retrofit of the same Llama
    save_memory(model, tmp_path / "memory.safetensors")
    again = llama()
    add_memory(again, [1], config)
    load_memory(again, tmp_path / "memory.safetensors")
    with torch.no_grad():
        assert torch.equal(again(inputs).logits, model(inputs).logits)


def test_retrofit_refusals():
    from memray.integrations.hf import add_memory

    with pytest.raises(ValueError, match="not one of the model's 2 decoder layers"):
        add_memory(llama(), [2], MemoryConfig(n_keys=8, heads=1, knn=4, k_dim=16))
    with pytest.raises(ValueError, match="Llama-architecture"):
        add_memory(torch.nn.Linear(3, 3), [0], MemoryConfig(n_keys=8, heads=1, knn=4, k_dim=16))


def test_retrofit_of_a_bf16_model_keeps_counting_usage_in_fp32():
    """add_memory casts the memory to the model's bf16; the usage mass stays fp32 and keeps
    growing (in bf16, 1000 + 0.01 is 1000)."""
    from memray.integrations.hf import add_memory

    model = llama().to(torch.bfloat16)
    params = add_memory(model, [1], MemoryConfig(n_keys=8, heads=1, knn=4, k_dim=16))
    table = model.model.layers[1].mlp.memory.values
    assert params.values[0].dtype == torch.bfloat16 and table.usage_mass.dtype == torch.float32
    table.usage_mass.fill_(1000.0)
    model.train()
    model(torch.randint(0, 256, (1, 5)))
    assert table.usage_mass.sum() > 1000.0 * table.num_rows
