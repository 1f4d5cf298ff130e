"""Test session set-up.

Triton kernels run on CPU only under the interpreter, which must be chosen before triton is
first imported; DeepSpeed must be told it has no accelerator before it is imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (still run by make test)")
    config.addinivalue_line("markers", "demo: the demo's minutes-long recall promise (make test; not make test-fast)")
    config.addinivalue_line("markers", "gpu: run by make gpu-check on its device (MEMRAY_GPU_CHECK_DEVICE)")


# Runs that several test files check, each trained once per session. Tests copy a checkpoint
# before damaging it.


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`memray train tiny --workers 0` (20 steps, one process, every step logged): the
    single-process reference of the run-directory contract, eval, inspect and the N-rank runs."""
    from helpers import memray

    run = tmp_path_factory.mktemp("tiny") / "run"
    result = memray("train", "tiny", "--workers", "0", "--run-dir", run, "--no-progress", "--set", "train.log_every=1")
    assert result.returncode == 0, result.stderr
    return run


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory):
    """The two-rank reference at ZeRO-3 (dense weights and Adam moments partitioned)."""
    from helpers import sets, train_tiny

    run = tmp_path_factory.mktemp("zero3") / "run"
    result = train_tiny(run, *sets("train.checkpoint_every=10", "train.keep_last=0", "distributed.zero_stage=3"))
    assert result.returncode == 0, result.stderr
    return run


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory):
    """The tiny model on 2 local processes at ZeRO-2 for 30 steps, a checkpoint every 10: what
    resumes, restarts and background saves must reproduce."""
    from helpers import sets, train_tiny

    run = tmp_path_factory.mktemp("two-ranks") / "run"
    result = train_tiny(run, *sets("train.checkpoint_every=10", "train.keep_last=0"))
    assert result.returncode == 0, result.stderr
    return run
