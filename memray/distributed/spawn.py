"""Run a function on N local processes that form a process group (no Ray needed).

``spawn(fn, n, *args)`` starts ``n`` fresh interpreters (multiprocessing "spawn"), gives each the
environment torch.distributed's ``env://`` expects (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR=127.0.0.1`` and a free port), runs ``fn(*args)`` in each and returns the ranks'
results in rank order. When a rank fails, the others (which may be blocked in a collective) are
terminated and the failure is raised in the caller: a :class:`memray.errors.UserError` as the
same type with its message, anything else (an exception, a rank that died, e.g. killed by a
signal) as ``WorkerError``: one line naming the rank and what happened, the rank's traceback in
``details``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import socket
import time
import traceback

import torch

from memray.errors import RunFailed, UserError


class WorkerError(RunFailed):
    """A rank failed: the message names the rank and its error's last line; ``details`` holds
    its traceback."""


def _death(exitcode: int | None) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it)."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


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
    except RunFailed as exc:  # its message is the line to report
        results.put((rank, "error", (str(exc), f"{exc.details}\n{traceback.format_exc()}".strip())))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which re-raises
        results.put((rank, "error", (f"{type(exc).__name__}: {exc}", traceback.format_exc())))


def _rebuild_user_error(name: str, message: str) -> UserError:
    import memray.errors as errors

    cls = getattr(errors, name, UserError)
    exc = UserError.__new__(cls if isinstance(cls, type) and issubclass(cls, UserError) else UserError)
    Exception.__init__(exc, message)
    return exc


def _raise_if_killed(procs, reported, wait: float = 2.0) -> None:
    """Raise WorkerError for a rank killed by a signal (it cannot report): when one rank dies,
    the others fail in their next collective, and that is not the cause to report."""
    deadline = time.monotonic() + wait
    while True:
        for rank, proc in enumerate(procs):
            if rank not in reported and proc.exitcode is not None and proc.exitcode < 0:
                raise WorkerError(f"rank {rank} died ({_death(proc.exitcode)})") from None
        if time.monotonic() >= deadline:
            return
        time.sleep(0.05)


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
                dead = [(r, p) for r, p in enumerate(procs) if r not in out and not p.is_alive()]
                if dead:
                    rank, proc = dead[0]
                    raise WorkerError(f"rank {rank} died ({_death(proc.exitcode)})") from None
                continue
            if status == "user":
                raise _rebuild_user_error(*payload)
            if status == "error":
                _raise_if_killed(procs, out)  # a rank killed first: the others' errors follow from it
                line, details = payload
                first = line.strip().splitlines()[0] if line.strip() else "no message"
                raise WorkerError(f"rank {rank} failed: {first}", details=f"rank {rank}:\n{details}")
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
