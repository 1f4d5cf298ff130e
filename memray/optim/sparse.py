"""Row-sparse optimizers for value pools: a step costs O(rows touched), never O(table).

A value pool's gradient is a sparse COO tensor over the rows a batch read (``indices`` [1, U],
``values`` [U, D]). It may be uncoalesced when several layers read one pool; duplicates are
summed here in fp32, so a bf16 pool's gradient is not rounded a second time. Each step then
gathers the touched rows of the table and of the state once, computes in fp32, and writes them
back with ``index_copy_`` (bf16 tables and bf16 moments are rounded to nearest); where a rule
does not need a row's old value (an fp32 table without weight decay) the update is added with
``index_add_`` instead of gathering the row. Rows the batch did not read, and their state, are
never written.

Rules (for a touched row r with fp32 gradient g, after duplicates are summed):

* ``RowSparseSGD``: ``w_r -= lr * (g + wd * w_r)``.
* ``RowWiseAdagrad`` (FBGEMM / TorchRec "exact row-wise Adagrad"): one fp32 accumulator per row,
  ``G[r] += mean((g + wd * w_r)**2)``, ``w_r -= lr * (g + wd * w_r) / (sqrt(G[r]) + eps)``.
* ``LazyAdam`` / ``LazyAdamW``: Adam moments updated only on touched rows. Bias correction uses
  a per-row step count (``row_step`` [N] int32: how many steps have updated that row), so a row
  read for the first time at global step 10,000 is corrected as a first step, not as a
  10,000th one (``torch.optim.SparseAdam`` uses the global step, which leaves rarely read rows
  with almost uncorrected, zero-biased moments). ``LazyAdam`` adds L2 weight decay to the
  gradient; ``LazyAdamW`` decays the row itself, ``w_r *= 1 - lr * wd``, before the Adam update
  (as ``torch.optim.AdamW``). Moments may be stored in bf16 (``state_dtype="bf16"``); the update
  uses the fp32 moments computed this step and only the stored copy is rounded.

Weight decay is applied to touched rows only: a row's decay is tied to how often it is read,
as in the other lazy updates, because decaying every row every step would cost O(table).

State is plain tensors (``sum_sq`` [N] fp32; ``exp_avg``/``exp_avg_sq`` [N, D]; ``row_step``
[N] int32) and parameter groups hold numbers, bools and strings, so a state dict can be stored
without pickle. ``_step_rows`` is the one place each rule touches the table (a fused C++ kernel
per rule on CPU, torch ops elsewhere).

Update in backward: ``update_in_backward(table)`` hands a table's updates to its lookup's
backward (:func:`memray.kernels.embedding_bag`'s ``row_update``), which applies the same rule to
each row as soon as that row's gradient is summed: on CPU each touched row is then read and
written once per step instead of twice, and no [U, D] gradient is stored. ``step()`` skips such
a table (its gradient stays ``None``). The rule sees each lookup's gradient as it comes, so it
needs one lookup of the table per step and no clipping of the gradient first.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from itertools import chain

import torch

from memray.kernels import BackwardRowUpdate, empty_huge_pages, lazy_adam_, rowwise_adagrad_, sgd_

STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class _Workspace:
    """Scratch blocks for the [U, D] rows of one step, kept between steps.

    A fresh CPU block of a few hundred MB is page-faulted in on every first touch, which costs
    about as much as an arithmetic pass over it; the blocks are therefore reused (they grow with
    the largest U seen). They are not optimizer state and are never saved.
    """

    def __init__(self):
        self._blocks: dict[str, torch.Tensor] = {}

    def get(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        block = self._blocks.get(slot)
        if block is None or block.numel() < numel or block.dtype != dtype or block.device != device:
            # grow with headroom: U varies from step to step
            size = numel if block is None or block.dtype != dtype else max(numel, block.numel() * 5 // 4)
            block = torch.empty(size, dtype=dtype, device=device)
            self._blocks[slot] = block
        return block[:numel].view(shape)


class RowSparseOptimizer(torch.optim.Optimizer, ABC):
    """Base of the row-sparse optimizers: parameters are 2-D tables with sparse COO gradients.

    Subclasses implement ``_init_state`` and ``_step_rows``; this class turns each gradient into
    (unique rows, fp32 row gradients) and owns gathering and writing back rows.
    """

    #: state key -> dtype it must have ("group" = the group's ``state_dtype``); used on load.
    #: Every state entry is indexed by the table's rows (``row_state``).
    _state_dtypes: dict[str, torch.dtype | str] = {}

    @property
    def row_state(self) -> tuple[str, ...]:
        """The state entries indexed by the table's rows: all of them."""
        return tuple(self._state_dtypes)

    def __init__(self, params, defaults: dict, fused: bool = True):
        super().__init__(params, defaults)
        # fused: one visit per touched row (memray.kernels' row updates) where a kernel serves
        # the table's device and dtypes; the torch ops of each rule otherwise
        self.fused = fused
        self._workspace = _Workspace()
        self._in_backward: set[int] = set()  # ids of the tables updated by their lookup's backward
        for group in self.param_groups:
            self._check_group(group)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _check_group(self, group: dict) -> None:
        if group["lr"] < 0:
            raise ValueError(f"lr must be >= 0, got {group['lr']}")
        if group.get("weight_decay", 0.0) < 0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
        if "eps" in group and group["eps"] <= 0:
            raise ValueError(f"eps must be > 0, got {group['eps']}")
        if "state_dtype" in group and group["state_dtype"] not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {sorted(STATE_DTYPES)}, got {group['state_dtype']!r}")
        for p in group["params"]:
            if p.ndim != 2 or not p.is_floating_point():
                raise ValueError(f"row-sparse optimizers take 2-D float tables, got {p.dtype} {tuple(p.shape)}")

    # -- rows in and out --------------------------------------------------------------------
    def _row_gradient(self, grad: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``grad`` (sparse COO over rows) -> (unique rows [U] int64, summed fp32 rows [U, D])."""
        if not grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} needs a row-sparse gradient (a sparse COO tensor); "
                "build the value table with sparse_grad=True"
            )
        if grad.shape != table.shape or grad.sparse_dim() != 1:
            raise RuntimeError(f"expected a gradient sparse over the rows of a {tuple(table.shape)} table")
        indices, values = grad._indices()[0], grad._values()
        # autograd's accumulation into a leaf drops the coalesced flag of the lookup's gradient;
        # strictly increasing rows are coalesced all the same, and checking costs O(U), not a sort
        if grad.is_coalesced() or bool((indices[1:] > indices[:-1]).all()):
            if values.dtype == torch.float32:
                return indices, values  # read-only below: never modified in place
            return indices, self._scratch("grad", values).copy_(values)
        rows, inverse = torch.unique(indices, sorted=True, return_inverse=True)
        rows_grad = self._workspace.get("grad", (rows.numel(), values.shape[1]), torch.float32, values.device)
        return rows, rows_grad.zero_().index_add_(0, inverse, values.float())

    def _scratch(self, slot: str, like: torch.Tensor) -> torch.Tensor:
        return self._workspace.get(slot, like.shape, torch.float32, like.device)

    def _gather(self, source: torch.Tensor, rows: torch.Tensor, slot: str) -> torch.Tensor:
        """fp32 copy [U, D] of ``source[rows]`` in the workspace slot ``slot``."""
        shape = (rows.numel(), source.shape[1])
        out = self._workspace.get(slot, shape, torch.float32, source.device)
        if source.dtype == torch.float32:
            return torch.index_select(source, 0, rows, out=out)
        stage = self._workspace.get(f"stage/{source.dtype}", shape, source.dtype, source.device)
        return out.copy_(torch.index_select(source, 0, rows, out=stage))

    def _scatter(self, target: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        """``target[rows] = values``, rounding fp32 values to nearest in ``target``'s dtype."""
        if target.dtype != values.dtype:
            stage = self._workspace.get(f"stage/{target.dtype}", values.shape, target.dtype, values.device)
            values = stage.copy_(values)
        target.index_copy_(0, rows, values)

    def _add_rows(self, table: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> None:
        """``table[rows] += delta`` (fp32 ``delta`` [U, D]), rounded once into the table's dtype."""
        if table.dtype == torch.float32:
            # no separate read of the rows: one read-modify-write per touched row
            table.index_add_(0, rows, delta)
            return
        weight = self._gather(table, rows, "weight")
        self._scatter(table, rows, weight.add_(delta))

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if id(p) in self._in_backward:
                    raise RuntimeError(
                        f"a {tuple(p.shape)} table updates in its lookup's backward but also has a gradient: "
                        "another lookup read it in the same step"
                    )
                rows, rows_grad = self._row_gradient(p.grad, p)
                state = self.state[p]
                if not state:
                    self._init_state(group, p, state)
                if rows.numel() == 0:
                    continue
                self._step_rows(group, p, state, rows, rows_grad)
        return loss

    def _init_state(self, group: dict, table: torch.Tensor, state: dict) -> None:
        pass

    @abstractmethod
    def _step_rows(
        self, group: dict, table: torch.Tensor, state: dict, rows: torch.Tensor, rows_grad: torch.Tensor
    ) -> None:
        """Apply the rule to ``rows`` (unique, increasing) of ``table`` with their fp32 gradients
        ``rows_grad`` [U, D], updating ``state`` in place."""

    # -- updates in the lookup's backward ----------------------------------------------------
    def update_in_backward(self, table: torch.Tensor) -> BackwardUpdate:
        """The rule of ``table``'s group as a lookup's ``row_update``: pass the result to the one
        lookup that reads ``table`` each step; ``step()`` skips ``table`` from then on."""
        group = self._group_of(table)
        self._check_in_backward(group, table)
        state = self.state[table]
        if not state:
            self._init_state(group, table, state)
        self._in_backward.add(id(table))
        return BackwardUpdate(self, table)

    def _group_of(self, table: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(p is table for p in group["params"]):
                return group
        raise ValueError(f"a {tuple(table.shape)} table that is not a parameter of this {type(self).__name__}")

    def _check_in_backward(self, group: dict, table: torch.Tensor) -> None:
        """Raises ValueError where the rule cannot run inside one lookup's backward."""

    @abstractmethod
    def _fused_rule(self, group: dict, state: dict) -> tuple[str, dict]:
        """``(rule, arguments)`` of the C++ backward update for this group (see
        :meth:`memray.kernels.BackwardRowUpdate.fused_rule`)."""

    # -- checkpoints ------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load groups as torch does, then state in the dtypes this optimizer keeps.

        ``torch.optim.Optimizer`` casts floating state to the parameter's dtype on load, which
        would turn fp32 accumulators of a bf16 table into bf16 (and bf16 moments of an fp32
        table into fp32); state is therefore restored here, per key.
        """
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                chain.from_iterable(g["params"] for g in self.param_groups),
            )
        )
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for key, value in saved_state.items():
            if key not in id_map:
                raise ValueError(f"state for unknown parameter id {key}")
            param = id_map[key]
            group = group_of[id(param)]
            restored = {}
            for name, tensor in value.items():
                want = self._state_dtypes.get(name)
                if want is None or not isinstance(tensor, torch.Tensor):
                    raise ValueError(f"unexpected optimizer state '{name}' for {type(self).__name__}")
                dtype = STATE_DTYPES[group["state_dtype"]] if want == "group" else want
                if tensor.shape[0] != param.shape[0]:
                    raise ValueError(f"state '{name}' has {tensor.shape[0]} rows, the table has {param.shape[0]}")
                restored[name] = tensor.to(device=param.device, dtype=dtype)
            self.state[param] = restored


class RowSparseSGD(RowSparseOptimizer):
    """``w_r -= lr * (g_r + weight_decay * w_r)`` on the touched rows only; no state."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, *, fused: bool = True):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), fused)

    def _fused_rule(self, group, state):
        return "sgd", dict(lr=float(group["lr"]), weight_decay=float(group["weight_decay"]))

    def _step_rows(self, group, table, state, rows, rows_grad):
        lr, wd = group["lr"], group["weight_decay"]
        if self.fused and sgd_(table.data, rows, rows_grad, lr, wd):
            return
        if table.dtype == torch.float32 and wd == 0:
            table.index_add_(0, rows, rows_grad, alpha=-lr)
            return
        weight = self._gather(table, rows, "weight")  # [U, D]
        if wd:
            weight.mul_(1 - lr * wd)
        weight.add_(rows_grad, alpha=-lr)
        self._scatter(table, rows, weight)


class RowWiseAdagrad(RowSparseOptimizer):
    """Exact row-wise Adagrad: one fp32 accumulator of mean squared gradients per row.

    State ``sum_sq`` [N] fp32 (always fp32: it is N numbers, not N x D).

    A table may hold a slice of each row (the column layout of a sharded pool): its parameter
    group then names the whole row's width, ``row_dim``, and ``all_reduce`` sums this slice's
    per-row sums of squared gradients with the other slices' (over the ranks holding them), so
    every slice divides by the same whole-row mean.
    """

    _state_dtypes = {"sum_sq": torch.float32}

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        fused: bool = True,
        all_reduce=None,
    ):
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, row_dim=None), fused)
        self.all_reduce = all_reduce
        for group in self.param_groups:
            sliced = group["row_dim"] not in (None, *(p.shape[1] for p in group["params"]))
            if sliced and all_reduce is None:
                raise ValueError(f"row_dim {group['row_dim']} spans several slices: all_reduce must sum over them")

    def _init_state(self, group, table, state):
        state["sum_sq"] = torch.zeros(table.shape[0], dtype=torch.float32, device=table.device)

    def _check_in_backward(self, group, table):
        if group["row_dim"] not in (None, table.shape[1]):
            raise ValueError(
                f"a table holding {table.shape[1]} of each row's {group['row_dim']} columns cannot update in its "
                "lookup's backward: its row norms need the other slices' gradients first"
            )

    def _fused_rule(self, group, state):
        args = {k: float(group[k]) for k in ("lr", "eps", "weight_decay")}
        return "rowwise_adagrad", dict(sum_sq=state["sum_sq"], **args)

    def _step_rows(self, group, table, state, rows, rows_grad):
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        row_dim = group["row_dim"] or table.shape[1]
        sliced = row_dim != table.shape[1]
        if not sliced and self.fused and rowwise_adagrad_(table.data, state["sum_sq"], rows, rows_grad, lr, eps, wd):
            return
        weight = None
        if wd:
            weight = self._gather(table, rows, "weight")  # [U, D]
            rows_grad = torch.add(rows_grad, weight, alpha=wd, out=self._scratch("decayed", rows_grad))
        sum_sq = state["sum_sq"].index_select(0, rows)  # [U]
        squares = torch.linalg.vecdot(rows_grad, rows_grad)
        sum_sq.add_(self.all_reduce(squares).div_(row_dim) if sliced else squares.div_(row_dim))
        state["sum_sq"].index_copy_(0, rows, sum_sq)
        scale = sum_sq.sqrt_().add_(eps).reciprocal_().mul_(-lr)[:, None]  # [U, 1]
        if weight is None:
            self._add_rows(table, rows, torch.mul(rows_grad, scale, out=self._scratch("delta", rows_grad)))
        else:
            self._scatter(table, rows, weight.addcmul_(rows_grad, scale))


class LazyAdam(RowSparseOptimizer):
    """Adam on the touched rows only, bias-corrected by each row's own step count.

    ``decoupled=False``: L2 weight decay added to the gradient (``torch.optim.Adam``).
    ``decoupled=True``: decoupled decay of the row (``torch.optim.AdamW``); see ``LazyAdamW``.
    ``state_dtype``: ``"fp32"`` or ``"bf16"`` for the [N, D] moments.
    """

    _state_dtypes = {"exp_avg": "group", "exp_avg_sq": "group", "row_step": torch.int32}

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decoupled: bool = False,
        state_dtype: str = "fp32",
        fused: bool = True,
    ):
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                decoupled=bool(decoupled),
                state_dtype=state_dtype,
            ),
            fused,
        )

    def _init_state(self, group, table, state):
        dtype = STATE_DTYPES[group["state_dtype"]]
        # read and written at scattered rows, as the table is: huge pages where available
        state["exp_avg"] = empty_huge_pages(*table.shape, dtype=dtype, device=table.device).zero_()
        state["exp_avg_sq"] = empty_huge_pages(*table.shape, dtype=dtype, device=table.device).zero_()
        state["row_step"] = torch.zeros(table.shape[0], dtype=torch.int32, device=table.device)

    def _fused_rule(self, group, state):
        beta1, beta2 = group["betas"]
        return "lazy_adam", dict(
            exp_avg=state["exp_avg"],
            exp_avg_sq=state["exp_avg_sq"],
            row_step=state["row_step"],
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            decoupled=bool(group["decoupled"]),
        )

    def _step_rows(self, group, table, state, rows, rows_grad):
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        if self.fused and lazy_adam_(
            table.data,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["row_step"],
            rows,
            rows_grad,
            lr,
            (beta1, beta2),
            eps,
            wd,
            group["decoupled"],
        ):
            return
        weight = None
        if wd:
            weight = self._gather(table, rows, "weight")  # [U, D]
            if group["decoupled"]:
                weight.mul_(1 - lr * wd)
            else:
                rows_grad = torch.add(rows_grad, weight, alpha=wd, out=self._scratch("decayed", rows_grad))

        row_step = state["row_step"].index_select(0, rows).add_(1)  # [U]
        state["row_step"].index_copy_(0, rows, row_step)
        # bias corrections per row, in fp64 on [U] numbers: 1 - beta2**t is tiny for small t
        t = row_step.double()
        bias1 = 1 - torch.pow(beta1, t)  # [U]
        bias2_sqrt = (1 - torch.pow(beta2, t)).sqrt_()  # [U]

        exp_avg = self._gather(state["exp_avg"], rows, "exp_avg")
        exp_avg.lerp_(rows_grad, 1 - beta1)
        self._scatter(state["exp_avg"], rows, exp_avg)
        exp_avg_sq = self._gather(state["exp_avg_sq"], rows, "exp_avg_sq")
        exp_avg_sq.mul_(beta2).addcmul_(rows_grad, rows_grad, value=1 - beta2)
        self._scatter(state["exp_avg_sq"], rows, exp_avg_sq)

        # w -= lr * (m / bias1) / (sqrt(v / bias2) + eps), written as
        # w -= (lr * sqrt(bias2) / bias1) * m / (sqrt(v) + eps * sqrt(bias2)) to save a pass;
        # the moments' blocks are free to reuse once written back
        denom = exp_avg_sq.sqrt_().add_((eps * bias2_sqrt).float()[:, None])
        delta = exp_avg.mul_((-lr * bias2_sqrt / bias1).float()[:, None]).div_(denom)
        if weight is None:
            self._add_rows(table, rows, delta)
        else:
            self._scatter(table, rows, weight.add_(delta))


class LazyAdamW(LazyAdam):
    """``LazyAdam`` with decoupled weight decay: ``w_r *= 1 - lr * wd`` on touched rows."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        state_dtype: str = "fp32",
        fused: bool = True,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled=True, state_dtype=state_dtype, fused=fused)


class BackwardUpdate(BackwardRowUpdate):
    """One table's rule, run by its lookup's backward (:meth:`RowSparseOptimizer.update_in_backward`).

    Group and state are looked up at each use, so hyperparameter changes (an lr schedule) and a
    loaded state dict apply as they do to ``step()``. ``take_norm()`` returns the L2 norm of the
    row gradients applied since it was last called (for logging) and how many lookups applied
    them.
    """

    def __init__(self, optimizer: RowSparseOptimizer, table: torch.Tensor):
        self.optimizer, self.table = optimizer, table
        self._sq_norms: list[torch.Tensor] = []

    def _target(self, table):
        if table is not self.table and table.data_ptr() != self.table.data_ptr():
            raise ValueError("this update belongs to another table")
        return self.optimizer._group_of(self.table), self.optimizer.state[self.table]

    def fused_rule(self, table):
        if not self.optimizer.fused:
            return None
        group, state = self._target(table)
        return self.optimizer._fused_rule(group, state)

    def apply(self, table, rows, row_grads):
        group, state = self._target(table)
        self.optimizer._step_rows(group, self.table, state, rows, row_grads)

    def record(self, row_sq):
        self._sq_norms.append(row_sq.sum(dtype=torch.float64))

    def take_norm(self) -> tuple[float, int]:
        total = float(torch.stack(self._sq_norms).sum()) if self._sq_norms else 0.0
        count = len(self._sq_norms)
        self._sq_norms = []
        return math.sqrt(total), count


__all__ = [
    "BackwardUpdate",
    "LazyAdam",
    "LazyAdamW",
    "RowSparseOptimizer",
    "RowSparseSGD",
    "RowWiseAdagrad",
    "STATE_DTYPES",
]
