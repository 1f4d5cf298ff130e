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
    table.grad = torch.sparse_coo_tensor(
        torch.tensor([[4, 4]]), torch.tensor([[1.0, 0.0], [3.0, 0.0]]), (10, 2), check_invariants=True
    )
    norm = clip_grads([dense, table], max_norm=1.0)
    assert math.isclose(norm, 5.0, rel_tol=1e-6)  # sqrt(3^2 + (1 + 3)^2)
    assert math.isclose(float(dense.grad[0]), 3.0 / 5.0, rel_tol=1e-5)
    torch.testing.assert_close(table.grad.to_dense()[4], torch.tensor([0.8, 0.0]), rtol=1e-5, atol=1e-6)
    assert clip_grads([dense], max_norm=None) > 0  # no clipping: norm only


# --------------------------------------------------------------------------------------------
# Row-sparse value optimizers against float64 references of the same rules
# --------------------------------------------------------------------------------------------

import io  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
from helpers import device_params  # noqa: E402

from memray.errors import ConfigError  # noqa: E402
from memray.model import ValueTable  # noqa: E402
from memray.optim import (  # noqa: E402
    VALUE_OPTIMIZERS,
    LazyAdam,
    LazyAdamW,
    OptimConfig,
    RowSparseSGD,
    RowWiseAdagrad,
    build_value_optimizer,
)

NUM_ROWS, DIM = 53, 37  # awkward sizes: neither is a power of two
LR, EPS, BETAS = 1e-2, 1e-3, (0.9, 0.99)  # eps large enough that misplacing it shows
# fp32 implementation against the float64 reference: tighter than the shared fp32 table
# (1e-5); a whole multi-step trajectory must stay within it.
STEP_TOL = dict(atol=1e-6, rtol=1e-6)
# Where a value is rounded to bf16, fp32 arithmetic (implementation) and fp64 arithmetic
# (reference) give the same bf16 number unless the exact value lies within their difference
# (~1e-7 relative for these few operations) of a rounding midpoint; then the two neighbours
# of the midpoint are both correct roundings.
MIDPOINT_RTOL = 1e-6

MOMENTS = ("exp_avg", "exp_avg_sq")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: extra threads only add synchronisation, which costs seconds when
    the machine's other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_optimizer(kind, params, weight_decay, state_dtype="fp32"):
    fused = not kind.endswith("_unfused")  # the fused C++ row update, or the torch-op rule
    kind = kind.removesuffix("_unfused")
    if kind == "sgd":
        return RowSparseSGD(params, lr=LR, weight_decay=weight_decay, fused=fused)
    if kind == "rowwise_adagrad":
        return RowWiseAdagrad(params, lr=LR, eps=EPS, weight_decay=weight_decay, fused=fused)
    cls = LazyAdamW if kind == "lazy_adamw" else LazyAdam
    return cls(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, state_dtype=state_dtype, fused=fused)


class Reference:
    """The update rules in float64, one touched row at a time, over dense state."""

    def __init__(self, kind, table, weight_decay):
        self.kind, self.wd = kind.removesuffix("_unfused"), weight_decay
        self.weight = table.detach().cpu().double().clone()
        self.sum_sq = torch.zeros(NUM_ROWS, dtype=torch.float64)
        self.exp_avg = torch.zeros(NUM_ROWS, DIM, dtype=torch.float64)
        self.exp_avg_sq = torch.zeros(NUM_ROWS, DIM, dtype=torch.float64)
        self.row_step = torch.zeros(NUM_ROWS, dtype=torch.int64)

    def sync(self, table, state):
        """Start the next step from the implementation's stored (possibly bf16-rounded) values."""
        self.weight = table.detach().cpu().double().clone()
        for name, value in state.items():
            value = value.cpu()
            setattr(self, name, value.double().clone() if value.is_floating_point() else value.long().clone())

    def step(self, grad) -> list[int]:
        rows = grad._indices()[0].tolist()
        values = grad._values().cpu().double()
        dense = torch.zeros(NUM_ROWS, DIM, dtype=torch.float64)
        for k, r in enumerate(rows):  # duplicates add up
            dense[r] += values[k]
        touched = sorted(set(rows))
        for r in touched:
            self._row(r, dense[r])
        return touched

    def _row(self, r, g):
        w, wd = self.weight[r].clone(), self.wd
        if self.kind == "sgd":
            self.weight[r] = w - LR * (g + wd * w)
        elif self.kind == "rowwise_adagrad":
            g = g + wd * w
            self.sum_sq[r] += (g * g).mean()
            self.weight[r] = w - LR * g / (self.sum_sq[r].sqrt() + EPS)
        else:
            if self.kind == "lazy_adamw":
                w = w * (1 - LR * wd)
            else:
                g = g + wd * w
            self.row_step[r] += 1
            t = int(self.row_step[r])
            b1, b2 = BETAS
            self.exp_avg[r] = b1 * self.exp_avg[r] + (1 - b1) * g
            self.exp_avg_sq[r] = b2 * self.exp_avg_sq[r] + (1 - b2) * g * g
            m_hat = self.exp_avg[r] / (1 - b1**t)
            v_hat = self.exp_avg_sq[r] / (1 - b2**t)
            self.weight[r] = w - LR * m_hat / (v_hat.sqrt() + EPS)


def assert_rounds_to(actual, exact, what):
    """``actual`` (bf16) is ``exact`` (float64) rounded to nearest, up to midpoint ambiguity."""
    assert actual.dtype == torch.bfloat16, what
    expected = exact.float().to(torch.bfloat16)
    differ = actual != expected
    if differ.any():
        a, e, x = actual[differ].double(), expected[differ].double(), exact[differ]
        midpoint = (a + e) / 2
        ok = (x - midpoint).abs() <= MIDPOINT_RTOL * x.abs()
        assert ok.all(), f"{what}: {int((~ok).sum())} values not rounded to nearest, e.g. {a[~ok][:3]} vs {x[~ok][:3]}"


def assert_matches(actual, exact, what):
    if actual.dtype == torch.bfloat16:
        assert_rounds_to(actual, exact, what)
    else:
        torch.testing.assert_close(actual.double(), exact, **STEP_TOL, msg=lambda m: f"{what}: {m}")


def random_gradient(step, dtype, generator):
    """Gradients that cover the cases a pool's step sees, by step number."""
    kind = ["duplicates", "coalesced", "empty", "duplicates", "zero_row", "coalesced", "duplicates"][step]
    if kind == "empty":
        return torch.sparse_coo_tensor(
            torch.zeros(1, 0, dtype=torch.int64),
            torch.zeros(0, DIM, dtype=dtype),
            (NUM_ROWS, DIM),
            check_invariants=True,
        )
    num_entries = int(torch.randint(8, 30, (), generator=generator))
    rows = torch.randint(0, NUM_ROWS - 5, (num_entries,), generator=generator)  # the last 5 rows: never read
    values = torch.randn(num_entries, DIM, generator=generator).to(dtype)
    if kind == "zero_row":  # a row read with a zero gradient is still a touched row
        rows[0], values[0] = NUM_ROWS - 6, 0.0
        rows[1:] = torch.where(rows[1:] == NUM_ROWS - 6, 0, rows[1:])
    grad = torch.sparse_coo_tensor(
        rows[None], values, (NUM_ROWS, DIM), check_invariants=True
    )  # uncoalesced: several layers
    return grad.coalesce() if kind == "coalesced" else grad


# the torch-op rules beside the fused CPU kernels: (optimizer, table dtype, state dtype)
UNFUSED_CASES = [
    ("sgd_unfused", torch.float32, "fp32"),
    ("sgd_unfused", torch.bfloat16, "fp32"),
    ("lazy_adam_unfused", torch.float32, "fp32"),
    ("lazy_adam_unfused", torch.bfloat16, "bf16"),
    ("lazy_adamw_unfused", torch.float32, "bf16"),
    ("lazy_adamw_unfused", torch.bfloat16, "fp32"),
]

CASES = [  # (optimizer, table dtype, state dtype)
    ("sgd", torch.float32, "fp32"),
    ("sgd", torch.bfloat16, "fp32"),
    ("rowwise_adagrad", torch.float32, "fp32"),
    ("rowwise_adagrad", torch.bfloat16, "fp32"),
    ("rowwise_adagrad_unfused", torch.float32, "fp32"),  # the torch-op path beside the fused kernel
    ("rowwise_adagrad_unfused", torch.bfloat16, "fp32"),
    ("lazy_adam", torch.float32, "fp32"),
    ("lazy_adam", torch.float32, "bf16"),
    ("lazy_adam", torch.bfloat16, "bf16"),
    ("lazy_adamw", torch.float32, "fp32"),
    ("lazy_adamw", torch.float32, "bf16"),
    ("lazy_adamw", torch.bfloat16, "fp32"),
] + UNFUSED_CASES


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("kind,table_dtype,state_dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_row_sparse_optimizer_matches_float64_reference(kind, table_dtype, state_dtype, weight_decay, device):
    base = kind.removesuffix("_unfused")
    generator = torch.Generator().manual_seed(1)
    initial = (torch.randn(NUM_ROWS, DIM, generator=generator) * 0.5).to(table_dtype)
    table = torch.nn.Parameter(initial.to(device))
    opt = make_optimizer(kind, [table], weight_decay, state_dtype)
    reference = Reference(kind, table, weight_decay)
    # With bf16 anywhere the reference restarts each step from the stored values: a legitimate
    # midpoint tie would otherwise send the two trajectories one bf16 step apart for good.
    # All-fp32 runs are one independent trajectory.
    resync = table_dtype == torch.bfloat16 or state_dtype == "bf16"
    ever_touched = set()
    for step in range(7):
        state = opt.state[table]
        if resync:
            reference.sync(table, state)
        before = {"weight": table.detach().cpu().clone(), **{k: v.cpu().clone() for k, v in state.items()}}
        table.grad = random_gradient(step, table_dtype, generator).to(device)
        opt.step()
        touched = reference.step(table.grad)
        ever_touched |= set(touched)
        state = opt.state[table]
        assert set(state) == {"sgd": set(), "rowwise_adagrad": {"sum_sq"}}.get(base, {*MOMENTS, "row_step"})
        assert all(value.device == table.device for value in state.values())
        state = {k: v.cpu() for k, v in state.items()}
        untouched = torch.ones(NUM_ROWS, dtype=torch.bool)
        untouched[touched] = False

        # untouched rows and their state: bit for bit what they were (zeros for fresh state)
        after = {"weight": table.detach().cpu(), **state}
        for name, value in after.items():
            old = before.get(name, torch.zeros_like(value))
            assert torch.equal(value[untouched], old[untouched]), f"step {step}: untouched rows of {name} changed"
        if not touched:
            continue
        # touched rows: the reference rule
        assert_matches(after["weight"][touched], reference.weight[touched], f"step {step} weight")
        if base == "rowwise_adagrad":
            assert state["sum_sq"].dtype == torch.float32
            assert_matches(state["sum_sq"][touched], reference.sum_sq[touched], f"step {step} sum_sq")
        if base.startswith("lazy"):
            assert state["row_step"].dtype == torch.int32
            assert torch.equal(state["row_step"].long(), reference.row_step), f"step {step} row_step"
            for name in MOMENTS:
                assert state[name].dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[state_dtype]
                assert_matches(state[name][touched], getattr(reference, name)[touched], f"step {step} {name}")
        pushed = table.grad.coalesce().to_dense().ne(0).any(-1).cpu()  # rows with a non-zero summed gradient
        moved = (after["weight"] != before["weight"]).any(-1)
        assert moved[pushed].float().mean() > 0.9, "rows with a gradient should move"
    assert len(ever_touched) < NUM_ROWS - 4


def test_lazy_adam_corrects_bias_per_row():
    """A row first read at step 3 gets a first-step update (lr * sign(g)), not a damped one."""
    table = torch.nn.Parameter(torch.zeros(4, 2))
    opt = LazyAdam([table], lr=0.1, betas=(0.9, 0.999), eps=1e-12)
    for row in (0, 0, 3):
        table.grad = torch.sparse_coo_tensor(
            torch.tensor([[row]]), torch.tensor([[2.0, -0.5]]), (4, 2), check_invariants=True
        )
        opt.step()
    torch.testing.assert_close(table.detach()[3], torch.tensor([-0.1, 0.1]))
    assert opt.state[table]["row_step"].tolist() == [2, 0, 0, 1]


def test_dense_gradient_is_refused_and_missing_gradient_skipped():
    a, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(5, 3))
    opt = RowWiseAdagrad([a, b])
    b_before = b.detach().clone()
    a.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 3), (5, 3), check_invariants=True)
    opt.step()  # b has no gradient: left alone
    assert torch.equal(b.detach(), b_before) and b not in opt.state
    a.grad = torch.ones(5, 3)
    with pytest.raises(RuntimeError, match="row-sparse gradient"):
        opt.step()
    opt.zero_grad()
    assert a.grad is None


def serialised(state_dict):
    """A state dict after a trip through bytes, loaded without arbitrary unpickling."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    "kind,table_dtype,state_dtype",
    [
        ("sgd", torch.float32, "fp32"),
        ("rowwise_adagrad", torch.bfloat16, "fp32"),  # fp32 accumulators on a bf16 table
        ("lazy_adam", torch.float32, "bf16"),  # bf16 moments on an fp32 table
        ("lazy_adamw", torch.bfloat16, "fp32"),
    ]
    + UNFUSED_CASES,
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_state_dict_round_trip_continues_identically(kind, table_dtype, state_dtype):
    generator = torch.Generator().manual_seed(2)
    grads = [random_gradient(step, table_dtype, generator) for step in range(7)]
    tables = [
        torch.nn.Parameter((torch.randn(NUM_ROWS, DIM, generator=generator) * 0.5).to(table_dtype)) for _ in range(2)
    ]
    opt = make_optimizer(kind, [{"params": [tables[0]]}, {"params": [tables[1]], "lr": LR / 3}], 0.1, state_dtype)
    for grad in grads[:4]:
        for t in tables:
            t.grad = grad
        opt.step()
    saved = serialised(opt.state_dict())
    saved_tables = [t.detach().clone() for t in tables]

    for state in saved["state"].values():
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    json.dumps(saved["param_groups"])  # groups: numbers, bools and strings only

    resumed_tables = [torch.nn.Parameter(t.clone()) for t in saved_tables]
    resumed = make_optimizer(kind, [{"params": [resumed_tables[0]]}, {"params": [resumed_tables[1]]}], 0.0, state_dtype)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[1]["lr"] == LR / 3 and resumed.param_groups[0]["weight_decay"] == 0.1
    for grad in grads[4:]:
        for t in (*tables, *resumed_tables):
            t.grad = grad
        opt.step()
        resumed.step()
    for t, r in zip(tables, resumed_tables):
        assert torch.equal(t, r)
        assert opt.state[t].keys() == resumed.state[r].keys()
        for name, value in opt.state[t].items():
            assert resumed.state[r][name].dtype == value.dtype, name  # not cast to the table's dtype
            assert torch.equal(resumed.state[r][name], value), name


def test_build_value_optimizer_maps_names_and_pools():
    pools = [ValueTable(40, 8, lr=None, weight_decay=0.0), ValueTable(40, 8, lr=2e-3, weight_decay=0.05)]
    expected = {
        "adamw": torch.optim.AdamW,
        "sparse_adam": torch.optim.SparseAdam,
        "adagrad": torch.optim.Adagrad,
        "rowwise_adagrad": RowWiseAdagrad,
        "lazy_adam": LazyAdam,
        "lazy_adamw": LazyAdamW,
        "sgd": RowSparseSGD,
    }
    assert set(expected) == set(VALUE_OPTIMIZERS)
    for name, cls in expected.items():
        config = OptimConfig(value_optimizer=name, lr=5e-3, value_eps=1e-7 if name != "adamw" else None)
        opt = build_value_optimizer(config, pools)
        assert type(opt) is cls, name
        assert [g["lr"] for g in opt.param_groups] == [5e-3, 2e-3]
        if name not in ("sparse_adam", "adagrad"):
            assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05], name
        if name != "sgd":
            assert opt.param_groups[0]["eps"] == (1e-8 if name == "adamw" else 1e-7), name
    lazy = build_value_optimizer(OptimConfig(value_optimizer="lazy_adamw", value_state_dtype="bf16"), pools)
    assert lazy.param_groups[0]["state_dtype"] == "bf16" and lazy.param_groups[0]["decoupled"]
    assert build_value_optimizer(OptimConfig(), []) is None


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["optim.value_state_dtype=fp16"], "optim.value_state_dtype"),
        (["optim.value_optimizer=sparse_adam", "optim.value_state_dtype=bf16"], "optim.value_state_dtype"),
        (["optim.value_optimizer=rowwise_adagrad", "optim.value_state_dtype=bf16"], "optim.value_state_dtype"),
        (["optim.value_eps=0"], "optim.value_eps"),
        (["optim.value_eps=-1e-8"], "optim.value_eps"),
        (["optim.value_optimizer=lazy_sgd"], "optim.value_optimizer"),
    ],
)
def test_value_optimizer_config_errors_name_the_key(overrides, key):
    from memray.train import load_run_config

    with pytest.raises(ConfigError) as info:
        load_run_config("tiny", overrides)
    assert info.value.key == key
    assert f"'{key}'" in str(info.value)


def test_value_optimizer_config_direct_construction_is_checked():
    for kwargs, key in (
        ({"value_optimizer": "lion"}, "value_optimizer"),
        ({"value_state_dtype": "fp16"}, "value_state_dtype"),
    ):
        with pytest.raises(ConfigError) as info:
            OptimConfig(**kwargs)
        assert info.value.key == key
    config = OptimConfig(value_optimizer="lazy_adam", value_state_dtype="bf16", value_eps=1e-6)
    assert config.sparse_values and config.value_eps == 1e-6


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_fused_rowwise_adagrad_serves_cpu_tables(table_dtype):
    """The fused kernel is what runs on CPU (the reference test above then checks its rule)."""
    from memray.kernels import cpu_ext, rowwise_adagrad_

    assert cpu_ext.available(), cpu_ext.load_error
    table = torch.randn(6, 5).to(table_dtype)
    sum_sq = torch.zeros(6)
    before = table.clone()
    assert rowwise_adagrad_(table, sum_sq, torch.tensor([1, 4]), torch.ones(2, 5), lr=0.1, eps=1e-8)
    assert torch.equal(table[[0, 2, 3, 5]], before[[0, 2, 3, 5]])
    assert sum_sq.tolist() == [0, 1, 0, 0, 1, 0]
    with pytest.raises(RuntimeError, match="strictly increasing"):
        rowwise_adagrad_(table, sum_sq, torch.tensor([4, 1]), torch.ones(2, 5), lr=0.1, eps=1e-8)
    with pytest.raises(IndexError):
        rowwise_adagrad_(table, sum_sq, torch.tensor([1, 6]), torch.ones(2, 5), lr=0.1, eps=1e-8)


def test_bench_value_step_smoke(tmp_path, capsys):
    """The benchmark's plumbing at a toy size: every method steps, files and key figures appear."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_value_step.py"
    spec = importlib.util.spec_from_file_location("bench_value_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    summary = bench.main(
        [
            "--log2-rows",
            "12",
            "--reps",
            "1",
            "--out",
            str(tmp_path),
            "--methods",
            "torch_sparse_adam",
            "memray_rowwise_adagrad",
            "memray_lazy_adamw",
        ]
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(summary))
    csv_text = (tmp_path / "bench_value_step.csv").read_text()
    assert csv_text.startswith("log2_rows,method,ms") and "copy_floor" in csv_text
    assert summary["rowwise_adagrad_ms"]["2^12"] > 0
    assert summary["rowwise_adagrad_in_backward_ms"]["2^12"] > 0 and "copy_floor_in_backward" in csv_text


def test_fused_lazy_adam_and_sgd_serve_cpu_tables():
    from memray.kernels import lazy_adam_, sgd_

    table, rows, grads = torch.zeros(5, 3), torch.tensor([0, 3]), torch.ones(2, 3)
    moments = [torch.zeros(5, 3, dtype=torch.bfloat16) for _ in range(2)]
    row_step = torch.zeros(5, dtype=torch.int32)
    assert lazy_adam_(table, *moments, row_step, rows, grads, lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    assert row_step.tolist() == [1, 0, 0, 1, 0]
    # a first Adam step moves each coordinate by lr * sign(g)
    torch.testing.assert_close(table[[0, 3]], torch.full((2, 3), -0.1))
    assert sgd_(table, rows, grads, lr=0.5)
    torch.testing.assert_close(table[[0, 3]], torch.full((2, 3), -0.6))
    assert not table[[1, 2, 4]].any()


# -- the update in the lookup's backward ----------------------------------------------------------

IN_BACKWARD_CASES = [  # (optimizer, state dtype, weight decay)
    ("rowwise_adagrad", "fp32", 0.0),
    ("rowwise_adagrad", "fp32", 0.3),
    ("lazy_adam", "fp32", 0.3),
    ("lazy_adam", "bf16", 0.0),
    ("lazy_adamw", "fp32", 0.3),
    ("sgd", "fp32", 0.3),
    ("rowwise_adagrad_unfused", "fp32", 0.3),  # the torch-op rule, applied by the backward
]


def lookup_batches(steps, generator, bags=11, bag_len=5):
    """(indices, weights, upstream gradient) per step; bags repeat rows, the last rows are never read."""
    for _ in range(steps):
        indices = torch.randint(0, NUM_ROWS - 5, (bags, bag_len), generator=generator)
        yield indices, torch.randn(bags, bag_len, generator=generator), torch.randn(bags, DIM, generator=generator)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("kind,state_dtype,weight_decay", IN_BACKWARD_CASES, ids=str)
def test_update_in_backward_equals_the_step_after_it(kind, state_dtype, weight_decay, backend):
    """fp32 table: the same rule, the same bits, whether the backward or step() applies it; the
    weights' gradient reads the rows as they were before the update."""
    from memray.kernels import embedding_bag

    generator = torch.Generator().manual_seed(3)
    initial = torch.randn(NUM_ROWS, DIM, generator=generator)
    stepped, fused = (torch.nn.Parameter(initial.clone()) for _ in range(2))
    by_step = make_optimizer(kind, [stepped], weight_decay, state_dtype)
    in_backward = make_optimizer(kind, [fused], weight_decay, state_dtype)
    update = in_backward.update_in_backward(fused)
    for indices, weights, upstream in lookup_batches(4, generator):
        w1, w2 = (weights.clone().requires_grad_() for _ in range(2))
        embedding_bag(indices, w1, stepped, backend=backend).backward(upstream)
        norm = clip_grads([stepped], None)
        by_step.step()
        by_step.zero_grad(set_to_none=True)
        embedding_bag(indices, w2, fused, backend=backend, row_update=update).backward(upstream)
        assert fused.grad is None
        in_backward.step()  # skips the table: nothing to apply twice
        assert torch.equal(w1.grad, w2.grad)
        assert torch.equal(stepped, fused)
        measured, lookups = update.take_norm()
        assert lookups == 1 and measured == pytest.approx(norm, rel=1e-6)
    for name, value in by_step.state[stepped].items():
        assert torch.equal(value, in_backward.state[fused][name]), name
    # rows never read, and their state, are untouched
    assert torch.equal(fused[-5:], initial[-5:])
    assert all(not value[-5:].any() for value in in_backward.state[fused].values())


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "lazy_adam", "sgd"])
def test_update_in_backward_of_a_bf16_table_uses_the_unrounded_row_gradient(kind):
    """bf16 table: the backward hands its fp32 row gradients to the rule unrounded (a step would
    first round them to the table's dtype): equal to the rule applied to fp32 gradients."""
    from memray.kernels import bag_backward, embedding_bag

    generator = torch.Generator().manual_seed(4)
    initial = torch.randn(NUM_ROWS, DIM, generator=generator).to(torch.bfloat16)
    reference, fused = (torch.nn.Parameter(initial.clone()) for _ in range(2))
    by_rule = make_optimizer(kind, [reference], 0.1)
    in_backward = make_optimizer(kind, [fused], 0.1)
    update = in_backward.update_in_backward(fused)
    for indices, weights, upstream in lookup_batches(3, generator):
        embedding_bag(indices, weights, fused, row_update=update).backward(upstream)
        # the row gradient does not depend on the table: take it at fp32
        _, rows, row_grads = bag_backward(upstream, indices, weights, reference.detach().float(), None)
        state = by_rule.state[reference]
        if not state:
            by_rule._init_state(by_rule.param_groups[0], reference, state)
        by_rule._step_rows(by_rule.param_groups[0], reference, state, rows, row_grads)
        assert torch.equal(reference, fused)


def test_update_in_backward_refusals():
    from memray.kernels import embedding_bag

    table = torch.nn.Parameter(torch.randn(NUM_ROWS, DIM))
    optimizer = RowWiseAdagrad([table])
    with pytest.raises(ValueError, match="not a parameter"):
        optimizer.update_in_backward(torch.nn.Parameter(torch.randn(3, 4)))
    sliced = RowWiseAdagrad([{"params": [table], "row_dim": 2 * DIM}], all_reduce=lambda x: x)
    with pytest.raises(ValueError, match="other slices"):
        sliced.update_in_backward(table)
    # another lookup of the table in the same backward: a lookup whose backward runs after the
    # update would read changed rows, and a gradient left for step() would be a second update
    update = optimizer.update_in_backward(table)
    indices, weights = torch.tensor([[1, 2]]), torch.ones(1, 2, requires_grad=True)
    plain = embedding_bag(indices, weights, table)
    updating = embedding_bag(indices, weights, table, row_update=update)  # its backward runs first
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (plain + updating).sum().backward()
    updating = embedding_bag(indices, weights, table, row_update=update)
    plain = embedding_bag(indices, weights, table)  # its backward runs first
    (plain + updating).sum().backward()
    with pytest.raises(RuntimeError, match="updates in its lookup's backward"):
        optimizer.step()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.value_update=backward"], "value_grad_clip: null"),
        (["optim.value_update=backward", "optim.value_grad_clip=null", "optim.value_optimizer=adamw"], "row-sparse"),
        (["optim.value_update=later"], "is not one of"),
        (
            [
                "optim.value_update=backward",
                "optim.value_grad_clip=null",
                "model.memory_layers=[0,1]",
                "model.memory_pools={shared: [0, 1]}",
            ],
            "pool 'shared' is read by blocks [0, 1]",
        ),
    ],
)
def test_value_update_in_backward_config_errors(overrides, message):
    from memray.train import load_run_config

    with pytest.raises(ConfigError) as info:
        load_run_config("tiny", overrides)
    assert info.value.key == "optim.value_update" and message in str(info.value)
    config = load_run_config("tiny", ["optim.value_update=backward", "optim.value_grad_clip=null"])
    config.distributed.workers = 2
    with pytest.raises(ConfigError, match="one process"):
        config.check_world()


@pytest.mark.parametrize("name", VALUE_OPTIMIZERS)
def test_each_value_optimizer_names_the_state_it_keeps_per_row(name):
    """Checkpoints save and reshard a value optimizer's per-row state with the rows
    (``row_state_keys``, from the optimizer, not guessed from shapes): after a step, exactly the
    entries with a row per table row are named, every other entry is a scalar."""
    from memray.optim import row_state_keys

    config = OptimConfig(value_optimizer=name)
    table = ValueTable(10, 10, sparse_grad=config.sparse_values)
    optimizer = build_value_optimizer(config, [table])
    table(torch.tensor([[1, 3], [3, 7]]), torch.rand(2, 2)).sum().backward()
    optimizer.step()
    state = optimizer.state[table.weight]
    assert state or name == "sgd"
    keys = row_state_keys(optimizer)
    for key, value in state.items():
        per_row = torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == table.num_rows
        assert (key in keys) == per_row, key
        assert per_row or not torch.is_tensor(value) or value.numel() == 1, key  # a step count
