"""Exact-match recall of facts: greedy answers of a model to each fact's prompt."""

from __future__ import annotations

from collections import defaultdict

import torch

from memray.data import ByteTokenizer, Fact


@torch.no_grad()
def greedy_answers(
    model, tokenizer: ByteTokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 256
) -> list[str]:
    """Greedy continuation of ``BOS + prompt + " "`` up to EOS or ``max_new_tokens``.

    Prompts are batched by token length, so no padding enters attention.
    """
    was_training = model.training
    model.eval()
    encoded = [tokenizer.encode(p + tokenizer.prompt_suffix, bos=True) for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    answers = [""] * len(prompts)
    device = model.embed.weight.device
    max_len = model.config.max_seq_len
    for length, members in by_length.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            tokens = torch.tensor([encoded[i] for i in chunk], device=device)
            steps = max(0, min(max_new_tokens, max_len - length))
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            for _ in range(steps):
                next_token = model(tokens)[:, -1].argmax(-1)
                tokens = torch.cat([tokens, next_token[:, None]], dim=1)
                done |= next_token == tokenizer.eos_id
                if bool(done.all()):
                    break
            for row, i in enumerate(chunk):
                answers[i] = tokenizer.decode(tokens[row, length:].tolist())
    model.train(was_training)
    return answers


def fact_recall(model, facts: list[Fact], tokenizer: ByteTokenizer | None = None) -> dict:
    """Fraction of facts whose greedy answer equals the answer exactly (after stripping spaces)."""
    tokenizer = tokenizer or ByteTokenizer()
    max_new = max(len(tokenizer.encode(" " + f.answer)) for f in facts) + 1  # the space, for a BPE
    predictions = greedy_answers(model, tokenizer, [f.prompt for f in facts], max_new)
    correct = [p.strip() == f.answer.strip() for p, f in zip(predictions, facts)]
    return {
        "recall": sum(correct) / len(facts),
        "correct": sum(correct),
        "total": len(facts),
        "examples": [
            {"prompt": f.prompt, "answer": f.answer, "predicted": p.strip()}
            for f, p, ok in list(zip(facts, predictions, correct))[:5]
        ],
    }
