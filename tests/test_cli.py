"""The command line: a real `memray` process where the process is part of what is tested (exit
codes, stderr, a run's files), click's runner in this process for errors found before any work."""

import json
import shutil

import pytest
import yaml
from helpers import assert_one_line_error, memray, memray_here


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
    assert_one_line_error(memray_here("train", "tiny", "--set", override, "--run-dir", tmp_path / "r"), needle)
    assert not (tmp_path / "r").exists()


def test_missing_inputs_exit_2(tmp_path):
    assert_one_line_error(memray("train", tmp_path / "missing.yaml"), "missing.yaml")  # a real process, once
    assert_one_line_error(memray_here("eval", tmp_path, "--facts", tmp_path / "facts.jsonl"), "facts.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\nnot json\n')
    assert_one_line_error(memray_here("eval", tmp_path, "--facts", bad), "bad.jsonl:2")


def test_help_has_examples():
    for command in ([], ["train"], ["eval"]):
        result = memray_here(*command, "--help")
        assert result.returncode == 0 and "Example" in result.stdout


@pytest.mark.slow
def test_run_directory_then_eval(tiny_run, tmp_path):
    """What `memray train tiny --workers 0` (conftest ``tiny_run``) leaves, and `memray eval` on it."""
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert config["train"]["steps"] == 20 and config["model"]["memory"]["knn"] == 8
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in ("loss", "tokens", "tokens_per_s", "lr", "memory/layer1/used", "memory/layer1/gini"):
        assert key in rows[-1], key
    assert "step 20" in (tiny_run / "log.txt").read_text()
    ckpt = tiny_run / "checkpoints" / "step-00000020"
    assert (ckpt / "COMMITTED").is_file()

    facts = tiny_run / "data" / "facts.jsonl"
    result = memray("eval", tiny_run, "--facts", facts, "--json", "--limit", "20")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["total"] == 20 and report["step"] == 20 and 0 <= report["recall"] <= 1
    # --min-recall makes a recall below it a failed command (exit 1), for scripts like make demo
    assert memray_here("eval", tiny_run, "--facts", facts, "--limit", "20", "--min-recall", "0").returncode == 0
    assert memray_here("eval", tiny_run, "--facts", facts, "--limit", "20", "--min-recall", "1.01").returncode == 1
    # memray facts writes the facts a config trains on: the same ones the run wrote
    written = memray_here("facts", "tiny", "--out", tmp_path / "facts.jsonl")
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "facts.jsonl").read_text() == facts.read_text()

    # a damaged checkpoint is refused, naming the file
    damaged = tmp_path / "damaged"
    shutil.copytree(ckpt, damaged)
    weights = damaged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert_one_line_error(memray("eval", damaged, "--facts", facts), "model.safetensors", "damaged")


def test_facts_styles_and_a_wrong_style(tmp_path):
    """`data.style`: numbers gives numeric answers, syllables names from six shared syllables;
    a style that does not exist is one line naming the key."""
    from memray.data import read_facts

    for style in ("numbers", "syllables"):
        out = tmp_path / f"{style}.jsonl"
        result = memray_here("facts", "tiny", "--set", f"data.style={style}", "--out", out)
        assert result.returncode == 0, result.stderr
        facts = read_facts(out)
        assert len(facts) == 100 and len({f.meta["entity"] for f in facts}) == 50
        if style == "numbers":
            assert all(f.answer.isdigit() for f in facts)
        else:
            for name in {f.meta["entity"] for f in facts}:
                rest = name.lower().replace(" ", "")
                for syllable in ("ka", "lo", "mi", "ra", "te", "nu"):
                    rest = rest.replace(syllable, "")
                assert rest == "", name
    assert_one_line_error(memray("facts", "tiny", "--set", "data.style=poems", "--out", tmp_path / "x"), "data.style")
