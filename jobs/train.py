"""Train on the Ray cluster this job runs on: ``python train.py CONFIG [memray train options]``.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train.py tiny --workers 2 --run-dir /shared/runs/tiny
"""

import sys

from memray.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]], prog_name="memray train")
