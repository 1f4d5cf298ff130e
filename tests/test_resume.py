"""Resuming: exact at the same world size, continuing from the same state on another."""

import json
import os
import subprocess
import sys

import pytest

from memray.train import Trainer, load_run_config

SAVE = ["--set", "train.log_every=1", "--set", "train.checkpoint_every=10", "--set", "train.keep_last=0"]
LOCAL = ["--set", "distributed.launcher=processes"]  # tests/test_ray.py resumes through Ray


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _cli(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "memray.cli", *args, *(LOCAL if args[0] == "train" else [])],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_single_process_resume_is_exact(tmp_path):
    overrides = ["train.log_every=1", "train.checkpoint_every=10", "train.keep_last=0"]
    Trainer(load_run_config("tiny", overrides), run_dir=tmp_path / "a", progress=False).fit()
    resumed = Trainer(load_run_config("tiny", overrides), run_dir=tmp_path / "b", progress=False)
    resumed.resume(tmp_path / "a" / "checkpoints" / "step-00000010")
    assert resumed.step == 10 and resumed.tokens == 10 * 8 * 64
    resumed.fit()
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")[10:]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "two"
    result = _cli(
        "train",
        "tiny",
        "--workers",
        "2",
        "--set",
        "distributed.zero_stage=2",
        "--run-dir",
        str(run),
        "--no-progress",
        *SAVE,
    )
    assert result.returncode == 0, result.stderr
    return run


@pytest.mark.parametrize("workers,tolerance", [(2, 0.0), (3, 1e-4)])
def test_resume_on_any_world_size(two_rank_run, workers, tolerance, tmp_path):
    """Same world size: the uninterrupted run's losses exactly. Another world size reads its own
    rows and columns and continues from the same state: equal up to the rounding of sums taken
    in another order (tests/test_ray.py resumes on 3 and 1 Ray workers too)."""
    layout = "column" if workers == 3 else "row"
    result = _cli(
        "train",
        "tiny",
        "--workers",
        str(workers),
        "--set",
        "distributed.zero_stage=2",
        "--set",
        f"model.memory.layout={layout}",
        "--run-dir",
        str(tmp_path / "r"),
        "--no-progress",
        "--set",
        "train.log_every=1",
        "--resume",
        str(two_rank_run / "checkpoints" / "step-00000010"),
    )
    assert result.returncode == 0, result.stderr
    resumed, uninterrupted = _losses(tmp_path / "r"), _losses(two_rank_run)[10:]
    assert len(resumed) == 10
    assert max(abs(a - b) for a, b in zip(resumed, uninterrupted)) <= tolerance


def test_resume_refuses_damage_and_zero3(two_rank_run, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_rank_run / "checkpoints" / "step-00000010", ckpt)
    chunk = ckpt / "memory.zarr" / "layer1" / "optim.exp_avg" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0xFF
    chunk.write_bytes(bytes(data))
    for extra, needle in (
        (["--set", "distributed.zero_stage=2"], "'layer1/optim.exp_avg' chunk 1/0"),
        (["--set", "distributed.zero_stage=3"], "distributed.zero_stage"),
    ):
        result = _cli(
            "train", "tiny", "--workers", "2", *extra, "--run-dir", str(tmp_path / "r"), "--resume", str(ckpt)
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr


def test_async_checkpoints_equal_the_state_at_their_step(two_rank_run, tmp_path):
    """Checkpoints written by a thread while training went on hold the state of their own step:
    resuming from the step-10 one reproduces the uninterrupted losses exactly."""
    result = _cli(
        "train",
        "tiny",
        "--workers",
        "2",
        "--set",
        "distributed.zero_stage=2",
        "--run-dir",
        str(tmp_path / "a"),
        "--no-progress",
        *SAVE,
        "--set",
        "train.checkpoint_every=5",
        "--set",
        "train.async_checkpoint=true",
    )
    assert result.returncode == 0, result.stderr
    assert _losses(tmp_path / "a") == _losses(two_rank_run)  # saving in the background changes nothing
    steps = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert steps == ["step-00000005", "step-00000010", "step-00000015", "step-00000020"]
    assert _cli("verify", str(tmp_path / "a" / "checkpoints" / "step-00000015")).returncode == 0
    resumed = _cli(
        "train",
        "tiny",
        "--workers",
        "2",
        "--set",
        "distributed.zero_stage=2",
        "--run-dir",
        str(tmp_path / "b"),
        "--no-progress",
        "--set",
        "train.log_every=1",
        "--resume",
        str(tmp_path / "a" / "checkpoints" / "step-00000010"),
    )
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(tmp_path / "b") == _losses(two_rank_run)[10:]
