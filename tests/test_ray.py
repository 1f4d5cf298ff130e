"""Ray orchestration, each path as a user takes it (a `memray` process): a worker killed mid-run on
the embedded local Ray that `memray train` starts, then one local head (`memray cluster up`)
shared by the Jobs API, ingestion and grow as Ray tasks and `memray cluster down`, and bad
addresses.
Every Ray instance is stopped by what started it: the embedded one by its `memray train`
process, the head by `memray cluster down` (its own process group)."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest
from helpers import assert_one_line_error, memray, read_metrics, sets

from memray.checkpoint import committed_checkpoints
from memray.train import load_run_config

# minutes of Ray (or process) start-up each: run by `make test-soak`, CI's step after `make test`
pytestmark = [pytest.mark.slow, pytest.mark.soak]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _isolated_env(home) -> dict:
    """A memray home and Ray token file of the test's own, no RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env.update(MEMRAY_HOME=str(home), RAY_AUTH_TOKEN_PATH=str(home / "auth_token"), PYTHONWARNINGS="ignore")
    return env


def test_bad_addresses_are_one_line_within_seconds(tmp_path):
    env = _isolated_env(tmp_path / "home")
    closed = f"127.0.0.1:{_free_port()}"
    for args, needle in (
        (["status", "x", "--address", f"http://{closed}"], "cannot reach the Ray Jobs API"),
        (["train", "tiny", "--address", closed], "cannot reach the Ray cluster"),
        (["submit", "tiny", "--address", "http://10.255.255.1:8265"], "without an auth token"),
        # unroutable, or (behind some proxies) answering but not a Jobs API: one line either way
        (["submit", "tiny", "--address", "http://10.255.255.1:8265", "--insecure"], "10.255.255.1:8265"),
        (["list"], "no cluster address"),
    ):
        started = time.monotonic()
        result = memray(*args, env=env, timeout=30)
        assert time.monotonic() - started < 10 + 5, args  # the 5 s connect timeout plus interpreter start
        assert_one_line_error(result, needle)


@pytest.fixture
def short_tmp():
    """A temporary directory with a short path (Ray's socket paths below it must fit 107 bytes)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="m", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_killed_worker_restarts_from_the_last_checkpoint(zero3_run, tmp_path, short_tmp):
    """`memray train` on 2 Ray Train workers of an embedded local Ray at ZeRO-3 continues the
    ZeRO-3 reference's step-10 checkpoint, reading its facts through a relative path (Ray workers
    start elsewhere). One worker is SIGKILLed once the step-15 checkpoint is committed: Ray Train
    restarts the group from it, and the last logged loss of every step equals the uninterrupted
    run's. Beside it, a dead head's leftover "current cluster" file in the temporary directory:
    the embedded instance keeps its own (Ray Train's cleaner does not wait on the dead address),
    and removes it when done."""
    from memray.data import generate_facts, write_facts

    source = load_run_config("tiny").data  # the same facts as the reference's synthetic source
    write_facts(tmp_path / "facts.jsonl", generate_facts(source.num_entities, source.num_attributes, source.seed))
    run = tmp_path / "run"
    restart = sets("distributed.zero_stage=3", "distributed.max_failures=1", "train.steps=30", "train.log_every=1")
    data = sets("train.checkpoint_every=5", "train.keep_last=0", "data.source=facts", "data.path=facts.jsonl")
    resume = ["--resume", str(zero3_run / "checkpoints" / "step-00000010")]
    command = [sys.executable, "-m", "memray.cli", "train", "tiny", "--workers", "2", "--run-dir", "run"]
    command += ["--no-progress", *restart, *data, *resume]
    temp = short_tmp  # TMPDIR, holding a dead head's file
    (temp / "ray").mkdir()
    (temp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")
    env = {**_isolated_env(tmp_path / "home"), "TMPDIR": str(temp)}
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=err)
        try:
            pid_file, committed = run / "pids" / "rank-1.pid", run / "checkpoints" / "step-00000015" / "COMMITTED"
            deadline = time.monotonic() + 240
            while not committed.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert committed.exists(), (tmp_path / "err.txt").read_text()[-3000:]
            victim = int(pid_file.read_text())
            assert not (run / "result.json").exists(), "the run ended before the kill"
            os.kill(victim, signal.SIGKILL)
            assert process.wait(timeout=300) == 0, (tmp_path / "err.txt").read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
    assert json.loads((tmp_path / "out.txt").read_text().strip().splitlines()[-1])["step"] == 30
    assert "PlacementGroupCleaner" not in (tmp_path / "err.txt").read_text()  # no stop timed out
    assert not list(temp.glob("memray-ray-*"))  # the instance's own temporary directory is gone
    assert int(pid_file.read_text()) != victim  # a new worker group ran
    final = {m["step"]: m["loss"] for m in read_metrics(run)}  # the last line of each step: after the restart
    reference = {m["step"]: m["loss"] for m in read_metrics(zero3_run)}
    assert sorted(final) == list(range(11, 31))
    assert final == {step: reference[step] for step in final}  # weights, optimizer state, data position


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """One local head for the tests below (2 CPUs), started as a user starts it."""
    home = tmp_path_factory.mktemp("ray-head") / "home"
    env = _isolated_env(home)
    port, jobs_port = _free_port(), _free_port()
    up = memray("cluster", "up", "--port", port, "--dashboard-port", jobs_port, "--num-cpus", "2", env=env)
    assert up.returncode == 0, up.stderr
    pid = json.loads((home / "cluster.json").read_text())["pid"]
    yield SimpleNamespace(env=env, home=home, gcs=f"127.0.0.1:{port}", jobs=f"http://127.0.0.1:{jobs_port}", pid=pid)
    memray("cluster", "down", env=env)  # nothing left to stop when test_cluster_down_stops_the_head ran


def test_cluster_submit_logs_status_checkpoint(head, tmp_path):
    env, address = head.env, head.jobs
    assert oct(os.stat(head.home / "auth_token").st_mode & 0o777) == "0o600"
    run = tmp_path / "run"
    submit = ["submit", "tiny", "--address", address, "--workers", "2"]
    layout = sets("distributed.zero_stage=2", "model.memory.layout=row")
    submitted = memray(*submit, *layout, "--run-dir", run, "--submission-id", "e2e-1", env=env)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert "step 20 loss" in submitted.stdout  # the job's logs streamed while it ran
    logs = memray("logs", "e2e-1", "--address", address, env=env)
    assert logs.returncode == 0 and "step 20 loss" in logs.stdout
    status = memray("status", "e2e-1", "--address", address, "--json", env=env)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "SUCCEEDED"
    assert (run / "checkpoints" / "step-00000020" / "COMMITTED").is_file()
    assert memray("verify", run, env=env).returncode == 0
    # an unauthenticated request to the token-protected head: one line naming it
    (head.home / "wrong_token").write_text("0" * 64)
    wrong = {**env, "RAY_AUTH_TOKEN_PATH": str(head.home / "wrong_token")}
    for command in (["status", "e2e-1"], ["submit", "tiny", "--no-wait"]):
        refused = memray(*command, "--address", address, env=wrong)
        assert_one_line_error(refused, address, "Invalid authentication token")
    # submitting the same id again starts nothing
    again = memray("submit", "tiny", "--address", address, "--submission-id", "e2e-1", "--no-wait", env=env)
    assert again.returncode == 0 and "already exists" in again.stderr
    listed = json.loads(memray("list", "--address", address, "--json", env=env).stdout)
    assert [j["job_id"] for j in listed] == ["e2e-1"]
    assert_one_line_error(memray("status", "no-such-job", "--address", address, env=env), "no job 'no-such-job'")
    # a long job stopped while it runs
    long_run = [*sets("train.steps=100000"), "--run-dir", tmp_path / "long"]
    long = memray(*submit, *long_run, "--submission-id", "long-1", "--no-wait", env=env)
    assert long.returncode == 0 and long.stdout.strip() == "long-1", long.stderr
    assert memray("stop", "long-1", "--address", address, env=env).returncode == 0
    for _ in range(60):
        state = json.loads(memray("status", "long-1", "--address", address, "--json", env=env).stdout)["status"]
        if state == "STOPPED":
            break
        time.sleep(1)
    assert state == "STOPPED"
    # more workers than the cluster's CPUs: an error naming the key, not a wait for resources
    started = time.monotonic()
    too_many = memray(
        "train", "tiny", "--workers", "3", "--address", head.gcs, "--run-dir", tmp_path / "r3", env=env, timeout=120
    )
    assert_one_line_error(too_many, "distributed.workers")
    assert time.monotonic() - started < 60


def test_ingest_as_ray_tasks_writes_the_local_shards(head, tmp_path):
    from memray.data.ingest import ingest

    for i in range(3):
        (tmp_path / f"{i}.jsonl").write_text("".join(f'{{"text": "doc {i}.{k}"}}\n' for k in range(50)) + "bad\n")
    sources = [tmp_path / f"{i}.jsonl" for i in range(3)]
    local = ingest(sources, tmp_path / "local", workers=1)
    env = {**head.env, "RAY_ADDRESS": head.gcs}
    result = memray("ingest", *sources, "--out", tmp_path / "ray", "--ray", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    on_ray = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert [s["sha256"] for s in on_ray["shards"]] == [s["sha256"] for s in local["shards"]]
    assert on_ray["totals"] == local["totals"]
    assert local["totals"] == {"read": 153, "written": 150, "rejected": 3, "tokens": local["totals"]["tokens"]}
    # a malformed record found by a task comes back as the one-line input error, not a Ray traceback
    strict = memray("ingest", *sources, "--out", tmp_path / "strict", "--ray", "--strict", env=env)
    assert_one_line_error(strict, "jsonl:51: not JSON")


def test_grow_as_ray_tasks_writes_the_local_grow(head, tmp_path):
    """``memray grow --ray``: the pools' chunk jobs run as Ray tasks and write exactly the chunks
    a local grow writes."""
    from memray.checkpoint import read_manifest
    from memray.train import Trainer

    Trainer(load_run_config("tiny", ["train.steps=2"]), run_dir=tmp_path / "run", progress=False).fit()
    env = {**head.env, "RAY_ADDRESS": head.gcs}
    for out, flags in (("local", []), ("ray", ["--ray"])):
        result = memray("grow", tmp_path / "run", "--n-keys", 21, "--out", tmp_path / out, *flags, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    local, on_ray = (read_manifest(tmp_path / out)[1]["chunks"] for out in ("local", "ray"))
    assert on_ray == local and len(local) >= 3


def test_a_killed_head_loses_no_checkpoint_and_a_resubmission_continues(head, tmp_path):
    """SIGKILL the head's process group while `memray submit` follows a job: one line, exit 1,
    naming the run directory; the committed checkpoints stay; after `memray cluster up` the same
    submission into that run directory continues from the newest (the rerun rule under Ray)."""
    run, env = tmp_path / "run", head.env
    every_5 = sets("train.checkpoint_every=5", "train.keep_last=0")
    command = [sys.executable, "-m", "memray.cli", "submit", "tiny", "--address", head.jobs, "--workers", "2"]
    command += [*every_5, *sets("train.steps=100000"), "--run-dir", str(run)]
    with open(tmp_path / "err.txt", "w") as err:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            committed = run / "checkpoints" / "step-00000010" / "COMMITTED"
            deadline = time.monotonic() + 240
            while not committed.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert committed.exists(), (tmp_path / "err.txt").read_text()[-3000:]
            os.killpg(head.pid, signal.SIGKILL)
            assert process.wait(timeout=120) == 1
        finally:
            if process.poll() is None:
                process.kill()
    lines = [line for line in (tmp_path / "err.txt").read_text().splitlines() if line.startswith("memray:")]
    assert len(lines) == 1 and "lost the Ray cluster while following job" in lines[0], lines
    assert f"--run-dir {run}" in lines[0] and "Traceback" not in (tmp_path / "err.txt").read_text()
    # the head again (new ports), and the same submission into the run directory
    port, jobs_port = _free_port(), _free_port()
    up = memray("cluster", "up", "--port", port, "--dashboard-port", jobs_port, "--num-cpus", "2", env=env)
    assert up.returncode == 0, up.stderr
    head.pid = json.loads((head.home / "cluster.json").read_text())["pid"]  # what the last test stops
    # the newest committed checkpoint now: the old job's ranks outlive their head by a second or
    # two and may commit one more before they notice, which the resubmission must continue from
    done = [p.name for p in committed_checkpoints(run / "checkpoints")]
    assert "step-00000010" in done and memray("verify", run, env=env).returncode == 0
    newest = int(done[-1].removeprefix("step-"))
    again = memray("submit", "tiny", "--address", f"http://127.0.0.1:{jobs_port}", "--workers", "2", *every_5,
                   *sets(f"train.steps={newest + 5}"), "--run-dir", run, env=env)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"continuing from {run / 'checkpoints' / done[-1]} (step {newest})" in (run / "log.txt").read_text()
    assert read_metrics(run)[-1]["step"] == newest + 5


def test_cluster_down_stops_the_head(head):
    down = memray("cluster", "down", env=head.env)
    assert down.returncode == 0, down.stderr
    assert "not running" in memray("cluster", "status", env=head.env).stdout
    with pytest.raises(ProcessLookupError):  # the head's process group is gone (zombies aside)
        for _ in range(50):
            os.killpg(head.pid, 0)
            state = open(f"/proc/{head.pid}/stat").read().split(")")[-1].split()[0]
            if state == "Z":
                raise ProcessLookupError
            time.sleep(0.1)


def test_cluster_definitions_keep_token_auth():
    """cluster/ is configuration only, but it must parse and keep authentication on."""
    import pathlib

    import yaml

    root = pathlib.Path(__file__).resolve().parent.parent / "cluster"
    launcher = yaml.safe_load((root / "gpu-cluster.yaml").read_text())
    assert launcher["head_node_type"] in launcher["available_node_types"]
    assert any(t.get("resources", {}).get("GPU") == 8 for t in launcher["available_node_types"].values())
    assert all(
        "RAY_AUTH_MODE=token" in c
        for c in launcher["head_start_ray_commands"][1:] + launcher["worker_start_ray_commands"][1:]
    )
    cluster, claim = yaml.safe_load_all((root / "kuberay-raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["authOptions"]["mode"] == "token"
    assert cluster["spec"]["rayVersion"] == "2.60.0" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
