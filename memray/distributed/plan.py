"""Per-rank memory and all-to-all traffic of a sharded value table, on paper (design §3).

Symbols used in every formula: W ranks in the memory-parallel group, N rows of one value pool,
D its value dim, b bytes per value (bf16 2, fp32 4), T tokens per step on one rank, L = heads·knn lookups
per token, uniformly random rows. Layouts: ``row`` (rank r owns a contiguous, balanced row range)
and ``column`` (rank r owns every row's slice of the value dim). Torch-free: ``memray plan`` and
these functions run anywhere.
"""

from __future__ import annotations

import re
from decimal import Decimal

from memray.errors import UserError

LAYOUTS = ("row", "column")
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
OPTIMIZERS = ("rowwise_adagrad", "lazy_adam", "lazy_adamw", "sgd", "adamw")
COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
BYTE_UNITS = {
    "": 1,
    "b": 1,
    **{p + "b": 1000**i for i, p in enumerate("kmgtp", 1)},
    **{p + "ib": 1024**i for i, p in enumerate("kmgtp", 1)},
}
_QUANTITY = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def balanced_ranges(n: int, w: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` ranges of ``n`` items for ``w`` ranks.

    Sizes are ``n // w + 1`` for the first ``n % w`` ranks and ``n // w`` for the rest.
    """
    if w < 1 or n < w:
        raise ValueError(f"cannot split {n} items over {w} ranks")
    size, extra = divmod(n, w)
    ranges, start = [], 0
    for rank in range(w):
        stop = start + size + (rank < extra)
        ranges.append((start, stop))
        start = stop
    return ranges


def _largest_share(n: int, w: int) -> int:
    """ceil(n / w): the first (largest) size of ``balanced_ranges(n, w)``, without the list."""
    if w < 1 or n < w:
        raise ValueError(f"cannot split {n} items over {w} ranks")
    return -(-n // w)


def expected_owners(world: int, lookups: int) -> float:
    """E = W·(1 − (1 − 1/W)^L): expected distinct owners hit by one token's L random lookups."""
    return world * (1 - (1 - 1 / world) ** lookups)


def lookup_traffic(layout: str, world: int, tokens: float, lookups: int, dim: int, act_bytes: int = 4) -> dict:
    """Bytes one rank sends to the other ranks for one memory layer and one step (fwd + bwd).

    ``tokens`` (T) tokens on the rank; the wire format is the implementation's. With
    E_off = (W−1)·(1 − (1 − 1/W)^L), the expected other-rank owners of one token's lookups:

    * row: forward dispatch 12·T·L·(W−1)/W (int32 local row, int32 bag, fp32 weight per
      off-rank entry) + returned partial bags T·E_off·D·a; backward: bag gradients T·E_off·D·a +
      weight gradients 4·T·L·(W−1)/W.
    * column: forward all-gather 12·T·L·(W−1) (int64 row, fp32 weight per entry to each other
      rank) + output slices T·D·a·(W−1)/W; backward: output-gradient slices T·D·a·(W−1)/W +
      partial weight gradients 4·T·L·(W−1).

    a = ``act_bytes``: bytes per exchanged bag element, 4 (bags are summed and sent in fp32 for
    any table dtype, so a sharded bag equals the unsharded one). The count exchanges (16 resp.
    8 bytes per other rank) are left out.

    Returns forward_bytes, backward_bytes, total_bytes and bytes_per_token = total / T; all 0 at W = 1.
    """
    w, t, n = world, tokens, lookups
    if layout == "row":
        entries = t * n * (w - 1) / w
        bags = t * (w - 1) * (1 - (1 - 1 / w) ** n) * dim * act_bytes
        forward, backward = 12 * entries + bags, bags + 4 * entries
    elif layout == "column":
        entries = t * n * (w - 1)
        outputs = t * dim * act_bytes * (w - 1) / w
        forward, backward = 12 * entries + outputs, outputs + 4 * entries
    else:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    total = forward + backward
    return {
        "forward_bytes": forward,
        "backward_bytes": backward,
        "total_bytes": total,
        "bytes_per_token": total / t if t else 0.0,
    }


def per_rank_memory(
    layout: str,
    world: int,
    rows: int,
    dim: int,
    tokens: int,
    lookups: int,
    *,
    memory_layers: int = 1,
    pools: int = 1,
    value_bytes: int = 2,
    optimizer: str = "rowwise_adagrad",
    state_bytes: int = 4,
    dense_params: int = 0,
) -> dict:
    """Bytes on the fullest rank of a W-rank group; T = ``tokens`` per step on each rank.

    * values: pools·rows_r·cols_r·b, with rows_r = ceil(N/W), cols_r = D (row layout) or
      rows_r = N, cols_r = ceil(D/W) (column layout: every rank holds all N rows).
    * optimizer: pools·(rows_r·cols_r·e + rows_r·r), e bytes per owned element and r per owned
      row: rowwise_adagrad e = 0, r = 4 (an fp32 accumulator); lazy_adam, lazy_adamw
      e = 2·state_bytes (two moments), r = 4 (an int32 step count); sgd 0, 0; adamw e = 8
      (dense fp32 moments), r = 0.
    * value_grad: pools·rows_r·cols_r·b for adamw (the paper's dense N×D gradient); 0 for the
      row-sparse optimizers, which never materialize a dense gradient of the table.
    * buffers, per memory layer, times memory_layers: row: send + receive of entries 2·12·T·L plus
      of fp32 partial bags 2·T·min(W, L)·D·4; column: gathered entries 12·W·T·L + gathered fp32
      bags W·T·cols_r·4 + fp32 outputs T·D·4.
    * dense: ZeRO-1/2 style: bf16 weights replicated 2·P_dense + fp32 master weights and two
      Adam moments sharded ceil(12·P_dense / W) (gradients and activations not counted).
    """
    if layout == "row":
        own_rows, own_cols = _largest_share(rows, world), dim
    elif layout == "column":
        own_rows, own_cols = rows, _largest_share(dim, world)
    else:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    elements = own_rows * own_cols
    per_element, per_row = {
        "rowwise_adagrad": (0, 4),
        "lazy_adam": (2 * state_bytes, 4),
        "lazy_adamw": (2 * state_bytes, 4),
        "sgd": (0, 0),
        "adamw": (8, 0),
    }[optimizer]
    if layout == "row":
        buffers = 2 * (12 * tokens * lookups + tokens * min(world, lookups) * dim * 4)
    else:
        buffers = 12 * world * tokens * lookups + world * tokens * own_cols * 4 + tokens * dim * 4
    memory = {
        "values": pools * elements * value_bytes,
        "optimizer": pools * (elements * per_element + own_rows * per_row),
        "value_grad": pools * elements * value_bytes if optimizer == "adamw" else 0,
        "buffers": memory_layers * buffers,
        "dense": 2 * dense_params + -(-12 * dense_params // world),
    }
    memory["total"] = sum(memory.values())
    return memory


def fewest_ranks(
    gpu_mem: int,
    layout: str,
    rows: int,
    dim: int,
    tokens: int,
    lookups: int,
    *,
    usable_fraction: float = 0.9,
    max_ranks: int = 65536,
    **options,
) -> int | None:
    """Smallest W in 1..min(max_ranks, N or D) with per_rank_memory(...)["total"] <= gpu_mem·usable_fraction.

    The row layout cannot use more ranks than rows, the column layout more than value columns.
    ``options`` go to ``per_rank_memory``. None when no W fits.
    """
    limit = min(max_ranks, rows if layout == "row" else dim)
    budget = gpu_mem * usable_fraction
    for world in range(1, limit + 1):
        if per_rank_memory(layout, world, rows, dim, tokens, lookups, **options)["total"] <= budget:
            return world
    return None


def make_plan(
    memory_params: int,
    value_dim: int,
    gpu_mem: int,
    tokens_per_rank: int = 16384,
    heads: int = 4,
    knn: int = 32,
    memory_layers: int = 3,
    dtype: str = "bf16",
    optimizer: str = "rowwise_adagrad",
    dense_params: int = 0,
    world: int | None = None,
    pools: int = 1,
    usable_fraction: float = 0.9,
) -> dict:
    """Per-rank memory and traffic of both layouts, each at its fewest ranks (or at ``world``).

    ``memory_params`` P per pool, N = P // D rows; ``pools`` pools (1: one pool shared by the
    ``memory_layers`` layers that read it). Traffic per rank per step is ``lookup_traffic`` with
    T = ``tokens_per_rank`` (each rank's micro-batch) and L = heads·knn, times memory_layers. A layout entry has
    memory and traffic None where it cannot be laid out (no W fits, or ``world`` > N resp. D).
    ``cheaper_traffic`` compares bytes per token (ties: row); ``fewest`` is the smaller of the two
    layouts' fewest ranks.
    """
    rows = memory_params // value_dim
    if rows < 1:
        raise ValueError(f"value_dim {value_dim} is larger than memory_params {memory_params}")
    lookups = heads * knn
    value_bytes = DTYPE_BYTES[dtype]
    options = dict(
        memory_layers=memory_layers,
        pools=pools,
        value_bytes=value_bytes,
        optimizer=optimizer,
        dense_params=dense_params,
    )
    budget = gpu_mem * usable_fraction
    layouts = {}
    for layout in LAYOUTS:
        fewest = fewest_ranks(
            gpu_mem, layout, rows, value_dim, tokens_per_rank, lookups, usable_fraction=usable_fraction, **options
        )
        w = world or fewest
        entry = {
            "fewest_ranks": fewest,
            "world": w,
            "tokens_per_rank": None,
            "memory": None,
            "traffic": None,
            "fits": False,
        }
        if w is not None and w <= (rows if layout == "row" else value_dim):
            memory = per_rank_memory(layout, w, rows, value_dim, tokens_per_rank, lookups, **options)
            traffic = lookup_traffic(layout, w, tokens_per_rank, lookups, value_dim)
            entry.update(
                tokens_per_rank=tokens_per_rank,
                memory=memory,
                fits=memory["total"] <= budget,
                traffic={key: memory_layers * v for key, v in traffic.items()},
            )
        layouts[layout] = entry
    priced = [name for name in LAYOUTS if layouts[name]["traffic"]]
    fitting = [(layouts[name]["fewest_ranks"], name) for name in LAYOUTS if layouts[name]["fewest_ranks"]]
    return {
        "inputs": dict(
            memory_params=memory_params,
            value_dim=value_dim,
            gpu_mem=gpu_mem,
            tokens_per_rank=tokens_per_rank,
            heads=heads,
            knn=knn,
            memory_layers=memory_layers,
            dtype=dtype,
            optimizer=optimizer,
            dense_params=dense_params,
            world=world,
            pools=pools,
            usable_fraction=usable_fraction,
        ),
        "rows": rows,
        "lookups": lookups,
        "budget_bytes": budget,
        "layouts": layouts,
        "cheaper_traffic": min(priced, key=lambda n: layouts[n]["traffic"]["bytes_per_token"]) if priced else None,
        "fewest": dict(zip(("ranks", "layout"), min(fitting))) if fitting else None,
    }


def parse_quantity(text: str, option: str, units: dict = COUNT_UNITS, minimum: int = 1) -> int:
    """A whole number from ``128e9``, ``1.07B``, ``4M`` (COUNT_UNITS) or ``80GiB``, ``80GB`` (BYTE_UNITS).

    Raises UserError naming ``option`` if it does not parse, is not whole, or is below ``minimum``.
    """
    match = _QUANTITY.fullmatch(str(text))
    unit = match and match[2].lower()
    value = Decimal(match[1]) * units[unit] if match and unit in units else None
    if value is None or value.adjusted() > 30:
        raise UserError(f"{option}: cannot parse {text!r}")
    if value != value.to_integral_value():
        raise UserError(f"{option}: {text!r} is not a whole number")
    if value < minimum:
        raise UserError(f"{option}: must be >= {minimum}, got {text!r}")
    return int(value)


def human_bytes(n: float, binary: bool = True) -> str:
    """``n`` bytes in GiB-style (binary) or GB-style (decimal) units, 4 significant digits."""
    base = 1024 if binary else 1000
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB") if binary else ("B", "kB", "MB", "GB", "TB", "PB")
    i = 0
    while abs(n) >= base and i < len(units) - 1:
        n, i = n / base, i + 1
    return f"{n:.4g} {units[i]}"


def format_plan(plan: dict) -> str:
    """The plan as a table: memory per rank in binary units, traffic per rank per step in decimal ones."""
    inp, layouts = plan["inputs"], plan["layouts"]
    lines = [
        f"value pool: {plan['rows']:,} rows x {inp['value_dim']} {inp['dtype']}, {inp['pools']} pool(s), "
        f"{inp['memory_layers']} memory layer(s), {plan['lookups']} lookups/token, "
        f"{inp['tokens_per_rank']:,} tokens per rank per step",
        f"budget per GPU: {human_bytes(plan['budget_bytes'])} ({inp['usable_fraction']:.0%} of "
        f"{human_bytes(inp['gpu_mem'])}); optimizer {inp['optimizer']}; dense model {inp['dense_params']:,} params",
        "",
        f"{'':26}{'row layout':>16}{'column layout':>16}",
    ]

    def row(label, cell):
        cells = [cell(layouts[name]) for name in LAYOUTS]
        lines.append(f"{label:26}" + "".join(f"{'-' if c is None else c:>16}" for c in cells))

    if inp["world"]:
        row("fewest ranks", lambda e: e["fewest_ranks"])
    row("ranks (GPUs)", lambda e: e["world"])
    row("tokens per rank", lambda e: e["tokens_per_rank"] and f"{e['tokens_per_rank']:,}")
    for key, label in (
        ("values", "values"),
        ("optimizer", "optimizer state"),
        ("value_grad", "value gradient"),
        ("buffers", "lookup buffers"),
        ("dense", "dense model (ZeRO)"),
        ("total", "total per rank"),
    ):
        row(label, lambda e: e["memory"] and human_bytes(e["memory"][key]))
    row("fits", lambda e: e["memory"] and ("yes" if e["fits"] else "no"))
    row("traffic per rank / step", lambda e: e["traffic"] and human_bytes(e["traffic"]["total_bytes"], binary=False))
    row("traffic per token", lambda e: e["traffic"] and human_bytes(e["traffic"]["bytes_per_token"], binary=False))
    lines.append("")
    if plan["cheaper_traffic"]:
        lines.append(f"cheaper in traffic per token: {plan['cheaper_traffic']} layout")
    fewest = plan["fewest"]
    lines.append(
        f"fewest GPUs that hold it: {fewest['ranks']} ({fewest['layout']} layout)"
        if fewest
        else "no number of GPUs holds it"
    )
    return "\n".join(lines)
