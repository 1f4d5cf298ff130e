"""Resuming: exact at the same world size, continuing from the same state on another.

The reference is the session's 30-step run on 2 local processes (conftest ``two_rank_run``);
tests/test_ray.py resumes and restarts through Ray against the same run."""

import shutil

import pytest
from helpers import SAVE_EVERY_10, TWO_RANKS, assert_one_line_error, losses, memray

from memray.train import Trainer, load_run_config

pytestmark = pytest.mark.slow


def test_single_process_resume_is_exact(tmp_path):
    overrides = ["train.log_every=1", "train.checkpoint_every=10", "train.keep_last=0"]
    Trainer(load_run_config("tiny", overrides), run_dir=tmp_path / "a", progress=False).fit()
    resumed = Trainer(load_run_config("tiny", overrides), run_dir=tmp_path / "b", progress=False)
    resumed.resume(tmp_path / "a" / "checkpoints" / "step-00000010")
    assert resumed.step == 10 and resumed.tokens == 10 * 8 * 64
    resumed.fit()
    assert losses(tmp_path / "b") == losses(tmp_path / "a")[10:]


@pytest.mark.parametrize("workers,tolerance", [(2, 0.0), (3, 1e-4)])
def test_resume_on_any_world_size(two_rank_run, workers, tolerance, tmp_path):
    """Same world size: the uninterrupted run's losses exactly. Another world size (and layout)
    reads its own rows and columns and continues from the same state: equal up to the rounding of
    sums taken in another order."""
    layout = "column" if workers == 3 else "row"
    result = memray(
        "train",
        "tiny",
        "--workers",
        workers,
        *TWO_RANKS,
        "--set",
        f"model.memory.layout={layout}",
        "--set",
        "train.steps=30",
        "--set",
        "train.log_every=1",
        "--run-dir",
        tmp_path / "r",
        "--no-progress",
        "--resume",
        two_rank_run / "checkpoints" / "step-00000010",
    )
    assert result.returncode == 0, result.stderr
    resumed, uninterrupted = losses(tmp_path / "r"), losses(two_rank_run)[10:]
    assert len(resumed) == 20
    assert max(abs(a - b) for a, b in zip(resumed, uninterrupted)) <= tolerance


def test_resume_refuses_damage_and_zero3(two_rank_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_rank_run / "checkpoints" / "step-00000010", ckpt)
    chunk = ckpt / "memory.zarr" / "layer1" / "optim.exp_avg" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0xFF
    chunk.write_bytes(bytes(data))
    train = ["train", "tiny", "--workers", "2", "--set", "distributed.launcher=processes", "--run-dir", tmp_path / "r"]
    damaged = memray(*train, "--set", "distributed.zero_stage=2", "--resume", ckpt)
    assert_one_line_error(damaged, "'layer1/optim.exp_avg' chunk 1/0")
    # refused before any process starts
    assert_one_line_error(
        memray(*train, "--set", "distributed.zero_stage=3", "--resume", ckpt), "distributed.zero_stage"
    )


def test_async_checkpoints_equal_the_state_at_their_step(two_rank_run, tmp_path):
    """Checkpoints written by a thread while training went on hold the state of their own step:
    resuming from one reproduces the uninterrupted losses exactly."""
    result = memray(
        "train",
        "tiny",
        "--workers",
        "2",
        *TWO_RANKS,
        *SAVE_EVERY_10,
        "--set",
        "train.steps=30",
        "--set",
        "train.checkpoint_every=5",
        "--set",
        "train.async_checkpoint=true",
        "--run-dir",
        tmp_path / "a",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert losses(tmp_path / "a") == losses(two_rank_run)  # saving in the background changes nothing
    steps = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert steps == [f"step-{s:08d}" for s in (5, 10, 15, 20, 25, 30)]
    assert memray("verify", tmp_path / "a" / "checkpoints" / "step-00000015").returncode == 0
    resumed = memray(
        "train",
        "tiny",
        "--workers",
        "2",
        *TWO_RANKS,
        "--set",
        "train.steps=30",
        "--set",
        "train.log_every=1",
        "--run-dir",
        tmp_path / "b",
        "--no-progress",
        "--resume",
        tmp_path / "a" / "checkpoints" / "step-00000015",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "b") == losses(two_rank_run)[15:]
