"""Text generation from a trained model: greedy or sampled decoding with a KV cache.

Prompts are run through the model once (the prefill), then one token per step attends to the
cached keys and values of the sequence so far, so a step costs one token's pass, not the whole
prefix's. Prompts of equal token length are decoded together as a batch (no padding enters
attention). Each prompt is ``BOS + prompt + tokenizer.prompt_suffix``, the form facts are
trained and evaluated in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature`` 0: greedy (argmax), and the other fields are
    unused; else softmax(logits / temperature), cut to the ``top_k`` most likely tokens (0: all)
    and to the smallest set whose probability reaches ``top_p`` (1: all), drawn with ``seed``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Next token ids [batch] from ``logits`` [batch, vocab]."""
        if self.temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            # drop a token when the tokens ranked above it already reach top_p (the first stays)
            drop = probs.cumsum(-1) - probs >= self.top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1)
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    sampling: Sampling | None = None,
    *,
    batch_size: int = 64,
    use_cache: bool = True,
    on_token: Callable[[int, list[int]], None] | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt's continuation, up to EOS (included) or
    ``max_new_tokens`` (or the model's ``max_seq_len``).

    ``use_cache=False`` recomputes the whole sequence at every step (the reference the cache is
    tested against). ``on_token(i, ids)`` is called after each step for each prompt ``i`` still
    decoding, with its new ids so far (streaming). Sampling draws from one generator seeded with
    ``sampling.seed``, batch by batch in a fixed order, so a seed gives the same text again.
    """
    sampling = sampling or Sampling()
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    max_len = model.config.max_seq_len
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.temperature else None
    encoded = [tokenizer.encode(p + tokenizer.prompt_suffix, bos=True) for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    out: list[list[int]] = [[] for _ in prompts]

    def decode_batch(chunk: list[int], length: int) -> None:
        steps = max(0, min(max_new_tokens, max_len - length))
        if steps == 0:
            return
        tokens = torch.tensor([encoded[i] for i in chunk], device=device)
        cache = model.new_cache(len(chunk), length + steps) if use_cache else None
        logits = model(tokens, cache)[:, -1]
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        for step in range(steps):
            next_token = torch.where(done, tokenizer.eos_id, sampling.choose(logits, generator))
            for row, i in enumerate(chunk):
                if not done[row]:
                    out[i].append(int(next_token[row]))
                    if on_token is not None:
                        on_token(i, out[i])
            done |= next_token == tokenizer.eos_id
            if bool(done.all()) or step == steps - 1:
                break
            if cache is not None:
                logits = model(next_token[:, None], cache)[:, -1]
            else:
                tokens = torch.cat([tokens, next_token[:, None]], dim=1)
                logits = model(tokens)[:, -1]

    try:
        for length in sorted(by_length):
            members = by_length[length]
            for start in range(0, len(members), batch_size):
                decode_batch(members[start : start + batch_size], length)
    finally:
        model.train(was_training)
    return out


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int, sampling: Sampling | None = None, **kw):
    """:func:`generate`, decoded to text (up to EOS)."""
    return [tokenizer.decode(ids) for ids in generate(model, tokenizer, prompts, max_new_tokens, sampling, **kw)]


class TextStream:
    """Turns a growing list of token ids into text increments for streaming: ``update(ids)``
    returns the text not yet returned, holding back a trailing partial UTF-8 character (shown
    as U+FFFD until its last byte arrives)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.shown = tokenizer, ""

    def update(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        if not text.startswith(self.shown):
            return ""  # a tokenizer that rewrites earlier text: wait for the final decode
        new, self.shown = text[len(self.shown) :], text
        return new
