"""One memory layer, whole: forward and forward+backward time and the search's peak memory.

Claim measured: ``ProductKeyMemory`` with the fused search (``kernels.pk_search``: half scores a
tile of tokens at a time, the C++ selection, a backward that touches only the selected sub-keys)
against the same layer with the search in torch ops (einsum of all half scores, three ``topk``,
gathers; the value lookup stays the C++ kernel), against the layer with ``backend: torch``
(every step in torch ops, ``F.embedding_bag`` included), and against the ``product-key-memory``
package (lucidrains, 0.3.0; ``pip install product-key-memory==0.3.0``, skipped when absent) at
the same shape: heads 4, knn 32, k_dim 256 (its ``dim_head`` 128), ``n_keys**2`` slots.

Variants run alternately in one process, median of ``--reps``. ``search_peak_mb``: the peak
tensor memory above the starting point while the search alone runs forward and backward (on the
CPU from the profiler's allocator events, on a GPU ``max_memory_allocated``); ``layer_peak_mb``:
the same for the whole layer's forward and backward. Last line: JSON.

    python benchmarks/bench_layer.py [--quick] [--reps R] [--tokens T] [--device cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import pathlib
import statistics
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import machine_info, synchronize, write_table  # noqa: E402

NAME = "bench_layer"
# (dim, n_keys): 2^16, 2^20 and 2^22 slots at dim 256 and 1024. The CPU skips [2^22, 1024]
# (a 16 GiB table); a GPU runs all.
SHAPES = [(256, 256), (256, 1024), (256, 2048), (1024, 256), (1024, 1024), (1024, 2048)]
CPU_MAX_TABLE_BYTES = 8 << 30
HEADS, KNN, K_DIM = 4, 32, 256


def peak_mb(fn, device: torch.device) -> float:
    """Peak tensor memory allocated above the starting point while ``fn()`` runs, in MiB: on a GPU
    ``max_memory_allocated``; on the CPU the running sum of the allocator's events recorded by
    the profiler (every tensor torch allocates, the C++ kernels' outputs included)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


@contextlib.contextmanager
def torch_search():
    """The layer's search in torch ops: the fused C++ search reported unavailable."""
    from memray.model import memory

    saved = memory.pk_search
    memory.pk_search = lambda *args, **kwargs: None
    try:
        yield
    finally:
        memory.pk_search = saved


def make_layers(dim: int, n_keys: int, device: torch.device, want_lucidrains: bool):
    from memray.model.memory import MemoryConfig, ProductKeyMemory

    layers = {}
    for name, backend in (("fused", "auto"), ("torch_search", "auto"), ("plain_torch", "torch")):
        config = MemoryConfig(
            n_keys=n_keys, heads=HEADS, knn=KNN, k_dim=K_DIM, swilu=False, query_layernorm=True, backend=backend
        )
        torch.manual_seed(0)
        layers[name] = ProductKeyMemory(dim, config, device=device)
    # the torch-search variant shares the fused layer's weights: the two must select the same slots
    layers["torch_search"].load_state_dict(layers["fused"].state_dict())
    if want_lucidrains:
        try:
            from product_key_memory import PKM
        except ImportError:
            pass
        else:
            torch.manual_seed(0)
            layers["lucidrains"] = PKM(dim, heads=HEADS, num_keys=n_keys, topk=KNN, dim_head=K_DIM // 2).to(device)
    return layers


def run(layer, name: str, x: torch.Tensor, backward: bool):
    context = torch_search() if name == "torch_search" else contextlib.nullcontext()
    with context:
        x = x.detach().requires_grad_(backward)
        out = layer(x)
        if backward:
            out.float().square().mean().backward()
            layer.zero_grad(set_to_none=True)


def search_once(layer, name: str, x: torch.Tensor):
    with torch_search() if name == "torch_search" else contextlib.nullcontext():
        rows, scores = layer.topk(x.detach().requires_grad_(True))
        scores.sum().backward()
        layer.zero_grad(set_to_none=True)
    return rows


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2^16 and 2^20 slots at dim 256, 3 reps")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--tokens", type=int, help="tokens per step (default 2048 on the CPU, 16384 on a GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-lucidrains", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible", file=sys.stderr)
        sys.exit(2)
    reps = args.reps or (3 if args.quick else 7)
    tokens = args.tokens or (16384 if device.type == "cuda" else 2048)
    shapes = SHAPES[:2] if args.quick else SHAPES
    rows = []
    for dim, n_keys in shapes:
        if device.type == "cpu" and n_keys**2 * dim * 4 > CPU_MAX_TABLE_BYTES:
            print(f"skipped on the CPU: dim {dim}, {n_keys}**2 slots (table over 8 GiB)", flush=True)
            continue
        layers = make_layers(dim, n_keys, device, not args.no_lucidrains)
        x = torch.randn(1, tokens, dim, device=device, generator=torch.Generator(device).manual_seed(1))
        # the fused and the torch search pick the same slots (up to exact ties of float scores)
        picked = {name: search_once(layers[name], name, x) for name in ("fused", "torch_search")}
        differing = int((picked["fused"].sort(-1).values != picked["torch_search"].sort(-1).values).any(-1).sum())
        times = {(name, what): [] for name in layers for what in ("fwd", "fwd_bwd")}
        with torch.no_grad():
            for name, layer in layers.items():
                run(layer, name, x, backward=False)  # warm-up (and the C++ build, once)
        for name, layer in layers.items():
            run(layer, name, x, backward=True)
        for _ in range(reps):
            for name, layer in layers.items():
                with torch.no_grad():
                    times[name, "fwd"].append(timed(lambda: run(layer, name, x, False), device))
                times[name, "fwd_bwd"].append(timed(lambda: run(layer, name, x, True), device))
        for name, layer in layers.items():
            search = None if name == "lucidrains" else peak_mb(lambda: search_once(layer, name, x), device)
            layer_peak = peak_mb(lambda: run(layer, name, x, True), device)
            row = {
                "dim": dim,
                "slots": f"2^{(n_keys**2).bit_length() - 1}",
                "tokens": tokens,
                "variant": name,
                "fwd_ms": statistics.median(times[name, "fwd"]),
                "fwd_bwd_ms": statistics.median(times[name, "fwd_bwd"]),
                "search_peak_mb": search,
                "layer_peak_mb": layer_peak,
                "rows_differing": differing if name == "fused" else None,
            }
            rows.append(row)
        base = {r["variant"]: r for r in rows if r["dim"] == dim and r["slots"] == rows[-1]["slots"]}
        for r in base.values():
            r["speedup_vs_torch_search"] = base["torch_search"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            print(json.dumps(r), flush=True)
        del layers, x
        gc.collect()
    fields = [
        "dim",
        "slots",
        "tokens",
        "variant",
        "fwd_ms",
        "fwd_bwd_ms",
        "speedup_vs_torch_search",
        "search_peak_mb",
        "layer_peak_mb",
        "rows_differing",
    ]
    suffix = ("_quick" if args.quick else "") + ("_cuda" if device.type == "cuda" else "")
    write_table(
        pathlib.Path(args.out),
        NAME + suffix,
        rows,
        fields,
        title=f"One memory layer (heads {HEADS}, knn {KNN}, k_dim {K_DIM}): median of {reps}, "
        f"variants alternating; fused = the C++ search, torch_search = the same layer with the search in torch ops",
        machine=machine_info(device),
    )
    summary = {"benchmark": NAME, "device": device.type}
    for r in rows:
        key = f"{r['dim']}/{r['slots']}"
        fused = next(f for f in rows if f["dim"] == r["dim"] and f["slots"] == r["slots"] and f["variant"] == "fused")
        summary.setdefault("fused_speedup", {}).setdefault(key, {})[r["variant"]] = r["fwd_bwd_ms"] / fused["fwd_bwd_ms"]
        if r["variant"] == "torch_search":
            summary.setdefault("search_peak_ratio", {})[key] = fused["search_peak_mb"] / max(r["search_peak_mb"], 1e-9)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
