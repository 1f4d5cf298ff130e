"""Exact-match recall of facts: greedy answers of a model to each fact's prompt."""

from __future__ import annotations

from memray.data import ByteTokenizer, Fact
from memray.generate import generate_text


def greedy_answers(
    model, tokenizer: ByteTokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 256
) -> list[str]:
    """Greedy continuation of ``BOS + prompt + prompt_suffix`` up to EOS or ``max_new_tokens``
    (:func:`memray.generate.generate` with a KV cache; prompts batched by token length)."""
    return generate_text(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size)


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
