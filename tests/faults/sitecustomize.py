"""Fault injection for tests/test_faults.py, loaded by every Python process started with this
directory on ``PYTHONPATH`` (ranks and workers included) when ``MEMRAY_FAULT`` is set:

* ``save-kill:STEP:RANK`` — rank RANK SIGKILLs itself while writing a chunk of checkpoint STEP;
* ``save-enospc:STEP:RANK`` — rank RANK's chunk writes for checkpoint STEP fail with ENOSPC;
* ``restore-kill:RANK`` — rank RANK SIGKILLs itself while reading a checkpoint's rows;
* ``ingest-kill:N`` — an ingesting process SIGKILLs itself when it finishes its N-th shard.
"""

import errno
import os
import signal

FAULT = os.environ.get("MEMRAY_FAULT", "")


def _rank() -> str:
    return os.environ.get("RANK", "0")


def _install(kind: str, *args: str) -> None:
    if kind in ("save-kill", "save-enospc"):
        from memray.checkpoint import pools

        step, rank = f"step-{int(args[0]):08d}", args[1]
        original = pools.write_chunk

        def write_chunk(store, *rest):
            if step in str(store) and _rank() == rank:
                if kind == "save-kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(store, *rest)

        pools.write_chunk = write_chunk
    elif kind == "restore-kill":
        from memray.checkpoint import sharded

        original = sharded.read_rows

        def read_rows(*a, **k):
            if _rank() == args[0]:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*a, **k)

        sharded.read_rows = read_rows
    elif kind == "ingest-kill":
        from memray.data import ingest

        original, calls = ingest.sha256_file, [0]

        def sha256_file(path):
            calls[0] += 1
            if calls[0] == int(args[0]):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(path)

        ingest.sha256_file = sha256_file
    else:
        raise ValueError(f"MEMRAY_FAULT: unknown fault {kind!r}")


if FAULT:
    _install(*FAULT.split(":"))
