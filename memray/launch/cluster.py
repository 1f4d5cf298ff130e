"""A local Ray head for job submission: ``memray cluster up|down|status``.

``up`` starts ``ray start --head --block`` as a process of its own session, every port on
127.0.0.1, token authentication on (a token is generated into Ray's token file when there is
none: ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, mode 0600), and waits until the Jobs API
answers. The head's PID, addresses and log file are recorded in ``MEMRAY_HOME/cluster.json``
(``~/.memray``); ``down`` stops exactly that process group (SIGTERM, then SIGKILL after a grace
period), never other Ray instances on the machine. Jobs submitted to the head run the Python of
the environment that started it (its ``bin`` comes first on the head's PATH).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from memray.errors import InputError

from .local import LOOPBACK, check_reachable, ensure_token

STATE = "cluster.json"
START_TIMEOUT_S = 90.0
STOP_GRACE_S = 35.0  # Ray drains a node for up to 30 s on SIGTERM


def state_dir() -> Path:
    return Path(os.environ.get("MEMRAY_HOME") or Path.home() / ".memray")


def read_state() -> dict | None:
    try:
        return json.loads((state_dir() / STATE).read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def status() -> dict:
    """The recorded head and whether it is running (its process alive, its Jobs API reachable)."""
    state = read_state()
    if state is None:
        return {"running": False}
    running = _alive(state["pid"])
    if running:
        try:
            check_reachable(state["dashboard"], 8265, "the Jobs API")
        except InputError:
            running = False
    return {**state, "running": running}


def up(port: int = 6379, dashboard_port: int = 8265, num_cpus: int | None = None) -> dict:
    """Start the local head (or report the one already running)."""
    current = status()
    if current["running"]:
        return {**current, "started": False}
    if current.get("pid") and _alive(current["pid"]):
        raise InputError(
            f"a local head (pid {current['pid']}) is running but its Jobs API does not answer: "
            "memray cluster down first"
        )
    ensure_token()
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "cluster.log"
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    # On SIGTERM Ray drains a node for up to 30 s so that Serve proxies can hand traffic over;
    # a single-node local head has nobody to hand over to, so `cluster down` stops it at once
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    env.pop("RAY_ADDRESS", None)
    ray_cli = Path(sys.executable).parent / "ray"
    command = [
        str(ray_cli) if ray_cli.exists() else "ray",
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        f"--node-ip-address={LOOPBACK}",
        f"--port={port}",
        "--include-dashboard=true",
        f"--dashboard-host={LOOPBACK}",
        f"--dashboard-port={dashboard_port}",
        f"--num-cpus={num_cpus or os.cpu_count() or 1}",
    ]
    with open(log, "ab") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True, stdin=subprocess.DEVNULL
        )
    state = {
        "pid": process.pid,
        "address": f"{LOOPBACK}:{port}",
        "dashboard": f"http://{LOOPBACK}:{dashboard_port}",
        "log": str(log),
        "started_at": time.time(),
    }
    (directory / STATE).write_text(json.dumps(state, indent=1))
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            (directory / STATE).unlink(missing_ok=True)
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise InputError(f"the local head exited at start (code {process.returncode}; {log}): {tail[0]}")
        try:
            _jobs_api_ready(state["dashboard"])
            return {**state, "running": True, "started": True}
        except Exception:
            if time.monotonic() > deadline:
                down()
                raise InputError(f"the local head did not answer within {START_TIMEOUT_S:.0f} s (see {log})") from None
            time.sleep(1.0)


def _jobs_api_ready(dashboard: str) -> None:
    from .jobs import client

    client(dashboard).list_jobs()


def down() -> dict:
    """Stop the recorded head's process group; a no-op when none is recorded."""
    state = read_state()
    if state is None:
        return {"stopped": False}
    pid = state["pid"]
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)  # ray start --block shuts down the processes it started
        deadline = time.monotonic() + STOP_GRACE_S
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)  # whatever of the group is left
    except ProcessLookupError:
        pass
    try:  # reap it when this process started it
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    (state_dir() / STATE).unlink(missing_ok=True)
    return {"stopped": True, "pid": pid}
