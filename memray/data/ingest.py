"""Tokenized Arrow shards from text, JSON lines and Parquet: ``memray ingest``.

Each source file is read as a stream (a paragraph, a line or a Parquet batch at a time) and
its documents are tokenized and written as they come into Arrow IPC files of at most
``shard_tokens`` tokens: one row per document, a ``tokens`` column of ``list<uint16>``. Memory
stays bounded by one batch of documents, whatever the input size. Files are ingested in
parallel by a process pool. A record that cannot be read (bad JSON, no text field, a null or
empty text, invalid UTF-8) is counted and written to ``rejects.jsonl`` with its ``file:line``
and the reason; ``strict`` makes the first one fatal. ``manifest.json`` records the schema
version, the tokenizer, every source's counts (read = written + rejected) and every shard's
documents, tokens and SHA-256.

Tokenizers: ``byte`` (default), ``bpe`` (a byte-level BPE of ``vocab_size`` ids trained on the
sources' accepted records in a first streaming pass) or ``bpe:PATH`` (an existing ``tokenizers``
JSON file); a BPE is saved as ``tokenizer.json`` beside the shards, its SHA-256 in the manifest.

Formats: ``text`` (documents are paragraphs separated by blank lines; the line is the
paragraph's first), ``jsonl`` (``{"text": ...}`` or a fact ``{"prompt", "answer"}``, whose text
is ``prompt + " " + answer``), ``parquet`` (a string column, ``text`` by default; the line is the
row number).
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from memray.errors import InputError, RunFailed
from memray.files import sha256_file

from .tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer, train_bpe

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
FORMATS = ("text", "jsonl", "parquet")
BATCH_DOCS = 1024


class _Reject(Exception):
    pass


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    return "text"


def _records(path: Path, fmt: str, text_column: str):
    """(line, text or _Reject) for every record of ``path``, streamed."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            handle = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for unreadable files
            raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
        if text_column not in handle.schema_arrow.names:
            raise InputError(f"{path}: no column '{text_column}' (columns: {handle.schema_arrow.names})")
        row = 0
        for batch in handle.iter_batches(columns=[text_column], batch_size=BATCH_DOCS):
            for value in batch.column(0).to_pylist():
                row += 1
                if not isinstance(value, str) or not value.strip():
                    yield row, _Reject(f"'{text_column}' is {'null' if value is None else 'empty or not text'}")
                else:
                    yield row, value
        return
    with open(path, "rb") as handle:
        if fmt == "jsonl":
            for number, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    yield number, _Reject(f"not JSON ({exc.__class__.__name__}: {exc})")
                    continue
                text = record.get("text") if isinstance(record, dict) else None
                if text is None and isinstance(record, dict) and {"prompt", "answer"} <= record.keys():
                    text = f"{record['prompt']} {record['answer']}"
                if not isinstance(text, str) or not text.strip():
                    yield number, _Reject("no non-empty 'text' or 'prompt'/'answer' field")
                else:
                    yield number, text
            return
        paragraph, start = [], None
        for number, raw in enumerate(handle, 1):
            if raw.strip():
                start = start or number
                paragraph.append(raw)
                continue
            if paragraph:
                yield start, _decode(b"".join(paragraph))
            paragraph, start = [], None
        if paragraph:
            yield start, _decode(b"".join(paragraph))


def _decode(raw: bytes):
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        return _Reject(f"invalid UTF-8 ({exc.reason} at byte {exc.start})")


def ingest_file(
    index: int,
    path: str,
    fmt: str,
    out: str,
    shard_tokens: int,
    strict: bool,
    text_column: str,
    tokenizer_file: str | None = None,
) -> dict:
    """Ingest one source into ``out/<index>-<shard>.arrow``; counts, shards and rejects."""
    import pyarrow as pa

    tokenizer = BPETokenizer(tokenizer_file) if tokenizer_file else ByteTokenizer()
    schema = pa.schema([pa.field("tokens", pa.list_(pa.uint16()))])
    source, out = Path(path), Path(out)
    counts = {"path": path, "format": fmt, "read": 0, "written": 0, "rejected": 0, "tokens": 0}
    shards, rejects = [], []
    writer, shard_path, shard_docs, shard_token_count, batch = None, None, 0, 0, []

    def flush():
        nonlocal batch
        if batch:
            writer.write_batch(pa.record_batch([pa.array(batch, type=pa.list_(pa.uint16()))], schema=schema))
            batch = []

    def close():
        nonlocal writer
        if writer is not None:
            flush()
            writer.close()
            shards.append(
                {
                    "file": shard_path.name,
                    "documents": shard_docs,
                    "tokens": shard_token_count,
                    "sha256": sha256_file(shard_path),
                }
            )
            writer = None

    for line, text in _records(source, fmt, text_column):
        counts["read"] += 1
        if isinstance(text, _Reject):
            if strict:
                raise InputError(f"{source}:{line}: {text}")
            counts["rejected"] += 1
            rejects.append({"file": str(source), "line": line, "reason": str(text)})
            continue
        ids = tokenizer.encode(text, bos=True, eos=True)
        if writer is None or shard_token_count + len(ids) > shard_tokens and shard_docs:
            close()
            shard_path = out / f"{index:05d}-{len(shards):05d}.arrow"
            writer = pa.ipc.new_file(str(shard_path), schema)
            shard_docs = shard_token_count = 0
        batch.append(ids)
        shard_docs += 1
        shard_token_count += len(ids)
        counts["written"] += 1
        counts["tokens"] += len(ids)
        if len(batch) >= BATCH_DOCS:
            flush()
    close()
    return {"source": counts, "shards": shards, "rejects": rejects}


def _accepted_texts(jobs, strict: bool):
    """Every accepted record's text, streamed over the sources (the BPE training pass)."""
    for _, path, fmt, _, _, _, text_column in jobs:
        for line, text in _records(Path(path), fmt, text_column):
            if isinstance(text, _Reject):
                if strict:
                    raise InputError(f"{path}:{line}: {text}")
                continue
            yield text


def ingest(
    sources: list[str | Path],
    out: str | Path,
    *,
    fmt: str | None = None,
    shard_tokens: int = 1 << 24,
    workers: int | None = None,
    strict: bool = False,
    text_column: str = "text",
    tokenizer: str = "byte",
    vocab_size: int = 8192,
    map_files=None,
) -> dict:
    """Ingest every source into ``out``; returns the manifest (also written to ``out``).

    ``tokenizer``: ``byte``, ``bpe`` (train one of ``vocab_size`` ids on the sources) or
    ``bpe:PATH`` (use the ``tokenizers`` JSON file at PATH). ``map_files(fn, jobs)`` runs
    ``fn(*job)`` for every file and returns the results in order (default: a local process pool
    of ``workers``; ``memray.launch.tasks.map_files`` runs them as Ray tasks)."""
    out = Path(out).resolve()
    paths = [Path(s) for s in sources]
    for path in paths:
        if not path.is_file():
            raise InputError(f"input not found: {path}")
    if (out / MANIFEST).exists():
        raise InputError(f"{out} already holds ingested shards ({MANIFEST}); choose another --out")
    if tokenizer != "byte" and tokenizer != "bpe" and not tokenizer.startswith("bpe:"):
        raise InputError(f"--tokenizer must be byte, bpe or bpe:PATH, got {tokenizer!r}")
    if tokenizer.startswith("bpe:") and not Path(tokenizer[4:]).is_file():
        raise InputError(f"tokenizer file not found: {tokenizer[4:]}")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        (i, str(p), fmt or detect_format(p), str(out), shard_tokens, strict, text_column) for i, p in enumerate(paths)
    ]
    if tokenizer == "byte":
        tok = ByteTokenizer()
    else:
        target = out / TOKENIZER_FILE
        if tokenizer == "bpe":
            tok = train_bpe(_accepted_texts(jobs, strict), vocab_size, target)
        else:
            BPETokenizer(tokenizer[4:])  # readable, with the special tokens, before copying
            shutil.copyfile(tokenizer[4:], target)
            tok = BPETokenizer(target)
        jobs = [job + (str(target),) for job in jobs]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if map_files is not None:
        results = map_files(ingest_file, jobs)
    elif workers == 1:
        results = [ingest_file(*job) for job in jobs]
    else:
        try:
            with ProcessPoolExecutor(workers) as pool:
                results = list(pool.map(ingest_file, *zip(*jobs)))
        except BrokenProcessPool:
            raise RunFailed(
                f"an ingest worker process died (killed?); {out} has no {MANIFEST}, so nothing was "
                "committed: run the same command again"
            ) from None
    with open(out / REJECTS, "w") as handle:
        for result in results:
            for reject in result["rejects"]:
                handle.write(json.dumps(reject) + "\n")
    sources_counts = [r["source"] for r in results]
    totals = {key: sum(s[key] for s in sources_counts) for key in ("read", "written", "rejected", "tokens")}
    assert totals["read"] == totals["written"] + totals["rejected"]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "tokenizer": tok.describe(),
        "schema": {"tokens": "list<uint16>", "row": "one document: BOS + tokens + EOS"},
        "sources": sources_counts,
        "shards": [shard for r in results for shard in r["shards"]],
        "totals": totals,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)  # written last: a directory without it is incomplete
    return manifest
