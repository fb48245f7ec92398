"""Faults injected for real, without Ray: a stopped MLflow server, an answer lost on the wire, a full or
read-only disk, a truncated or missing checkpoint file. RELIABILITY.md lists each fault and its test; the
faults that need a training run are in test_reliability_train.py, the sweep driver's in
test_reliability_sweep.py, the lost node's in test_cluster_loopback.py.

The MLflow server is clusters/mlflow_server.sh's (as the clusters start theirs) on a loopback port, stopped
and started again on the same port; disks are tmpfs mounts (root only: skipped elsewhere).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from alignprop_ray import tracking
from alignprop_ray.tracking import BufferedLogger, RunLogger, TrackingError
from tests.helpers import free_port
from tests.stores import SERVER_SCRIPT, SERVER_TIMEOUT_S, server_env

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "reliability"


class MlflowServer:
    """A real `mlflow server` on a loopback port, with its artifacts served, that a test stops (its whole
    process group, as an outage does) and starts again on the same port."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.uri = f"http://127.0.0.1:{self.port}"
        self.flags = [
            "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
        ]  # fmt: skip
        self.env = server_env()

    def start(self) -> None:
        command = ["bash", str(SERVER_SCRIPT), "start", str(self.root / "server"), *self.flags]
        done = subprocess.run(
            command, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=SERVER_TIMEOUT_S
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def stop(self) -> None:
        command = ["bash", str(SERVER_SCRIPT), "stop", str(self.root / "server")]
        subprocess.run(command, env=self.env, capture_output=True, timeout=60, check=True)

    def crash(self) -> None:
        """End the server at once (SIGKILL to its process group), as a lost machine does. `stop` shuts it
        down gracefully, which takes up to 10 s: an outage's start would then be known only to 10 s."""
        pid_file = self.root / "server" / "server.pid"
        pgid = int(pid_file.read_text())
        os.killpg(pgid, signal.SIGKILL)
        wait_for(lambda: not process_group_alive(pgid), 30, f"the server's process group {pgid} to end")
        pid_file.unlink()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def one_try(monkeypatch):
    """What a training worker sets (tracking.use_own_retries): MLflow tries each request once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def new_run(uri: str, name: str) -> str:
    run_id, _ = tracking.start_run(uri, EXPERIMENT, name, {}, "name: x\n")
    return run_id


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracking.client(uri).get_metric_history(run_id, key))


def image_steps(uri: str, run_id: str, key: str = "eval/images") -> list[int]:
    from alignprop_ray.compat import mlflow_logged_image_step

    names = [Path(a.path).name for a in tracking.client(uri).list_artifacts(run_id, "images")]
    return sorted(s for n in names if (s := mlflow_logged_image_step(n, key)) is not None)


def grid(step: int):
    from PIL import Image

    return Image.fromarray(np.full((8, 8, 3), step, np.uint8))


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- the MLflow server goes away ------------------------------------------------------------------------


@pytest.mark.slow
def test_logging_rides_out_a_stopped_server_and_sends_every_call_once(server, one_try, tmp_path):
    run_id, said = new_run(server.uri, "outage"), []
    logger = BufferedLogger(server.uri, run_id, outage_limit_s=120, say=said.append)
    logger.log_metrics({"m": 1.0}, 1)
    logger.flush(timeout=30)
    server.stop()
    waits = []
    for step in range(2, 8):  # as the loop logs a step, then settles before its report
        started = time.monotonic()
        logger.log_metrics({"m": float(step)}, step)
        logger.log_image(grid(step), key="eval/images", step=step)
        logger.settle(timeout=5.0)
        waits.append(time.monotonic() - started)
    assert max(waits) < 1.0, waits  # training never waits on the outage
    logger.save_unsent(tmp_path / "unsent")  # what a checkpoint written now would carry
    assert len(tracking.read_unsent(tmp_path / "unsent")) == 12
    server.start()
    logger.close(timeout=120)
    assert history(server.uri, run_id, "m") == [(s, float(s)) for s in range(1, 8)]
    assert image_steps(server.uri, run_id) == list(range(2, 8))
    assert any(line.startswith("MLflow logging failed (") for line in said), said
    assert any(line.startswith("MLflow logging recovered after ") for line in said), said
    # A worker restarted from that checkpoint sends its calls again: all had arrived, none is doubled.
    restarted = BufferedLogger(server.uri, run_id, outage_limit_s=120, say=said.append)
    assert restarted.resend(tmp_path / "unsent") == 12
    restarted.close(timeout=60)
    assert history(server.uri, run_id, "m") == [(s, float(s)) for s in range(1, 8)]
    assert image_steps(server.uri, run_id) == list(range(2, 8))


@pytest.mark.slow
def test_an_outage_past_the_limit_stops_training_with_one_clear_error(server, one_try):
    run_id = new_run(server.uri, "too-long")
    logger = BufferedLogger(server.uri, run_id, outage_limit_s=3, say=lambda line: None)
    server.stop()
    try:
        logger.log_metrics({"m": 1.0}, 1)

        def refused() -> str | None:
            try:
                logger.log_metrics({"m": 2.0}, 2)
            except TrackingError as err:
                return str(err)
            return None

        message = wait_for(refused, timeout=30, what="the logger to give up")
    finally:
        server.start()
    assert message.startswith(f"MLflow at {server.uri} failed for ")
    assert "past tracking.outage_limit_s (3 s)" in message and "\n" not in message
    with pytest.raises(TrackingError, match="outage_limit_s"):
        logger.flush()


class AnswerDropper:
    """A loopback TCP proxy in front of the server that relays everything, except that it cuts the
    connection instead of relaying the answer to the next `count` requests containing `marker`: the
    request reached the server and was committed, the client never hears back."""

    def __init__(self, upstream_port: int, marker: bytes, count: int):
        self.upstream, self.marker, self.count = upstream_port, marker, count
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=30)
                cut = threading.Event()
                threading.Thread(target=self._requests, args=(client, upstream, cut), daemon=True).start()
                threading.Thread(target=self._answers, args=(upstream, client, cut), daemon=True).start()

    def _requests(self, client, upstream, cut) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if self.count > 0 and self.marker in data:
                    self.count -= 1
                    cut.set()
                upstream.sendall(data)

    def _answers(self, upstream, client, cut) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if cut.is_set():  # the server has answered, so it has committed: cut the client off
                    for side in (client, upstream):  # shutdown, not close: it wakes the other thread's recv
                        side.shutdown(socket.SHUT_RDWR)
                    return
                client.sendall(data)

    def close(self) -> None:
        self.listener.close()


@pytest.mark.slow
def test_a_call_whose_answer_is_lost_is_not_logged_twice(server, one_try):
    run_id = new_run(server.uri, "lost-answer")
    proxy = AnswerDropper(server.port, marker=b"/runs/log-batch", count=2)
    try:
        logger = BufferedLogger(proxy.uri, run_id, outage_limit_s=60, say=lambda line: None)
        for step in range(1, 5):
            logger.log_metrics({"m": float(step), "n": -float(step)}, step)
        logger.close(timeout=60)
    finally:
        proxy.close()
    assert proxy.count == 0, "no answer was dropped: the test did not inject its fault"
    assert history(server.uri, run_id, "m") == [(s, float(s)) for s in range(1, 5)]
    assert history(server.uri, run_id, "n") == [(s, -float(s)) for s in range(1, 5)]


@pytest.mark.slow
@pytest.mark.parametrize("marker", [b"/runs/create", b"/runs/log-batch", b"/runs/update"])
def test_a_run_whose_start_or_end_loses_an_answer_is_created_once_and_complete(
    server, one_try, marker, monkeypatch, tmp_path
):
    """The trial driver's start and end of its run (issue 22's scale run lost one trial to a log-batch
    whose answer was cut off under load): each call is retried, and a run the lost answer had created is
    found again by name instead of created twice."""
    monkeypatch.setattr(tracking, "START_WAIT_S", 0.05)
    proxy = AnswerDropper(server.port, marker=marker, count=1)
    name = f"lost-{marker.decode().rsplit('/', 1)[1]}"
    try:
        run_id, resumed = tracking.start_run(proxy.uri, EXPERIMENT, name, {"lr": "0.001"}, "name: x\n")
        tracking.end_run(proxy.uri, run_id)
    finally:
        proxy.close()
    assert proxy.count == 0, "no answer was dropped: the test did not inject its fault"
    store = tracking.client(server.uri)
    experiment = store.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = store.search_runs([experiment], filter_string=f"tags.`{tracking.NAME_TAG}` = '{name}'")
    assert [run.info.run_id for run in runs] == [run_id] and not resumed
    assert runs[0].data.params == {"lr": "0.001"} and runs[0].info.status == "FINISHED"
    assert Path(store.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text() == "name: x\n"


def test_only_a_tracking_servers_blips_are_retried(monkeypatch):
    """A dropped connection to a server is tried again; a refusal (HTTP 4xx) and any error of a store the
    driver opens itself (a SQLite file: a setting, not a blip) fail at once."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    monkeypatch.setattr(tracking, "START_WAIT_S", 0.01)

    def failing(errors: list[Exception]):
        calls = []

        def call():
            calls.append(1)
            if len(calls) <= len(errors):
                raise errors[len(calls) - 1]
            return "ok"

        return call, calls

    dropped = MlflowException("API request to http://x/api failed with exception Connection broken")
    call, calls = failing([dropped, ConnectionError("reset")])
    assert tracking.retried("http://127.0.0.1:1", call) == "ok" and len(calls) == 3
    refused = MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE)
    call, calls = failing([refused])
    with pytest.raises(MlflowException, match="Changing param"):
        tracking.retried("http://127.0.0.1:1", call)
    assert len(calls) == 1
    call, calls = failing([OSError("unable to open database file")])
    with pytest.raises(OSError, match="unable to open"):
        tracking.retried("sqlite:////no/such/dir/mlflow.db", call)
    assert len(calls) == 1
    call, calls = failing([dropped] * tracking.START_TRIES)
    with pytest.raises(MlflowException, match="Connection broken"):
        tracking.retried("https://mlflow.example", call)
    assert len(calls) == tracking.START_TRIES


def test_a_restart_that_replays_steps_logs_nothing_twice(tmp_path):
    """A worker restarted from the checkpoint of step 3 replays steps 4 and 5, already logged."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = new_run(uri, "replay")
    first = RunLogger(uri, run_id)
    for step in range(0, 6):
        first.log_metrics(
            {"train/loss": -step / 10, **({"eval/reward": step} if step % 5 == 0 else {})}, step
        )
    first.log_image(grid(5), key="eval/images", step=5)
    restarted = RunLogger(uri, run_id)
    for step in range(4, 8):
        restarted.log_metrics({"train/loss": -step / 10}, step)
    restarted.log_image(grid(5), key="eval/images", step=5)
    restarted.log_metrics({"eval/reward": 5.0, "eval/new": 1.0}, 5)  # only the key it never logged goes
    assert [s for s, _ in history(uri, run_id, "train/loss")] == list(range(8))
    assert history(uri, run_id, "eval/reward") == [(0, 0.0), (5, 5.0)]
    assert history(uri, run_id, "eval/new") == [(5, 1.0)]
    assert image_steps(uri, run_id) == [5]


def test_a_trial_stopped_by_the_sweep_stays_killed_whatever_ends_first(tmp_path):
    """Tune's stopper marks a trial KILLED from the sweep driver while the trial's own error handler ends
    the same run: the handler must not overwrite a status it finds already set."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stopped, running = new_run(uri, "stopped"), new_run(uri, "running")
    tracking.end_run(uri, stopped, "KILLED")  # the sweep driver came first
    for run_id in (stopped, running):
        tracking.end_run_if_running(uri, run_id, "FAILED")
    status = {run_id: tracking.client(uri).get_run(run_id).info.status for run_id in (stopped, running)}
    assert status == {stopped: "KILLED", running: "FAILED"}


# --- disks: full, read-only -----------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small tmpfs at `path` for the block (root only: the test skips elsewhere, saying why)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill(folder: Path) -> None:
    """Write zeros into `folder` until its disk has not one byte left."""
    with open(folder / "filler", "wb", buffering=0) as out:
        for chunk in (b"\0" * 65536, b"\0"):
            with contextlib.suppress(OSError):
                while out.write(chunk):
                    pass


def test_a_full_artifact_folder_stops_logging_at_once_with_one_clear_error(tmp_path, own_tmp):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tmpfs(tmp_path / "mlartifacts", "256k") as artifacts:  # the experiment's folder (ensure_experiment)
        run_id = new_run(uri, "full-disk")
        fill(artifacts)
        logger = BufferedLogger(uri, run_id, outage_limit_s=600, say=lambda line: None)
        logger.log_metrics({"m": 1.0}, 1)
        logger.log_image(grid(1), key="eval/images", step=1)
        with pytest.raises(TrackingError) as info:
            logger.flush(timeout=30)  # no waiting out the limit: a full disk does not heal by itself
        assert spools(own_tmp)  # the unsent image is still in it
        with pytest.raises(TrackingError):
            logger.close()
    message = str(info.value)
    assert message.startswith("MLflow could not take the run's logs (log_image): OSError: [Errno 28]")
    assert "No space left on device" in message and "\n" not in message
    assert history(uri, run_id, "m") == [(1, 1.0)]  # what came before the failure is there
    assert spools(own_tmp) == []  # a logger that gave up leaves no spool behind


@pytest.fixture
def own_tmp(tmp_path, monkeypatch):
    """A temporary directory of the test's own, for this process (tempfile) and the ones it starts (TMPDIR)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


def spools(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{tracking.SPOOL_PREFIX}*"))


OWN_A_SPOOL = "from alignprop_ray import tracking; print(tracking.new_spool()[0], flush=True); input()"


def test_the_spool_of_a_killed_worker_is_removed_when_the_next_logger_starts(own_tmp):
    """A training worker killed mid-run cannot remove its spool folder (its unsent calls are in its last
    checkpoint): the next logger on the machine does, and leaves those of live processes alone."""
    owners = [
        subprocess.Popen(
            [sys.executable, "-c", OWN_A_SPOOL], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    killed, alive = (Path(owner.stdout.readline().strip()) for owner in owners)
    older = own_tmp / f"{tracking.SPOOL_PREFIX}older"  # an older version's: no lock file, not known dead
    older.mkdir()
    owners[0].kill()
    owners[0].wait()
    try:
        assert spools(own_tmp) == sorted([killed, alive, older])
        assert tracking.remove_dead_spools() == 1
        assert spools(own_tmp) == sorted([alive, older])
    finally:
        owners[1].communicate("", timeout=60)
    assert tracking.remove_dead_spools() == 1 and spools(own_tmp) == [older]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_storage_that_cannot_take_checkpoints_fails_before_anything_is_created(tmp_path, fault):
    """`alignprop-ray train` with such a storage.path: exit 1, one line, no MLflow run."""
    with tmpfs(tmp_path / "storage", "128k", read_only=fault == "read-only") as storage:
        if fault == "full":
            fill(storage)
        proc = subprocess.run(
            [
                sys.executable, "-m", "alignprop_ray.cli", "train", str(ROOT / "sweeps" / "tiny.yaml"),
                "--set", f"storage.path={storage}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            ],
            capture_output=True, text=True, cwd=tmp_path, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    reason = "Read-only file system" if fault == "read-only" else "No space left on device"
    assert proc.stderr.strip().splitlines() == [
        f"alignprop-ray train: storage.path {storage} cannot take checkpoints: {reason}; no checkpoint was "
        f"saved: `alignprop-ray train {ROOT / 'sweeps' / 'tiny.yaml'} --set storage.path={storage} --set "
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'} --name tiny` starts it again"
    ]
    assert not (tmp_path / "mlflow.db").exists()


# --- damaged checkpoints --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A checkpoint of a tiny learner after one step, with one unsent MLflow call in it."""
    from alignprop_ray.train.checkpoint import UNSENT_LOGS, Progress, write_checkpoint
    from tests.helpers import brightness_reward, tiny_learner, train_steps

    learner = tiny_learner(brightness_reward)
    train_steps(learner, 1)

    def unsent(directory: Path) -> None:
        (directory / UNSENT_LOGS).mkdir()
        call = {"method": "set_tags", "args": {"tags": {"a": "b"}}, "folder": None, "file_args": []}
        (directory / UNSENT_LOGS / tracking.UNSENT_FILE).write_text(json.dumps([call]))

    parent = tmp_path_factory.mktemp("checkpoint")
    return write_checkpoint(learner, Progress(step=1, run_id="r"), parent, unsent), learner


def damaged_copy(source: Path, target: Path, damage: str) -> Path:
    import shutil

    shutil.copytree(source, target)
    name, _, how = damage.partition(":")
    path = target / name
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "missing":
        path.unlink()
    elif how == "garbled":
        path.write_bytes(b"{" * path.stat().st_size)
    return target


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("adapter/pytorch_lora_weights.safetensors:truncated", "adapter/pytorch_lora_weights.safetensors: "),
        ("training_state.pt:truncated", "training_state.pt: "),
        ("training_state.pt:missing", "training_state.pt: missing"),
        ("meta.json:missing", "meta.json: "),
        ("meta.json:truncated", "meta.json: "),
        ("adapter/pytorch_lora_weights.safetensors:garbled", "adapter: "),
        ("training_state.pt:garbled", "training_state.pt: "),
    ],
)
def test_a_damaged_checkpoint_is_refused_before_anything_is_loaded(checkpoint_dir, tmp_path, damage, reason):
    from alignprop_ray.train.checkpoint import DamagedCheckpoint, read_checkpoint

    directory = damaged_copy(checkpoint_dir[0], tmp_path / "checkpoint", damage)
    with pytest.raises(DamagedCheckpoint) as info:
        read_checkpoint(directory)
    assert str(info.value).startswith(reason), str(info.value)


def test_an_intact_checkpoint_restores_the_learner_and_its_unsent_calls(checkpoint_dir, tmp_path):
    import torch

    from alignprop_ray.train.checkpoint import UNSENT_LOGS, read_checkpoint
    from tests.helpers import brightness_reward, tiny_learner

    directory, trained = checkpoint_dir
    fresh = tiny_learner(brightness_reward)
    assert read_checkpoint(directory).restore(fresh).step == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.params, trained.params, strict=True))
    assert [c.method for c in tracking.read_unsent(directory / UNSENT_LOGS)] == ["set_tags"]
    garbled = damaged_copy(directory, tmp_path / "c", f"{UNSENT_LOGS}/{tracking.UNSENT_FILE}:garbled")
    with pytest.raises(ValueError, match=tracking.UNSENT_FILE):
        tracking.read_unsent(garbled / UNSENT_LOGS)
