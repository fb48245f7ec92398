"""MLflow tracking: one run per training run, found again by name on resume; rank 0 logs into it.

Runs are created by the driver (before any worker starts), so a worker restart or a rerun of the
same command never creates a second run: workers receive the run id and only log into it.

Rank 0 logs through a `BufferedLogger`: a queue that a thread sends in order, so training goes on through
a tracking outage (up to tracking.outage_limit_s), and `RunLogger`'s idempotent calls, so neither a retry
nor a restart that replays steps logs anything twice. RELIABILITY.md has the guarantees and their tests.
"""

from __future__ import annotations

import errno
import io
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

NAME_TAG = "alignprop.name"  # our run name; unique within an experiment
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests child runs under their parent
KIND_TAG = "alignprop.kind"  # "sweep" on a sweep's parent run
SWEEP_TAG = "alignprop.sweep"  # the sweep a child run belongs to
TRIAL_TAG = "alignprop.trial_id"  # the Tune trial of a child run
STOP_TAG = "alignprop.stop_reason"  # why a trial ended early (collapse, NaN, scheduler, error)
BEST_TRIAL_TAG = "alignprop.best_trial"  # on a sweep's parent run: the Tune trial id of its best trial
BEST_RUN_TAG = "alignprop.best_run_id"  # ... and that trial's MLflow run
SELECT_TAG = "alignprop.select_rule"  # ... the rule that chose it (selection.SelectionRule as text)
SELECTION_TAG = "alignprop.selection"  # ... which trial that rule chose and why (not the plain maximum)
PARETO_TAG = "alignprop.pareto_front"  # ... the trials on its Pareto fronts (pareto_front.csv: each front)
# `alignprop-ray compare` (sweep/compare.py): on a trial's run, the comparison, method label and round it ran
# in, and `true` where it ran at its method's picked lr scale; on a selection sweep's parent, that scale.
COMPARE_TAG = "alignprop.compare"
COMPARE_METHOD_TAG = "alignprop.compare.method"
COMPARE_ROUND_TAG = "alignprop.compare.round"
COMPARE_FINAL_TAG = "alignprop.compare.final"
COMPARE_PICK_TAG = "alignprop.compare.lr_scale"
EXCLUDED_TAG = "alignprop.excluded"  # on a trial's run: why it breaks the sweep's selection rule
# Params that may differ between machines or reruns of the same run: not compared on resume.
IGNORED_ON_RESUME = ("tracking.", "storage.", "failure.", "name")
MAX_PARAM_CHARS = 6000  # MLflow 3's limit on one param value
# MLflow 3's UI opens an experiment on its GenAI view (traces) unless the experiment says it is model
# training: the tag its "Machine learning" experiment type sets (mlflow/server/js: ExperimentKind).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"


DEFAULT_UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` serves unless told --host/--port
# MLflow 3's job runner off (it has no flag): the printed `mlflow ui` command and the sweep's own server
JOB_RUNNER_OFF = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
NO_JOB_RUNNER = "env " + " ".join(f"{key}={value}" for key, value in JOB_RUNNER_OFF.items())  # any shell


def ui_command(uri: str, base: str = DEFAULT_UI_URL) -> str | None:
    """The `mlflow ui` command that serves store `uri` at `base` (None: `uri` is a server already).

    One worker for a SQLite store: the file takes one writer, and MLflow 3.17's default of 4 uvicorn
    workers on a busy machine failed their start-up health checks and were restarted in a loop for minutes
    (the port refused connections), where one worker answered within 10 s (issue 30). Without MLflow 3's
    job runner (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false, which has no flag): for GenAI scorers, which
    comparing runs never uses, it starts 8 more processes with the UI (a runner and 7 huey consumers, each
    importing MLflow), as the sweep's own server does not (sweep/mlflow_server.py).
    """
    import shlex
    from urllib.parse import urlsplit

    if uri.startswith(("http://", "https://", "databricks")):
        return None
    address, default = urlsplit(base), urlsplit(DEFAULT_UI_URL)
    port = address.port or {"http": 80, "https": 443}[address.scheme]
    command = f"{NO_JOB_RUNNER} mlflow ui --backend-store-uri {shlex.quote(uri)}"
    if uri.startswith("sqlite:"):
        command += " --workers 1"
    if address.hostname not in (default.hostname, "localhost"):
        # MLflow's server answers only Host headers of loopback and private addresses unless told others,
        # and refuses the UI's own API calls (403, shown as INTERNAL_ERROR) from any other origin
        command += f" --host {address.hostname} --allowed-hosts {address.netloc}"
        command += f" --cors-allowed-origins {address.scheme}://{address.netloc}"
    if port != default.port:
        command += f" --port {port}"
    if address.path.strip("/"):
        command += f" --static-prefix /{address.path.strip('/')}"
    return command


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating it with an absolute artifact location for SQLite stores, and marked
    as model development so that the MLflow UI opens it on its runs table.

    MLflow's default artifact root for a database store is `./mlruns` relative to whichever process
    logs first, which for Ray workers is not the user's directory: pin it next to the database. An
    experiment created before the mark existed gets it here; one whose kind the user chose keeps it.
    """
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    try:
        return mlflow_client.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT}
        )
    except Exception:  # created concurrently by another trial: use theirs
        return mlflow_client.get_experiment_by_name(name).experiment_id


def find_run(uri: str, experiment: str, name: str) -> str | None:
    """The id of the run called `name` in `experiment`, if one exists."""
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = mlflow_client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{NAME_TAG}` = '{name}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def last_logged_step(uri: str, experiment: str, name: str) -> int | None:
    """The last optimizer step the run called `name` logged a metric for (None: no run, or no metric)."""
    from alignprop_ray.compat import mlflow_latest_metric_steps

    run_id = find_run(uri, experiment, name)
    steps = mlflow_latest_metric_steps(client(uri), run_id).values() if run_id else ()
    return max(steps, default=None)


def start_run(
    uri: str,
    experiment: str,
    name: str,
    params: Mapping[str, str],
    config_yaml: str,
    tags: Mapping[str, str] | None = None,
    check_resume: Callable[[str], None] | None = None,
) -> tuple[str, bool]:
    """(run id, resumed): the existing run called `name`, or a new one with params and the config.

    An existing run is marked RUNNING only once `check_resume(run_id)` has accepted it: a command refused
    there (a rerun with other settings) leaves the run as it found it, FINISHED or KILLED.

    Each call to a tracking server is retried through a short outage or a dropped connection (`retried`); a run
    created by a call whose answer was lost is found again by its name, not created twice.
    """
    existing = retried(uri, find_run, uri, experiment, name)
    if existing is not None:
        if check_resume is not None:
            check_resume(existing)
        retried(uri, client(uri).update_run, existing, status="RUNNING")
        return existing, True
    mlflow_client = client(uri)
    experiment_id = retried(uri, ensure_experiment, uri, experiment)

    def create() -> str:
        found = find_run(uri, experiment, name)  # an earlier try's answer may have been lost
        if found is not None:
            return found
        return mlflow_client.create_run(
            experiment_id, run_name=name, tags={NAME_TAG: name, **(tags or {})}
        ).info.run_id

    run_id = retried(uri, create)
    retried(uri, log_params, uri, run_id, params)  # the same value again is no change to MLflow
    retried(uri, mlflow_client.log_text, run_id, config_yaml, "config.yaml")
    return run_id, False


# A call that `retried` makes: tries at most, and the first wait (doubled after each failure): 31 s in all.
START_TRIES, START_WAIT_S = 6, 1.0


def retried(uri: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)` on the store at `uri`, tried again after a failure that waiting may cure
    (`_refused` says which do not), up to START_TRIES times, where the store is a tracking server (http,
    https). Only for idempotent calls: the driver's start and end of a run.

    Under load (issue 22's scale run, a load average of 24) a server's answer can be cut off mid-read, and
    MLflow's client retries no POST whose answer was lost; without this the trial failed before training.
    A store that is a file or a database the driver opens itself fails at once: its errors are settings.
    """
    if not uri.startswith(("http://", "https://")):
        return call(*args, **kwargs)
    wait = START_WAIT_S
    for attempt in range(1, START_TRIES + 1):
        try:
            return call(*args, **kwargs)
        except Exception as err:
            if _refused(err) or attempt == START_TRIES:
                raise
            time.sleep(wait)
            wait *= 2


def changed_param(uri: str, run_id: str, params: Mapping[str, str]) -> tuple[str, str, str] | None:
    """The first of `params` the run logged with another value, as (key, logged, now); keys the run never
    logged do not count (runs from older versions)."""
    logged = client(uri).get_run(run_id).data.params
    for key, value in params.items():
        if key in logged and logged[key] != value[:MAX_PARAM_CHARS]:
            return key, logged[key], value
    return None


def log_params(uri: str, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client(uri).log_batch(run_id, params=items[start : start + 100])


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    retried(uri, client(uri).set_terminated, run_id, status=status)


def end_run_if_running(uri: str, run_id: str, status: str) -> None:
    """End the run unless someone else already has: a sweep driver marks a trial it stopped KILLED, and
    the trial's own error handler, which may run after it, must not turn that into FAILED."""
    store = client(uri)
    if store.get_run(run_id).info.status == "RUNNING":
        store.set_terminated(run_id, status=status)


class TrackingError(RuntimeError):
    """The MLflow store refused the run's logs, or kept failing for longer than tracking.outage_limit_s."""


def table_name(step: int) -> str:
    return f"step_{step:07d}.parquet"


class RunLogger:
    """Rank 0's handle on the run, sending each call to MLflow at once: metrics, images, eval tables, tags
    and artifacts.

    Every call is idempotent, so neither a worker restarted from a checkpoint (it replays the steps after
    it) nor a retry of a call whose answer was lost logs anything twice:
    - a metric only for a step past the last one the run holds for its key (metrics are logged in step
      order, so the run holds every step up to that one);
    - an image only if the run has none under its key at that step;
    - tables, tags and artifacts overwrite themselves with the same content.
    """

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = client(uri)
        self._last_steps: dict[str, int] | None = None  # metric key -> last step the run holds

    def forget(self) -> None:
        """Ask the store again before the next metric: a call that failed may still have reached it."""
        self._last_steps = None

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        from alignprop_ray.compat import mlflow_latest_metric_steps

        if self._last_steps is None:
            self._last_steps = mlflow_latest_metric_steps(self.client, self.run_id)
        when = timestamp_ms or int(time.time() * 1000)
        last = self._last_steps
        batch = [Metric(k, float(v), when, step) for k, v in metrics.items() if step > last.get(k, -1)]
        for start in range(0, len(batch), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])
        last.update((metric.key, step) for metric in batch)

    def log_image(self, image, key: str, step: int) -> None:
        """`image`: a PIL image, or the path of an image file."""
        from alignprop_ray.compat import mlflow_logged_image_step

        logged = (Path(a.path).name for a in self.client.list_artifacts(self.run_id, "images"))
        if any(mlflow_logged_image_step(name, key) == step for name in logged):
            return
        if isinstance(image, str | os.PathLike):
            from PIL import Image

            with Image.open(image) as opened:
                image = opened.copy()
        self.client.log_image(self.run_id, image, key=key, step=step)

    def log_table(self, table, step: int, folder: str = "eval_tables") -> None:
        """One Parquet file per evaluation, named by its step."""
        import pyarrow.parquet as pq

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, table_name(step))
            pq.write_table(table, path)
            self.log_artifact(path, folder)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dir(self, directory: str | os.PathLike, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_json(self, data: Any, name: str) -> None:
        buffer = io.StringIO()
        json.dump(data, buffer, indent=2, sort_keys=True)
        self.client.log_text(self.run_id, buffer.getvalue(), name)


# Between two tries of a failed call: the first wait, doubled after each failure up to the second.
RETRY_WAIT_S = (0.5, 10.0)
# Calls the queue holds at most: at a step every 0.1 s and an evaluation every 10 steps, 2.5 hours of logs.
MAX_QUEUED = 100_000
UNSENT_FILE = "calls.json"  # in the folder BufferedLogger.save_unsent writes
_CALLS = ("log_metrics", "log_image", "log_artifact", "log_dir", "set_tags")  # what the queue may hold


def use_own_retries() -> None:
    """In a process that logs through BufferedLogger: MLflow's HTTP client tries each request once.

    BufferedLogger retries failed calls itself, after asking the store what it already holds. MLflow's own
    retries (7 by default, with backoff, on any method) would resend an append whose answer was lost, and
    hold a call for minutes while the outage limit cannot act. A value the user set is kept.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


@dataclass
class _Call:
    """One queued RunLogger call: the method, its JSON-able arguments, and the spool folder of its files."""

    method: str
    args: dict[str, Any]
    folder: str | None = None  # the files it sends: a folder of the spool
    file_args: tuple[str, ...] = ()  # the arguments that name a file in `folder`

    @classmethod
    def from_json(cls, data: dict) -> _Call:
        call = cls(data["method"], dict(data["args"]), data.get("folder"), tuple(data.get("file_args", ())))
        if call.method not in _CALLS or (call.file_args and not call.folder):
            raise ValueError(f"not a logging call: {data!r:.200}")
        return call


class BufferedLogger:
    """RunLogger's calls, queued and sent in order by a background thread: training never waits on MLflow.

    Files (images, tables, the adapter) are written to a spool folder when queued. A failed call is retried,
    waiting 0.5 s, doubling up to 10 s, until the store has failed for `outage_limit_s` in a row; a call the
    store refuses (HTTP 4xx) or a local artifact folder that is full or read-only ends it at once. Either
    way the next call from training raises TrackingError.

    A checkpoint carries what is still queued (`save_unsent`), and a worker restarted from it queues that
    again first (`resend`): a crash loses no log that a checkpoint covers, and RunLogger drops what did
    reach the store.
    """

    def __init__(self, uri: str, run_id: str, outage_limit_s: float, say: Callable[[str], None] = print):
        self.uri, self.limit, self._say = uri, outage_limit_s, say
        self._sender = RunLogger(uri, run_id)
        remove_dead_spools()
        self._spool, self._spool_lock = new_spool()
        self._folders = itertools.count()
        self._queue: deque[_Call] = deque()
        self._changed = threading.Condition()
        self._error: str | None = None  # why the thread gave up
        self._failing = False  # the store failed the last try: an outage, maybe
        self._closing = False
        self._thread = threading.Thread(target=self._send_queued, name="alignprop-mlflow", daemon=True)
        self._thread.start()

    # --- called by training: each returns at once ---------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = {key: float(value) for key, value in metrics.items()}
        when = int(time.time() * 1000)  # when the step ran, not when the store took it
        self._put(_Call("log_metrics", {"metrics": values, "step": step, "timestamp_ms": when}))

    def log_image(self, image, key: str, step: int) -> None:
        folder = self._new_folder()
        image.save(self._spool / folder / "image.png")
        self._put(_Call("log_image", {"image": "image.png", "key": key, "step": step}, folder, ("image",)))

    def log_table(self, table, step: int, folder: str = "eval_tables") -> None:
        import pyarrow.parquet as pq

        spooled, name = self._new_folder(), table_name(step)
        pq.write_table(table, self._spool / spooled / name)
        self._put(_Call("log_artifact", {"path": name, "artifact_path": folder}, spooled, ("path",)))

    def log_dir(self, directory: str | os.PathLike, artifact_path: str) -> None:
        folder = self._new_folder()
        shutil.copytree(directory, self._spool / folder / "files")
        args = {"directory": "files", "artifact_path": artifact_path}
        self._put(_Call("log_dir", args, folder, ("directory",)))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._put(_Call("set_tags", {"tags": {key: str(value) for key, value in tags.items()}}))

    def settle(self, timeout: float) -> None:
        """Wait until everything queued has been sent, for at most `timeout`, and not at all while the store
        is failing: before a report, so the store holds a step's logs before Ray or Tune act on the step
        (a trial Tune stops is ended at once), without tying training to an outage."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._queue and not self._failing and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            self._raise_if_failed()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything queued has been sent (bounded by the outage limit, or `timeout`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self._queue and self._error is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TrackingError(f"{len(self._queue)} MLflow calls still unsent after {timeout:g} s")
                self._changed.wait(left)
            self._raise_if_failed()

    def close(self, timeout: float | None = None) -> None:
        """Send everything still queued, then stop the thread and remove the spool folder: also when the
        logger gave up (the calls it could not send are in the last checkpoint), not while it still tries."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        try:
            self.flush(timeout)
        finally:
            if self._error is not None or not self._queue:  # the thread has ended, or ends now
                self._thread.join()
                shutil.rmtree(self._spool, ignore_errors=True)
                os.close(self._spool_lock)

    def save_unsent(self, directory: str | os.PathLike) -> None:
        """Write the calls not yet sent, with their files, into `directory` (inside a checkpoint)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._changed:  # the thread deletes a call's files under this lock once it is sent
            calls = list(self._queue)
            for call in calls:
                if call.folder:
                    shutil.copytree(self._spool / call.folder, directory / call.folder)
        (directory / UNSENT_FILE).write_text(json.dumps([asdict(call) for call in calls]))

    def resend(self, directory: str | os.PathLike) -> int:
        """Queue the calls that `save_unsent` wrote into `directory`; how many. Call before logging."""
        calls = read_unsent(directory)
        for call in calls:
            if call.folder:
                folder = self._new_folder(create=False)
                shutil.copytree(Path(directory) / call.folder, self._spool / folder)
                call.folder = folder
        with self._changed:
            self._queue.extend(calls)
            self._changed.notify_all()
        return len(calls)

    # --- the sending thread -----------------------------------------------------------------------------

    def _new_folder(self, create: bool = True) -> str:
        name = f"call-{next(self._folders):07d}"
        if create:
            (self._spool / name).mkdir()
        return name

    def _put(self, call: _Call) -> None:
        with self._changed:
            self._raise_if_failed()
            if len(self._queue) >= MAX_QUEUED:
                raise TrackingError(
                    f"{MAX_QUEUED} MLflow calls are queued unsent ({self.uri} is not taking them)"
                )
            self._queue.append(call)
            self._changed.notify_all()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise TrackingError(self._error)

    def _send_queued(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._closing:
                    self._changed.wait()
                if not self._queue:
                    return
                call = self._queue[0]
            if not self._send_until_done(call):
                return
            with self._changed:
                self._queue.popleft()
                if call.folder:
                    shutil.rmtree(self._spool / call.folder, ignore_errors=True)
                self._changed.notify_all()

    def _send_until_done(self, call: _Call) -> bool:
        """Send `call`, retrying through an outage; False once the logger gave up (the error is kept).

        An outage is announced at its second failed try (a single failure is often a dropped keep-alive
        connection), and its end likewise."""
        failing_since, tries, wait = None, 0, RETRY_WAIT_S[0]
        while True:
            try:
                self._send(call)
                break
            except Exception as err:
                now, tries = time.monotonic(), tries + 1
                failing_since = now if failing_since is None else failing_since
                failed_for = now - failing_since
                if _refused(err) or failed_for >= self.limit:
                    self._give_up(call, err, failed_for)
                    return False
                self._set_failing(True)
                if tries == 2:
                    self._say(
                        f"MLflow logging failed ({_one_line(err)}); retrying for up to {self.limit:.0f} s "
                        "(tracking.outage_limit_s) while training continues"
                    )
                self._sender.forget()  # the failed call may have reached the store: ask it before resending
                time.sleep(min(wait, self.limit - failed_for))
                wait = min(2 * wait, RETRY_WAIT_S[1])
        if failing_since is not None:
            self._set_failing(False)
            if tries >= 2:
                self._say(
                    f"MLflow logging recovered after {time.monotonic() - failing_since:.0f} s; "
                    f"{len(self._queue)} queued calls to send"
                )
        return True

    def _set_failing(self, failing: bool) -> None:
        with self._changed:
            self._failing = failing
            self._changed.notify_all()

    def _send(self, call: _Call) -> None:
        args = dict(call.args)
        for name in call.file_args:
            args[name] = str(self._spool / call.folder / args[name])
        getattr(self._sender, call.method)(**args)

    def _give_up(self, call: _Call, err: Exception, failed_for: float) -> None:
        if _refused(err):
            why = f"MLflow could not take the run's logs ({call.method}): {_one_line(err)}"
        else:
            why = (
                f"MLflow at {self.uri} failed for {failed_for:.0f} s, past tracking.outage_limit_s "
                f"({self.limit:g} s): {_one_line(err)}"
            )
        with self._changed:
            self._error = why
            self._changed.notify_all()


SPOOL_PREFIX = "alignprop-logs-"  # a BufferedLogger's spool: a folder of the temporary directory
SPOOL_LOCK = ".owner"  # in a spool, locked (flock) by the process that owns it for as long as it lives


def new_spool() -> tuple[Path, int]:
    """A new spool folder, and the descriptor that holds its lock. The lock file is locked before it gets its
    name, so `remove_dead_spools` never sees a spool of a live process unlocked."""
    import fcntl

    spool = Path(tempfile.mkdtemp(prefix=SPOOL_PREFIX))
    unnamed = spool / f"{SPOOL_LOCK}.new"
    lock = os.open(unnamed, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(unnamed, spool / SPOOL_LOCK)
    return spool, lock


def remove_dead_spools() -> int:
    """Remove the spools whose process has ended without removing its own (a killed training worker): the
    kernel released their lock. A spool being made, or made by an older version, has no lock file: kept.
    How many were removed."""
    import fcntl

    removed = 0
    for spool in Path(tempfile.gettempdir()).glob(f"{SPOOL_PREFIX}*"):
        try:
            lock = os.open(spool / SPOOL_LOCK, os.O_RDWR)
        except OSError:  # no lock file, or another user's
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its process lives
            continue
        else:
            shutil.rmtree(spool, ignore_errors=True)
            removed += 1
        finally:
            os.close(lock)
    return removed


def read_unsent(directory: str | os.PathLike) -> list[_Call]:
    """The calls `BufferedLogger.save_unsent` wrote into `directory` (none if it does not exist);
    ValueError if the folder is damaged."""
    directory = Path(directory)
    if not directory.exists():
        return []
    try:
        calls = [_Call.from_json(item) for item in json.loads((directory / UNSENT_FILE).read_text())]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{UNSENT_FILE}: {_one_line(err)}") from None
    for call in calls:
        for name in call.file_args:
            if not (directory / call.folder / call.args[name]).exists():
                raise ValueError(f"{call.folder}/{call.args[name]} is missing")
    return calls


def _refused(err: Exception) -> bool:
    """Failures that waiting does not cure: the store refused the call (HTTP 4xx but a timeout or rate limit),
    or the local artifact folder is full, read-only or closed to us."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return 400 <= status < 500 and status not in (408, 429)
    return isinstance(err, OSError) and err.errno in _DISK_ERRORS


_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _one_line(err: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
