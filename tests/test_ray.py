"""Ray orchestration: a local head and the Jobs API end to end, a worker killed mid-run, elastic
restarts, and bad addresses. Each Ray instance here is stopped by what started it: the head by
`memray cluster down` (its own process group), the embedded one by ray.shutdown()."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from memray.train import load_run_config

TINY = ["train.log_every=1", "train.keep_last=0", "distributed.zero_stage=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, env=None, timeout=300):
    env = {**(env or os.environ), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "memray.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def _one_line_error(result, needle):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines and needle in lines[-1], result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def _metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def isolated_env(tmp_path):
    """A memray home and Ray token file of the test's own, no RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env.update(MEMRAY_HOME=str(tmp_path / "home"), RAY_AUTH_TOKEN_PATH=str(tmp_path / "home" / "auth_token"))
    return env


def test_cluster_submit_logs_status_checkpoint_down(isolated_env, tmp_path):
    env, port, jobs_port = isolated_env, _free_port(), _free_port()
    address = f"http://127.0.0.1:{jobs_port}"
    up = _cli("cluster", "up", "--port", str(port), "--dashboard-port", str(jobs_port), "--num-cpus", "2", env=env)
    assert up.returncode == 0, up.stderr
    head_pid = json.loads((tmp_path / "home" / "cluster.json").read_text())["pid"]
    try:
        assert oct(os.stat(tmp_path / "home" / "auth_token").st_mode & 0o777) == "0o600"
        run = tmp_path / "run"
        submitted = _cli(
            "submit",
            "tiny",
            "--address",
            address,
            "--workers",
            "2",
            "--set",
            "distributed.zero_stage=2",
            "--set",
            "model.memory.layout=row",
            "--run-dir",
            str(run),
            "--submission-id",
            "e2e-1",
            env=env,
        )
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        assert "step 20 loss" in submitted.stdout  # the job's logs streamed while it ran
        logs = _cli("logs", "e2e-1", "--address", address, env=env)
        assert logs.returncode == 0 and "step 20 loss" in logs.stdout
        status = _cli("status", "e2e-1", "--address", address, "--json", env=env)
        assert status.returncode == 0 and json.loads(status.stdout)["status"] == "SUCCEEDED"
        assert (run / "checkpoints" / "step-00000020" / "COMMITTED").is_file()
        assert _cli("verify", str(run), env=env).returncode == 0
        # submitting the same id again starts nothing
        again = _cli("submit", "tiny", "--address", address, "--submission-id", "e2e-1", "--no-wait", env=env)
        assert again.returncode == 0 and "already exists" in again.stderr
        listed = json.loads(_cli("list", "--address", address, "--json", env=env).stdout)
        assert [j["job_id"] for j in listed] == ["e2e-1"]
        _one_line_error(_cli("status", "no-such-job", "--address", address, env=env), "no job 'no-such-job'")
        # a long job stopped while it runs
        long = _cli(
            "submit",
            "tiny",
            "--address",
            address,
            "--workers",
            "2",
            "--set",
            "train.steps=100000",
            "--run-dir",
            str(tmp_path / "long"),
            "--submission-id",
            "long-1",
            "--no-wait",
            env=env,
        )
        assert long.returncode == 0 and long.stdout.strip() == "long-1", long.stderr
        assert _cli("stop", "long-1", "--address", address, env=env).returncode == 0
        for _ in range(60):
            state = json.loads(_cli("status", "long-1", "--address", address, "--json", env=env).stdout)["status"]
            if state == "STOPPED":
                break
            time.sleep(1)
        assert state == "STOPPED"
        # more workers than the cluster's CPUs: an error naming the key, not a wait for resources
        started = time.monotonic()
        too_many = _cli(
            "train",
            "tiny",
            "--workers",
            "3",
            "--address",
            f"127.0.0.1:{port}",
            "--run-dir",
            str(tmp_path / "r3"),
            env=env,
            timeout=120,
        )
        _one_line_error(too_many, "distributed.workers")
        assert time.monotonic() - started < 60
    finally:
        down = _cli("cluster", "down", env=env)
    assert down.returncode == 0, down.stderr
    assert "not running" in _cli("cluster", "status", env=env).stdout
    with pytest.raises(ProcessLookupError):  # the head's process group is gone (zombies aside)
        for _ in range(50):
            os.killpg(head_pid, 0)
            state = open(f"/proc/{head_pid}/stat").read().split(")")[-1].split()[0]
            if state == "Z":
                raise ProcessLookupError
            time.sleep(0.1)


def test_bad_addresses_are_one_line_within_seconds(isolated_env):
    env = isolated_env
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
        result = _cli(*args, env=env, timeout=30)
        assert time.monotonic() - started < 10 + 5, args  # the 5 s connect timeout plus interpreter start
        _one_line_error(result, needle)


@pytest.fixture(scope="module")
def embedded_ray():
    """One embedded Ray for the in-process tests below (3 CPUs: the elastic test's 3 workers)."""
    from memray.launch.local import ray_session

    with ray_session(None, num_cpus=3):
        yield


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """30 steps on 2 local processes, checkpoints every 10: the reference."""
    from memray.train import train_local

    run = tmp_path_factory.mktemp("reference") / "run"
    config = load_run_config(
        "tiny",
        [
            *TINY,
            "train.steps=30",
            "train.checkpoint_every=10",
            "distributed.workers=2",
            "distributed.launcher=processes",
        ],
    )
    train_local(config, run)
    return run


def test_a_killed_worker_restarts_from_the_last_checkpoint(embedded_ray, uninterrupted, tmp_path):
    from memray.launch.ray_train import train_on_ray

    run = tmp_path / "run"
    config = load_run_config(
        "tiny",
        [*TINY, "train.steps=30", "train.checkpoint_every=10", "distributed.workers=2", "distributed.max_failures=1"],
    )
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=train_on_ray(config, run)))
    thread.start()
    pid_file, committed = run / "pids" / "rank-1.pid", run / "checkpoints" / "step-00000010" / "COMMITTED"
    deadline = time.monotonic() + 180
    while not committed.exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    victim = int(pid_file.read_text())
    assert not (run / "result.json").exists(), "the run ended before the kill"
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert outcome["result"]["step"] == 30
    assert int(pid_file.read_text()) != victim  # a new worker group ran
    logged = _metrics(run)
    final = {m["step"]: m["loss"] for m in logged}  # the last line of each step: after the restart
    reference = {m["step"]: m["loss"] for m in _metrics(uninterrupted)}
    assert sorted(final) == list(range(1, 31))
    assert final == reference  # exact: the restart resumed weights, optimizer state and data position


def test_ingest_as_ray_tasks_writes_the_local_shards(embedded_ray, tmp_path):
    from memray.data.ingest import ingest
    from memray.launch.ingest_ray import map_files

    for i in range(3):
        (tmp_path / f"{i}.jsonl").write_text("".join(f'{{"text": "doc {i}.{k}"}}\n' for k in range(50)) + "bad\n")
    sources = [tmp_path / f"{i}.jsonl" for i in range(3)]
    local = ingest(sources, tmp_path / "local", workers=1)
    on_ray = ingest(sources, tmp_path / "ray", map_files=map_files)
    assert [s["sha256"] for s in on_ray["shards"]] == [s["sha256"] for s in local["shards"]]
    assert (
        on_ray["totals"]
        == local["totals"]
        == {"read": 153, "written": 150, "rejected": 3, "tokens": local["totals"]["tokens"]}
    )
    # a malformed record found by a task comes back as the one-line input error, not a Ray traceback
    from memray.errors import InputError

    with pytest.raises(InputError, match=r"\d\.jsonl:51: not JSON") as info:
        ingest(sources, tmp_path / "strict", strict=True, map_files=map_files)
    assert "\n" not in str(info.value) and type(info.value) is InputError


@pytest.mark.parametrize("workers,layout", [(3, "column"), (1, "row")])
def test_elastic_resume_on_other_worker_counts(embedded_ray, uninterrupted, workers, layout, tmp_path, monkeypatch):
    """2 workers' step-20 checkpoint continued on 3 (column layout) and 1 Ray workers: the same
    weights, optimizer state and data, so the same losses up to the rounding of sums taken in
    another order. The data come from a facts file named by a relative path (the same facts as
    the synthetic source): Ray workers, which start elsewhere, must find it."""
    from memray.data import generate_facts, write_facts
    from memray.launch.ray_train import train_on_ray

    data = load_run_config("tiny").data
    write_facts(tmp_path / "facts.jsonl", generate_facts(data.num_entities, data.num_attributes, data.seed))
    monkeypatch.chdir(tmp_path)
    config = load_run_config(
        "tiny",
        [
            *TINY,
            "train.steps=30",
            f"distributed.workers={workers}",
            f"model.memory.layout={layout}",
            "data.source=facts",
            "data.path=facts.jsonl",
        ],
    )
    result = train_on_ray(config, tmp_path / "run", resume=uninterrupted / "checkpoints" / "step-00000020")
    assert result["step"] == 30
    resumed = _metrics(tmp_path / "run")
    reference = _metrics(uninterrupted)[20:]
    assert [m["step"] for m in resumed] == list(range(21, 31))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(resumed, reference)) <= 1e-4
    assert len(resumed[-1]["lookup/layer1/bytes_sent"]) == workers


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
