"""Forward FLOPs per token of a model config (2 per multiply-add), by part.

What the quality benchmark matches models on: a memory layer costs its query projection, the
sub-key scores (heads x 2 halves x n_keys x k_dim/2), the candidate sums (heads x knn²), the
weighted bag (heads x knn x v_dim) and, for Memory+, the SiLU gate and output projections —
not its table size. A top-k MoE costs its router and k experts. Attention is counted with a
context of ``seq_len`` tokens (each token attends to seq_len/2 on average under the causal mask).
"""

from __future__ import annotations

from .transformer import ModelConfig


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """{"attention", "ffn", "memory", "moe", "head", "total"} forward FLOPs of one token."""
    d, seq = config.dim, seq_len or config.max_seq_len
    hidden = config.hidden
    out = {"attention": 0.0, "ffn": 0.0, "memory": 0.0, "moe": 0.0, "head": 2.0 * d * config.vocab_size}
    memory_layers = set(config.memory_layers)
    for layer in range(config.n_layers):
        out["attention"] += 2.0 * 4 * d * d + 2.0 * 2 * d * (seq / 2)
        if layer in memory_layers:
            m = config.memory
            v_dim = m.v_dim or d
            cost = 2.0 * d * m.heads * m.k_dim  # query projection
            cost += 2.0 * m.heads * m.n_keys * m.k_dim  # both halves' scores against their sub-keys
            cost += m.heads * min(m.knn, m.n_keys) ** 2  # candidate sums
            cost += 2.0 * m.heads * m.knn * v_dim  # the weighted bag
            if m.swilu:
                cost += 2.0 * d * v_dim + v_dim  # gate projection and product
            if m.swilu or v_dim != d:
                cost += 2.0 * v_dim * d  # output projection
            out["memory"] += cost
        elif config.ffn == "moe":
            e = config.moe
            expert_hidden = e.hidden or hidden
            out["moe"] += 2.0 * d * e.num_experts + e.top_k * 2.0 * 3 * d * expert_hidden
        else:
            out["ffn"] += 2.0 * 3 * d * hidden  # SwiGLU: gate, up, down
    out["total"] = sum(out.values())
    return out
