"""Training curves of a run directory as one PNG, from ``metrics.jsonl`` (no TensorBoard server).

Panels: loss; learning rates; gradient norms (dense and value pools); tokens/s; per pool, the
share of slots read in each logging window; per pool, the lookup imbalance across ranks (max
over mean rows served; 1 is even).
"""

from __future__ import annotations

import json
from pathlib import Path

from memray.errors import InputError

from .rundir import METRICS


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``RUN/metrics.jsonl``; one-line errors naming the file (and line)."""
    path = Path(run_dir) / METRICS
    if not Path(run_dir).is_dir():
        raise InputError(f"run directory not found: {run_dir}")
    try:
        lines = path.read_text().splitlines()
    except OSError:
        raise InputError(f"{path}: not found (is {run_dir} a run directory?)") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise InputError(f"{path}:{number}: a metrics record needs an integer 'step'")
        records.append(record)
    if not records:
        raise InputError(f"{path}: no metrics logged yet")
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's curves to ``out`` (default ``RUN/metrics.png``); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "metrics.png"
    keys = {k for r in records for k in r}
    pools = sorted({k.split("/")[1] for k in keys if k.startswith("memory/") and k.endswith("/used")})
    imbalance = sorted(k for k in keys if k.startswith("lookup/") and k.endswith("/imbalance"))
    panels = [
        ("loss", ["loss"], "linear"),
        ("learning rate", ["lr", "value_lr"], "log"),
        ("gradient norm", ["grad_norm", "value_grad_norm"], "log"),
        ("tokens/s", ["tokens_per_s"], "linear"),
    ]
    if pools:
        panels.append(("share of slots read", [f"memory/{p}/used" for p in pools], "linear"))
    if imbalance:
        panels.append(("lookup imbalance (max/mean)", imbalance, "linear"))
    cols = 2
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10, 3 * rows), squeeze=False)
    for ax, (title, panel_keys, scale) in zip(axes.flat, panels):
        for key in panel_keys:
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if scale == "log" and all(v > 0 for key in panel_keys for v in _series(records, key)[1]):
            ax.set_yscale("log")
        if len(panel_keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
