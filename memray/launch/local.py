"""Connecting to Ray: an embedded local instance, or a running cluster by address.

The embedded instance binds to 127.0.0.1 and keeps Ray's token authentication on (Ray enables it
for new local instances and keeps the token in ``~/.ray/auth_token`` unless ``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH`` name another); it lives as long as the command. An address is checked
for reachability within a few seconds before Ray is asked to connect, so a wrong address is one
line, not a hang.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from memray.errors import InputError, UserError

CONNECT_TIMEOUT_S = 5.0
LOOPBACK = "127.0.0.1"


def split_address(address: str, default_port: int) -> tuple[str, int, str]:
    """(host, port, scheme) of ``host[:port]``, ``http://host:port`` or ``ray://host:port``."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        port = parsed.port or default_port
    except ValueError:
        raise InputError(f"address {address!r}: the port is not a number") from None
    if not parsed.hostname:
        raise InputError(f"address {address!r}: no host")
    return parsed.hostname, port, parsed.scheme


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_reachable(address: str, default_port: int, what: str) -> None:
    host, port, _ = split_address(address, default_port)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        raise InputError(f"cannot reach {what} at {address} ({host}:{port}): {reason}") from None


def auth_token() -> str | None:
    """The Ray auth token this client would send: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH's file, or
    ~/.ray/auth_token; None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return token or None


def ensure_token() -> None:
    """Generate the token a local instance will use (0600, where :func:`auth_token` looks first:
    ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``) when there is none yet."""
    if auth_token() is not None:
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))


@contextlib.contextmanager
def _own_temp_dir():
    """A temporary directory of its own for an embedded instance (``RAY_TMPDIR``, inherited by
    its processes), removed after it. Ray's state API finds "the current cluster" through
    ``<temp>/ray/ray_current_cluster``, which ``ray start`` writes in the shared default
    directory and nothing removes when that head dies: read by the embedded instance's own
    processes, a stale file (a killed head) held Ray Train's placement-group cleaner in a 12 s
    timeout at the end of every run, and a live one (another cluster on this machine) would
    answer for actors it does not have. The instance's logs go with the directory (a run's own
    log, metrics and failure report are in its run directory)."""
    saved = os.environ.get("RAY_TMPDIR")
    root = tempfile.mkdtemp(prefix="memray-ray-")
    os.environ["RAY_TMPDIR"] = root
    try:
        yield Path(root)
    finally:
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(root, ignore_errors=True)


def loopback_only() -> None:
    """Make a Ray started by this process single-node on 127.0.0.1: every port it opens binds to
    loopback (Ray reads this when it is first imported)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """Ray connected for the duration: the cluster at ``address`` (GCS ``host:6379`` or
    ``ray://host:10001``), else the one ``RAY_ADDRESS`` names (as inside a Ray job), else an
    embedded local instance on 127.0.0.1. A Ray already initialised in this process is reused
    and left running."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or is_loopback(split_address(address, 6379)[0]):
        loopback_only()  # this machine's head: the driver's node is 127.0.0.1 too
    if address is not None:
        check_reachable(address, 10001 if address.startswith("ray://") else 6379, "the Ray cluster")
        if auth_token() is not None:  # a configured token is sent to the cluster (read when Ray is imported)
            os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        yield
        return
    with contextlib.ExitStack() as stack:
        if address is None:
            ensure_token()  # Ray makes one only at its default path, and fails on a missing RAY_AUTH_TOKEN_PATH
            temp = stack.enter_context(_own_temp_dir())
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=True,
                dashboard_host=LOOPBACK,
                _node_ip_address=LOOPBACK,
                logging_level=logging.WARNING,
            )
            # what "the current cluster" is to Ray's state API, here and in every process of the
            # instance (Ray Train's controller and its placement-group cleaner ask it)
            (temp / "ray" / "ray_current_cluster").write_text(ray.get_runtime_context().gcs_address)
        else:
            try:
                ray.init(address=address, logging_level=logging.WARNING)
            except ray.exceptions.AuthenticationError as exc:  # e.g. RAY_AUTH_TOKEN_PATH names no file
                reason = str(exc).split(". ")[0]
                raise InputError(f"the Ray cluster at {address}: {reason}") from None
        try:
            yield
        finally:
            ray.shutdown()  # before the temporary directory goes


def user_error(exc: BaseException) -> UserError | None:
    """A user error raised inside a worker, found in what Ray raises on the driver."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            # Ray re-raises a task's exception as a subclass of it carrying the remote traceback
            # in its message; the original is its ``cause``
            cause = getattr(e, "cause", None)
            return cause if isinstance(cause, UserError) else e
        todo += [e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
        todo += [getattr(e, attr, None) for attr in ("cause", "error", "_base_exc")]
    return None
