"""MLflow on the stores the clusters use (docs/clusters.md), each a real server on loopback, each MLflow
server started by clusters/mlflow_server.sh as the head nodes start theirs.

- PostgreSQL (the runs store on AWS and KubeRay): a throwaway cluster made by this module (`initdb` +
  `pg_ctl`, as `nobody` when the tests run as root, since PostgreSQL refuses to run as root), password
  authentication, an MLflow server with 2 workers in front of it, and the smoke sweep with 2 trials
  logging to it at the same time.
- S3 (the artifact store): moto's S3 server on loopback as `--artifacts-destination` of a server with
  `--serve-artifacts`; an adapter logged through the server reads back byte-identical and is in the
  bucket. Only the server process gets the S3 endpoint and credentials, as on a cluster.
- SQLite (one machine): mlflow_server.sh runs one server worker, and refuses more.

PostgreSQL's binaries come with the machine image (.ci/run installs them where missing); elsewhere the
PostgreSQL tests skip, unless ALIGNPROP_REQUIRE_POSTGRES=1 (set by .ci/run) makes a missing one a failure.
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
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import free_port, lora_settings

ROOT = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = ROOT / "clusters" / "mlflow_server.sh"
BUCKET = "alignprop-artifacts"
# Bounds for every wait below, so that no test hangs.
PG_TIMEOUT_S = 60
SERVER_TIMEOUT_S = 180
INITDB_OPTIONS = ("--auth=scram-sha-256", "--encoding=UTF8", "--no-sync")  # password logins only


def server_env(**extra: str) -> dict[str, str]:
    """The environment mlflow_server.sh runs in: this virtualenv first on PATH (the script calls `mlflow`
    and `python`), no job runner (MLflow's background job consumers: seven more processes on two cores)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
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


def postgres_bin() -> Path:
    """The directory with initdb and pg_ctl: PATH first, then Debian's /usr/lib/postgresql/<major>/bin."""
    found = shutil.which("pg_ctl")
    candidates = [Path(found).parent] if found else []
    majors = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    for directory in candidates + majors:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    message = "PostgreSQL server binaries (initdb, pg_ctl) not found; .ci/run installs them"
    if os.environ.get("ALIGNPROP_REQUIRE_POSTGRES") == "1":
        pytest.fail(message)
    pytest.skip(message)


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


@pytest.mark.slow  # starts an MLflow server (~10 s)
def test_postgresql_server_runs_the_workers_it_was_given(postgres_mlflow):
    """mlflow_server.sh leaves a PostgreSQL store's worker count alone (only SQLite gets one)."""
    _, state = postgres_mlflow
    uvicorn = [args for args in server_processes(state) if "-m uvicorn" in args]
    assert uvicorn and "--workers 2" in uvicorn[0], server_processes(state)


@pytest.mark.ray
def test_sweep_with_two_concurrent_trials_logs_completely_to_postgresql(
    ray_session, postgres_mlflow, tmp_path
):
    from mlflow import MlflowClient

    from alignprop_ray.sweep.config import load_sweep
    from alignprop_ray.sweep.launch import run_sweep

    uri, _ = postgres_mlflow
    steps, name = 3, f"pg-{uuid.uuid4().hex[:6]}"
    sweep = load_sweep(
        ROOT / "sweeps" / "smoke.yaml",
        [
            f"name={name}",
            f"tracking.uri={uri}",
            f"tracking.experiment={name}",
            f"storage.path={tmp_path / 'runs'}",
            "space.train.lr={grid: [0.01]}",  # 2 trials: the truncation extremes
            "tune.max_concurrent_trials=2",
            f"train.steps={steps}",
            f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}",
            "sampling.steps=4",
            "model.resolution=32",
        ],
        env={},
    )
    outcome = run_sweep(sweep, say=lambda _: None)
    assert outcome.exit_code == 0, outcome.rows

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2, [r.data.tags for r in runs]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    first, second = sorted(children, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time, "the two trials did not run at the same time"
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags
        histories = {key: _steps(client, child.info.run_id, key) for key in child.data.metrics}
        train = {k: v for k, v in histories.items() if k.startswith("train/")}
        evals = {k: v for k, v in histories.items() if k.startswith("eval/")}
        assert "train/loss" in train and "eval/reward" in evals, sorted(histories)
        # every optimizer step once; evaluations before training and at the end, once each
        assert all(v == list(range(1, steps + 1)) for v in train.values()), train
        assert all(v == [0, steps] for v in evals.values()), evals
    assert parents[0].info.status == "FINISHED"


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# ---------------------------------------------------------------- S3 artifacts (moto) and SQLite


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port with an empty bucket; (endpoint URL, boto3 client)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=BUCKET)
        yield endpoint, client
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_mlflow(s3, tmp_path_factory):
    """An MLflow server on SQLite (no --workers: mlflow_server.sh decides) proxying artifacts to S3."""
    endpoint, _ = s3
    tmp = tmp_path_factory.mktemp("s3-mlflow")
    flags = ["--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    flags += ["--artifacts-destination", f"s3://{BUCKET}/mlflow-artifacts", "--serve-artifacts"]
    # The server alone talks to S3, as on the cluster: the test process keeps no S3 settings.
    env = server_env(
        MLFLOW_S3_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    with mlflow_server(tmp / "server", flags, env) as uri:
        yield uri, tmp / "server"


@pytest.mark.slow  # starts an MLflow server (~10 s)
def test_adapter_logged_through_the_server_reads_back_byte_identical_from_s3(s3, s3_mlflow, tmp_path):
    from mlflow import MlflowClient

    from alignprop_ray.engine.lora import WEIGHT_NAME, attach_lora, save_adapter
    from alignprop_ray.engine.models import load_parts

    _, bucket = s3
    uri, _ = s3_mlflow
    denoiser = load_parts("tiny").denoiser
    attach_lora(denoiser, lora_settings(rank=4, alpha=4))
    adapter = save_adapter(denoiser, tmp_path / "adapter")
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment(f"s3-{uuid.uuid4().hex[:6]}")).info.run_id
    client.log_artifacts(run_id, str(adapter), "adapter")

    back = Path(client.download_artifacts(run_id, "adapter", str(tmp_path / "back")))
    sent = {p.relative_to(adapter): p.read_bytes() for p in adapter.rglob("*") if p.is_file()}
    received = {p.relative_to(back): p.read_bytes() for p in back.rglob("*") if p.is_file()}
    assert Path(WEIGHT_NAME) in sent and received == sent
    # ...and it is S3 that holds it, under the destination the server was given
    keys = [o["Key"] for o in bucket.list_objects_v2(Bucket=BUCKET, Prefix="mlflow-artifacts/")["Contents"]]
    key = next(k for k in keys if k.endswith(f"/{run_id}/artifacts/adapter/{WEIGHT_NAME}"))
    assert bucket.get_object(Bucket=BUCKET, Key=key)["Body"].read() == sent[Path(WEIGHT_NAME)]


@pytest.mark.slow  # starts an MLflow server (~10 s)
def test_sqlite_server_gets_one_worker(s3_mlflow):
    _, state = s3_mlflow
    uvicorn = [args for args in server_processes(state) if "-m uvicorn" in args]
    assert uvicorn and "--workers 1" in uvicorn[0], server_processes(state)


@pytest.mark.parametrize(
    "flags, env",
    [
        (["--backend-store-uri", "sqlite:///runs.db", "--workers", "4"], {}),
        (["--backend-store-uri=sqlite:///runs.db", "-w", "2"], {}),
        ([], {"MLFLOW_WORKERS": "3"}),  # no store given: MLflow's default is SQLite
        (["--workers", "4"], {"MLFLOW_BACKEND_STORE_URI": "sqlite:///runs.db"}),
    ],
    ids=["flag", "short-flag", "default-store", "store-from-env"],
)
def test_sqlite_server_with_more_workers_is_refused(tmp_path, flags, env):
    state, port = tmp_path / "server", str(free_port())
    command = ["bash", str(SERVER_SCRIPT), "start", str(state), "--host", "127.0.0.1", "--port", port, *flags]
    try:
        done = subprocess.run(
            command,
            cwd=tmp_path,
            env=server_env(**env),
            capture_output=True,
            text=True,
            timeout=SERVER_TIMEOUT_S,
        )
    finally:  # a script that wrongly starts the server must not leave it running
        subprocess.run(["bash", str(SERVER_SCRIPT), "stop", str(state)], timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--workers" in lines[0] and "SQLite" in lines[0], done.stderr
    assert not list(tmp_path.glob("*.db")), "nothing may be started"
