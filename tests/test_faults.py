"""The fault matrix: each fault ends in one line naming what failed, loses nothing committed, and
the same command run again succeeds. Faults are planted in the real processes (ranks and
workers included) by tests/faults/sitecustomize.py; README's "Reliability" table lists these
tests beside the others (damaged chunks and shards, the Ray cases)."""

import json
import os
import pathlib
import shutil

import pytest
from helpers import assert_one_line_error, memray, memray_here, read_metrics, sets, train_tiny

from memray.checkpoint import committed_checkpoints

# minutes of Ray (or process) start-up each: run by `make test-soak`, CI's step after `make test`
pytestmark = [pytest.mark.slow, pytest.mark.soak]

FAULTS = pathlib.Path(__file__).resolve().parent / "faults"


def _with_fault(fault: str) -> dict:
    path = os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "MEMRAY_FAULT": fault}


def test_rank_killed_or_disk_full_in_save_or_restore_loses_nothing(two_rank_run, tmp_path):
    """One run directory through four launches of the same command (2 ranks, a checkpoint every
    10 steps): a rank SIGKILLed while writing step 20, then no space left while writing step 20,
    then a rank SIGKILLed while restoring step 10, then no fault. Each failure is one line, exit
    1; step 10 stays committed and intact throughout; the last launch continues from it and
    every step's loss equals the uninterrupted reference run's."""
    run = tmp_path / "run"
    every_10 = sets("train.checkpoint_every=10", "train.keep_last=0")

    def intact() -> None:
        assert [p.name for p in committed_checkpoints(run / "checkpoints")] == ["step-00000010"]
        assert memray("verify", run / "checkpoints" / "step-00000010").returncode == 0

    killed = train_tiny(run, *every_10, env=_with_fault("save-kill:20:1"))
    assert_one_line_error(killed, "rank 1 died (killed by SIGKILL)", code=1)
    intact()
    full = train_tiny(run, *every_10, env=_with_fault("save-enospc:20:0"))
    assert_one_line_error(full, "checkpoint step 20 was not saved", "No space left on device", code=1)
    assert "OSError" in (run / "failure.txt").read_text()  # the traceback, kept where the line says
    intact()
    restoring = train_tiny(run, *every_10, env=_with_fault("restore-kill:1"))
    assert_one_line_error(restoring, "rank 1 died (killed by SIGKILL)", code=1)
    intact()
    again = train_tiny(run, *every_10)
    assert again.returncode == 0, again.stderr
    final = {m["step"]: m["loss"] for m in read_metrics(run)}  # each step's last line: the last launch
    reference = {m["step"]: m["loss"] for m in read_metrics(two_rank_run)}
    assert final == reference
    assert [p.name for p in committed_checkpoints(run / "checkpoints")][-1] == "step-00000030"


def test_checkpoint_of_another_model_is_named_before_loading(two_rank_run, tmp_path):
    step_10 = two_rank_run / "checkpoints" / "step-00000010"
    for override, needle in (
        ("model.dim=32", "'embed.weight' is [259, 64] there, [259, 32] here"),
        ("model.memory.n_keys=12", "'blocks.1.ffn.keys' is [2, 2, 16, 16] there, [2, 2, 12, 16] here"),
        ("model.n_layers=3", "it has no 'blocks.2."),
    ):
        run = ["--run-dir", tmp_path / override, "--resume", step_10]  # one process: the check is every launcher's
        result = memray_here("train", "tiny", "--workers", 0, *sets(override), *run)
        assert_one_line_error(result, "holds another model", needle)
        assert not committed_checkpoints(tmp_path / override / "checkpoints")


def test_ingest_killed_midway_commits_nothing_and_reruns(tmp_path):
    """A worker of a parallel ingestion SIGKILLed after its first shard: one line, no manifest (a
    reader refuses the directory), and the same command then writes what a clean run writes."""
    for i in range(2):
        (tmp_path / f"{i}.jsonl").write_text("".join(f'{{"text": "doc {i}.{k} {"x" * 50}"}}\n' for k in range(400)))
    sources = [tmp_path / f"{i}.jsonl" for i in range(2)]
    args = ["ingest", *sources, "--shard-tokens", 4096, "--workers", 2]
    killed = memray(*args, "--out", tmp_path / "out", env=_with_fault("ingest-kill:1"))
    assert_one_line_error(killed, "an ingest worker process died", "run the same command again", code=1)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert memray(*args, "--out", tmp_path / "out").returncode == 0
    assert memray(*args, "--out", tmp_path / "clean").returncode == 0
    shards = [json.loads((tmp_path / d / "manifest.json").read_text())["shards"] for d in ("out", "clean")]
    assert shards[0] == shards[1] and len(shards[0]) > 2
    shutil.rmtree(tmp_path / "clean")
