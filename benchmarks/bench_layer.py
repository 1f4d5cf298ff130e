"""One memory layer, whole: forward and forward+backward time and the search's peak memory.

Claim measured: ``ProductKeyMemory`` with the fused search (``kernels.pk_search``: half scores a
tile of tokens at a time, the C++ selection, a backward that touches only the selected sub-keys)
and the fused query and sub-key norms (``kernels.row_norm``) against the same layer with both in
torch ops (einsum of all half scores, three ``topk``, gathers, a dozen elementwise passes for the
norms; the value lookup stays the C++ kernel), against the layer with ``backend: torch``
(every step in torch ops, ``F.embedding_bag`` included), and against the ``product-key-memory``
package (lucidrains, 0.3.0; ``pip install product-key-memory==0.3.0``, skipped when absent) at
the same shape: heads 4, knn 32, k_dim 256 (its ``dim_head`` 128), ``n_keys**2`` slots.

Variants run alternately in one process per shape, median of ``--reps``; ``search_fwd_bwd_ms``
times the search alone (queries and sub-keys in, scores' backward out). ``search_peak_mb``: the peak
tensor memory above the starting point while the search alone runs forward and backward (on the
CPU from the profiler's allocator events, on a GPU ``max_memory_allocated``); ``layer_peak_mb``:
the same for the whole layer's forward and backward. Last line: JSON.

    python benchmarks/bench_layer.py [--quick] [--reps R] [--tokens T] [--device cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import subprocess
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
    the profiler (every tensor torch allocates, the C++ kernels' outputs included; the pool of
    large kernel outputs is off meanwhile)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    from memray.kernels import _alloc

    # a buffer reused from the kernels' pool of large outputs is no allocation event: measure
    # with the pool off, so every byte the step holds is counted
    saved = _alloc._pool, _alloc._POOL_SIZE
    _alloc._pool, _alloc._POOL_SIZE = [], 0
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        _alloc._pool, _alloc._POOL_SIZE = saved
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def _unavailable(*_args, **_kwargs):
    return None


@contextlib.contextmanager
def variant(layer, name: str):
    """Run ``layer`` as ``name``: fused as built; torch_search as the layer ran before the fused
    kernels (the search and the query and sub-key norms in torch ops, the lookup still the C++
    kernel); plain_torch with ``backend: torch`` (the lookup in torch ops too). One layer serves
    all three: one table."""
    if name not in ("torch_search", "plain_torch"):
        yield
        return
    from memray.kernels.row_norm import row_norm_reference
    from memray.model import memory

    saved = memory.pk_search, memory.row_norm, layer.config.backend, layer.values.backend
    memory.pk_search, memory.row_norm = _unavailable, row_norm_reference
    if name == "plain_torch":
        layer.config.backend = layer.values.backend = "torch"
    try:
        yield
    finally:
        memory.pk_search, memory.row_norm, layer.config.backend, layer.values.backend = saved


def make_layers(dim: int, n_keys: int, device: torch.device, want_lucidrains: bool):
    from memray.model.memory import MemoryConfig, ProductKeyMemory

    config = MemoryConfig(n_keys=n_keys, heads=HEADS, knn=KNN, k_dim=K_DIM, swilu=False, query_layernorm=True)
    torch.manual_seed(0)
    ours = ProductKeyMemory(dim, config, device=device)
    layers = {"fused": ours, "torch_search": ours, "plain_torch": ours}
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
    with variant(layer, name):
        x = x.detach().requires_grad_(backward)
        out = layer(x)
        if backward:
            out.float().square().mean().backward()
            layer.zero_grad(set_to_none=True)


def search_once(layer, name: str, x: torch.Tensor):
    """The search alone, forward and backward, from the layer's queries and sub-keys (the value
    lookup, whose backward is memory bound and the noisiest part of a step, left out)."""
    with torch.no_grad():
        q = layer._queries(x.reshape(-1, layer.dim))
        keys = layer._subkeys()
    q.requires_grad_(True)
    keys.requires_grad_(True)
    with variant(layer, name):
        rows, scores = layer.select(q, keys)
        scores.sum().backward()
    return rows


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def measure_shape(dim: int, n_keys: int, tokens: int, reps: int, device: torch.device, lucidrains: bool) -> list[dict]:
    layers = make_layers(dim, n_keys, device, lucidrains)
    x = torch.randn(1, tokens, dim, device=device, generator=torch.Generator(device).manual_seed(1))
    # the fused and the torch search pick the same slots (up to exact ties of float scores)
    picked = {name: search_once(layers[name], name, x) for name in ("fused", "torch_search")}
    differing = int((picked["fused"].sort(-1).values != picked["torch_search"].sort(-1).values).any(-1).sum())
    times = {(name, what): [] for name in layers for what in ("fwd", "fwd_bwd", "search")}
    for name, layer in layers.items():  # warm-up (and the C++ build, once)
        run(layer, name, x, backward=True)
    for _ in range(reps):
        for name, layer in layers.items():
            with torch.no_grad():
                times[name, "fwd"].append(timed(lambda: run(layer, name, x, False), device))
            times[name, "fwd_bwd"].append(timed(lambda: run(layer, name, x, True), device))
            if name != "lucidrains":
                times[name, "search"].append(timed(lambda: search_once(layer, name, x), device))
            else:  # the OS returns its dense [N, D] gradient (up to 4 GiB) before the next variant runs
                time.sleep(0.5)
    rows = []
    for name, layer in layers.items():
        rows.append(
            {
                "dim": dim,
                "slots": f"2^{(n_keys**2).bit_length() - 1}",
                "tokens": tokens,
                "variant": name,
                "fwd_ms": statistics.median(times[name, "fwd"]),
                "fwd_bwd_ms": statistics.median(times[name, "fwd_bwd"]),
                "search_fwd_bwd_ms": statistics.median(times[name, "search"]) if times[name, "search"] else None,
                "search_peak_mb": None
                if name == "lucidrains"
                else peak_mb(lambda: search_once(layer, name, x), device),
                "layer_peak_mb": peak_mb(lambda: run(layer, name, x, True), device),
                "rows_differing": differing if name == "fused" else None,
            }
        )
    for r in rows:
        r["speedup_vs_torch_search"] = rows[1]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return rows


def recall_model_steps(steps: int, device: torch.device) -> list[dict]:
    """Training steps of the recall benchmark's Memory+ model (setting full: the 2 x 64 backbone,
    n_keys 256, 32 x 128 tokens a step), fused search against the search in torch ops,
    alternating step by step on one trainer; median ms per step."""
    import tempfile

    import factual_recall as recall

    s = recall.SETTINGS["full"]
    facts = recall.generate_facts(s["entities"], s["attributes"], seed=0)
    text, _ = recall.corpus(facts, s)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "corpus.txt"
        path.write_text(text)
        overrides = [*recall.BASE, *s["model"], *recall.model_overrides("memory_plus", s["n_keys"], 2)]
        overrides += ["data.source=text", f"data.path={path}", f"train.steps={2 * steps + 10}"]
        overrides += [f"train.batch_size={s['batch']}", f"train.device={device.type}"]
        trainer = recall.Trainer(
            recall.load_run_config("demo", overrides), run_dir=pathlib.Path(tmp) / "run", progress=False
        )
        layer = next(m for m in trainer.model.modules() if hasattr(m, "select"))
        times = {"fused": [], "torch_search": []}
        for step in range(2 * steps + 4):
            name = ("fused", "torch_search")[step % 2]
            inputs, targets = trainer.batches.next()
            with variant(layer, name):
                ms = timed(lambda: trainer.train_step(inputs, targets), device)
            if step >= 4:  # warm-up: the C++ build and the first allocations
                times[name].append(ms)
    rows = [
        {"variant": name, "steps": len(v), "step_ms": statistics.median(v), "tokens_per_step": s["batch"] * 128}
        for name, v in times.items()
    ]
    for r in rows:
        r["speedup_vs_torch_search"] = rows[1]["step_ms"] / r["step_ms"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2^16 and 2^20 slots at dim 256, 3 reps")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--tokens", type=int, help="tokens per step (default 2048 on the CPU, 16384 on a GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-lucidrains", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument(
        "--recall-steps", type=int, help="training steps per variant of the recall benchmark's Memory+ model (0: skip)"
    )
    parser.add_argument("--shape", help=argparse.SUPPRESS)  # "dim,n_keys": one shape, rows as JSON lines
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible", file=sys.stderr)
        sys.exit(2)
    reps = args.reps or (3 if args.quick else 7)
    tokens = args.tokens or (16384 if device.type == "cuda" else 2048)
    if args.shape:
        dim, n_keys = (int(v) for v in args.shape.split(","))
        for row in measure_shape(dim, n_keys, tokens, reps, device, not args.no_lucidrains):
            print("ROW " + json.dumps(row), flush=True)
        return
    shapes = SHAPES[:2] if args.quick else SHAPES
    rows = []
    for dim, n_keys in shapes:
        if device.type == "cpu" and n_keys**2 * dim * 4 > CPU_MAX_TABLE_BYTES:
            print(f"skipped on the CPU: dim {dim}, {n_keys}**2 slots (table over 8 GiB)", flush=True)
            continue
        # one process per shape: the allocator's state (which buffers page-fault) starts afresh
        command = [sys.executable, __file__, "--shape", f"{dim},{n_keys}", "--reps", str(reps), "--tokens", str(tokens)]
        command += ["--device", args.device] + (["--no-lucidrains"] if args.no_lucidrains else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            sys.exit(done.returncode)
        for line in done.stdout.splitlines():
            if line.startswith("ROW "):
                rows.append(json.loads(line[4:]))
                print(json.dumps(rows[-1]), flush=True)
    fields = [
        "dim",
        "slots",
        "tokens",
        "variant",
        "fwd_ms",
        "fwd_bwd_ms",
        "speedup_vs_torch_search",
        "search_fwd_bwd_ms",
        "search_peak_mb",
        "layer_peak_mb",
        "rows_differing",
    ]
    suffix = ("_quick" if args.quick else "") + ("_cuda" if device.type == "cuda" else "")
    recall_steps = args.recall_steps if args.recall_steps is not None else (5 if args.quick else 20)
    train_rows = recall_model_steps(recall_steps, device) if recall_steps else []
    for r in train_rows:
        print(json.dumps({"recall_model": r}), flush=True)
    summary = {"benchmark": NAME, "device": device.type}
    for r in rows:
        key = f"{r['dim']}/{r['slots']}"
        fused = next(f for f in rows if f["dim"] == r["dim"] and f["slots"] == r["slots"] and f["variant"] == "fused")
        speedups = summary.setdefault("fused_speedup", {}).setdefault(key, {})
        speedups[r["variant"]] = r["fwd_bwd_ms"] / fused["fwd_bwd_ms"]
        if r["variant"] == "torch_search":
            summary.setdefault("search_speedup", {})[key] = r["search_fwd_bwd_ms"] / fused["search_fwd_bwd_ms"]
            summary.setdefault("search_peak_ratio", {})[key] = fused["search_peak_mb"] / max(r["search_peak_mb"], 1e-9)
    if train_rows:
        summary["recall_model_step_speedup"] = train_rows[0]["speedup_vs_torch_search"]
    machine = machine_info(device)
    write_table(
        pathlib.Path(args.out),
        NAME + suffix,
        rows,
        fields,
        title=f"One memory layer (heads {HEADS}, knn {KNN}, k_dim {K_DIM}): median of {reps}, "
        f"variants alternating; fused = the C++ norms and search, torch_search = the same layer with the norms and "
        f"the search in torch ops (the layer before the fused kernels)",
        machine=machine,
        summary={k: v for k, v in summary.items() if k != "device"},
    )
    if train_rows:
        write_table(
            pathlib.Path(args.out),
            NAME + "_recall_model" + suffix,
            train_rows,
            ["variant", "steps", "step_ms", "tokens_per_step", "speedup_vs_torch_search"],
            title="Training steps of the recall benchmark's Memory+ model (setting full), fused norms and search "
            "vs both in torch ops, alternating step by step; median ms per step",
            machine=machine,
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
