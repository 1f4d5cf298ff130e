"""Tokenize text, JSON lines and Parquet into Arrow shards with one Ray task per source file, on
the cluster this job runs on: ``python ingest.py SRC... --out DIR [memray ingest options]``."""

import sys

from memray.cli import main

if __name__ == "__main__":
    main(["ingest", "--ray", *sys.argv[1:]], prog_name="memray ingest")
