"""Run a function on N local processes that form a process group (no Ray needed).

``spawn(fn, n, *args)`` starts ``n`` fresh interpreters (multiprocessing "spawn"), gives each the
environment torch.distributed's ``env://`` expects (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR=127.0.0.1`` and a free port), runs ``fn(*args)`` in each and returns the ranks'
results in rank order. When a rank fails, the others (which may be blocked in a collective) are
terminated and the failure is raised in the caller: a :class:`memray.errors.UserError` as the
same type with its message, anything else as ``WorkerError`` carrying the rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback

import torch

from memray.errors import UserError


class WorkerError(RuntimeError):
    """A rank failed; the message holds its traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, args, env, results):
    os.environ.update(env)
    rank = int(env["RANK"])
    torch.set_num_threads(int(env["MEMRAY_THREADS"]))
    try:
        results.put((rank, "ok", fn(*args)))
    except UserError as exc:
        results.put((rank, "user", (type(exc).__name__, str(exc))))
    except BaseException:  # noqa: BLE001 - reported to the parent, which re-raises
        results.put((rank, "error", traceback.format_exc()))


def _rebuild_user_error(name: str, message: str) -> UserError:
    import memray.errors as errors

    cls = getattr(errors, name, UserError)
    exc = UserError.__new__(cls if isinstance(cls, type) and issubclass(cls, UserError) else UserError)
    Exception.__init__(exc, message)
    return exc


def spawn(fn, world_size: int, *args, threads: int | None = None) -> list:
    """``[fn(*args) on rank 0, ..., on rank world_size - 1]``, each rank in its own process."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    procs = []
    for rank in range(world_size):
        env = {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "MEMRAY_THREADS": str(threads),
        }
        proc = ctx.Process(target=_entry, args=(fn, args, env, results), daemon=True)
        proc.start()
        procs.append(proc)
    out: dict[int, object] = {}
    try:
        while len(out) < world_size:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for r, p in enumerate(procs) if r not in out and not p.is_alive()]
                if dead:
                    raise WorkerError(
                        f"a worker process died (exit code {dead[0].exitcode}) without reporting"
                    ) from None
                continue
            if status == "user":
                raise _rebuild_user_error(*payload)
            if status == "error":
                raise WorkerError(f"rank {rank} failed:\n{payload}")
            out[rank] = payload
        for proc in procs:
            proc.join(timeout=60)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=10)
    return [out[r] for r in range(world_size)]
