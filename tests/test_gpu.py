"""What `make gpu-check` runs on its device with `pytest -m gpu` (MEMRAY_GPU_CHECK_DEVICE=cuda;
cpu for the check's smoke run in `make test`, with the Triton interpreter and tiny shapes):
the Triton lookup against the float64 reference, the product-key search (the layer's and the
Triton kernel's) against brute force,
and a sharded table at world size 1 (NCCL on a GPU) against the unsharded layer. The row-sparse
optimizers' check on the device is tests/test_optim.py's, parametrized by device_params()."""

import pytest
import torch
from helpers import GPU_CHECK_DEVICE, load_benchmark

import memray.kernels as K
from memray.distributed import ShardedValueTable, init_distributed, shutdown_distributed, spawn
from memray.model import MemoryConfig, ProductKeyMemory

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not GPU_CHECK_DEVICE, reason="make gpu-check runs these (MEMRAY_GPU_CHECK_DEVICE)"),
]
DEVICE = torch.device(GPU_CHECK_DEVICE or "cpu")
SMOKE = DEVICE.type == "cpu"  # the interpreter: tiny shapes


def test_triton_lookup_matches_the_reference():
    """Forward, weight and row-sparse table gradients of fp32 and bf16 tables, awkward dims,
    duplicate rows, empty bags, outputs poisoned with NaN (gpu_lookup.py's checks)."""
    rows = load_benchmark("gpu_lookup").run_checks(K, DEVICE, "triton", smoke=SMOKE)
    failed = [r for r in rows if not r["ok"]]
    assert rows and not failed, failed


@pytest.mark.parametrize("qk_norm", [False, True])
def test_product_key_topk_equals_brute_force(qk_norm):
    n_keys, knn = (9, 5) if SMOKE else (512, 32)
    config = MemoryConfig(n_keys=n_keys, heads=4, knn=knn, k_dim=64, qk_norm=qk_norm)
    layer = ProductKeyMemory(128, config, device=DEVICE).double()
    x = torch.randn(2, 33, 128, dtype=torch.float64, device=DEVICE)
    indices, scores = layer.topk(x)
    brute_scores, brute_indices = layer.score_all(x).topk(knn, dim=-1)
    assert indices.device.type == DEVICE.type
    assert torch.equal(indices, brute_indices)
    torch.testing.assert_close(scores, brute_scores, atol=1e-12, rtol=0)


def test_triton_search_equals_brute_force():
    """The Triton search on the device, on integer-valued queries and keys (exact half scores in
    any summation order, ties everywhere): the brute-force slots, their scores, and the sparse
    backward's gradients equal autograd through the dense half scores."""
    from memray.kernels.pk_search import pk_search, pk_select_reference

    tokens, heads, n_keys, half, knn = (20, 2, 9, 4, 5) if SMOKE else (300, 4, 1024, 256, 32)
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-2, 3, (tokens, heads, 2, half), generator=g).float().to(DEVICE).requires_grad_()
    keys = torch.randint(-2, 3, (heads, 2, n_keys, half), generator=g).float().to(DEVICE).requires_grad_()
    first, second, scores = pk_search(q, keys, knn, backend="triton")
    half_scores = torch.einsum("thsd,hsnd->thsn", q.double(), keys.double())
    want_i, want_j = pk_select_reference(half_scores.detach().flatten(0, 1), knn)
    assert torch.equal(first.flatten(0, 1), want_i) and torch.equal(second.flatten(0, 1), want_j)
    want = half_scores[:, :, 0].gather(-1, first) + half_scores[:, :, 1].gather(-1, second)
    assert torch.equal(scores.double(), want.detach())
    upstream = torch.randint(-2, 3, scores.shape, generator=g).float().to(DEVICE)
    got = torch.autograd.grad((scores * upstream).sum(), (q, keys))
    expected = torch.autograd.grad((want * upstream.double()).sum(), (q, keys))
    for a, b in zip(got, expected):
        assert torch.equal(a.double(), b)


def _world_one(device_type: str) -> dict:
    ctx = init_distributed("nccl" if device_type == "cuda" else "gloo")
    errors = {}
    try:
        config = MemoryConfig(n_keys=7 if device_type == "cpu" else 64, heads=2, knn=4, k_dim=16, v_dim=29)
        for layout in ("row", "column"):
            torch.manual_seed(0)
            reference = ProductKeyMemory(32, config, device=ctx.device)
            table = ShardedValueTable(
                config.num_slots,
                29,
                group=ctx.memory_group,
                layout=layout,
                init_seed=reference.values.init_seed,
                device=ctx.device,
            )
            sharded = ProductKeyMemory(32, config, values=table, device=ctx.device)
            dense = {k: v for k, v in reference.state_dict().items() if not k.startswith("value_table.")}
            sharded.load_state_dict(dense, strict=False)
            x = torch.randn(37, 32, device=ctx.device)
            upstream = torch.randn(37, 32, device=ctx.device)
            (reference(x) * upstream).sum().backward()
            y = sharded(x)
            (y * upstream).sum().backward()
            errs = {"forward": (y - reference(x)).abs().max().item()}
            errs["values"] = (table.weight.grad.to_dense() - reference.values.weight.grad.to_dense()).abs().max().item()
            for (name, p), q in zip(sharded.named_parameters(), reference.parameters()):
                errs[name] = (p.grad - q.grad).abs().max().item()
            errors[layout] = errs
    finally:
        shutdown_distributed()
    return errors


def test_sharded_table_at_world_size_one_equals_the_unsharded_layer():
    for layout, errs in spawn(_world_one, 1, DEVICE.type)[0].items():
        for name, error in errs.items():
            assert error <= 1e-5, (layout, name, error)
