"""Everything a lent GPU is for, in one command: correctness on the hardware, training, speed, scale.

``make gpu-check`` (benchmarks/gpu.sh) runs this on one GPU in under 8 minutes (``--quick``: 3).
Each section runs in processes of its own, so one failing section does not hide the others:

* ``aot``: every Triton kernel launch compiled for sm_90 and sm_80 by this host's triton
  (memray.kernels.aot), before anything runs a kernel.
* ``tests``: ``pytest -m gpu`` on the device — the Triton lookup against the float64 reference,
  the row-sparse optimizers against their float64 rules, the product-key search against brute
  force, a sharded table at world size 1 under NCCL against the unsharded layer.
* ``train``: ``memray train tiny`` in bf16 on one process on the device, and on one rank of the
  processes launcher (NCCL + DeepSpeed's bf16 engine) at ZeRO-1 and ZeRO-3; each run's checkpoint
  resumes on the device (the next 2T losses equal the uninterrupted run's within 1e-5) and on the
  CPU (a process that sees no GPU; at least 5 losses within bf16 rounding), and back.
* ``lookup``: forward and backward of the value lookup, GB/s against a device-to-device copy
  and against ``F.embedding_bag`` (gpu_lookup.py), N from 2^20 to 2^24, D 256 and 1024, fp32 and
  bf16 tables.
* ``value_step``: lookup + backward + row-sparse step against the paper's dense AdamW at D = 1024
  (bench_value_step.py).
* ``layer``: a Memory+ layer with 2^20 slots, forward + backward, against the same layer reading
  its values with ``F.embedding_bag``.
* ``search``: the product-key search forward + backward at n_keys 1024, k_dim 512, 16k tokens:
  the Triton kernel against the torch search, time and peak memory.
* ``e2e``: training tokens/s of Memory+ (2^20 slots) against a dense model of equal FLOPs per
  token, bf16 (e2e_throughput.py).
* ``scale``: training steps of a small model whose pool is 2^24 x 1024 bf16 (17.2B values, row-wise
  Adagrad) against the same model with a 2^16-row pool.

``--device cpu`` runs the same sections at tiny shapes (the Triton interpreter, a CPU lookup
backend) in about a minute: ``make test`` runs it so that the script cannot rot between GPU runs;
the performance targets are judged only on a GPU. Results: ``gpu_check.json`` (every figure, each
target and whether it was met), ``gpu_check.md``, ``gpu_check.log`` and ``details.tar.gz`` (each
benchmark's own CSV and Markdown) in ``--out`` (default: $OUT, else benchmarks/results/gpu). The
exit code is 1 when a correctness check failed or a section broke, 0 otherwise (missed speed
targets are reported, not fatal).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
NAME = "gpu_check"
BF16_LOSS_RTOL = 1e-2  # bf16 keeps 8 bits of mantissa: a loss agrees to about 0.4%; twice that, and some
# the same device resuming its own checkpoint computes what the uninterrupted run computed: equal
# to the bit where its kernels are deterministic; 1e-5 leaves room for those that are not, and a
# master rounded to bf16 (~0.4% of each weight) or zeroed moments part the losses by far more
RESUME_RTOL = 1e-5
SPEED = "speed"  # the third element of a check that is a speed target: reported, not fatal


# ------------------------------------------------------------------------------------------------
# running things
# ------------------------------------------------------------------------------------------------


class Log:
    def __init__(self, path: pathlib.Path):
        self.handle = open(path, "w")

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        self.handle.write(text + "\n")
        self.handle.flush()


def run(log: Log, args: list, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command, its output into the log; the completed process (stdout kept)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    started = time.monotonic()
    log(f"$ {' '.join(map(str, args))}")
    try:
        result = subprocess.run(
            list(map(str, args)), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        log(f"  timed out after {timeout:.0f} s")
        return subprocess.CompletedProcess(args, 124, exc.stdout or "", exc.stderr or "")
    for line in (result.stdout + result.stderr).splitlines()[-40:]:
        log(f"  {line}")
    log(f"  exit {result.returncode} in {time.monotonic() - started:.1f} s")
    return result


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def device_env(device: str) -> dict:
    """On a GPU: compiled Triton kernels and DeepSpeed's CUDA accelerator, whatever the test
    configuration sets for CPU machines (the interpreter, DeepSpeed's CPU accelerator). On the
    CPU (the smoke run): the Triton interpreter, for the sections that run a Triton kernel."""
    return {"TRITON_INTERPRET": "0", "DS_ACCELERATOR": "cuda"} if device == "cuda" else {"TRITON_INTERPRET": "1"}


def memray(*args) -> list:
    return [sys.executable, "-m", "memray.cli", *args]


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


# ------------------------------------------------------------------------------------------------
# sections: each returns (figures, checks) where checks maps a name to (passed, what was required)
# ------------------------------------------------------------------------------------------------


def section_env(device: str, log: Log, _work: pathlib.Path, _quick: bool) -> tuple[dict, dict]:
    code = (
        "import json, torch, triton, platform\n"
        "d = {'python': platform.python_version(), 'torch': torch.__version__, 'triton': triton.__version__}\n"
        f"if {device!r} == 'cuda':\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    d.update(gpu=p.name, capability=f'{p.major}.{p.minor}', memory_GiB=round(p.total_memory / 2**30, 1),\n"
        "             multiprocessors=p.multi_processor_count)\n"
        "print(json.dumps(d))\n"
    )
    result = run(log, [sys.executable, "-c", code], 120)
    figures = last_json(result.stdout) if result.returncode == 0 else {}
    return figures, {"environment": (result.returncode == 0, "torch, triton and the device answer")}


def section_aot(_device: str, log: Log, work: pathlib.Path, _quick: bool) -> tuple[dict, dict]:
    """Every Triton kernel launch compiled for sm_90 and sm_80 with this host's triton (no GPU
    used): a compile error shows here, named, before the kernels first run."""
    report = work / "aot.json"
    result = run(
        log,
        [sys.executable, "-m", "memray.kernels.aot", "--json", report],
        900,
        env={"TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(work / "triton-cache")},
    )
    figures = {}
    if report.exists():
        data = json.loads(report.read_text())
        figures = {
            "triton": data["triton"],
            "compiled": len(data["compiled"]),
            "failures": data["failures"],
            "most_shared_bytes": max((r["shared_bytes"] for r in data["compiled"]), default=None),
            "spills": sorted({f"{r['target']} {r['launch']}" for r in data["compiled"] if r["spill_bytes"]}),
        }
    ok = result.returncode == 0 and figures.get("compiled", 0) > 0
    return figures, {"every kernel compiles for sm_90 and sm_80": (ok, "to a cubin, within shared memory")}


def section_tests(device: str, log: Log, work: pathlib.Path, _quick: bool) -> tuple[dict, dict]:
    junit = work / "pytest-gpu.xml"
    result = run(
        log,
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider", f"--junitxml={junit}"],
        600,
        env={"MEMRAY_GPU_CHECK_DEVICE": device},
    )
    figures = {}
    if junit.exists():
        import xml.etree.ElementTree as ET

        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        figures = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    ok = result.returncode == 0 and figures.get("tests", 0) > 0
    return figures, {"pytest -m gpu": (ok, "every GPU test passes")}


def _losses(run_dir: pathlib.Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines)}


def _checkpoint(run_dir: pathlib.Path, step: int) -> pathlib.Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def section_train(device: str, log: Log, work: pathlib.Path, quick: bool) -> tuple[dict, dict]:
    """Each configuration trains 3T steps on the device in bf16, saving every T. Its step-T
    checkpoint resumes on the device again, whose next 2T losses must equal the uninterrupted
    run's (within RESUME_RTOL: a master rounded to bf16 or moments lost in the checkpoint part
    them further); and in a process that sees no GPU (the same configuration on the CPU), whose
    losses must follow the device run's within bf16 rounding for at least 5 steps; that CPU
    run's step-2T checkpoint then resumes back on the device, likewise. The CPU smoke run trains
    the ZeRO-1 configuration only (the others run the same code with other options;
    tests/test_resume.py resumes every stage on CPU exactly)."""
    third = 5 if device == "cpu" or quick else 10  # T >= 5: every comparison spans 5 steps or more
    steps = 3 * third
    common = sets(
        "train.precision=bf16",
        f"train.steps={steps}",
        "train.log_every=1",
        f"train.checkpoint_every={third}",
        "train.keep_last=0",
    )
    ranks = sets("distributed.launcher=processes")
    configurations = {  # name -> (options on the device, the same run on the CPU)
        "one process": (
            ["--workers", "0", *sets(f"train.device={device}")],
            ["--workers", "0", *sets("train.device=cpu")],
        ),
        "1 rank ZeRO-1": (["--workers", "1", *ranks, *sets("distributed.zero_stage=1")],) * 2,
        "1 rank ZeRO-3": (["--workers", "1", *ranks, *sets("distributed.zero_stage=3")],) * 2,
    }
    if device == "cpu":
        configurations = {"1 rank ZeRO-1": configurations["1 rank ZeRO-1"]}
    cpu_env = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "TRITON_INTERPRET": "1"}
    figures, checks = {}, {}

    def train(run_dir, options, resume=None, env=None) -> dict[int, float]:
        args = ["train", "tiny", "--no-progress", "--run-dir", run_dir, *common, *options]
        result = run(log, memray(*args, *(["--resume", resume] if resume else [])), 300, env=env)
        return _losses(run_dir) if result.returncode == 0 else {}

    def agree(what, continued: dict, reference: dict, first: int, rtol: float) -> None:
        compared = [s for s in range(first, steps + 1) if s in continued and s in reference]
        ok = len(compared) >= 5 and len(compared) == steps + 1 - first
        worst = max((abs(continued[s] - reference[s]) / abs(reference[s]) for s in compared), default=None)
        figures[f"{what}: steps compared, largest relative loss difference"] = [len(compared), worst]
        checks[what] = (
            ok and worst <= rtol,
            f"the losses of steps {first}-{steps} within {rtol:g} (relative) of the run it continues",
        )

    for name, (options, cpu_options) in configurations.items():
        slug = name.replace(" ", "-")
        losses = train(work / slug, options)
        figures[f"{name}: losses at steps 1, {third}, {steps}"] = [losses.get(s) for s in (1, third, steps)]
        checks[f"train {name} on {device}"] = (
            bool(losses) and losses[steps] < losses[1],
            "trains in bf16; the loss falls",
        )
        again = train(work / f"{slug}-again", options, _checkpoint(work / slug, third))
        agree(f"{name}: saved on {device}, resumed on {device}", again, losses, third + 1, RESUME_RTOL)
        # a process that sees no GPU reads what the device saved (any world size or stage may)
        on_cpu = train(work / f"{slug}-on-cpu", cpu_options, _checkpoint(work / slug, third), env=cpu_env)
        agree(f"{name}: saved on {device}, resumed on CPU", on_cpu, losses, third + 1, BF16_LOSS_RTOL)
        back = train(work / f"{slug}-back", options, _checkpoint(work / f"{slug}-on-cpu", 2 * third))
        agree(f"{name}: saved on CPU, resumed on {device}", back, on_cpu, 2 * third + 1, BF16_LOSS_RTOL)
    return figures, checks


def section_lookup(device: str, log: Log, work: pathlib.Path, quick: bool) -> tuple[dict, dict]:
    script = [sys.executable, HERE / "gpu_lookup.py", "--device", device, "--skip-checks", "--out", work]
    if device == "cpu":
        script += ["--backend", "torch", "--smoke"]
    elif quick:
        script += ["--quick", "--log2-rows", "20", "24", "--dims", "1024", "--tokens", "16384"]
    else:
        script += ["--log2-rows", "20", "22", "24", "--dims", "256", "1024", "--tokens", "16384"]
    result = run(log, script, 420)
    if result.returncode != 0:
        return {}, {"lookup benchmark": (False, "runs")}
    summary = last_json(result.stdout)
    shapes = summary["shapes"]

    def worst(key):
        values = [s[key] for s in shapes.values() if key in s]
        return min(values) if values else None

    def torch_speedup(shape):  # against the faster of torch's two gradients
        return min(v for k, v in shape.items() if k.startswith("backward_speedup_vs_"))

    figures = {
        "copy_GBps": summary["copy_GBps"],
        "forward_of_copy_min": worst("forward_of_copy"),
        "backward_of_copy_min": worst("backward_of_copy"),
        "backward_speedup_vs_torch_min": min(torch_speedup(s) for s in shapes.values()),
        "shapes": shapes,
    }
    checks = {"lookup benchmark": (True, "runs")}
    if device != "cpu":
        checks["lookup forward >= 80% of copy"] = (figures["forward_of_copy_min"] >= 0.8, "every shape", SPEED)
        checks["lookup backward >= 50% of copy"] = (figures["backward_of_copy_min"] >= 0.5, "every shape", SPEED)
        checks["lookup backward >= 3x F.embedding_bag"] = (
            figures["backward_speedup_vs_torch_min"] >= 3,
            "every shape, against torch's faster gradient",
            SPEED,
        )
    return figures, checks


def section_value_step(device: str, log: Log, work: pathlib.Path, quick: bool) -> tuple[dict, dict]:
    script = [sys.executable, HERE / "bench_value_step.py", "--device", device, "--out", work]
    if device == "cpu":
        script += ["--dim", "16", "--log2-rows", "10", "12", "--reps", "1"]
        script += ["--methods", "dense_adamw", "memray_rowwise_adagrad", "memray_lazy_adam"]
    else:
        script += ["--dim", "1024", "--log2-rows", "16", "20", "22", *(["--reps", "3"] if quick else [])]
    result = run(log, script, 420)
    if result.returncode != 0:
        return {}, {"value step benchmark": (False, "runs")}
    summary = last_json(result.stdout)
    keys = ("speedup_vs_dense_2p20", "speedup_vs_dense_2p22", "dense_baseline_2p22", "floor_ratio_2p22")
    figures = {k: summary.get(k) for k in (*keys, "rowwise_adagrad_ms", "skipped")}
    checks = {"value step benchmark": (True, "runs")}
    if device != "cpu":
        speedup = summary.get("speedup_vs_dense_2p22")
        checks["value step 2^22 x 1024 >= 20x dense AdamW"] = (
            bool(speedup and speedup >= 20),
            "row-wise Adagrad vs the dense AdamW that fits",
            SPEED,
        )
    return figures, checks


def section_e2e(device: str, log: Log, work: pathlib.Path, quick: bool) -> tuple[dict, dict]:
    script = [sys.executable, HERE / "e2e_throughput.py", "--device", device, "--precision", "bf16", "--out", work]
    if device == "cpu":
        script += ["--quick", "--n-keys", "16", "--batch", "4", "--one-process"]
    else:
        script += ["--n-keys", "1024", "--dim", "1024", "--layers", "8", "--batch", "64"]
        script += sets("model.n_heads=8", "model.memory.k_dim=512", "model.memory.value_dtype=bf16")
        script += ["--quick"] if quick else []
    result = run(log, script, 420)
    if result.returncode != 0:
        return {}, {"e2e benchmark": (False, "runs")}
    ratio = last_json(result.stdout)["memory_plus_over_dense"]["1 process"]
    checks = {"e2e benchmark": (True, "runs")}
    if device != "cpu":
        checks["Memory+ trains >= 0.8x dense tokens/s"] = (
            ratio >= 0.8,
            "equal FLOPs per token, bf16, 2^20 slots",
            SPEED,
        )
    return {"memory_plus_over_dense": ratio}, checks


def section_layer(device: str, log: Log, _work: pathlib.Path, quick: bool) -> tuple[dict, dict]:
    script = [sys.executable, __file__, "--part", "layer", "--device", device, *(["--quick"] if quick else [])]
    result = run(log, script, 300)
    if result.returncode != 0:
        return {}, {"Memory+ layer benchmark": (False, "runs")}
    return last_json(result.stdout), {"Memory+ layer benchmark": (True, "runs")}


def section_search(device: str, log: Log, _work: pathlib.Path, quick: bool) -> tuple[dict, dict]:
    script = [sys.executable, __file__, "--part", "search", "--device", device, *(["--quick"] if quick else [])]
    result = run(log, script, 300)
    if result.returncode != 0:
        return {}, {"product-key search benchmark": (False, "runs")}
    figures = last_json(result.stdout)
    checks = {"product-key search benchmark": (True, "runs")}
    if device != "cpu":
        checks["Triton search >= 2x the torch search"] = (
            figures["speedup"] >= 2.0,
            "forward + backward, n_keys 1024, k_dim 512, 16k tokens",
            SPEED,
        )
    return figures, checks


def section_scale(device: str, log: Log, _work: pathlib.Path, quick: bool) -> tuple[dict, dict]:
    script = [sys.executable, __file__, "--part", "scale", "--device", device, *(["--quick"] if quick else [])]
    result = run(log, script, 420)
    if result.returncode != 0:
        return {}, {"scale benchmark": (False, "runs")}
    figures = last_json(result.stdout)
    checks = {"scale benchmark": (True, "runs")}
    if device != "cpu":
        checks["2^24 x 1024 bf16 pool steps within 1.3x of 2^16"] = (
            figures["ratio"] <= 1.3,
            "same model and batch",
            SPEED,
        )
    return figures, checks


# ------------------------------------------------------------------------------------------------
# parts timed in a process of their own
# ------------------------------------------------------------------------------------------------


def _median_seconds(fn, reps: int, sync) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def part_layer(device: str, quick: bool) -> dict:
    """A Memory+ layer forward + backward: memray's lookup against F.embedding_bag's."""
    import torch
    import torch.nn.functional as F

    from memray.model import MemoryConfig, ProductKeyMemory, ValueTable

    class EmbeddingBagTable(ValueTable):
        """The same pool read through torch's embedding bag (row-sparse gradient)."""

        def forward(self, indices, weights, *, record=False):
            offsets = torch.arange(indices.shape[0], device=indices.device) * indices.shape[1]
            return F.embedding_bag(
                indices.reshape(-1),
                self.weight,
                offsets,
                mode="sum",
                sparse=True,
                per_sample_weights=weights.reshape(-1).to(self.weight.dtype),
            )

    dev = torch.device(device)
    small = dev.type == "cpu"
    dim, tokens = (64, 256) if small else (1024, 16384)
    config = MemoryConfig(
        n_keys=16 if small else 1024,
        heads=4,
        knn=8 if small else 32,
        k_dim=64 if small else 512,
        swilu=True,
        qk_norm=True,
        value_dtype="bf16",
        track_usage=False,
    )
    layer = ProductKeyMemory(dim, config, device=dev)
    torch_pool = EmbeddingBagTable(config.num_slots, dim, dtype=torch.bfloat16, device=dev, init_seed=0)
    with torch.no_grad():
        torch_pool.weight.copy_(layer.values.weight)
    torch_layer = ProductKeyMemory(dim, config, values=torch_pool, device=dev)
    torch_layer.load_state_dict(
        {k: v for k, v in layer.state_dict().items() if not k.startswith("value_table.")}, strict=False
    )
    x = torch.randn(tokens, dim, device=dev)
    upstream = torch.randn(tokens, dim, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step(module):
        def fn():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                y = module(x)
            y.float().backward(upstream)
            module.zero_grad(set_to_none=True)
            module.values.weight.grad = None

        return fn

    reps = 3 if small else (10 if quick else 30)
    ours = _median_seconds(step(layer), reps, sync)
    theirs = _median_seconds(step(torch_layer), reps, sync)
    return {
        "slots": config.num_slots,
        "dim": dim,
        "tokens": tokens,
        "memray_ms": ours * 1e3,
        "embedding_bag_ms": theirs * 1e3,
        "speedup": theirs / ours,
    }


def part_search(device: str, quick: bool) -> dict:
    """The product-key search forward + backward: the Triton kernel (``kernels.pk_search``,
    ``backend="triton"``) against the layer's torch search (the full half scores, three topk),
    with each one's peak memory above its inputs."""
    import torch

    from memray.kernels import pk_search
    from memray.model import MemoryConfig, ProductKeyMemory

    dev = torch.device(device)
    small = dev.type == "cpu"
    tokens, heads, n_keys, k_dim, knn = (16, 2, 16, 16, 4) if small else (16384, 4, 1024, 512, 32)
    torch_search = ProductKeyMemory(64, MemoryConfig(n_keys=n_keys, heads=heads, knn=knn, k_dim=k_dim, backend="torch"))
    q = torch.randn(tokens, heads, 2, k_dim // 2, device=dev, requires_grad=True)
    keys = torch.randn(heads, 2, n_keys, k_dim // 2, device=dev, requires_grad=True)
    upstream = torch.randn(tokens, heads, knn, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def triton_step():
        scores = pk_search(q, keys, knn, backend="triton")[2]
        torch.autograd.grad((scores * upstream).sum(), (q, keys))

    def torch_step():
        scores = torch_search.select(q, keys)[1]
        torch.autograd.grad((scores * upstream).sum(), (q, keys))

    out = {"tokens": tokens, "heads": heads, "n_keys": n_keys, "k_dim": k_dim, "knn": knn}
    reps = 1 if small else (5 if quick else 15)
    for name, fn in (("triton", triton_step), ("torch", torch_step)):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        out[f"{name}_ms"] = 1e3 * _median_seconds(fn, reps, sync)
        if dev.type == "cuda":
            out[f"{name}_peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    out["speedup"] = out["torch_ms"] / out["triton_ms"]
    # the same slots: the torch search's own selection can differ only at exact score ties
    with torch.no_grad():
        got, want = pk_search(q, keys, knn, backend="triton"), torch_search.select(q, keys)
        slots = got[0] * n_keys + got[1]
        out["same_slots_fraction"] = float((slots == want[0]).float().mean())
        out["max_score_diff"] = float((got[2] - want[1]).abs().max())
    return out


def part_scale(device: str, quick: bool) -> dict:
    """Training steps of one small model with a 2^16-row and a 2^24-row bf16 pool (row-wise
    Adagrad), the same batches: median step time of each and their ratio."""
    import torch

    from memray.train import Trainer, load_run_config

    small = device == "cpu"
    sizes = (4, 8) if small else (256, 4096)  # n_keys: 2^16 and 2^24 slots on a GPU
    v_dim = 32 if small else 1024
    reps = 3 if small else (8 if quick else 20)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n_keys in sizes:
            config = load_run_config(
                "tiny",
                [
                    f"train.device={device}",
                    "train.precision=bf16",
                    "train.batch_size=16",
                    "data.seq_len=64",
                    "model.dim=256" if not small else "model.dim=64",
                    "model.n_heads=4",
                    "model.memory_layers=[1]",
                    f"model.memory.n_keys={n_keys}",
                    f"model.memory.v_dim={v_dim}",
                    "model.memory.value_dtype=bf16",
                    "model.memory.heads=4",
                    f"model.memory.knn={4 if small else 32}",
                    "model.memory.k_dim=64",
                    "optim.value_optimizer=rowwise_adagrad",
                    "model.memory.value_lr=0.01",
                ],
            )
            trainer = Trainer(config, run_dir=f"{tmp}/{n_keys}", progress=False)
            trainer.model.train()
            sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
            out[f"step_ms_2^{2 * n_keys.bit_length() - 2}"] = 1e3 * _median_seconds(
                lambda trainer=trainer: trainer.train_step(*trainer.batches.next()), reps, sync
            )
            out[f"pool_GiB_2^{2 * n_keys.bit_length() - 2}"] = round(
                trainer.tables["layer1"].weight.numel() * 2 / 2**30, 3
            )
            del trainer
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    small_key, large_key = (k for k in out if k.startswith("step_ms"))
    out["ratio"] = out[large_key] / out[small_key]
    return out


# ------------------------------------------------------------------------------------------------


SECTIONS = {
    "env": section_env,
    "aot": section_aot,
    "tests": section_tests,
    "train": section_train,
    "lookup": section_lookup,
    "value_step": section_value_step,
    "layer": section_layer,
    "search": section_search,
    "e2e": section_e2e,
    "scale": section_scale,
}


def write_report(out: pathlib.Path, report: dict) -> None:
    (out / f"{NAME}.json").write_text(json.dumps(report, indent=1))
    lines = [
        f"# {NAME} on {report['figures'].get('env', {}).get('gpu', report['device'])}",
        "",
        f"{report['figures'].get('env', {})}; {'quick' if report['quick'] else 'full'} run, {report['seconds']:.0f} s.",
        "",
        "| check | met | required |",
        "|---|---|---|",
    ]
    for name, (ok, what, *kind) in report["checks"].items():
        lines.append(f"| {name} | {'yes' if ok else 'NO'} | {what}{' (speed target)' if kind else ''} |")
    lines += ["", "Figures:", ""]
    for section, figures in report["figures"].items():
        if section != "env":
            lines.append(f"- **{section}**: `{json.dumps(figures)}`")
    lines.append(f"- sections that broke: {report['broken'] or 'none'}")
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (a lent GPU) or cpu (the smoke run)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (under 3 minutes)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results" / "gpu"))
    parser.add_argument("--sections", default=",".join(SECTIONS), help="a comma-separated subset")
    parts = {"layer": part_layer, "search": part_search, "scale": part_scale}
    parser.add_argument("--part", choices=list(parts), help=argparse.SUPPRESS)  # run by a section
    args = parser.parse_args(argv)
    if args.part:
        print(json.dumps(parts[args.part](args.device, args.quick)))
        return 0
    os.environ.update(device_env(args.device))  # every process below inherits it
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / f"{NAME}.log")
    started = time.monotonic()
    report = {"device": args.device, "quick": args.quick, "figures": {}, "checks": {}, "broken": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        for name in args.sections.split(","):
            log(f"== {name}")
            fn = SECTIONS[name]
            try:
                figures, checks = fn(args.device, log, work, args.quick)
            except Exception as exc:  # noqa: BLE001 - a broken section is reported with the others
                log(f"  section {name} broke: {type(exc).__name__}: {exc}")
                report["broken"].append(name)
                continue
            report["figures"][name] = figures
            report["checks"].update(checks)
        with tarfile.open(out / "details.tar.gz", "w:gz") as tar:
            for path in sorted(work.glob("*.csv")) + sorted(work.glob("*.md")):
                tar.add(path, arcname=path.name)
    report["seconds"] = time.monotonic() - started
    write_report(out, report)
    for name, (ok, what, *kind) in report["checks"].items():
        log(f"{'ok ' if ok else 'NO '} {name} ({what}{', speed target' if kind else ''})")
    passed = all(ok for ok, _, *kind in report["checks"].values() if not kind) and not report["broken"]
    log(
        json.dumps(
            {
                "benchmark": NAME,
                "device": args.device,
                "passed": passed,
                "checks_met": sum(ok for ok, *_ in report["checks"].values()),
                "checks": len(report["checks"]),
                "broken": report["broken"],
                "seconds": round(report["seconds"]),
            }
        )
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
