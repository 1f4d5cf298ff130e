"""Ingestion throughput: tokens per second of ``memray ingest`` on 1 and 2 processes.

The corpus: ``--files`` JSON-lines files of synthetic fact sentences and paragraphs of text
(``--mib`` MiB in all; 1% malformed lines, which are rejected), generated into a temporary
directory. Each configuration ingests the same files into a fresh directory; the median of
``--reps`` runs is reported, and the read speed of the same bytes (one pass over every file) for
scale. Byte tokenizer, so tokens = UTF-8 bytes + 2 per document.

    python benchmarks/bench_ingest.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, write_table  # noqa: E402

from memray.data.ingest import ingest  # noqa: E402
from memray.data.synthetic import generate_facts  # noqa: E402

NAME = "bench_ingest"


def make_corpus(directory: pathlib.Path, files: int, mib: int) -> int:
    facts = [f.text for f in generate_facts(2000, 8, seed=0)]
    per_file = (mib << 20) // files
    total = 0
    for index in range(files):
        with open(directory / f"part-{index}.jsonl", "w") as handle:
            written, line = 0, 0
            while written < per_file:
                text = facts[line % len(facts)] if line % 3 else " ".join(facts[line % len(facts) :][:8])
                row = "{not json\n" if line % 100 == 99 else json.dumps({"text": text}) + "\n"
                handle.write(row)
                written += len(row)
                line += 1
        total += written
    return total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mib", type=int, default=None)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results")
    args = parser.parse_args(argv)
    mib, reps = args.mib or (8 if args.quick else 64), args.reps or (1 if args.quick else 3)
    work = pathlib.Path(tempfile.mkdtemp())
    rows, summary = [], {"benchmark": NAME}
    try:
        corpus = work / "corpus"
        corpus.mkdir()
        nbytes = make_corpus(corpus, args.files, mib)
        sources = sorted(corpus.iterdir())
        start = time.perf_counter()
        for path in sources:
            path.read_bytes()
        read_s = time.perf_counter() - start
        for workers in (1, 2):
            times, manifest = [], None
            for rep in range(reps):
                out = work / f"out-{workers}-{rep}"
                start = time.perf_counter()
                manifest = ingest(sources, out, workers=workers)
                times.append(time.perf_counter() - start)
                shutil.rmtree(out)
            seconds = statistics.median(times)
            tokens = manifest["totals"]["tokens"]
            rows.append(
                {
                    "workers": workers,
                    "input_MiB": nbytes / 2**20,
                    "documents": manifest["totals"]["written"],
                    "rejected": manifest["totals"]["rejected"],
                    "tokens": tokens,
                    "median_s": seconds,
                    "tokens_per_s": tokens / seconds,
                    "MiB_per_s": nbytes / 2**20 / seconds,
                }
            )
            summary[f"tokens_per_s/w{workers}"] = tokens / seconds
        summary["speedup_2_workers"] = summary["tokens_per_s/w2"] / summary["tokens_per_s/w1"]
        summary["read_MiB_per_s"] = nbytes / 2**20 / read_s
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine = machine_info()
    write_table(
        args.out,
        NAME,
        rows,
        ["workers", "input_MiB", "documents", "rejected", "tokens", "median_s", "tokens_per_s", "MiB_per_s"],
        machine=machine,
        summary=summary,
        title=f"memray ingest of {args.files} JSON-lines files ({mib} MiB, 1% malformed), byte tokenizer, "
        f"median of {reps} runs.",
    )
    summary["machine"] = machine
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
