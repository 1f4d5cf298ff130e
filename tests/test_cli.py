"""The command line, run as a user runs it: a real `memray` process."""

import json
import os
import subprocess
import sys

import pytest
import yaml

MEMRAY = [sys.executable, "-m", "memray.cli"]


def run(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*MEMRAY, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def assert_user_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.memory.nkeys=4", "model.memory.nkeys"),
        ("model.memory.knn=300", "model.memory.knn"),  # n_keys**2 = 256 < 300
        ("model.memory.k_dim=33", "model.memory.k_dim"),
        ("model.memory.heads=0", "model.memory.heads"),
        ("model.memory_layers=[2]", "model.memory_layers"),  # tiny has 2 blocks
    ],
)
def test_bad_config_exits_2_with_one_line(override, needle, tmp_path):
    assert_user_error(run("train", "tiny", "--set", override, "--run-dir", str(tmp_path / "r")), needle)
    assert not (tmp_path / "r").exists()


def test_missing_inputs_exit_2(tmp_path):
    assert_user_error(run("train", str(tmp_path / "missing.yaml")), "missing.yaml")
    assert_user_error(run("eval", str(tmp_path), "--facts", str(tmp_path / "facts.jsonl")), "facts.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\nnot json\n')
    assert_user_error(run("eval", str(tmp_path), "--facts", str(bad)), "bad.jsonl:2")


def test_help_has_examples():
    for command in ([], ["train"], ["eval"]):
        result = run(*command, "--help")
        assert result.returncode == 0 and "Example" in result.stdout


@pytest.mark.slow
def test_train_tiny_then_eval(tmp_path):
    run_dir = tmp_path / "run"
    result = run("train", "tiny", "--workers", "0", "--run-dir", str(run_dir), "--set", "train.steps=10")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["step"] == 10
    # the run directory contract
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["steps"] == 10 and config["model"]["memory"]["knn"] == 8
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10]
    for key in ("loss", "tokens", "tokens_per_s", "lr", "memory/layer1/used", "memory/layer1/gini"):
        assert key in rows[-1], key
    assert "step 10" in (run_dir / "log.txt").read_text()
    ckpt = run_dir / "checkpoints" / "step-00000010"
    assert (ckpt / "COMMITTED").is_file()

    facts = run_dir / "data" / "facts.jsonl"
    result = run("eval", str(run_dir), "--facts", str(facts), "--json", "--limit", "20")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["total"] == 20 and report["step"] == 10 and 0 <= report["recall"] <= 1
    # --min-recall makes a recall below it a failed command (exit 1), for scripts like make demo
    assert run("eval", str(run_dir), "--facts", str(facts), "--limit", "20", "--min-recall", "0").returncode == 0
    assert run("eval", str(run_dir), "--facts", str(facts), "--limit", "20", "--min-recall", "1.01").returncode == 1
    # memray facts writes the facts a config trains on: the same ones the run wrote
    written = run("facts", "tiny", "--out", str(tmp_path / "facts.jsonl"))
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "facts.jsonl").read_text() == facts.read_text()

    # a damaged checkpoint is refused, naming the file
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert_user_error(run("eval", str(ckpt), "--facts", str(facts)), "model.safetensors", "damaged")
