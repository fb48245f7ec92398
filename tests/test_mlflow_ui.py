"""A finished sweep as the user meets it: its console, the links it prints, and those links opened in a real
browser (headless Chromium) on a real `mlflow server` at the address given with --ui-url.

The sweep is the one over the method rows that tests/test_methods.py trains (tests/method_sweep.py): through
the CLI in a subprocess joined to the session's Ray instance, with --register; then `--resume --verbose` on
the finished sweep, which trains nothing but prints Tune's console in full.
Chromium is Debian's `chromium` (.ci/run installs it where missing); elsewhere the browser tests skip.
"""

from __future__ import annotations

import concurrent.futures
import html.parser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from alignprop_ray import cli
from alignprop_ray.console import HIDDEN_LINES, LineFilter
from alignprop_ray.sweep.tracking import BEST_RUN_TAG, compare_url, ui_base
from alignprop_ray.tracking import NO_JOB_RUNNER, ui_command
from tests.helpers import serving, tiny_sweep
from tests.method_sweep import MODEL
from tests.method_sweep import STEPS as SWEEP_STEPS

# A sweep file for the command-line checks that end before any work.
SWEEP = tiny_sweep(
    {"train.lr": {"loguniform": [1e-3, 1e-1]}, "truncation": {"choice": ["fixed:1", "full"]}},
    name="ui",
    base={
        "sampling": {"steps": 2},
        "train": {"steps": 2, "batch_size": 2, "eval_every": 2, "checkpoint_every": 2},
        "scaling": {"resources_per_worker": {"CPU": 1}},
        "tracking": {"experiment": "ui"},
        "failure": {"max_failures": 0},
    },
    tune={"algorithm": "random", "num_samples": 2, "seed": 0},
)
SWEPT = ["method.name"]  # the method sweep's swept parameter, as MLflow holds it


# --- without Ray -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--ui-url", "127.0.0.1:5000"],
            "--ui-url must look like http://HOST[:PORT][/PATH], got '127.0.0.1:5000'",
        ),
        (["--ui-url", "http://h:99999"], "--ui-url must look like http://HOST[:PORT][/PATH]"),
        (["--register", "a:b"], "model name 'a:b': give a non-empty name without '/' or ':'"),
    ],
)
def test_bad_console_options_exit_2_before_any_work(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(SWEEP))
    assert cli.main(["sweep", "sweep.yaml", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]


def test_ui_address_and_the_command_that_serves_it():
    store = "sqlite:////data/my runs/mlflow.db"
    assert ui_base(store, None) == "http://127.0.0.1:5000"
    assert ui_base("http://tracking:5000/", None) == "http://tracking:5000"  # the server is the UI
    assert (
        ui_command(store, ui_base(store, None))
        == f"{NO_JOB_RUNNER} mlflow ui --backend-store-uri 'sqlite:////data/my runs/mlflow.db' --workers 1"
    )
    assert ui_command(store, "http://gpu-box:8080/mlflow") == (
        f"{NO_JOB_RUNNER} mlflow ui --backend-store-uri 'sqlite:////data/my runs/mlflow.db' --workers 1 --host gpu-box "
        "--allowed-hosts gpu-box:8080 --cors-allowed-origins http://gpu-box:8080 --port 8080 "
        "--static-prefix /mlflow"
    )
    assert ui_command("http://tracking:5000", "http://tracking:5000") is None
    # a database server takes many writers: MLflow's default workers
    assert (
        ui_command("postgresql://db/mlflow")
        == f"{NO_JOB_RUNNER} mlflow ui --backend-store-uri postgresql://db/mlflow"
    )
    link = compare_url("http://h:1", ["a1", "b2"], ["7"])
    assert link == "http://h:1/#/compare-runs?runs=%5B%22a1%22%2C%22b2%22%5D&experiments=%5B%227%22%5D"


def test_line_filter_drops_hidden_lines_even_when_written_in_pieces():
    import io

    out = io.StringIO()
    stream = LineFilter(out, HIDDEN_LINES)
    print("Trial status: 2 RUNNING", file=stream)
    stream.write("Logical res")
    stream.flush()  # held until the line ends: it might become a hidden one
    stream.write("ource usage: 0/2 CPUs, 0/0 GPUs\nkeep")
    stream.write(" this\n  Logical resource usage: indented\n")
    # as Ray streams it from the Train controller's process
    stream.write(
        "\x1b[36m(TrainController pid=2584)\x1b[0m [2026-12-06 06:43:52,843 E 2584 2632] core_worker.cc"
    )
    stream.write(
        ":2465: Actor with class name: 'PreemptionWatcher' and ID: '7649988449448aa0c7' has constructor "
    )
    stream.write("arguments in the object store and max_restarts > 0. If the arguments ...\n")
    stream.write(
        "\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node: 9f3 with address: "
        "10.0.0.2, which is 4x the maximum expected startup concurrency (2). This could be a result of ...\n"
    )
    stream.write(
        "(PlacementGroupCleaner pid=8805) Failed to query Ray Train Controller actor state. State API may be "
        "temporarily unavailable. Continuing to monitor.\n"
    )
    stream.write("in the middle: Logical resource usage: kept\nlast")
    stream.close()
    kept = "Trial status: 2 RUNNING\nkeep this\nin the middle: Logical resource usage: kept\nlast"
    assert out.getvalue() == kept
    print(" line after the block", file=stream)  # a logging handler made inside it may still write
    assert out.getvalue() == kept + " line after the block\n"


# --- a finished sweep -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_run(method_sweep):
    return method_sweep


def printed(out: str, label: str) -> str:
    lines = [
        line.split(":", 1)[1].strip() for line in out.splitlines() if line.strip().startswith(f"{label}:")
    ]
    assert len(lines) == 1, (label, out[-2000:])
    return lines[0]


# --- the console and the links --------------------------------------------------------------------------


@pytest.mark.ray
def test_tune_console_hides_its_tensorboard_hint_and_resource_line_unless_verbose(sweep_run):
    quiet, verbose = sweep_run.first.stdout, sweep_run.again.stdout
    assert "Trial status:" in quiet  # Tune's own progress is still shown
    for line in (quiet + sweep_run.first.stderr).splitlines():
        assert not any(re.search(hidden, line) for hidden in HIDDEN_LINES), line
    for hidden in ("To visualize your results with TensorBoard", "Logical resource usage:"):
        assert any(line.startswith(hidden) for line in verbose.splitlines()), (hidden, verbose[-3000:])


@pytest.mark.ray
def test_printed_links_open_the_runs_table_and_the_compare_page_of_every_trial(sweep_run):
    base = f"http://127.0.0.1:{sweep_run.port}"
    experiment_id = sweep_run.experiment.experiment_id
    out = sweep_run.first.stdout
    runs_table = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    sort = "&orderByKey=metrics.%60eval%2Freward%60&orderByAsc=false"  # the sweep's objective, best first
    assert printed(out, "runs table") == runs_table + sort
    compare = printed(out, "compare trials")
    assert compare.startswith(f"{base}/#/compare-runs?")
    query = urllib.parse.parse_qs(compare.split("?", 1)[1])
    assert sorted(json.loads(query["runs"][0])) == sorted(r.info.run_id for r in sweep_run.children)
    assert json.loads(query["experiments"][0]) == [experiment_id]
    uri = sweep_run.uri
    command = f"{NO_JOB_RUNNER} mlflow ui --backend-store-uri {uri} --workers 1 --port {sweep_run.port}"
    assert printed(out, "open the UI") == command
    assert sweep_run.experiment.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.ray
def test_parent_run_reads_as_its_best_trial(sweep_run):
    parent, children = sweep_run.parent, sweep_run.children
    assert len(children) == len(sweep_run.trials) >= 2
    best = max(children, key=lambda run: run.data.metrics["eval/reward"])
    assert parent.data.tags[BEST_RUN_TAG] == best.info.run_id
    for field in SWEPT:
        assert parent.data.params[field] == best.data.params[field]
    assert parent.data.metrics == best.data.metrics  # every final metric, under the trials' own names
    # finished twice (the sweep, then its resume): logged once
    history = sweep_run.client.get_metric_history(parent.info.run_id, "eval/reward")
    assert [m.step for m in history] == [SWEEP_STEPS]


@pytest.mark.ray
def test_sweep_register_adds_the_best_trials_adapter(sweep_run):
    best = sweep_run.parent.data.tags[BEST_RUN_TAG]
    (version,) = sweep_run.client.search_model_versions(f"name = '{MODEL}'")
    assert version.run_id == best
    assert f"registered models:/{MODEL}/1: the adapter of run {best}" in sweep_run.first.stdout


# --- in the browser -------------------------------------------------------------------------------------


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("Chromium not found (Debian package `chromium`; .ci/run installs it)")
    return found


@pytest.fixture(scope="module")
def ui_server(sweep_run):
    """The UI at the address the sweep was told (--ui-url), started by the `mlflow ui` command the sweep
    printed, literally: the venv's `mlflow` first on PATH, as for a user who activated it."""
    chromium()
    command = shlex.split(printed(sweep_run.first.stdout, "open the UI"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    health = f"http://127.0.0.1:{sweep_run.port}/health"
    with serving(command, health, sweep_run.tmp / "ui-server.log", timeout=90, env=env):
        yield


class _Text(html.parser.HTMLParser):
    """The visible text of a page: its text nodes in document order, outside scripts and styles."""

    def __init__(self):
        super().__init__()
        self.texts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style")

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.texts.append(data.strip())


def page_texts(url: str, profile: Path, ready: str) -> list[str]:
    """The text of `url` after the single-page app rendered it, once it shows `ready` (3 tries, each with
    more virtual time for the app's requests to the server)."""
    command = [
        chromium(),
        *("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"),
        *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
        f"--user-data-dir={profile}",
        "--window-size=1600,4000",  # the compare page draws only the rows in view
    ]
    texts: list[str] = []
    for budget_ms in (15_000, 30_000, 60_000):
        dom = subprocess.run(
            [*command, f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=240,
        ).stdout
        parser = _Text()
        parser.feed(dom)
        texts = parser.texts
        if ready in texts:
            return texts
    raise AssertionError(f"{url} never showed {ready!r}; it showed: {texts[:80]}")


def row(texts: list[str], label: str, columns: int, after: str | None = None) -> list[str]:
    """The `columns` values that follow `label` (the first one after `after`) in a compare table."""
    start = texts.index(after) if after else 0
    i = texts.index(label, start)
    return texts[i + 1 : i + 1 + columns]


@pytest.fixture(scope="module")
def pages(sweep_run, ui_server, tmp_path_factory) -> dict[str, list[str]]:
    """The texts of the two pages the sweep linked, rendered at the same time (each mostly waits on the
    app's requests to the server)."""
    links = {"compare trials": "Run Name:", "runs table": "matching runs"}
    with concurrent.futures.ThreadPoolExecutor(len(links)) as pool:
        futures = {
            label: pool.submit(
                page_texts, printed(sweep_run.first.stdout, label), tmp_path_factory.mktemp("chromium"), ready
            )
            for label, ready in links.items()
        }
    return {label: future.result() for label, future in futures.items()}


@pytest.mark.ray
def test_compare_page_shows_every_trial_and_its_swept_params(sweep_run, pages):
    texts = pages["compare trials"]
    names = row(texts, "Run Name:", len(sweep_run.children))
    by_name = {run.info.run_name: run for run in sweep_run.children}
    assert sorted(names) == sorted(by_name)  # every trial, and only the trials
    for field in SWEPT:
        shown = row(texts, field, len(names), after="Parameters")
        assert shown == [by_name[name].data.params[field] for name in names], field


@pytest.mark.ray
def test_runs_table_link_opens_the_runs_best_first(sweep_run, pages):
    texts = pages["runs table"]
    assert texts[texts.index("matching runs") - 1] == str(1 + len(sweep_run.children))  # parent, trials
    assert "Overview" not in texts  # not the GenAI view MLflow 3 opens by default
    by_reward = sorted(sweep_run.children, key=lambda run: run.data.metrics["eval/reward"])
    worst, best = by_reward[0], by_reward[-1]
    names = [text for text in texts if text in {worst.info.run_name, best.info.run_name}]
    assert names.index(best.info.run_name) < names.index(worst.info.run_name), names
