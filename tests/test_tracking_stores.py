"""MLflow on the stores the clusters use (docs/clusters.md), each a real server on loopback, each MLflow
server started by clusters/mlflow_server.sh as the head nodes start theirs (tests/stores.py).

- PostgreSQL (the runs store on AWS and KubeRay): a throwaway cluster (`initdb` + `pg_ctl`, as `nobody` when
  the tests run as root, since PostgreSQL refuses to run as root), password authentication, an MLflow server
  with 2 workers in front of it. A sweep of 2 trials at once logs to it completely: tests/test_sweep.py's
  collapse sweep, which logs there where PostgreSQL is installed (always under .ci/run).
- S3 (the artifact store): moto's S3 server on loopback as `--artifacts-destination` of a server with
  `--serve-artifacts`; an adapter logged through the server reads back byte-identical and is in the
  bucket. Only the server process gets the S3 endpoint and credentials, as on a cluster.
- SQLite (one machine): mlflow_server.sh runs one server worker, and refuses more.

PostgreSQL's binaries come with the machine image (.ci/run installs them where missing); elsewhere the
PostgreSQL tests skip, unless ALIGNPROP_REQUIRE_POSTGRES=1 (set by .ci/run) makes a missing one a failure.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from tests.helpers import free_port, lora_settings
from tests.stores import SERVER_SCRIPT, SERVER_TIMEOUT_S, mlflow_server, server_env, server_processes

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "alignprop-artifacts"


@pytest.mark.slow  # starts an MLflow server (~10 s)
def test_postgresql_server_runs_the_workers_it_was_given(postgres_mlflow):
    """mlflow_server.sh leaves a PostgreSQL store's worker count alone (only SQLite gets one)."""
    _, state = postgres_mlflow
    uvicorn = [args for args in server_processes(state) if "-m uvicorn" in args]
    assert uvicorn and "--workers 2" in uvicorn[0], server_processes(state)


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


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_a_start_timeout_that_is_not_seconds_is_refused(tmp_path, value):
    state, port = tmp_path / "server", str(free_port())
    command = ["bash", str(SERVER_SCRIPT), "start", str(state), "--host", "127.0.0.1", "--port", port]
    env = server_env(MLFLOW_SERVER_START_TIMEOUT_S=value)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mlflow_server.sh: MLFLOW_SERVER_START_TIMEOUT_S={value}")
    assert not state.exists() and not list(tmp_path.glob("*.db")), "nothing may be started"
    stop = subprocess.run(
        ["bash", str(SERVER_SCRIPT), "stop", str(state)], env=env, capture_output=True, timeout=60
    )
    assert stop.returncode == 0, stop.stderr  # the setting is start's alone
