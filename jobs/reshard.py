"""Reshard a checkpoint offline for another world size or layout:
``python reshard.py CKPT --out DIR --world-size N [--layout row|column]``."""

import sys

from memray.cli import main

if __name__ == "__main__":
    main(["restore", *sys.argv[1:]], prog_name="memray restore")
