"""Schedules and gradient clipping of dense and row-sparse gradients."""
import math

import torch

from memray.optim import clip_grads, lr_factor


def test_warmup_then_cosine():
    assert lr_factor(0, 100, 10, 0.1) == 0.1
    assert lr_factor(9, 100, 10, 0.1) == 1.0
    assert math.isclose(lr_factor(10, 100, 10, 0.1), 1.0)
    assert math.isclose(lr_factor(55, 100, 10, 0.1), 0.55)
    assert math.isclose(lr_factor(100, 100, 10, 0.1), 0.1)


def test_clip_sparse_gradients_with_duplicate_rows():
    dense = torch.nn.Parameter(torch.zeros(3))
    dense.grad = torch.tensor([3.0, 0.0, 0.0])
    table = torch.nn.Parameter(torch.zeros(10, 2))
    # two layers read row 4: their gradients add up before the norm is taken
    table.grad = torch.sparse_coo_tensor(torch.tensor([[4, 4]]), torch.tensor([[1.0, 0.0], [3.0, 0.0]]), (10, 2), check_invariants=True)
    norm = clip_grads([dense, table], max_norm=1.0)
    assert math.isclose(norm, 5.0, rel_tol=1e-6)  # sqrt(3^2 + (1 + 3)^2)
    assert math.isclose(float(dense.grad[0]), 3.0 / 5.0, rel_tol=1e-5)
    torch.testing.assert_close(table.grad.to_dense()[4], torch.tensor([0.8, 0.0]), rtol=1e-5, atol=1e-6)
    assert clip_grads([dense], max_norm=None) > 0  # no clipping: norm only
