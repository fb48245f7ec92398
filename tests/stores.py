"""MLflow servers as the clusters start theirs (clusters/mlflow_server.sh), and a throwaway PostgreSQL for
them: helpers and module-scoped fixtures (`postgres`, `postgres_mlflow`, which tests/conftest.py offers to
every test module). Used by tests/test_tracking_stores.py and by the collapse sweep of tests/test_sweep.py,
which logs to the PostgreSQL server where PostgreSQL is installed.

PostgreSQL's binaries come with the machine image (.ci/run installs them where missing); elsewhere a test that
needs PostgreSQL skips, unless ALIGNPROP_REQUIRE_POSTGRES=1 (set by .ci/run) makes a missing one a failure.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = ROOT / "clusters" / "mlflow_server.sh"
# Bounds for every wait below, so that no test hangs.
PG_TIMEOUT_S = 60
SERVER_TIMEOUT_S = 180
INITDB_OPTIONS = ("--auth=scram-sha-256", "--encoding=UTF8", "--no-sync")  # password logins only
REQUIRE_POSTGRES = "ALIGNPROP_REQUIRE_POSTGRES"


def server_env(**extra: str) -> dict[str, str]:
    """The environment mlflow_server.sh runs in: this virtualenv first on PATH (the script calls `mlflow`
    and `python`), no job runner (MLflow's background job consumers: seven more processes on two cores)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    # the script's own wait for /health ends first, so that its failure shows the server's log
    env["MLFLOW_SERVER_START_TIMEOUT_S"] = str(SERVER_TIMEOUT_S - 30)
    return {**env, **extra}


@contextlib.contextmanager
def mlflow_server(state: Path, flags: list[str], env: dict[str, str]):
    """`clusters/mlflow_server.sh start STATE FLAGS` on 127.0.0.1 (a free port); yields the http:// URI."""
    port = free_port()
    state.mkdir(parents=True, exist_ok=True)
    start = ["bash", str(SERVER_SCRIPT), "start", str(state), "--host", "127.0.0.1", "--port", str(port)]
    # cwd: a server that falls back to a default store (sqlite:///mlflow.db) writes it here, not in the repo
    done = subprocess.run(
        [*start, *flags], cwd=state, env=env, capture_output=True, text=True, timeout=SERVER_TIMEOUT_S
    )
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", str(SERVER_SCRIPT), "stop", str(state)], env=env, timeout=60)


def server_processes(state: Path) -> list[str]:
    """Command lines of the processes in the server's process group (mlflow, uvicorn, its workers)."""
    pgid = (state / "server.pid").read_text().strip()
    listed = subprocess.run(
        ["ps", "-ww", "-o", "args=", "-g", pgid], capture_output=True, text=True, timeout=10
    )
    return listed.stdout.splitlines()


# ---------------------------------------------------------------- PostgreSQL


def find_postgres_bin() -> Path | None:
    """The directory with initdb and pg_ctl: PATH first, then Debian's /usr/lib/postgresql/<major>/bin."""
    found = shutil.which("pg_ctl")
    candidates = [Path(found).parent] if found else []
    majors = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    for directory in candidates + majors:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    return None


def postgres_required() -> bool:
    return os.environ.get(REQUIRE_POSTGRES) == "1"


def postgres_bin() -> Path:
    """find_postgres_bin's directory; where there is none, the test skips (fails under .ci/run)."""
    found = find_postgres_bin()
    if found is None:
        message = "PostgreSQL server binaries (initdb, pg_ctl) not found; .ci/run installs them"
        if postgres_required():
            pytest.fail(message)
        pytest.skip(message)
    return found


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    database: str

    def uri(self) -> str:
        """As the clusters write it: the driver named, no password (it comes from PGPASSWORD)."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{self.database}"


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster of its own: password auth on 127.0.0.1 only, stopped and deleted afterwards."""
    bin_dir = postgres_bin()
    as_owner: list[str] = []
    # Short path in /tmp: the root-owned pytest tmp folders are closed to nobody.
    home = Path(tempfile.mkdtemp(prefix="apl-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        as_owner = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", "--"]
    pg = Postgres("127.0.0.1", free_port(), "mlflow", secrets.token_hex(16), "mlflow")
    password_file = home / "password"
    password_file.write_text(pg.password)
    if as_owner:
        os.chown(password_file, nobody.pw_uid, nobody.pw_gid)
    data = home / "data"

    def run(*command) -> subprocess.CompletedProcess:
        args = [*as_owner, *map(str, command)]
        return subprocess.run(args, capture_output=True, text=True, timeout=PG_TIMEOUT_S)

    def check(*command) -> None:
        done = run(*command)
        assert done.returncode == 0, f"{command[0]}: {done.stdout}{done.stderr}"

    pg_ctl = bin_dir / "pg_ctl"
    # TCP on loopback only, no unix socket; fsync off: a throwaway cluster needs no durability.
    options = f"-c listen_addresses={pg.host} -c port={pg.port} -c unix_socket_directories='' -c fsync=off"
    try:
        check(bin_dir / "initdb", "-D", data, "-U", pg.user, f"--pwfile={password_file}", *INITDB_OPTIONS)
        check(pg_ctl, "-D", data, "-l", home / "postgres.log", "-o", options, "-w", "-t", 60, "start")
        _create_database(pg)
        yield pg
    finally:
        if (data / "postmaster.pid").exists():
            run(pg_ctl, "-D", data, "-m", "fast", "-w", "-t", 30, "stop")
        shutil.rmtree(home, ignore_errors=True)


def _create_database(pg: Postgres) -> None:
    import psycopg

    with psycopg.connect(
        host=pg.host, port=pg.port, user=pg.user, password=pg.password, dbname="postgres", autocommit=True
    ) as connection:
        connection.execute(f'CREATE DATABASE "{pg.database}"')


@pytest.fixture(scope="module")
def postgres_mlflow(postgres, tmp_path_factory):
    """An MLflow server with 2 workers on the PostgreSQL store, as the clusters run theirs."""
    tmp = tmp_path_factory.mktemp("pg-mlflow")
    flags = ["--workers", "2", "--backend-store-uri", postgres.uri()]
    flags += ["--artifacts-destination", str(tmp / "artifacts"), "--serve-artifacts"]
    with mlflow_server(tmp / "server", flags, server_env(PGPASSWORD=postgres.password)) as uri:
        yield uri, tmp / "server"
