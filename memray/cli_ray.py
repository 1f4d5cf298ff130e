"""``memray cluster up|down|status`` and the Ray Jobs commands ``submit|status|logs|stop|list``.

Registered on the main group by :mod:`memray.cli`; user errors (an unreachable address, an
unknown job id, a config error) are one line with exit code 2 like every other command; a job
that fails makes ``submit`` (when it waits) exit 1, as ``ray job submit`` does.
"""

from __future__ import annotations

import json
import sys

import click

from memray.errors import UsageError

_ADDRESS = click.option("--address", help="The cluster's Jobs API, http://HOST:8265 (default: RAY_ADDRESS).")
_INSECURE = click.option(
    "--insecure", is_flag=True, help="Allow a non-loopback address without an auth token (trusted networks only)."
)


@click.group()
def cluster():
    """A local Ray head on 127.0.0.1 (token auth on) for submitting jobs.

    \b
    Example:
      memray cluster up && export RAY_ADDRESS=http://127.0.0.1:8265
      memray submit tiny --workers 2 && memray cluster down
    """


@cluster.command()
@click.option("--port", type=int, default=6379, show_default=True, help="GCS port.")
@click.option("--dashboard-port", type=int, default=8265, show_default=True, help="Dashboard and Jobs API port.")
@click.option("--num-cpus", type=int, help="CPUs the head offers (default: this machine's).")
def up(port, dashboard_port, num_cpus):
    """Start the local head (or report the running one)."""
    from memray.launch import cluster as local_cluster

    state = local_cluster.up(port, dashboard_port, num_cpus)
    verb = "started" if state["started"] else "already running"
    click.echo(f"local head {verb}: pid {state['pid']}, address {state['address']}, jobs API {state['dashboard']}")
    click.echo(f"  export RAY_ADDRESS={state['dashboard']}   # for memray submit|status|logs|stop|list")


@cluster.command()
def down():
    """Stop the local head started by `memray cluster up` (and only it)."""
    from memray.launch import cluster as local_cluster

    result = local_cluster.down()
    click.echo(f"local head (pid {result['pid']}) stopped" if result["stopped"] else "no local head recorded")


@cluster.command(name="status")
@click.option("--json", "as_json", is_flag=True)
def cluster_status(as_json):
    """Whether the local head runs, its addresses and jobs."""
    from memray.launch import cluster as local_cluster

    state = local_cluster.status()
    if state["running"]:
        from memray.launch import jobs

        state["jobs"] = {}
        for job in jobs.list_jobs(jobs.client(state["dashboard"])):
            state["jobs"][job.status.value] = state["jobs"].get(job.status.value, 0) + 1
    if as_json:
        click.echo(json.dumps(state))
    elif state["running"]:
        click.echo(
            f"running: pid {state['pid']}, address {state['address']}, jobs API {state['dashboard']}, "
            f"jobs {state['jobs'] or 'none'}"
        )
    else:
        click.echo("not running" + (f" (recorded pid {state['pid']} is gone)" if state.get("pid") else ""))


@click.command()
@click.argument("config")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--workers", type=int, help="Ray Train workers (sets distributed.workers).")
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False),
    help="Run directory, on storage the cluster shares (default runs/<name>-<timestamp>, made absolute).",
)
@click.option("--resume", help="A checkpoint path on the cluster's storage to continue from.")
@click.option("--submission-id", help="Job id to use; submitting an id that exists again does not start a second job.")
@click.option("--no-wait", is_flag=True, help="Print the job id and return instead of streaming its logs.")
@_ADDRESS
@_INSECURE
def submit(config, overrides, workers, run_dir, resume, submission_id, no_wait, address, insecure):
    """Submit a training job to a Ray cluster through the Jobs API.

    Waits and streams the logs; exits 0 when the job succeeds, 1 when it fails or is stopped.

    \b
    Example:
      memray submit tiny --address http://127.0.0.1:8265 --workers 2 --set distributed.zero_stage=2
    """

    from memray.config import dump_yaml
    from memray.launch import jobs
    from memray.train import load_run_config
    from memray.train.rundir import resolve_run_dir

    if workers is not None:
        overrides = [*overrides, f"distributed.workers={workers}"]
    run_config = load_run_config(config, list(overrides))  # errors here, before anything is sent
    if run_config.distributed.workers < 1 or run_config.distributed.launcher != "ray":
        raise UsageError("a submitted job trains on Ray Train workers: --workers >= 1, distributed.launcher: ray")
    run_config.check_world()
    run_config = run_config.with_absolute_paths()  # a job runs in its own working directory
    run_dir = str(resolve_run_dir(run_config, run_dir).resolve())
    client, job_id, new = jobs.submit(
        dump_yaml(run_config),
        address=address,
        run_dir=run_dir,
        submission_id=submission_id,
        resume=resume,
        insecure=insecure,
    )
    click.echo(f"job {job_id} {'submitted' if new else 'already exists'}; run directory {run_dir}", err=True)
    if no_wait:
        click.echo(job_id)
        return
    status = jobs.follow(client, job_id, run_dir=run_dir)
    click.echo(f"job {job_id} {status}", err=True)
    sys.exit(0 if status == "SUCCEEDED" else 1)


@click.command(name="status")
@click.argument("job_id")
@_ADDRESS
@_INSECURE
@click.option("--json", "as_json", is_flag=True)
def job_status(job_id, address, insecure, as_json):
    """A job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED.

    \b
    Example:
      memray status raysubmit_abc123 --address http://127.0.0.1:8265
    """
    from memray.launch import jobs

    info = jobs.info(jobs.client(address, insecure), job_id)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "job_id": job_id,
                    "status": info.status.value,
                    "message": info.message,
                    "start_time": info.start_time,
                    "end_time": info.end_time,
                }
            )
        )
    else:
        click.echo(f"{job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))


@click.command()
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Stream until the job ends.")
@_ADDRESS
@_INSECURE
def logs(job_id, follow, address, insecure):
    """A job's logs.

    \b
    Example:
      memray logs raysubmit_abc123 --follow --address http://127.0.0.1:8265
    """
    from memray.launch import jobs

    client = jobs.client(address, insecure)
    if follow:
        jobs.follow(client, job_id)
    else:
        click.echo(jobs.logs(client, job_id), nl=False)


@click.command()
@click.argument("job_id")
@_ADDRESS
@_INSECURE
def stop(job_id, address, insecure):
    """Stop a running job.

    \b
    Example:
      memray stop raysubmit_abc123 --address http://127.0.0.1:8265
    """
    from memray.launch import jobs

    stopped = jobs.stop(jobs.client(address, insecure), job_id)
    click.echo(f"{job_id}: {'stop requested' if stopped else 'not running'}")


@click.command(name="list")
@_ADDRESS
@_INSECURE
@click.option("--json", "as_json", is_flag=True)
def list_jobs(address, insecure, as_json):
    """The cluster's jobs, oldest first.

    \b
    Example:
      memray list --address http://127.0.0.1:8265
    """
    from memray.launch import jobs

    rows = [
        {
            "job_id": j.submission_id or j.job_id,
            "status": j.status.value,
            "start_time": j.start_time,
            "entrypoint": j.entrypoint,
        }
        for j in jobs.list_jobs(jobs.client(address, insecure))
    ]
    rows.sort(key=lambda r: r["start_time"] or 0)
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        click.echo(f"{r['job_id']:32s} {r['status']:10s} {r['entrypoint']}")


def register(group: click.Group) -> None:
    for command in (cluster, submit, job_status, logs, stop, list_jobs):
        group.add_command(command)
