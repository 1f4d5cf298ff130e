"""memray ingest: text, JSON lines and Parquet into checked Arrow shards, and reading them back."""

import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import assert_one_line_error, memray, memray_here, sets

from memray.data import BPETokenizer, ByteTokenizer, DataConfig, load_documents, saved_tokenizer
from memray.data.arrow import ArrowDocuments
from memray.data.ingest import ingest
from memray.errors import InputError

TEXTS = ["Hello world.\nsecond line", "Para two.", "doc one", "X was born in Cork", "alpha", "beta"]


@pytest.fixture
def sources(tmp_path):
    (tmp_path / "a.txt").write_text("Hello world.\nsecond line\n\n\nPara two.\n")
    (tmp_path / "b.jsonl").write_text(
        '{"text": "doc one"}\nnot json\n{"prompt": "X was born in", "answer": "Cork"}\n{"foo": 1}\n\n'
    )
    (tmp_path / "d.txt").write_bytes(b"caf\xe9 latin-1\n")  # not UTF-8
    pq.write_table(pa.table({"text": ["alpha", None, "beta", ""]}), tmp_path / "c.parquet")
    return [tmp_path / n for n in ("a.txt", "b.jsonl", "c.parquet", "d.txt")]


def test_ingest_counts_rejects_and_round_trip(sources, tmp_path):
    manifest = ingest(sources, tmp_path / "out", shard_tokens=20, workers=2)
    totals = manifest["totals"]
    assert totals == {"read": 11, "written": 6, "rejected": 5, "tokens": sum(len(t.encode()) + 2 for t in TEXTS)}
    for source in manifest["sources"]:
        assert source["read"] == source["written"] + source["rejected"]
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(os.path.basename(r["file"]), r["line"]) for r in rejects] == [
        ("b.jsonl", 2),
        ("b.jsonl", 4),
        ("c.parquet", 2),
        ("c.parquet", 4),
        ("d.txt", 1),
    ]
    assert "not JSON" in rejects[0]["reason"] and "null" in rejects[2]["reason"] and "UTF-8" in rejects[4]["reason"]
    assert len(manifest["shards"]) > len(sources) - 1  # 20-token shards: sources split over several
    documents = ArrowDocuments(tmp_path / "out")
    tokenizer = ByteTokenizer()
    assert [tokenizer.decode(documents[i][1:]) for i in range(len(documents))] == TEXTS
    assert all(
        documents[i][0] == tokenizer.bos_id and documents[i][-1] == tokenizer.eos_id for i in range(len(documents))
    )


def test_parallel_ingest_writes_the_same_shards(sources, tmp_path):
    one = ingest(sources, tmp_path / "one", workers=1)
    two = ingest(sources, tmp_path / "two", workers=2)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]


def test_strict_and_bad_inputs_are_one_line(sources, tmp_path):
    assert_one_line_error(memray("ingest", sources[1], "--out", tmp_path / "s", "--strict"), "b.jsonl:2: not JSON")
    for args, needle in (
        ((tmp_path / "missing.txt", "--out", tmp_path / "m"), "input not found"),
        ((sources[2], "--out", tmp_path / "p", "--text-column", "body"), "no column 'body'"),
    ):
        assert_one_line_error(memray_here("ingest", *args), needle)
    ok = memray_here("ingest", sources[0], "--out", tmp_path / "ok")
    assert ok.returncode == 0 and "2 documents" in ok.stdout
    again = memray_here("ingest", sources[0], "--out", tmp_path / "ok")  # never overwrites finished shards
    assert_one_line_error(again, "already holds")


def test_reader_refuses_damage(sources, tmp_path):
    manifest = ingest(sources, tmp_path / "out", workers=1)
    shard = tmp_path / "out" / manifest["shards"][0]["file"]
    good = shard.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match=manifest["shards"][0]["file"] + " is damaged"):
        ArrowDocuments(tmp_path / "out")
    shard.write_bytes(good[: len(good) // 2])  # truncated: named the same way, also to a training run
    arrow = sets("data.source=arrow", f"data.path={tmp_path / 'out'}", "train.steps=1")
    result = memray_here("train", "tiny", "--workers", 0, *arrow, "--run-dir", tmp_path / "run")
    assert_one_line_error(result, manifest["shards"][0]["file"] + " is damaged")


def test_training_reads_arrow_shards(sources, tmp_path):
    ingest(sources, tmp_path / "out", workers=1)
    documents, facts, tokenizer = load_documents(DataConfig(source="arrow", path=str(tmp_path / "out")))
    assert facts is None and len(documents) == len(TEXTS) and isinstance(tokenizer, ByteTokenizer)


def test_bpe_trained_on_the_corpus_round_trips_and_is_checked(sources, tmp_path):
    manifest = ingest(sources, tmp_path / "bpe", workers=2, tokenizer="bpe", vocab_size=300)
    spec = manifest["tokenizer"]
    assert spec["kind"] == "bpe" and spec["file"] == "tokenizer.json" and 259 < spec["vocab_size"] <= 300
    documents = ArrowDocuments(tmp_path / "bpe")
    tokenizer = documents.tokenizer
    assert [tokenizer.decode(documents[i][1:]) for i in range(len(documents))] == TEXTS
    assert manifest["totals"]["tokens"] < sum(len(t.encode()) + 2 for t in TEXTS)  # merges shorten the corpus
    # the same file reused with bpe:PATH encodes identically
    again = ingest(sources, tmp_path / "reuse", workers=1, tokenizer=f"bpe:{tmp_path / 'bpe' / 'tokenizer.json'}")
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
    with pytest.raises(InputError, match="tokenizer file not found"):
        ingest(sources, tmp_path / "x", tokenizer="bpe:/nonexistent.json")
    with pytest.raises(InputError, match="--vocab-size"):
        ingest(sources, tmp_path / "y", tokenizer="bpe", vocab_size=100)
    path = tmp_path / "bpe" / "tokenizer.json"
    path.write_text(path.read_text().replace('"<eos>"', '"<eoz>"', 1))
    with pytest.raises(InputError, match="tokenizer file tokenizer.json is damaged"):
        ArrowDocuments(tmp_path / "bpe")


def test_training_on_bpe_shards_saves_the_tokenizer_for_eval(tmp_path):
    from click.testing import CliRunner

    from memray.cli import main
    from memray.data import generate_facts, write_facts
    from memray.train.config import load_run_config
    from memray.train.trainer import Trainer

    facts = generate_facts(20, 2, seed=0)
    write_facts(tmp_path / "facts.jsonl", facts)
    ingest([tmp_path / "facts.jsonl"], tmp_path / "shards", tokenizer="bpe", vocab_size=512, workers=1)
    size = json.loads((tmp_path / "shards" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    overrides = ["data.source=arrow", f"data.path={tmp_path / 'shards'}", "train.steps=2", "train.eval_facts=0"]
    with pytest.raises(Exception, match="model.vocab_size.*smaller than the bpe tokenizer"):
        Trainer(load_run_config("tiny", overrides + ["model.vocab_size=259"]), run_dir=tmp_path / "r0", progress=False)
    Trainer(
        load_run_config("tiny", overrides + [f"model.vocab_size={size}"]), run_dir=tmp_path / "run", progress=False
    ).fit()
    ckpt = next((tmp_path / "run" / "checkpoints").iterdir())
    assert (ckpt / "tokenizer.json").read_bytes() == (tmp_path / "shards" / "tokenizer.json").read_bytes()
    assert saved_tokenizer(ckpt).vocab_size == size and isinstance(saved_tokenizer(tmp_path / "run"), BPETokenizer)
    result = CliRunner().invoke(
        main, ["eval", str(tmp_path / "run"), "--facts", str(tmp_path / "facts.jsonl"), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["total"] == len(facts)
    # the tokenizer is part of the checkpoint: checksummed in COMMITTED, and a checkpoint that lost
    # it is refused rather than decoded with bytes
    assert "tokenizer.json" in json.loads((ckpt / "COMMITTED").read_text())["files"]
    damaged = tmp_path / "damaged"
    shutil.copytree(ckpt, damaged)
    (damaged / "tokenizer.json").unlink()
    assert_one_line_error(memray_here("verify", damaged), "tokenizer.json is missing")
    assert_one_line_error(
        memray_here("eval", damaged, "--facts", tmp_path / "facts.jsonl"), "tokenizer.json is missing"
    )
    # a grown checkpoint keeps it too
    assert memray_here("grow", ckpt, "--n-keys", 17, "--out", tmp_path / "big").returncode == 0
    grown = next((tmp_path / "big" / "checkpoints").iterdir())
    assert "tokenizer.json" in json.loads((grown / "COMMITTED").read_text())["files"]
    assert isinstance(saved_tokenizer(grown), BPETokenizer)


_STREAM = """
import resource, sys
from memray.data.ingest import ingest
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ingest([sys.argv[1]], sys.argv[2], shard_tokens=1 << 20, workers=1)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_ingest_streams_with_bounded_memory(tmp_path):
    """16 MiB of text (16M tokens): held whole as token lists it would take > 128 MiB."""
    paragraph = ("lorem ipsum dolor sit amet " * 20 + "\n\n").encode()
    with open(tmp_path / "big.txt", "wb") as f:
        for _ in range((16 << 20) // len(paragraph)):
            f.write(paragraph)
    result = subprocess.run(
        [sys.executable, "-c", _STREAM, str(tmp_path / "big.txt"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
    )
    before, after = map(int, result.stdout.split())
    assert (after - before) / 1024 < 64, f"peak RSS grew by {(after - before) / 1024:.0f} MiB"
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["totals"]["tokens"] > 15 << 20


def test_bench_ingest_smoke(tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_ingest.py"
    spec = importlib.util.spec_from_file_location("bench_ingest", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    summary = bench.main(["--mib", "1", "--files", "2", "--reps", "1", "--out", str(tmp_path)])
    assert summary["tokens_per_s/w1"] > 0 and summary["tokens_per_s/w2"] > 0
    text = (tmp_path / "bench_ingest.md").read_text()
    assert "| 1 | " in text and "| 2 | " in text
