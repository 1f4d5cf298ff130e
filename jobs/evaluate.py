"""Exact-match recall of a checkpoint on a facts file: ``python evaluate.py CKPT --facts F [--json]``."""

import sys

from memray.cli import main

if __name__ == "__main__":
    main(["eval", *sys.argv[1:]], prog_name="memray eval")
