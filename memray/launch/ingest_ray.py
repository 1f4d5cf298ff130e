"""Ingestion on a Ray cluster: one Ray task per source file (``memray ingest --ray``).

Each task runs :func:`memray.data.ingest.ingest_file` where Ray places it and writes its shards
straight into the output directory, which must be on storage every node shares; the driver then
writes the manifest as a local ingestion does.
"""

from __future__ import annotations

from .local import ray_session, user_error


def map_files(fn, jobs: list[tuple], address: str | None = None) -> list:
    """``fn(*job)`` for every job as Ray tasks (one CPU each); results in job order."""
    with ray_session(address):
        import ray

        task = ray.remote(num_cpus=1)(fn)
        try:
            return ray.get([task.remote(*job) for job in jobs])
        except Exception as exc:
            user = user_error(exc)  # a malformed input found by a task: one line, exit 2
            if user is not None:
                raise user from None
            raise
