"""Ground-truth embedding bag in plain PyTorch.

Deliberately the most obvious formulation (gather rows, scale, scatter-add into bags) so the
fast backends can be checked against it; ordinary autograd differentiates it (dense grads).
"""

import torch


def embedding_bag_reference(indices, weights, table, offsets=None):
    """``out[b] = sum_e weights[e] * table[indices[e]]`` over the entries ``e`` of bag ``b``.

    ``indices``/``weights`` are either ``[B, L]`` (``offsets`` None) or flat ``[nnz]`` with CSR
    ``offsets`` ``[B + 1]``. Accumulates in at least float32 (float64 for float64 inputs) and
    returns ``torch.result_type(table, weights)``.
    """
    if offsets is None:
        num_bags, bag_len = indices.shape
        bag_of_entry = torch.arange(num_bags, device=indices.device).repeat_interleave(bag_len)
    else:
        num_bags = offsets.numel() - 1
        bag_of_entry = torch.repeat_interleave(
            torch.arange(num_bags, device=indices.device), offsets[1:] - offsets[:-1]
        )
    indices = indices.reshape(-1)
    weights = weights.reshape(-1)

    out_dtype = torch.result_type(table, weights)
    acc_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32

    rows = table[indices].to(acc_dtype)  # [nnz, D]
    scaled = rows * weights.to(acc_dtype)[:, None]
    out = torch.zeros(num_bags, table.shape[1], dtype=acc_dtype, device=table.device)
    out = out.index_add(0, bag_of_entry, scaled)
    return out.to(out_dtype)
