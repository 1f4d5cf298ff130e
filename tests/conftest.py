"""Test session set-up.

Triton kernels run on CPU only under the interpreter, which must be chosen before triton is
first imported; DeepSpeed must be told it has no accelerator before it is imported.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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
    config.addinivalue_line("markers", "soak: end-to-end Ray and fault-injection runs: make test-soak (CI's next step)")
    config.addinivalue_line("markers", "threads: keeps torch's threads while the demo trains in the background")


# The demo's training (minutes) runs in the background on one thread from the start of the
# session, while the other tests use what the machine has left; the demo test runs last and
# waits for it. (One thread trains the demo at ~0.6x the speed of two, and the rest of the suite
# leaves most of a core idle: the session ends minutes sooner.)
DEMO_TRAIN = """
import sys, torch
torch.set_num_threads(1)
from memray.train import Trainer, load_run_config
Trainer(load_run_config("demo"), run_dir=sys.argv[1], progress=False).fit()
"""
_demo: dict = {}


def pytest_collection_finish(session):
    demo = [item for item in session.items if item.get_closest_marker("demo")]
    if not demo:
        return
    # beside the demo's thread first: the quick single-process tests, which lose little on one
    # core; then the slow ones (most start several processes, which wait for each other on a
    # shared core), as much as possible after the demo's training ends; the demo test last
    session.items.sort(key=lambda item: (bool(item.get_closest_marker("demo")), bool(item.get_closest_marker("slow"))))
    root = Path(tempfile.mkdtemp(prefix="memray-demo-test-"))
    log = open(root / "train.log", "w")
    command = [sys.executable, "-c", DEMO_TRAIN, str(root / "run")]
    _demo.update(root=root, log=log, process=subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))


def pytest_sessionfinish():
    if "process" in _demo:
        if _demo["process"].poll() is None:
            _demo["process"].kill()
        _demo["process"].wait()
        _demo["log"].close()
        shutil.rmtree(_demo["root"], ignore_errors=True)


@pytest.fixture(autouse=True)
def one_thread_beside_demo(request, monkeypatch):
    """While the demo trains in the background (on one thread, on one of the two cores), every
    test's torch gets one thread too, in this process (restored after) and in the processes it
    starts (OMP_NUM_THREADS): two threads beside the demo's wait for each other at every parallel
    region while one of them is descheduled, and the same work took 3-7x as long. A test marked
    ``threads`` (it exercises the kernels' multithreaded paths) keeps torch's default. Without the
    demo (a file run alone, make test-fast), nothing changes."""
    if request.node.get_closest_marker("threads") or "process" not in _demo or _demo["process"].poll() is not None:
        yield
        return
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def demo_run() -> Path:
    """The run directory of `memray train demo` (one process), once its background training ends."""
    assert "process" in _demo, "the demo's training starts when a demo test is collected"
    code = _demo["process"].wait()
    _demo["log"].flush()
    assert code == 0, (_demo["root"] / "train.log").read_text()[-3000:]
    return _demo["root"] / "run"


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
