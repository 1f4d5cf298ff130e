"""What `make gpu-check` runs on its device with `pytest -m gpu` (MEMRAY_GPU_CHECK_DEVICE=cuda;
cpu for the check's smoke run in `make test`, with the Triton interpreter and tiny shapes):
the Triton lookup against the float64 reference, the product-key search against brute force,
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
