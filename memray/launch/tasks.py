"""Offline jobs as Ray tasks: ``memray ingest --ray`` (one task per source file, running
:func:`memray.data.ingest.ingest_file`) and ``memray grow --ray`` (one task per run of grown
chunks, :func:`memray.train.grow.grow_chunks`).

Each task writes its files straight into the output directory where Ray places it, so that
directory must be on storage every node shares; the driver then writes the manifest (or commits
the checkpoint) as a local run does.
"""

from __future__ import annotations

from .local import ray_session, user_error

SETTLE_SECONDS = 30.0  # how long a failed ingestion waits for its other tasks to stop


def map_files(fn, jobs: list[tuple], address: str | None = None) -> list:
    """``fn(*job)`` for every job as Ray tasks (one CPU each); results in job order."""
    with ray_session(address):
        import ray

        task = ray.remote(num_cpus=1)(fn)
        refs = [task.remote(*job) for job in jobs]
        try:
            return ray.get(refs)
        except Exception as exc:
            # settle every task before the session ends: one still running when the driver
            # disconnects fails into a closed connection, and Ray prints that on stderr. Only
            # tasks still running after a grace period are cancelled (cancelling one that is
            # just completing trips a check inside Ray's task manager).
            _, running = ray.wait(refs, num_returns=len(refs), timeout=SETTLE_SECONDS)
            if running:
                for ref in running:
                    ray.cancel(ref)
                ray.wait(running, num_returns=len(running), timeout=SETTLE_SECONDS)
            user = user_error(exc)  # a malformed input found by a task: one line, exit 2
            if user is not None:
                raise user from None
            raise
