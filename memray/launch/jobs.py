"""Ray Jobs: ``memray submit|status|logs|stop|list`` through the Jobs SDK.

The address is the cluster's Jobs API (its dashboard, ``http://host:8265``), from ``--address``
or else ``RAY_ADDRESS``. It is checked for reachability within a few seconds first. The Ray
auth token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) is sent as a
bearer token; since the Jobs API runs arbitrary code, submitting to a non-loopback address without
a token is refused unless ``insecure``.

A submitted training job ships only a small working directory: the resolved config
(``config.yaml``) and memray's ``jobs/train.py`` entrypoint, run with the cluster's Python, which
must have memray installed (the local head started by ``memray cluster up`` uses this
environment's). The run directory is resolved to an absolute path on submission, so it must be on
storage the cluster's nodes share.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from memray.errors import InputError, ReportedError, RunFailed, UsageError

from .local import auth_token, check_reachable, is_loopback, split_address

JOBS_PORT = 8265
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _entrypoints() -> Path:
    import memray.jobs

    return Path(memray.jobs.__file__).resolve().parent


def jobs_address(address: str | None) -> str:
    """The Jobs API URL from ``--address`` or ``RAY_ADDRESS``."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UsageError(
            "no cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS "
            "(memray cluster up prints a local one)"
        )
    host, port, scheme = split_address(address, JOBS_PORT)
    if scheme not in ("http", "https", "tcp"):
        raise UsageError(f"address {address!r}: the Jobs API is an http(s)://HOST:PORT address (a Ray dashboard)")
    return f"{'https' if scheme == 'https' else 'http'}://{host}:{port}"


def client(address: str | None, insecure: bool = False):
    """A JobSubmissionClient for ``address`` with the auth token; refuses an unauthenticated
    non-loopback address unless ``insecure``."""
    from ray.job_submission import JobSubmissionClient

    url = jobs_address(address)
    host = split_address(url, JOBS_PORT)[0]
    token = auth_token()
    if token is None and not is_loopback(host) and not insecure:
        raise UsageError(
            f"refusing to talk to {url} without an auth token: the Jobs API runs arbitrary code. Set "
            "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH), or pass --insecure for a trusted network"
        )
    check_reachable(url, JOBS_PORT, "the Ray Jobs API")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except Exception as exc:  # the SDK raises ConnectionError/RuntimeError for refusals and bad tokens
        raise InputError(f"the Ray Jobs API at {url} refused the connection: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _not_found(exc: RuntimeError) -> bool:
    """The Jobs SDK's way of saying a job id is unknown (it raises RuntimeError for every failure)."""
    text = str(exc)
    return "404" in text or "does not exist" in text


def _call(what: str, job_id: str | None, fn, *args):
    try:
        return fn(*args)
    except RuntimeError as exc:
        if job_id is not None and _not_found(exc):
            raise InputError(f"no job '{job_id}' on this cluster") from None
        raise InputError(f"{what} failed: {_first_line(exc)}") from None


def _exists(jobs, job_id: str) -> bool:
    """Whether the cluster has a job ``job_id``; any failure other than "unknown id" (a refused
    token, a server error) is an error, not a reason to submit again."""
    try:
        jobs.get_job_info(job_id)
        return True
    except RuntimeError as exc:
        if _not_found(exc):
            return False
        raise InputError(f"reading job '{job_id}' failed: {_first_line(exc)}") from None


def submit(
    config_yaml: str,
    *,
    address: str | None,
    run_dir: str,
    submission_id: str | None = None,
    resume: str | None = None,
    insecure: bool = False,
) -> tuple[object, str, bool]:
    """Submit a training job; (client, submission id, whether it was newly submitted). An id
    that already exists is not submitted again."""
    jobs = client(address, insecure)
    if submission_id is not None and _exists(jobs, submission_id):
        return jobs, submission_id, False
    with tempfile.TemporaryDirectory(prefix="memray-job-") as directory:
        (Path(directory) / "config.yaml").write_text(config_yaml)
        shutil.copyfile(_entrypoints() / "train.py", Path(directory) / "train.py")
        command = ["python", "train.py", "config.yaml", "--run-dir", run_dir, "--no-progress"]
        if resume:
            command += ["--resume", resume]
        job_id = _call(
            "submitting the job",
            None,
            lambda: jobs.submit_job(
                entrypoint=shlex.join(command),
                submission_id=submission_id,
                runtime_env={"working_dir": directory},
                metadata={"memray": "train", "run_dir": run_dir},
            ),
        )
    return jobs, job_id, True


def info(jobs, job_id: str):
    return _call("reading the job", job_id, jobs.get_job_info, job_id)


def logs(jobs, job_id: str) -> str:
    return _call("reading the job's logs", job_id, jobs.get_job_logs, job_id)


def follow(jobs, job_id: str, out=None, run_dir: str | None = None) -> str:
    """Stream the job's logs until it ends; its final status. Losing the cluster on the way (its
    head killed, the network gone) is one line, exit 1: what the job committed stays in its run
    directory (``run_dir``), and submitting into it again continues from there."""
    out = out or sys.stdout
    # the SDK logs a closed log stream at INFO on stderr, a second line beside memray's own
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    info(jobs, job_id)

    async def tail():
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
        while (status := str(info(jobs, job_id).status.value)) not in TERMINAL:  # logs end just before the status
            time.sleep(0.5)
    except ReportedError:
        raise
    except Exception as exc:  # aiohttp's and requests' connection errors, the SDK's RuntimeError
        where = f"--run-dir {run_dir}" if run_dir else "its --run-dir"
        raise RunFailed(
            f"lost the Ray cluster while following job '{job_id}' ({type(exc).__name__}: {_first_line(exc)}); "
            f"what it committed stays in its run directory: submit again with {where} to continue from it"
        ) from exc
    return status


def stop(jobs, job_id: str) -> bool:
    info(jobs, job_id)
    return _call("stopping the job", job_id, jobs.stop_job, job_id)


def list_jobs(jobs) -> list:
    return _call("listing jobs", None, jobs.list_jobs)
