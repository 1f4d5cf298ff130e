"""TensorBoard event files beside metrics.jsonl, read back with TensorBoard's own reader, and
`memray plot`."""

import json
import sys

import pytest
from helpers import assert_one_line_error, memray_here

from memray.train import Trainer, load_run_config


def test_event_files_hold_the_logged_metrics(tiny_run):
    run_dir = tiny_run  # `memray train tiny --workers 0`, every step logged (conftest)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("loss", "lr", "grad_norm", "value_grad_norm", "tokens_per_s", "memory/layer1/used"):
        assert tag in tags, tag
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [r["step"] for r in records]
        assert [e.value for e in logged] == pytest.approx([r[tag] for r in records], rel=1e-6)
    # per-rank lists become one tag per rank
    assert "lookup/layer1/rows_served/rank0" in tags and "lookup/layer1/imbalance" in tags


def test_no_event_files_when_switched_off_or_without_tensorboard(tmp_path, monkeypatch):
    config = load_run_config("tiny", ["train.steps=2", "train.tensorboard=false"])
    Trainer(config, run_dir=tmp_path / "off", progress=False).fit()
    assert (tmp_path / "off" / "metrics.jsonl").exists() and not list((tmp_path / "off").glob("events.*"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    Trainer(load_run_config("tiny", ["train.steps=2"]), run_dir=tmp_path / "missing", progress=False).fit()
    assert not list((tmp_path / "missing").glob("events.*"))
    assert "tensorboard is not installed" in (tmp_path / "missing" / "log.txt").read_text()


def test_memray_plot(tiny_run, tmp_path):
    result = memray_here("plot", tiny_run, "--out", tmp_path / "curves.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_one_line_error(memray_here("plot", tmp_path / "nowhere"), "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss"\n')
    assert_one_line_error(memray_here("plot", broken), "metrics.jsonl:2")
