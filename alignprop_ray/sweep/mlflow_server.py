"""A local `mlflow server` in front of a SQLite store, for the duration of a sweep.

Why: SQLite allows one writer at a time. One training run has a single steady writer (its rank-0
worker), but concurrent trials each log every step, and every new process also runs MLflow's schema
check on the file: writers then collide ("database is locked") and runs lose metrics. Serializing the
trials would avoid that at the price of the cluster's parallelism, which is what a sweep is for; so the
sweep puts one server process in front of the file and hands trials its http:// URI. The server is the
only writer. SQLite already means one machine, so 127.0.0.1 reaches every trial. Artifacts bypass it:
the experiment's artifact location is a file:// folder beside the database (`tracking.ensure_experiment`),
which trials write directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from alignprop_ray.errors import UserError
from alignprop_ray.tracking import JOB_RUNNER_OFF

STARTUP_TIMEOUT_S = 120.0


@contextlib.contextmanager
def local_server(sqlite_uri: str, log_dir: str | os.PathLike) -> Iterator[str]:
    """Serve `sqlite_uri` on 127.0.0.1 (a free port) while the block runs; yields the http:// URI."""
    port = _free_port()
    log_path = Path(log_dir) / "mlflow-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    artifacts = (Path(sqlite_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    server = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        sqlite_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-serve-artifacts",
        "--default-artifact-root",
        artifacts,
    ]
    watcher = [sys.executable, "-m", __name__, str(os.getpid()), *server]
    # MLflow 3's job runner (huey consumers for GenAI scorers, which sweeps never use) is 7 more processes,
    # about 1.2 GiB on the node that runs the sweep (bench/head_memory.py); a value set by the user wins
    env = {**JOB_RUNNER_OFF, **os.environ}
    with open(log_path, "ab") as log:  # a new session: Ctrl-C on the sweep does not kill it mid-cleanup
        process = subprocess.Popen(
            watcher,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    try:
        uri = f"http://127.0.0.1:{port}"
        _wait_ready(uri, process, log_path)
        yield uri
    finally:
        _stop(process)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _watch(parent_pid: int, server: list[str]) -> int:
    """Run `server` in this process group until it exits or the sweep driver is gone, then end the group.

    A sweep driver killed without cleanup (SIGKILL, a lost terminal) must not leave a server behind.
    """
    process = subprocess.Popen(server)
    signal.signal(signal.SIGTERM, lambda *_: _end_group())
    while process.poll() is None and os.getppid() == parent_pid:
        time.sleep(1.0)
    _end_group()
    return 0


def _end_group() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.killpg(0, signal.SIGTERM)  # the server, its workers, and this watcher


def _wait_ready(uri: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(
                f"the local MLflow server exited with status {process.returncode}; see {log_path}"
            )
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    _stop(process)
    raise UserError(
        f"the local MLflow server did not answer within {STARTUP_TIMEOUT_S:.0f} s; see {log_path}"
    )


def _stop(process: subprocess.Popen) -> None:
    """End the server's process group (watcher, server, its workers): politely first, then by force."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        if _group_gone(process, wait):
            return


def _group_gone(process: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.poll()  # reap the watcher
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


if __name__ == "__main__":
    sys.exit(_watch(int(sys.argv[1]), sys.argv[2:]))
