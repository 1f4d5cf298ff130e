"""What every benchmark shares: the machine's description and the CSV + Markdown result files."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import os
import pathlib
import platform
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent


def import_kernels():
    """``memray.kernels`` when installed, else ``kernels/`` of this checkout as ``memray_kernels``
    (GPU hosts run the benchmarks from a bare checkout with only torch and triton)."""
    try:
        return importlib.import_module("memray.kernels")
    except ImportError:
        pass
    if "memray_kernels" in sys.modules:
        return sys.modules["memray_kernels"]
    init = REPO / "kernels" / "__init__.py"
    spec = importlib.util.spec_from_file_location("memray_kernels", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["memray_kernels"] = module
    spec.loader.exec_module(module)
    return module


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device | None = None) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_avg": os.getloadavg()[0],
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_table(
    out_dir: pathlib.Path,
    name: str,
    rows: list[dict],
    fields: list[str],
    *,
    title: str,
    machine: dict,
    summary: dict | None = None,
) -> None:
    """``out_dir/name.csv`` (all fields) and ``out_dir/name.md`` (a table plus the machine)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in fields})
    lines = [
        f"# {name}",
        "",
        title,
        "",
        "Machine: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in machine.items()),
        "",
        "| " + " | ".join(fields) + " |",
        "|" + "---|" * len(fields),
    ]
    lines += ["| " + " | ".join(_fmt(row.get(k, "")) for k in fields) + " |" for row in rows]
    if summary:
        lines += ["", "Key figures:", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in summary.items() if k not in ("machine", "benchmark")]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
