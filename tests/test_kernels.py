"""Embedding bag (memory-layer value lookup): torch, C++ and Triton backends against the reference.

Triton runs under the interpreter on CPU (``TRITON_INTERPRET=1`` from conftest), which executes
every program in Python, so Triton cases use small bags and tables. The C++ kernels are built
on first use (seconds; cached in the torch extensions directory afterwards).
"""

import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from tolerances import TOL, assert_close

import memray.kernels as K
from memray.kernels import _alloc, bag_backward, bag_forward, cpu_ext, embedding_bag, embedding_bag_reference

# the kernels' multithreaded paths (OpenMP over rows and bags) are what these tests check: they
# keep torch's threads while the demo trains in the background (conftest)
pytestmark = pytest.mark.threads

EB_MODULE = sys.modules["memray.kernels.embedding_bag"]
KERNELS_DIR = pathlib.Path(K.__file__).resolve().parent

# The C++ kernels are skipped only where no C++ compiler exists; with one, a failed build fails
# test_cpp_extension_builds instead of silently skipping.
HAVE_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
CPP = pytest.param(
    "cpp",
    marks=pytest.mark.skipif(
        not HAVE_COMPILER and not cpu_ext.available(), reason="no C++ compiler for the CPU kernels"
    ),
)


def _param(backend, dtype):
    marks = CPP.marks if backend == "cpp" else ()
    return pytest.param(backend, dtype, id=f"{backend}-{str(dtype).removeprefix('torch.')}", marks=marks)


BACKEND_DTYPES = [
    _param(backend, dtype)
    for backend, dtype in [
        ("torch", torch.float32),
        ("torch", torch.bfloat16),
        ("torch", torch.float64),
        ("cpp", torch.float32),
        ("cpp", torch.bfloat16),
        ("cpp", torch.float64),
        ("triton", torch.float32),
        ("triton", torch.bfloat16),
    ]
]
ALL = ["torch", CPP, "triton"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _fixed(num_rows, dim, bags, bag_len, *, idx=None):
    """[B, L] indices; ``idx`` (a nested list) overrides the random draw."""
    indices = torch.tensor(idx) if idx is not None else torch.randint(0, num_rows, (bags, bag_len))
    return dict(indices=indices, weights=torch.randn(indices.shape), table=torch.randn(num_rows, dim), offsets=None)


def _csr(num_rows, dim, lengths, *, idx=None):
    nnz = sum(lengths)
    indices = torch.tensor(idx) if idx is not None else torch.randint(0, num_rows, (nnz,))
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return dict(indices=indices, weights=torch.randn(nnz), table=torch.randn(num_rows, dim), offsets=offsets)


CASES = {
    "fixed_d33": lambda: _fixed(10, 33, 4, 3),
    "d1": lambda: _fixed(5, 1, 3, 2),
    "d100": lambda: _fixed(7, 100, 2, 5),
    # more than one 128-wide D block per row
    "d130_two_blocks": lambda: _fixed(6, 130, 2, 3),
    # duplicates inside a bag and across bags
    "duplicates": lambda: _fixed(4, 9, 2, 3, idx=[[1, 1, 2], [2, 1, 1]]),
    # empty bags first, in the middle and last
    "csr_empty_bags": lambda: _csr(6, 8, [0, 3, 0, 4, 0]),
    # bags and per-row segments longer than one 16-entry loop step
    "long_segments": lambda: _csr(3, 5, [40, 1, 0, 7]),
    "single_row_table": lambda: _fixed(1, 5, 3, 4),
    "random_csr": lambda: _csr(50, 48, torch.randint(0, 20, (12,)).tolist()),
}


def _prepare(case, table_dtype, weight_dtype=None):
    """Cast the case to the tested dtypes; float64 copies of the *rounded* values feed the reference.

    Weights default to float32, or float64 with a float64 table (so every output is float64).
    """
    if weight_dtype is None:
        weight_dtype = torch.float64 if table_dtype == torch.float64 else torch.float32
    table = case["table"].to(table_dtype)
    weights = case["weights"].to(weight_dtype)
    return case["indices"], weights, table, case["offsets"]


def _run(backend, indices, weights, table, offsets, *, sparse_grad=True, grad_out=None):
    """Forward + backward; returns (out, grad_weights, grad_table, grad_out)."""
    weights = weights.clone().requires_grad_()
    table = table.clone().requires_grad_()
    out = embedding_bag(indices, weights, table, offsets, sparse_grad=sparse_grad, backend=backend)
    if grad_out is None:
        grad_out = torch.randn(out.shape).to(out.dtype)
    grad_weights, grad_table = torch.autograd.grad(out, (weights, table), grad_out)
    return out, grad_weights, grad_table, grad_out


def _reference(indices, weights, table, offsets, grad_out):
    weights = weights.double().requires_grad_()
    table = table.double().requires_grad_()
    out = embedding_bag_reference(indices, weights, table, offsets)
    grad_weights, grad_table = torch.autograd.grad(out, (weights, table), grad_out.double())
    return out, grad_weights, grad_table


def _check_sparse_grad(grad_table, indices, table):
    """Coalesced COO over exactly the touched rows, sorted, one values row per touched row."""
    touched = torch.unique(indices.reshape(-1))
    assert grad_table.layout == torch.sparse_coo
    assert grad_table.shape == table.shape
    assert grad_table.dtype == table.dtype
    assert grad_table.is_coalesced()
    assert torch.equal(grad_table._indices(), touched[None])
    assert grad_table._values().shape == (touched.numel(), table.shape[1])


# ------------------------------------------------------------------------------------------------
# numerical agreement with the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_matches_reference(backend, dtype, case_name):
    indices, weights, table, offsets = _prepare(CASES[case_name](), dtype)
    out, grad_weights, grad_table, grad_out = _run(backend, indices, weights, table, offsets)
    ref_out, ref_gw, ref_gt = _reference(indices, weights, table, offsets, grad_out)

    assert out.dtype == torch.result_type(table, weights)
    assert grad_weights.dtype == weights.dtype and grad_weights.shape == weights.shape
    assert_close(out, ref_out, dtype=dtype)
    assert_close(grad_weights, ref_gw, dtype=dtype)
    _check_sparse_grad(grad_table, indices, table)
    assert_close(grad_table.to_dense(), ref_gt, dtype=dtype)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize(
    "table_dtype,weight_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64), (torch.bfloat16, torch.float64)],
    ids=["bf16-bf16", "fp32-fp64", "bf16-fp64"],
)
def test_mixed_dtypes(backend, table_dtype, weight_dtype):
    """Output dtype follows result_type; accumulation is fp64 whenever an input is fp64."""
    indices, weights, table, offsets = _prepare(CASES["csr_empty_bags"](), table_dtype, weight_dtype)
    out, grad_weights, grad_table, grad_out = _run(backend, indices, weights, table, offsets)
    ref_out, ref_gw, ref_gt = _reference(indices, weights, table, offsets, grad_out)
    # The coarsest dtype in play sets the tolerance (bf16 output, weights or table gradients).
    tol_dtype = torch.bfloat16 if torch.bfloat16 in (table_dtype, weight_dtype) else torch.float32
    assert out.dtype == torch.result_type(table, weights)
    assert grad_weights.dtype == weight_dtype
    assert grad_table.dtype == table_dtype
    assert_close(out, ref_out, dtype=tol_dtype)
    assert_close(grad_weights, ref_gw, dtype=tol_dtype)
    assert_close(grad_table.to_dense(), ref_gt, dtype=tol_dtype)


def test_triton_float64():
    """The Triton kernels also accumulate in fp64 for fp64 inputs (fp64 tolerance)."""
    indices, weights, table, offsets = _prepare(CASES["long_segments"](), torch.float64, torch.float64)
    out, grad_weights, grad_table, grad_out = _run("triton", indices, weights, table, offsets)
    ref_out, ref_gw, ref_gt = _reference(indices, weights, table, offsets, grad_out)
    assert_close(out, ref_out)
    assert_close(grad_weights, ref_gw)
    assert_close(grad_table.to_dense(), ref_gt)


@pytest.mark.parametrize("backend", ALL)
def test_gradcheck_dense(backend):
    """Finite differences on the autograd Function itself (fp64, dense table gradient)."""
    indices, weights, table, offsets = _prepare(_csr(4, 3, [2, 0, 3]), torch.float64)
    weights.requires_grad_()
    table.requires_grad_()
    torch.autograd.gradcheck(
        lambda w, t: embedding_bag(indices, w, t, offsets, sparse_grad=False, backend=backend), (weights, table)
    )


def test_torch_backend_larger_and_chunked(monkeypatch):
    """Bigger random problem; a tiny chunk size forces the torch backend's chunk loops."""
    monkeypatch.setattr(EB_MODULE, "_CHUNK_ELEMS", 1000)
    case = _fixed(300, 64, 48, 24)
    for dtype in (torch.float32, torch.bfloat16):
        indices, weights, table, offsets = _prepare(case, dtype)
        out, grad_weights, grad_table, grad_out = _run("torch", indices, weights, table, offsets)
        ref_out, ref_gw, ref_gt = _reference(indices, weights, table, offsets, grad_out)
        assert_close(out, ref_out, dtype=dtype)
        assert_close(grad_weights, ref_gw, dtype=dtype)
        _check_sparse_grad(grad_table, indices, table)
        assert_close(grad_table.to_dense(), ref_gt, dtype=dtype)


@pytest.mark.parametrize("backend", ALL)
def test_broadcast_grad_out(backend):
    """``out.sum().backward()`` hands the backward an expanded (stride-0) grad_out."""
    indices, weights, table, offsets = _prepare(CASES["fixed_d33"](), torch.float32)
    grad_out = torch.ones(1, 1).expand(4, 33)
    _, grad_weights, grad_table, _ = _run(backend, indices, weights, table, offsets, grad_out=grad_out)
    _, ref_gw, ref_gt = _reference(indices, weights, table, offsets, grad_out.contiguous())
    assert_close(grad_weights, ref_gw, dtype=torch.float32)
    assert_close(grad_table.to_dense(), ref_gt, dtype=torch.float32)


@pytest.mark.parametrize("backend", [CPP, "triton"])
def test_backends_agree_on_raw_api(backend):
    """bag_forward/bag_backward (CSR, no autograd) give the torch backend's answers."""
    indices, weights, table, offsets = _prepare(CASES["csr_empty_bags"](), torch.float32)
    grad_out = torch.randn(offsets.numel() - 1, table.shape[1])
    results = {}
    for name in ("torch", backend):
        out = bag_forward(indices, weights, table, offsets, name)
        grad_weights, unique_rows, row_grads = bag_backward(grad_out, indices, weights, table, offsets, name)
        results[name] = (out, grad_weights, unique_rows, row_grads)
    (o_a, gw_a, u_a, r_a), (o_b, gw_b, u_b, r_b) = results["torch"], results[backend]
    assert torch.equal(u_a, u_b) and torch.equal(u_a, torch.unique(indices))
    assert gw_a.shape == indices.shape and r_a.shape == (u_a.numel(), table.shape[1])
    assert_close(o_b, o_a, dtype=torch.float32)
    assert_close(gw_b, gw_a, dtype=torch.float32)
    assert_close(r_b, r_a, dtype=torch.float32)


@pytest.mark.parametrize("backend", ALL)
def test_raw_backward_parts_not_requested(backend):
    indices, weights, table, offsets = _prepare(CASES["duplicates"](), torch.float32)
    grad_out = torch.randn(2, 9)
    _, ref_gw, ref_gt = _reference(indices, weights, table, offsets, grad_out)
    grad_weights, unique_rows, row_grads = bag_backward(
        grad_out, indices, weights, table, offsets, backend, need_weights_grad=False
    )
    assert grad_weights is None
    assert torch.equal(unique_rows, torch.tensor([1, 2]))
    assert_close(row_grads, ref_gt[unique_rows], dtype=torch.float32)
    grad_weights, unique_rows, row_grads = bag_backward(
        grad_out, indices, weights, table, offsets, backend, need_table_grad=False
    )
    assert unique_rows is None and row_grads is None
    assert_close(grad_weights, ref_gw.reshape(-1), dtype=torch.float32)  # the raw API is flat [nnz]


# ------------------------------------------------------------------------------------------------
# awkward shapes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _fixed(5, 6, 0, 3), id="B0_fixed"),
        pytest.param(lambda: _csr(5, 6, []), id="B0_csr"),
        pytest.param(lambda: _fixed(5, 6, 3, 0), id="L0"),
        pytest.param(lambda: _csr(5, 6, [0, 0]), id="all_bags_empty"),
    ],
)
def test_no_entries(backend, make):
    indices, weights, table, offsets = _prepare(make(), torch.float32)
    out, grad_weights, grad_table, _ = _run(backend, indices, weights, table, offsets)
    num_bags = indices.shape[0] if offsets is None else offsets.numel() - 1
    assert out.shape == (num_bags, 6)
    assert torch.equal(out, torch.zeros_like(out))
    assert grad_weights.shape == weights.shape
    _check_sparse_grad(grad_table, indices, table)
    assert grad_table._nnz() == 0


@pytest.mark.parametrize("backend", ALL)
def test_untouched_rows_absent(backend):
    """Only the rows read appear in the sparse gradient; the rest of the table gets nothing."""
    idx = [[7, 3, 7], [40, 3, 12]]
    indices, weights, table, offsets = _prepare(_fixed(50, 4, 2, 3, idx=idx), torch.float32)
    _, _, grad_table, grad_out = _run(backend, indices, weights, table, offsets)
    _check_sparse_grad(grad_table, indices, table)
    assert grad_table._indices().tolist() == [[3, 7, 12, 40]]
    _, _, ref_gt = _reference(indices, weights, table, offsets, grad_out)
    assert_close(grad_table.to_dense(), ref_gt, dtype=torch.float32)


@pytest.mark.parametrize("backend", ALL)
def test_large_table_rows_near_end(backend):
    """int64 row numbers close to N = 70000; the sparse grad stays at the touched rows only."""
    num_rows = 70_000
    idx = [[num_rows - 1, 0, num_rows - 2], [65_537, num_rows - 1, 32_768]]
    indices, weights, table, offsets = _prepare(_fixed(num_rows, 3, 2, 3, idx=idx), torch.float32)
    out, grad_weights, grad_table, grad_out = _run(backend, indices, weights, table, offsets)
    ref_out, ref_gw, ref_gt = _reference(indices, weights, table, offsets, grad_out)
    assert_close(out, ref_out, dtype=torch.float32)
    assert_close(grad_weights, ref_gw, dtype=torch.float32)
    _check_sparse_grad(grad_table, indices, table)
    assert grad_table._nnz() == 5
    assert_close(grad_table.to_dense(), ref_gt, dtype=torch.float32)


@pytest.mark.parametrize("backend", ALL)
def test_sparse_and_dense_grads_equal(backend):
    indices, weights, table, offsets = _prepare(CASES["csr_empty_bags"](), torch.bfloat16)
    _, gw_sparse, gt_sparse, grad_out = _run(backend, indices, weights, table, offsets, sparse_grad=True)
    _, gw_dense, gt_dense, _ = _run(backend, indices, weights, table, offsets, sparse_grad=False, grad_out=grad_out)
    assert gt_dense.layout == torch.strided and gt_dense.dtype == table.dtype
    assert torch.equal(gt_sparse.to_dense(), gt_dense)
    assert torch.equal(gw_sparse, gw_dense)


@pytest.mark.parametrize("backend", ALL)
def test_one_input_requires_grad(backend):
    indices, weights, table, offsets = _prepare(CASES["duplicates"](), torch.float32)
    grad_out = torch.randn(2, 9)
    _, ref_gw, ref_gt = _reference(indices, weights, table, offsets, grad_out)

    w = weights.clone().requires_grad_()
    out = embedding_bag(indices, w, table, offsets, backend=backend)
    (gw,) = torch.autograd.grad(out, w, grad_out)
    assert_close(gw, ref_gw, dtype=torch.float32)

    t = table.clone().requires_grad_()
    out = embedding_bag(indices, weights, t, offsets, backend=backend)
    out.backward(grad_out)
    # A leaf's .grad goes through AccumulateGrad, which keeps the values but not the coalesced flag.
    assert t.grad.layout == torch.sparse_coo
    assert_close(t.grad.to_dense(), ref_gt, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# NaN poisoning: every output element must be written
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype", [p for p in BACKEND_DTYPES if p.values[1] != torch.float64])
def test_nan_poisoning(backend, dtype, monkeypatch):
    calls = []

    def nan_empty(*shape, dtype, device):
        calls.append((shape, dtype))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_alloc, "empty", nan_empty)
    case = _csr(7, 130, [0, 3, 17, 0, 2])  # empty bags, a >16-entry bag, two D blocks
    # bf16 weights make the torch backend's bf16 conversions go through the allocator as well
    indices, weights, table, offsets = _prepare(case, dtype, weight_dtype=dtype)
    out, grad_weights, grad_table, grad_out = _run(backend, indices, weights, table, offsets)
    assert calls, "the allocation helper was bypassed"
    for name, t in [("out", out), ("grad_weights", grad_weights), ("row_grads", grad_table._values())]:
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements"
    ref_out, ref_gw, ref_gt = _reference(indices, weights, table, offsets, grad_out)
    assert_close(out, ref_out, dtype=dtype)
    assert_close(grad_weights, ref_gw, dtype=dtype)
    assert_close(grad_table.to_dense(), ref_gt, dtype=dtype)


def test_large_outputs_reuse_a_free_buffer_and_never_a_live_one(monkeypatch):
    """Large CPU outputs come from a pool of freed buffers: a buffer is handed out again once
    nothing holds its storage, never while any tensor (a view included) still does."""
    monkeypatch.setattr(_alloc, "_HUGE_PAGE_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(_alloc, "_pool", [])
    size = 3 << 20
    first = _alloc.empty(size // 4, dtype=torch.float32, device="cpu")
    first.fill_(1.0)
    address = first.data_ptr()
    second = _alloc.empty(size // 4, dtype=torch.float32, device="cpu")
    assert second.data_ptr() != address  # first is alive
    view = first[5:]
    del first
    third = _alloc.empty(size // 4, dtype=torch.float32, device="cpu")
    assert third.data_ptr() != address  # a view of it is alive
    assert torch.equal(view, torch.ones(size // 4 - 5))  # and was left alone
    del view
    fourth = _alloc.empty(size // 4 - 100, dtype=torch.float32, device="cpu")
    assert fourth.data_ptr() == address  # free now: reused
    del fourth
    small = _alloc.empty((5 << 20) // 16, dtype=torch.float32, device="cpu")  # 1.25 MiB
    assert small.data_ptr() != address  # a buffer over twice the request is not spent on it
    assert _alloc.empty(size // 4, dtype=torch.float32, device="cpu").data_ptr() == address
    # the pool is bounded: buffers beyond it are plain fresh memory
    held = [_alloc.empty(size // 4, dtype=torch.float32, device="cpu") for _ in range(2 * _alloc._POOL_SIZE)]
    assert len(_alloc._pool) <= _alloc._POOL_SIZE
    assert len({t.data_ptr() for t in held}) == len(held)


# ------------------------------------------------------------------------------------------------
# API contract
# ------------------------------------------------------------------------------------------------


def test_reference_is_plain_autograd_float64():
    indices, weights, table, offsets = _prepare(CASES["csr_empty_bags"](), torch.float64, torch.float64)
    weights.requires_grad_()
    table.requires_grad_()
    torch.autograd.gradcheck(lambda w, t: embedding_bag_reference(indices, w, t, offsets), (weights, table))


# ------------------------------------------------------------------------------------------------
# the C++ CPU kernels: build, selection, fallback
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C++ compiler")
@pytest.mark.skipif(cpu_ext._disabled(), reason=f"{cpu_ext.ENV_SWITCH} disables the C++ kernels")
def test_cpp_extension_builds():
    assert cpu_ext.available(), cpu_ext.load_error


def test_auto_backend_on_cpu_is_fastest_available():
    expected = "cpp" if cpu_ext.available() else "torch"
    assert EB_MODULE._resolve_backend("auto", torch.zeros(2, 2)) == expected


def _run_python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


CHECK_AUTO_IS_TORCH = (
    "import sys, warnings, torch\n"
    "warnings.simplefilter('always')\n"
    "with warnings.catch_warnings(record=True) as caught:\n"
    "    from memray.kernels import cpu_ext, embedding_bag\n"
    "    eb = sys.modules['memray.kernels.embedding_bag']\n"
    "    assert eb._resolve_backend('auto', torch.zeros(2, 2)) == 'torch'\n"
    "    out = embedding_bag(torch.tensor([[0, 1, 1]]), torch.ones(1, 3), torch.eye(3))\n"
    "assert out.tolist() == [[1.0, 2.0, 0.0]], out\n"
    "print(cpu_ext.load_error)\n"
    "print('|'.join(str(w.message) for w in caught))\n"
)


def test_cpp_switched_off_means_torch_backend(tmp_path):
    result = _run_python(CHECK_AUTO_IS_TORCH, MEMRAY_CPU_EXT="0", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "disabled by MEMRAY_CPU_EXT=0" in result.stdout
    assert not any(tmp_path.iterdir()), "nothing may be built when the extension is switched off"


def test_cpp_build_failure_falls_back_to_torch(tmp_path):
    """No usable compiler: one warning naming the cause, then the torch backend does the work."""
    result = _run_python(CHECK_AUTO_IS_TORCH, MEMRAY_CPU_EXT="1", TORCH_EXTENSIONS_DIR=str(tmp_path), CXX="/bin/false")
    assert result.returncode == 0, result.stderr
    load_error, warning_text = result.stdout.strip().splitlines()[-2:]
    assert load_error != "None"
    assert "C++ CPU kernels unavailable" in warning_text and "slower torch backend" in warning_text


def test_stale_build_lock_is_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("")
    cpu_ext._remove_stale_lock(tmp_path)
    assert lock.exists(), "a fresh lock belongs to a build in progress"
    old = lock.stat().st_mtime - cpu_ext._STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    cpu_ext._remove_stale_lock(tmp_path)
    assert not lock.exists()


@pytest.mark.parametrize("backend", [CPP])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpp_multithreaded_shapes(backend, dtype):
    """Enough bags and rows that both threads get work; D = 70 leaves a tail after 16-wide lanes."""
    for case in (_fixed(500, 70, 300, 24), _csr(2000, 70, torch.randint(0, 40, (257,)).tolist())):
        indices, weights, table, offsets = _prepare(case, dtype)
        out, grad_weights, grad_table, grad_out = _run(backend, indices, weights, table, offsets)
        ref_out, ref_gw, ref_gt = _reference(indices, weights, table, offsets, grad_out)
        assert_close(out, ref_out, dtype=dtype)
        assert_close(grad_weights, ref_gw, dtype=dtype)
        _check_sparse_grad(grad_table, indices, table)
        assert_close(grad_table.to_dense(), ref_gt, dtype=dtype)


@pytest.mark.parametrize("backend", [CPP])
@pytest.mark.parametrize("bad", [-1, 10])
def test_cpp_index_out_of_range(backend, bad):
    """The C++ kernels check every index before following it (a bf16 table runs the C++ forward)."""
    indices = torch.tensor([[0, bad, 2]])
    with pytest.raises(IndexError, match="out of range"):
        bag_forward(indices, torch.ones(1, 3), torch.ones(10, 4, dtype=torch.bfloat16), None, backend)
    with pytest.raises(IndexError, match="out of range"):
        bag_backward(torch.ones(1, 4), indices, torch.ones(1, 3), torch.ones(10, 4), None, backend)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(indices=torch.zeros(2, 3, dtype=torch.int32)), "int64"),
        (dict(weights=torch.zeros(2, 4)), "shape"),
        (dict(weights=torch.zeros(2, 3, dtype=torch.int64)), "weights dtype"),
        (dict(table=torch.zeros(5)), "2-D"),
        (dict(table=torch.zeros(5, 4, dtype=torch.float16)), "table dtype"),
        (dict(indices=torch.zeros(6, dtype=torch.int64), weights=torch.zeros(6)), "\\[B, L\\]"),
        (dict(offsets=torch.tensor([0, 3, 6])), "flat"),
        (
            dict(indices=torch.zeros(6, dtype=torch.int64), weights=torch.zeros(6), offsets=torch.tensor([0, 3, 5])),
            "end at nnz",
        ),
        (
            dict(indices=torch.zeros(6, dtype=torch.int64), weights=torch.zeros(6), offsets=torch.tensor([1, 3, 6])),
            "start at 0",
        ),
        (
            dict(indices=torch.zeros(6, dtype=torch.int64), weights=torch.zeros(6), offsets=torch.tensor([0, 4, 3, 6])),
            "non-decreasing",
        ),
        (
            dict(indices=torch.zeros(6, dtype=torch.int64), weights=torch.zeros(6), offsets=torch.tensor([0.0, 6.0])),
            "int64",
        ),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_validation_errors(kwargs, match):
    args = dict(
        indices=torch.zeros(2, 3, dtype=torch.int64), weights=torch.zeros(2, 3), table=torch.zeros(5, 4), offsets=None
    )
    backend = kwargs.pop("backend", "torch")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        embedding_bag(args["indices"], args["weights"], args["table"], args["offsets"], backend=backend)


def test_bag_backward_checks_grad_out_shape():
    indices, weights, table = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3), torch.zeros(5, 4)
    with pytest.raises(ValueError, match="grad_out"):
        bag_backward(torch.zeros(3, 4), indices, weights, table, None, "torch")


def test_kernels_import_only_torch_triton_and_stdlib():
    """Static check: kernels/ must stay usable without the rest of memray (or numpy, ...)."""
    allowed = {"torch", "triton"} | set(sys.stdlib_module_names)
    for path in KERNELS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{path.name} imports {roots}"


def test_import_without_triton():
    """Triton is imported lazily: the package and its torch backend work when triton is absent."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from memray.kernels import embedding_bag\n"
        "assert sys.modules['triton'] is None\n"
        "out = embedding_bag(torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 3), torch.ones(4, 5))\n"
        "assert out.shape == (2, 5) and bool((out == 3).all())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------------------
# the benchmark scripts' plumbing (tiny shapes; their numbers are not checked here)
# ------------------------------------------------------------------------------------------------

BENCHMARKS = KERNELS_DIR.parent / "benchmarks"


def _load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _last_json_line(text):
    import json

    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.slow
def test_bench_lookup_smoke(tmp_path, capsys):
    bench = _load_script("bench_lookup")
    bench.main(
        [
            "--reps",
            "1",
            "--log2-rows",
            "10",
            "12",
            "--tokens",
            "16",
            "--options-log2-rows",
            "12",
            "--out",
            str(tmp_path),
        ]
    )
    summary = _last_json_line(capsys.readouterr().out)
    assert set(summary["per_N"]) == {"2^10", "2^12"}
    assert summary["per_N"]["2^10"]["step_ms"] > 0 and "step_ratio_2^12_vs_2^10" in summary
    assert (tmp_path / "bench_lookup.csv").read_text().startswith("section,log2_rows,method")
    assert "| N | method | pass |" in (tmp_path / "bench_lookup.md").read_text()
    # the bytes of a step: indices, weights, gathered rows and output, then the backward's traffic
    assert bench.forward_bytes(10, 2) == 10 * 12 + 10 * 256 * 4 + 2 * 256 * 4


def test_gpu_lookup_plumbing_on_cpu(tmp_path, capsys):
    """The GPU script's checks, timings and result files, run with a CPU backend."""
    gpu = _load_script("gpu_lookup")
    assert gpu.TOL == TOL, "gpu_lookup.TOL must mirror tests/tolerances.py"
    backend = "cpp" if cpu_ext.available() else "torch"
    code = gpu.main(["--device", "cpu", "--backend", backend, "--smoke", "--out", str(tmp_path)])
    summary = _last_json_line(capsys.readouterr().out)
    assert code == 0 and summary["checks_passed"] == summary["checks_total"] > 0
    assert {"2^10 x 16 x 16 tok float32", "2^10 x 33 x 16 tok bfloat16"} <= set(summary["shapes"])
    assert "backward_speedup_vs_sparse" in summary["shapes"]["2^10 x 33 x 16 tok bfloat16"]
    assert (tmp_path / "gpu_lookup.csv").exists() and (tmp_path / "gpu_lookup.md").exists()


def test_gpu_lookup_checks_catch_a_wrong_kernel(monkeypatch):
    """The check section fails when a backend computes something else."""
    gpu = _load_script("gpu_lookup")
    real = EB_MODULE._forward_torch
    monkeypatch.setattr(EB_MODULE, "_forward_torch", lambda *a: real(*a) * 1.001)
    rows = gpu.run_checks(K, torch.device("cpu"), "torch", smoke=True)
    assert not any(r["ok"] for r in rows if r["table_dtype"] == "float32" and r["weight_dtype"] == "float32")


def test_gpu_lookup_imports_kernels_from_a_checkout():
    """On a machine without `pip install -e .`, kernels/ is loaded as memray_kernels."""
    code = (
        "import sys; sys.modules['memray'] = None\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "import gpu_lookup\n"
        "K = gpu_lookup.import_kernels()\n"
        "assert K.__name__ == 'memray_kernels', K.__name__\n"
        "import torch\n"
        "out = K.embedding_bag(torch.tensor([[0, 1]]), torch.ones(1, 2), torch.eye(2), backend='torch')\n"
        "assert out.tolist() == [[1.0, 1.0]]\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
