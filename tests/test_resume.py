"""Resuming: exact at the same world size, continuing from the same state on another.

The reference is the session's 30-step run on 2 local processes (conftest ``two_rank_run``);
tests/test_ray.py resumes and restarts through Ray against the same run."""

import json
import shutil

import pytest
import torch
from helpers import assert_one_line_error, losses, memray, memray_here, sets, train_tiny
from safetensors.torch import load_file

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
    # the rerun rule for one process: training again into a run directory continues its newest
    # committed checkpoint (an uncommitted newer one is ignored)
    rerun = tmp_path / "c" / "checkpoints"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000010", rerun / "step-00000010")
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000020", rerun / "step-00000020")
    (rerun / "step-00000020" / "COMMITTED").unlink()
    result = memray_here("train", "tiny", "--workers", 0, *sets(*overrides), "--run-dir", tmp_path / "c")
    assert result.returncode == 0, result.stderr
    assert losses(tmp_path / "c") == losses(tmp_path / "a")[10:]


@pytest.mark.parametrize("workers,tolerance", [(2, 0.0), (3, 1e-4), (1, 1e-4)])
def test_resume_on_any_world_size(two_rank_run, workers, tolerance, tmp_path):
    """Same world size: the uninterrupted run's losses exactly. Another world size (3 ranks in the
    column layout at ZeRO-3, whose partitions 3 ranks do not divide evenly; 1 rank) reads its own
    rows and columns and continues from the same state: equal up to the rounding of sums taken
    in another order."""
    other = sets("model.memory.layout=column", "distributed.zero_stage=3") if workers == 3 else []
    step_10 = two_rank_run / "checkpoints" / "step-00000010"
    result = train_tiny(tmp_path / "r", *other, "--resume", step_10, workers=workers)
    assert result.returncode == 0, result.stderr
    resumed, uninterrupted = losses(tmp_path / "r"), losses(two_rank_run)[10:]
    assert len(resumed) == 20
    assert max(abs(a - b) for a, b in zip(resumed, uninterrupted)) <= tolerance


def test_a_rerun_continues_its_run_directory(two_rank_run, tmp_path):
    """The rerun rule of every launcher (Ray's is in tests/test_ray.py): a run directory that
    holds committed checkpoints continues from its newest, also when ``--resume`` names another
    (that is where the run directory started: the same command run again must continue)."""
    ckpts = two_rank_run / "checkpoints"
    shutil.copytree(ckpts / "step-00000010", tmp_path / "r" / "checkpoints" / "step-00000010")
    result = train_tiny(tmp_path / "r", "--resume", ckpts / "step-00000020")
    assert result.returncode == 0, result.stderr
    assert losses(tmp_path / "r") == losses(two_rank_run)[10:]
    assert "continuing from" in (tmp_path / "r" / "log.txt").read_text()


def test_zero3_resumes_exactly(zero3_run, tmp_path):
    """ZeRO-3 partitions the dense weights and Adam moments: its checkpoint holds them whole
    (once saved as zeros: the base optimizer's groups are empty between ZeRO-3 steps) and they
    load back into the partitions (on 3 ranks, padded ones: test_resume_on_any_world_size)."""
    step_10 = zero3_run / "checkpoints" / "step-00000010"
    same = train_tiny(tmp_path / "same", *sets("distributed.zero_stage=3"), "--resume", step_10)
    assert same.returncode == 0, same.stderr
    assert losses(tmp_path / "same") == losses(zero3_run)[10:]


def test_resume_refuses_damage(two_rank_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_rank_run / "checkpoints" / "step-00000010", ckpt)
    chunk = ckpt / "memory.zarr" / "layer1" / "optim.exp_avg" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert_one_line_error(train_tiny(tmp_path / "r", "--resume", ckpt), "'layer1/optim.exp_avg' chunk 1/0")


def test_async_checkpoints_equal_the_state_at_their_step(two_rank_run, tmp_path):
    """Checkpoints written by a thread while training went on hold the state of their own step:
    resuming from one reproduces the uninterrupted losses exactly."""
    every_5 = sets("train.checkpoint_every=5", "train.keep_last=0", "train.async_checkpoint=true")
    result = train_tiny(tmp_path / "a", *every_5)
    assert result.returncode == 0, result.stderr
    assert losses(tmp_path / "a") == losses(two_rank_run)  # saving in the background changes nothing
    steps = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert steps == [f"step-{s:08d}" for s in (5, 10, 15, 20, 25, 30)]
    step_15 = tmp_path / "a" / "checkpoints" / "step-00000015"
    assert memray("verify", step_15).returncode == 0
    resumed = train_tiny(tmp_path / "b", "--resume", step_15)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "b") == losses(two_rank_run)[15:]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_checkpoints_hold_fp32_masters_and_resume_exactly(stage, tmp_path):
    """train.precision bf16 on N ranks runs DeepSpeed's bf16 engine (here on its CPU accelerator,
    the path a GPU takes): the parameters are bf16, the optimizer keeps fp32 masters. A
    checkpoint holds those masters (fp32, not rounded to bf16) and the Adam moments (stage 0's
    wrapper keys them by its own fp32 copies), and a run resumed from it reproduces the
    uninterrupted run's next 5 losses exactly."""
    bf16 = sets(
        "train.precision=bf16",
        f"distributed.zero_stage={stage}",
        "train.steps=8",
        "train.checkpoint_every=3",
        "train.keep_last=0",
    )
    uninterrupted = train_tiny(tmp_path / "a", *bf16)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    step_3 = tmp_path / "a" / "checkpoints" / "step-00000003"
    attrs = json.loads((step_3 / "memory.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["dense_dtype"] == "bfloat16" and attrs["zero_stage"] == stage
    weights, moments = load_file(step_3 / "model.safetensors"), load_file(step_3 / "optimizer.safetensors")
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
    # a master that had been rounded to bf16 would equal its rounding: none of them does
    assert not [name for name, w in weights.items() if torch.equal(w, w.bfloat16().float())]
    assert moments and not [name for name, m in moments.items() if not m.abs().sum() > 0]
    resumed = train_tiny(tmp_path / "b", *bf16, "--resume", step_3)
    assert resumed.returncode == 0, resumed.stderr
    assert len(losses(tmp_path / "b")) == 5
    assert losses(tmp_path / "b") == losses(tmp_path / "a")[3:]
