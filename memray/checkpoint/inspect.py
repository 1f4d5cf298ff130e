"""What a checkpoint holds, read without building the model: ``memray inspect``.

Works on both kinds of checkpoints (pools in ``model.safetensors``, or in ``memory.zarr`` written
shard by shard) and reads a pool's weights one chunk of rows at a time, so a table larger than
memory can be inspected.
"""

from __future__ import annotations

from pathlib import Path

import torch

from memray.errors import InputError

from . import WEIGHTS
from .model import read_model_config
from .pools import STORE
from .sharded import load_pool_shard, pool_info, verify_checkpoint

ROWS_PER_READ = 1 << 16


def _pool_reader(ckpt: Path, manifest: dict, name: str):
    """(num_rows, dim, dtype, read(a, b, key)) for pool ``name`` of either checkpoint kind."""
    if (ckpt / STORE).is_dir():
        info = pool_info(ckpt)["pools"][name]

        def read(a, b, key):
            return (
                load_pool_shard(ckpt, name, (a, b), None, manifest)[key]
                if key != "weight"
                else load_pool_shard(ckpt, name, (a, b), (0, info["dim"]), manifest)["weight"]
            )

        sample = read(0, 1, "weight")
        return info["num_rows"], info["dim"], sample.dtype, read
    from safetensors import safe_open

    handle = safe_open(str(ckpt / WEIGHTS), framework="pt")
    weight = handle.get_slice(f"pools.{name}.weight")
    rows, dim = weight.get_shape()

    def read(a, b, key):
        return handle.get_slice(f"pools.{name}.{key}")[a:b]

    return rows, dim, read(0, 1, "weight").dtype, read


def usage_png(counts: dict[str, torch.Tensor], path: str | Path, title: str) -> None:
    """Per pool: a histogram of how often slots were read, and the reads on the product-key grid
    (slot i * n_keys + j at row i, column j), both on log scales."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(counts), 2, figsize=(10, 4 * len(counts)), squeeze=False)
    for (name, count), (hist, grid) in zip(counts.items(), axes):
        reads = count.double()
        hist.hist(torch.log10(reads + 1).numpy(), bins=50)
        hist.set(title=f"{name}: reads per slot", xlabel="log10(reads + 1)", ylabel="slots", yscale="log")
        side = math.isqrt(reads.numel())
        if side * side == reads.numel():
            image = grid.imshow(
                torch.log10(reads + 1).view(side, side).numpy(), cmap="viridis", interpolation="nearest"
            )
            grid.set(
                title=f"{name}: reads on the key grid (log10)", xlabel="second sub-key j", ylabel="first sub-key i"
            )
            fig.colorbar(image, ax=grid)
        else:
            grid.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe(
    path: str | Path, pool: str | None = None, slot: int | None = None, usage_png_path: str | Path | None = None
) -> dict:
    """Step, world size, layout, checksum status and, per pool, shape, dtype, usage metrics and
    value norms; with ``slot``, that slot's value norm, usage and the layers that read it."""
    from memray.model import usage_metrics

    ckpt, manifest = verify_checkpoint(path)  # raises, naming the damage, before anything is read
    config = read_model_config(ckpt)
    attrs = pool_info(ckpt) if (ckpt / STORE).is_dir() else {}
    readers = {name: layers for name, layers in _layers_by_pool(config).items() if pool in (None, name)}
    if pool is not None and pool not in readers:
        raise InputError(f"checkpoint {ckpt}: no value pool '{pool}' (it has {sorted(_layers_by_pool(config))})")
    out = {
        "checkpoint": str(ckpt),
        "step": manifest["step"],
        "world_size": attrs.get("world_size", 1),
        "layout": attrs.get("layout", "unsharded"),
        "checksums": "ok",
        "files": len(manifest["files"]),
        "chunks": len(manifest.get("chunks", {})),
        "pools": {},
    }
    counts = {}
    for name, layers in readers.items():
        rows, dim, dtype, read = _pool_reader(ckpt, manifest, name)
        norms = torch.cat(
            [read(a, min(a + ROWS_PER_READ, rows), "weight").float().norm(dim=1) for a in range(0, rows, ROWS_PER_READ)]
        )
        count, mass = read(0, rows, "usage_count"), read(0, rows, "usage_mass")
        entry = {
            "rows": rows,
            "dim": dim,
            "dtype": str(dtype).removeprefix("torch."),
            "layers": layers,
            "value_norm_mean": float(norms.mean()),
            "value_norm_max": float(norms.max()),
            "lookups": int(count.sum()),
            **usage_metrics(count, mass),
        }
        if (ckpt / STORE).is_dir():
            entry["shard_map"] = _shard_map(attrs, rows, dim)
        if slot is not None:
            if not 0 <= slot < rows:
                raise InputError(f"--slot {slot} is out of range: pool '{name}' has {rows} slots")
            entry["slot"] = {
                "index": slot,
                "value_norm": float(norms[slot]),
                "usage_count": int(count[slot]),
                "usage_mass": float(mass[slot]),
                "layers": layers,
            }
        out["pools"][name] = entry
        counts[name] = count
    if usage_png_path is not None:
        usage_png(counts, usage_png_path, f"{ckpt.name}: slot usage since the run began")
        out["usage_png"] = str(usage_png_path)
    return out


def _layers_by_pool(config) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for block, name in config.pool_of().items():
        out.setdefault(name, []).append(block)
    return out


def _shard_map(attrs: dict, rows: int, dim: int) -> list[list[int]]:
    """The saving run's [row_start, row_stop, col_start, col_stop] per rank."""
    from memray.distributed.plan import balanced_ranges

    world, layout = attrs.get("world_size", 1), attrs.get("layout", "row")
    if layout == "column":
        return [[0, rows, a, b] for a, b in balanced_ranges(dim, world)]
    return [[a, b, 0, dim] for a, b in balanced_ranges(rows, world)]


def format_description(d: dict) -> str:
    lines = [
        f"checkpoint {d['checkpoint']}",
        f"  step {d['step']}, saved by {d['world_size']} rank(s), "
        f"layout {d['layout']}; checksums {d['checksums']} ({d['files']} files, {d['chunks']} chunks)",
    ]
    for name, p in d["pools"].items():
        lines.append(f"  pool {name}: {p['rows']:,} x {p['dim']} {p['dtype']}, read by layer(s) {p['layers']}")
        lines.append(
            f"    usage: {p['used']:.1%} of slots read, {p['lookups']:,} lookups, KL to uniform "
            f"{p['kl_uniform']:.3f}, Gini {p['gini']:.3f}, top-50% mass in {p['top50']:.2%} of slots"
        )
        lines.append(f"    value norm: mean {p['value_norm_mean']:.4f}, max {p['value_norm_max']:.4f}")
        if "shard_map" in p:
            lines.append(f"    shards (rows, columns): {[(a, b, c, e) for a, b, c, e in p['shard_map']]}")
        if "slot" in p:
            s = p["slot"]
            lines.append(
                f"    slot {s['index']}: value norm {s['value_norm']:.4f}, read {s['usage_count']:,} times, "
                f"weight mass {s['usage_mass']:.4f}, layers {s['layers']}"
            )
    return "\n".join(lines)
