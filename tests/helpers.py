"""What several test files need: running the CLI (a real process, or in this one) and reading a
run directory."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

# `make gpu-check` runs the tests marked gpu with this set to its device (cuda; cpu for its smoke
# run): tests parametrized with device_params() then also run there
GPU_CHECK_DEVICE = os.environ.get("MEMRAY_GPU_CHECK_DEVICE")


def device_params() -> list:
    """ "cpu", and the GPU check's device (marked gpu) when `make gpu-check` runs the tests."""
    import pytest

    params = ["cpu"]
    if GPU_CHECK_DEVICE:
        params.append(pytest.param(GPU_CHECK_DEVICE, marks=pytest.mark.gpu, id=f"gpu-check-{GPU_CHECK_DEVICE}"))
    return params


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (its workers are pickled by module name)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def sets(*overrides: str) -> list[str]:
    """``--set KEY=VALUE`` for each override."""
    return [arg for override in overrides for arg in ("--set", override)]


# how the session's two-rank reference (conftest ``two_rank_run``) and the runs compared with it train
TWO_RANKS = sets("distributed.launcher=processes", "distributed.zero_stage=2", "train.steps=30", "train.log_every=1")


def memray(*args, env=None, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """``memray ARGS`` as a user runs it: a new process; its exit code, stdout and stderr."""
    env = {**(env or os.environ), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "memray.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def train_tiny(run_dir, *args, workers=2, env=None) -> subprocess.CompletedProcess:
    """``memray train tiny`` on local processes, trained as the two-rank reference is (ZeRO-2, 30
    steps, every step logged), into ``run_dir``; ``args``: more options (later ``--set`` win)."""
    args = ("train", "tiny", "--workers", workers, *TWO_RANKS, "--run-dir", run_dir, "--no-progress", *args)
    return memray(*args, env=env)


def memray_here(*args) -> subprocess.CompletedProcess:
    """``memray ARGS`` in this process (click's runner): for commands that fail or finish before
    any real work, where a new interpreter would only add its start-up time."""
    from click.testing import CliRunner

    from memray.cli import main

    result = CliRunner().invoke(main, list(map(str, args)))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    """Exit code ``code`` (2: a user's error, 1: a failed run) and one line on stderr naming every
    needle; no traceback. (A failed run's own log lines may come before it, as they do on a
    terminal without a progress bar.)"""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    if code != 2:
        lines = [line for line in lines if not _LOG_LINE.match(line)]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d ")  # RunDirectory.log's lines


def read_metrics(run_dir) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as handle:
        return [json.loads(line) for line in handle]


def losses(run_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


# torch.distributed calls that move tensors (what DeepSpeed and memray call between them)
COLLECTIVES = (
    "all_reduce",
    "reduce_scatter_tensor",
    "all_gather_into_tensor",
    "broadcast",
    "reduce",
    "all_gather",
    "reduce_scatter",
    "all_reduce_coalesced",
    "all_to_all_single",
    "all_gather_object",
    "barrier",
)


def watch_collectives(on_call) -> None:
    """Call ``on_call(name, tensors, group, caller_frame)`` before every collective of
    ``torch.distributed`` (for the rest of the process: tests run it in spawned ranks).
    ``tensors``: every tensor argument, also inside lists; ``caller_frame``: who called it."""
    import sys

    import torch
    import torch.distributed as dist

    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def wrapper(*args, _original=original, _name=name, **kwargs):
            values = (*args, *kwargs.values())
            tensors = [a for a in values if isinstance(a, torch.Tensor)]
            tensors += [t for a in values if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            on_call(_name, tensors, kwargs.get("group"), sys._getframe(1))
            return _original(*args, **kwargs)

        setattr(dist, name, wrapper)
