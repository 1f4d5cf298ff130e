"""The memory layer against brute force and against a float64 reference written here."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close

from memray.model import MemoryConfig, ProductKeyMemory, ValueTable, usage_metrics


def make_layer(dim=24, dtype=torch.float32, **overrides):
    config = MemoryConfig(**{"n_keys": 7, "heads": 2, "knn": 5, "k_dim": 10, "qk_norm": False, **overrides})
    layer = ProductKeyMemory(dim, config).to(dtype)
    return layer


@pytest.mark.parametrize(
    "n_keys,knn,heads,qk_norm",
    [(7, 5, 2, False), (13, 1, 3, False), (10, 9, 1, True), (5, 25, 2, False), (6, 17, 2, True), (3, 2, 4, False)],
)
def test_topk_equals_brute_force(n_keys, knn, heads, qk_norm):
    layer = make_layer(
        dtype=torch.float64, n_keys=n_keys, knn=knn, heads=heads, qk_norm=qk_norm, query_layernorm=qk_norm
    )
    x = torch.randn(3, 11, 24, dtype=torch.float64)
    indices, scores = layer.topk(x)
    assert indices.shape == (33, heads, knn) and indices.dtype == torch.int64
    assert scores.dtype == torch.float64
    brute_scores, brute_indices = layer.score_all(x).topk(knn, dim=-1)
    assert torch.equal(indices, brute_indices)
    torch.testing.assert_close(scores, brute_scores, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "rows,n_keys,knn",
    [
        (1, 1, 1),
        (9, 3, 9),
        (40, 7, 5),
        (33, 5, 20),
        (64, 128, 16),
        (8, 300, 32),
        (16, 203, 3),
        (6, 1024, 32),
        (4, 1024, 128),
    ],
)
def test_cpp_selection_equals_brute_force_ties_included(rows, n_keys, knn, dtype):
    """The C++ selection against a stable sort of all n_keys**2 slots: on random scores and on
    scores drawn from three values (ties everywhere: lower key, then lower slot, first)."""
    from memray.kernels import cpu_ext
    from memray.kernels.pk_search import pk_select, pk_select_reference

    if not cpu_ext.available():
        pytest.skip(f"C++ kernels unavailable: {cpu_ext.load_error}")
    torch.manual_seed(rows * n_keys + knn)
    random = torch.randn(rows, 2, n_keys, dtype=dtype)
    # three values: most of a half ties at the top (the selection's sort path); quarters: a few
    # dozen ties near each half's k-th key and among the sums (its counting path)
    for scores in (random, torch.randint(-1, 2, (rows, 2, n_keys)).to(dtype), (random * 4).round() / 4):
        got, want = pk_select(scores, knn), pk_select_reference(scores, knn)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("n_keys,knn", [(6, 5), (1024, 32)])
def test_cpp_selection_ranks_nan_below_every_number(n_keys, knn):
    """NaN ranks as -inf, as in the brute-force order: never chosen while a half has knn numbers
    (both the insertion path and the blocked path of the C++ selection)."""
    from memray.kernels import cpu_ext
    from memray.kernels.pk_search import pk_select, pk_select_reference

    if not cpu_ext.available():
        pytest.skip(f"C++ kernels unavailable: {cpu_ext.load_error}")
    scores = torch.randn(4, 2, n_keys, generator=torch.Generator().manual_seed(n_keys))
    scores[:, 0, 2] = float("nan")
    scores[0, 0, 0] = float("nan")  # first in its half: before the list of best keys is full
    scores[1, 1, : n_keys // 2] = float("nan")
    scores[2, 1, : n_keys - 3] = float("nan")  # three numbers left: fewer than knn in that half
    i, j = pk_select(scores, knn)
    want_i, want_j = pk_select_reference(scores, knn)
    assert torch.equal(i, want_i) and torch.equal(j, want_j)
    assert not (i[:, :] == 2).any() and not (i[0] == 0).any()


@pytest.mark.parametrize("n_keys,knn", [(6, 5), (1024, 32)])
def test_cpp_selection_orders_infinities_as_brute_force(n_keys, knn):
    """Infinite half scores: inf + -inf is NaN, so that slot ranks as -inf, below every finite
    sum, as in the brute-force order; -inf sums tie (slot order decides). (Two +inf sums tie
    whatever their other halves: there the product-key rule, each half's best keys first, is
    not a brute-force sort; see kernels/pk_search.py.)"""
    from memray.kernels import cpu_ext
    from memray.kernels.pk_search import pk_select, pk_select_reference

    if not cpu_ext.available():
        pytest.skip(f"C++ kernels unavailable: {cpu_ext.load_error}")
    inf = float("inf")
    scores = torch.randn(5, 2, n_keys, generator=torch.Generator().manual_seed(n_keys + 1))
    scores[0, 0, 3] = inf
    scores[0, 1, 1:] = -inf  # one finite key in the second half: the inf key's other sums are NaN
    scores[1, :, :] = -inf  # every sum -inf: the lowest slots
    scores[2, 0, 4] = -inf  # one key of a half below every other
    scores[3, 1, 2] = -inf  # a -inf key in each half
    scores[3, 0, 5] = -inf
    i, j = pk_select(scores, knn)
    want_i, want_j = pk_select_reference(scores, knn)
    assert torch.equal(i, want_i) and torch.equal(j, want_j)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tokens,heads,n_keys,half,knn", [(1, 1, 1, 1, 1), (37, 3, 7, 5, 20), (50, 2, 300, 4, 32)])
def test_fused_search_equals_brute_force_and_its_gradients(tokens, heads, n_keys, half, knn, dtype, monkeypatch):
    """pk_search (tiles of a few tokens here, the last one ragged) selects what a stable sort of
    all slots selects, returns those slots' summed half scores, and its sparse backward equals
    autograd through the dense half scores."""
    from memray.kernels import cpu_ext

    module = importlib.import_module("memray.kernels.pk_search")  # the package exports a function of that name
    if not cpu_ext.available():
        pytest.skip(f"C++ kernels unavailable: {cpu_ext.load_error}")
    monkeypatch.setattr(module, "TILE_BYTES", 7 * heads * 2 * n_keys * (4 if dtype == torch.float32 else 8))
    g = torch.Generator().manual_seed(tokens + n_keys)
    q = torch.randn(tokens, heads, 2, half, dtype=dtype, generator=g, requires_grad=True)
    keys = torch.randn(heads, 2, n_keys, half, dtype=dtype, generator=g, requires_grad=True)
    # float64: equal to rounding; float32: torch's default closeness (sums run in another order)
    tol = {"atol": 1e-12, "rtol": 0} if dtype == torch.float64 else {}
    first, second, scores = module.pk_search(q, keys, knn)
    half_scores = torch.einsum("thsd,hsnd->thsn", q, keys)
    want_i, want_j = module.pk_select_reference(half_scores.detach().flatten(0, 1), knn)
    assert torch.equal(first.flatten(0, 1), want_i) and torch.equal(second.flatten(0, 1), want_j)
    want = half_scores[:, :, 0].gather(-1, first) + half_scores[:, :, 1].gather(-1, second)
    torch.testing.assert_close(scores, want, **tol)
    upstream = torch.randn(scores.shape, dtype=dtype, generator=g)
    got = torch.autograd.grad((scores * upstream).sum(), (q, keys))
    expected = torch.autograd.grad((want * upstream).sum(), (q, keys))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **tol)
    # frozen sub-keys: only the query's gradient is computed
    (dq,) = torch.autograd.grad((module.pk_search(q, keys.detach(), knn)[2] * upstream).sum(), (q,))
    torch.testing.assert_close(dq, expected[0], **tol)


@pytest.mark.parametrize(
    "tokens,heads,n_keys,half,knn,dtype",
    [
        (5, 1, 1, 1, 1, torch.float32),
        (21, 1, 7, 5, 20, torch.float32),  # knn > n_keys: every key of a half, k1 = n_keys
        (16, 1, 150, 3, 6, torch.float32),  # two key blocks, the last one ragged
        (9, 2, 12, 8, 4, torch.bfloat16),
    ],
)
def test_triton_search_equals_brute_force_ties_included(tokens, heads, n_keys, half, knn, dtype):
    """The Triton search (interpreted on CPU) on integer-valued queries and keys, whose half
    scores are exact in any summation order and tie everywhere: the slots of a stable sort of
    all n_keys**2 slots (ties: lower key, then lower slot), those slots' summed scores, and the
    sparse backward's gradients equal autograd through the dense half scores."""
    from memray.kernels.pk_search import pk_search, pk_select_reference

    g = torch.Generator().manual_seed(tokens * n_keys + knn)
    q = torch.randint(-2, 3, (tokens, heads, 2, half), generator=g).to(dtype).requires_grad_()
    keys = torch.randint(-2, 3, (heads, 2, n_keys, half), generator=g).to(dtype).requires_grad_()
    q.data[0, 0, 1] = 0.0  # one token's second half all zero: every key of that half ties
    first, second, scores = pk_search(q, keys, knn, backend="triton")
    half_scores = torch.einsum("thsd,hsnd->thsn", q.float(), keys.float())
    want_i, want_j = pk_select_reference(half_scores.detach().flatten(0, 1), knn)
    assert torch.equal(first.flatten(0, 1), want_i) and torch.equal(second.flatten(0, 1), want_j)
    want = half_scores[:, :, 0].gather(-1, first) + half_scores[:, :, 1].gather(-1, second)
    assert scores.dtype == torch.float32 and torch.equal(scores, want.detach())
    upstream = torch.randint(-2, 3, scores.shape, generator=g).float()
    got = torch.autograd.grad((scores * upstream).sum(), (q, keys))
    expected = torch.autograd.grad((want * upstream).sum(), (q, keys))
    for a, b in zip(got, expected):
        assert a.dtype == dtype and torch.equal(a, b.to(dtype))


def test_triton_search_refuses_knn_beyond_its_limit():
    """Beyond MAX_KNN the kernel's per-program rankings would not fit a GPU's shared memory
    (tests/test_aot.py holds the listed launches to it): asked for by name, one clear error."""
    from memray.kernels.pk_search import pk_search
    from memray.kernels.triton_search import MAX_KNN

    q, keys = torch.randn(4, 1, 2, 4), torch.randn(1, 2, 9, 4)
    with pytest.raises(ValueError, match=f"knn <= {MAX_KNN}"):
        pk_search(q, keys, MAX_KNN + 1, backend="triton")


def test_triton_search_ranks_nan_below_every_number():
    from memray.kernels.pk_search import pk_search, pk_select_reference

    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 1, 2, 4, generator=g)
    keys = torch.randn(1, 2, 40, 4, generator=g)
    keys[0, 0, 3] = float("nan")  # every token's score against key 3 of the first half
    keys[0, 1, 0] = float("nan")  # and against the first key of the second half
    first, second, _ = pk_search(q, keys, 8, backend="triton")
    half_scores = torch.einsum("thsd,hsnd->thsn", q, keys)
    want_i, want_j = pk_select_reference(half_scores.flatten(0, 1), 8)
    assert torch.equal(first.flatten(0, 1), want_i) and torch.equal(second.flatten(0, 1), want_j)
    assert not (first == 3).any() and not (second == 0).any()


def layer_run(backend, dtype, qk_norm, seed, heads, tokens, **knobs):
    """A layer's selected slots, scores and every dense gradient (input included) on one batch."""
    torch.manual_seed(seed)
    layer = make_layer(dtype=dtype, n_keys=9, knn=6, heads=heads, qk_norm=qk_norm, backend=backend, **knobs)
    x = torch.randn(tokens, 24, dtype=dtype, generator=torch.Generator().manual_seed(seed + 1), requires_grad=True)
    torch.manual_seed(seed + 2)  # the same query dropout masks for every backend
    rows, scores = layer.topk(x)
    layer(x).square().sum().backward()
    return rows, scores, [x.grad] + [p.grad for p in layer.parameters() if p.grad is not None and not p.grad.is_sparse]


def assert_same_layer_run(a, b, **tolerance):
    (rows_a, scores_a, grads_a), (rows_b, scores_b, grads_b) = a, b
    assert torch.equal(rows_a, rows_b)
    torch.testing.assert_close(scores_a, scores_b, **tolerance)
    assert len(grads_a) == len(grads_b) > 2
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(x, y, **tolerance)


@pytest.mark.parametrize(
    "qk_norm,query_layernorm,query_dropout",
    [(False, False, 0.0), (True, False, 0.0), (False, True, 0.0), (True, True, 0.0), (True, True, 0.1)],
)
def test_layer_selection_and_gradients_equal_the_torch_search(qk_norm, query_layernorm, query_dropout):
    """backend auto (the fused C++ norms and search on CPU) and torch (torch ops, three topk
    calls): the same slots, the same scores, and every gradient (the norms' parameters included)
    equal within 1e-12 (float64); with query dropout between the two norms too (rarely enough
    that no query half is dropped whole: its scores would all tie at 0, and torch's topk breaks
    ties in no fixed order)."""
    knobs = {"query_layernorm": query_layernorm, "query_dropout": query_dropout}
    runs = [
        layer_run(backend, torch.float64, qk_norm, seed=3, heads=3, tokens=26, **knobs) for backend in ("auto", "torch")
    ]
    assert_same_layer_run(*runs, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "outer,groups,inner,d,splits,layernorm,rms",
    [
        (37, 3, 1, 10, 2, True, True),
        (1, 6, 50, 4, 1, False, True),
        (5, 2, 3, 8, 2, True, False),
        (300, 4, 1, 34, 2, True, True),
    ],
)
def test_row_norm_equals_torch_ops_for_any_thread_count(outer, groups, inner, d, splits, layernorm, rms):
    """kernels.row_norm (C++) against the same norms in torch ops, float64, values and the
    gradients of x and of every parameter within 1e-12; bit-identical with 1 and 2 threads (the
    parameter gradients are summed in fixed blocks of rows)."""
    from memray.kernels import cpu_ext
    from memray.kernels.row_norm import row_norm, row_norm_reference

    if not cpu_ext.available():
        pytest.skip(f"C++ kernels unavailable: {cpu_ext.load_error}")
    g = torch.Generator().manual_seed(outer + d)
    x = (torch.randn(outer, groups, inner, d, dtype=torch.float64, generator=g) * 3 + 1).requires_grad_()
    w, b, gain = (torch.randn(groups, d, dtype=torch.float64, generator=g) for _ in range(3))
    params = {"ln_weight": w, "ln_bias": b} if layernorm else {}
    if rms:
        params["gain"] = gain
    for p in params.values():
        p.requires_grad_()
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=g)
    inputs = [x, *params.values()]

    def run(fn):
        out = fn(x, groups, inner, splits, **params, scale=0.37)
        return [out, *torch.autograd.grad((out * upstream).sum(), inputs)]

    want = run(row_norm_reference)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(row_norm)
        torch.set_num_threads(2)
        two = run(row_norm)
    finally:
        torch.set_num_threads(threads)
    assert len(one) == len(want) == len(inputs) + 1
    for got, expected, other in zip(one, want, two):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
        assert torch.equal(got, other)


def test_layer_with_the_triton_search_equals_the_torch_search():
    """backend triton (the Triton search and lookup, interpreted on CPU) against backend torch,
    fp32: the same slots, scores and gradients to fp32 rounding (sums run in another order)."""
    runs = [layer_run(backend, torch.float32, True, seed=5, heads=2, tokens=16) for backend in ("triton", "torch")]
    assert_same_layer_run(*runs)


def test_scores_are_fp32_for_low_precision_layers():
    layer = make_layer(dtype=torch.bfloat16)
    _, scores = layer.topk(torch.randn(4, 24, dtype=torch.bfloat16))
    assert scores.dtype == torch.float32


def test_topk_sees_slots_beyond_per_half_top_when_knn_exceeds_n_keys():
    # knn > n_keys: the per-half candidates are all keys, the search must still be exact
    layer = make_layer(n_keys=4, knn=16, heads=1)
    x = torch.randn(5, 24)
    indices, _ = layer.topk(x)
    assert torch.equal(indices.sort(-1).values, torch.arange(16).expand(5, 1, 16))


def reference_forward(x, p, n_keys, knn, heads, half):
    """Plain float64 memory layer: brute-force scores over all slots, no product-key tricks."""
    tokens = x.reshape(-1, x.shape[-1])
    q = (tokens @ p["query_proj.weight"].T + p["query_proj.bias"]).view(-1, heads, 2, half)
    k = p["keys"]  # [heads, 2, n_keys, half]
    s1 = torch.einsum("thd,hnd->thn", q[:, :, 0], k[:, 0])
    s2 = torch.einsum("thd,hnd->thn", q[:, :, 1], k[:, 1])
    all_scores = (s1[..., :, None] + s2[..., None, :]).reshape(len(tokens), heads, n_keys * n_keys)
    top, slots = all_scores.topk(knn, dim=-1)
    w = torch.softmax(top, dim=-1)
    values = p["value_table.weight"]
    y = torch.zeros(len(tokens), values.shape[1], dtype=x.dtype)
    for t in range(len(tokens)):
        for h in range(heads):
            for i in range(knn):
                y[t] += w[t, h, i] * values[slots[t, h, i]]
    gate = F.silu(tokens @ p["swilu_proj.weight"].T + p["swilu_proj.bias"])
    out = (y * gate) @ p["out_proj.weight"].T + p["out_proj.bias"]
    return out.view(x.shape)


@pytest.mark.parametrize("v_dim", [None, 9])
def test_layer_output_and_gradients_match_float64_reference(v_dim):
    torch.manual_seed(1)
    n_keys, knn, heads, k_dim, dim = 6, 5, 2, 8, 12
    layer = make_layer(dim=dim, dtype=torch.float64, n_keys=n_keys, knn=knn, heads=heads, k_dim=k_dim, v_dim=v_dim)
    layer.values.sparse_grad = True
    x = torch.randn(2, 7, dim, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    x_ref = x.detach().clone().requires_grad_(True)
    ref = reference_forward(x_ref, params, n_keys, knn, heads, k_dim // 2)
    ref.backward(grad_out)

    assert_close(out, ref)
    assert_close(x.grad, x_ref.grad)
    checked = [
        "keys",
        "query_proj.weight",
        "query_proj.bias",
        "value_table.weight",
        "swilu_proj.weight",
        "swilu_proj.bias",
        "out_proj.weight",
        "out_proj.bias",
    ]
    for name, p in layer.named_parameters():
        grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
        assert_close(grad, params[name].grad, msg=f"gradient of {name}")
    assert layer.values.weight.grad.is_sparse  # the value gradient stays row-sparse
    assert set(checked) <= {n for n, _ in layer.named_parameters()}


def test_every_knob_runs_forward_and_backward():
    layer = make_layer(
        qk_norm=True,
        query_layernorm=True,
        gate=True,
        swilu=True,
        input_dropout=0.1,
        query_dropout=0.1,
        value_dropout=0.1,
        query_bias=False,
        v_dim=16,
    )
    x = torch.randn(4, 24, requires_grad=True)
    layer(x).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
    assert layer.query_proj.bias is None


def test_plain_memory_without_swilu_returns_the_bag():
    layer = make_layer(swilu=False)
    x = torch.randn(5, 24)
    indices, scores = layer.topk(x)
    weights = torch.softmax(scores, -1).reshape(5, -1)
    expected = (layer.values.weight[indices.reshape(5, -1)] * weights[..., None]).sum(1)
    assert_close(layer(x), expected)


def test_shared_pool_accumulates_and_separate_pools_stay_apart():
    config = MemoryConfig(n_keys=5, heads=1, knn=3, k_dim=6, track_usage=True)
    shared = ValueTable(config.num_slots, 8)
    other = ValueTable(config.num_slots, 8)
    a, b = ProductKeyMemory(8, config, values=shared), ProductKeyMemory(8, config, values=shared)
    c = ProductKeyMemory(8, config, values=other)
    assert a.values is b.values is shared and "value_table.weight" not in dict(a.named_parameters())
    x = torch.randn(6, 8)
    (a(x).sum() + b(x).sum()).backward()
    grad_shared = shared.weight.grad.to_dense()
    assert other.weight.grad is None
    # one table received both layers' gradients: equal to the sum of each layer alone
    shared.weight.grad = None
    a(x).sum().backward()
    ga = shared.weight.grad.to_dense()
    shared.weight.grad = None
    b(x).sum().backward()
    assert_close(grad_shared, ga + shared.weight.grad.to_dense())
    assert int(shared.usage_count.sum()) == 4 * 6 * 3  # four forwards of 6 tokens x 3 slots
    c(x).sum().backward()
    assert other.weight.grad is not None and int(other.usage_count.sum()) == 6 * 3
    with pytest.raises(ValueError):
        ProductKeyMemory(8, MemoryConfig(n_keys=4, heads=1, knn=3, k_dim=6), values=shared)


def test_usage_metrics():
    uniform = usage_metrics(torch.ones(100, dtype=torch.long), torch.ones(100))
    assert uniform["used"] == 1.0 and abs(uniform["kl_uniform"]) < 1e-12 and abs(uniform["gini"]) < 1e-12
    assert uniform["top50"] == 0.5 and uniform["top90"] == 0.9 and uniform["top99"] == 0.99
    one = torch.zeros(100)
    one[7] = 3.0
    peaked = usage_metrics((one > 0).long(), one)
    assert peaked["used"] == 0.01 and abs(peaked["kl_uniform"] - math.log(100)) < 1e-9
    assert abs(peaked["gini"] - 0.99) < 1e-9 and peaked["top99"] == 0.01
    mass = torch.tensor([5.0, 3.0, 1.0, 1.0])
    m = usage_metrics(torch.ones(4, dtype=torch.long), mass)
    assert m["top50"] == 0.25 and m["top90"] == 0.75 and m["top99"] == 1.0


def test_usage_window_gives_the_whole_table_metrics_from_the_rows_read():
    """A window folded many times over (fold_every 7 entries) and read once: the metrics of the
    rows read equal usage_metrics over the whole table's counts and mass."""
    from memray.model import UsageWindow, touched_usage_metrics

    g = torch.Generator().manual_seed(3)
    window, counts = UsageWindow(fold_every=7), torch.zeros(500, dtype=torch.long)
    mass = torch.zeros(500, dtype=torch.float64)
    for _ in range(20):
        rows = torch.randint(0, 100, (5,), generator=g) * 3
        weights = torch.rand(5, generator=g) * (torch.rand(5, generator=g) > 0.3)
        window.add(rows, weights)
        counts.index_add_(0, rows, torch.ones_like(rows))
        mass.index_add_(0, rows, weights.double())
    read, read_mass = window.take()
    assert torch.equal(read, torch.unique(torch.nonzero(counts).flatten()))
    got, want = touched_usage_metrics(read_mass, 500), usage_metrics(counts, mass)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
    assert window.take()[0].numel() == 0  # a new window
