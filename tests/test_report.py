"""`alignprop-ray report` and notebooks/compare_runs.ipynb on a small MLflow store written without training.

The store is written through `alignprop_ray.tracking` (the code training uses) with the metric, param and
tag names of train/loop.py: a sweep parent with four trials (one reward mixture, one ended by a stopper,
one failed before any evaluation), an older experiment with one run, an experiment of runs that logged
next to nothing, and an empty experiment.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from alignprop_ray import tracking
from alignprop_ray.cli import main

EXPERIMENT = "trunc-sweep"
OLDER = "older-study"
EMPTY = "empty-study"
SPARSE = "sparse-study"
SWEEP = "sweep-trunc"
SWEEP_TAGS = {"alignprop.kind": "sweep"}  # as alignprop_ray.sweep.tracking tags a parent run
STOP_REASON = "collapse: eval/diversity 0.03 < 0.05 after step 12"
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare_runs.ipynb"
PLOT_FILES = [
    "reward_vs_step.png",
    "reward_vs_diversity.png",
    "pareto_fronts.png",
    "heldout_rewards.png",
    "reward_terms.png",
    "k_histogram.png",
]


@dataclass
class Trial:
    name: str
    truncation: str
    lr: float
    weights: dict[str, float]  # reward term -> weight
    steps: int = 20
    eval_every: int = 10
    rate: float = 1.0  # reward gained over 20 steps
    stop_at: int | None = None  # a stopper ended the run after this step
    evaluate: bool = True
    status: str = "FINISHED"
    rank: int = 4
    heldout: tuple[str, ...] = ()  # held-out rewards (eval.rewards) it evaluates
    expected: dict[str, float] = field(default_factory=dict)  # final eval values, filled when logged


def trials() -> list[Trial]:
    return [
        Trial("fixed1", "fixed:1", 1e-3, {"saturation": 1.0}, heldout=("hpsv2",)),
        Trial("uniform-mix", "uniform:0:10", 1e-3, {"contrast": 0.7, "saturation": 0.3}, rate=1.5),
        Trial(
            "full-collapse",
            "full",
            1e-2,
            {"saturation": 1.0},
            eval_every=4,
            rate=3.0,
            stop_at=12,
            rank=8,
            heldout=("hpsv2", "pickscore"),
        ),
        Trial(
            "fixed10-failed", "fixed:10", 3e-3, {"saturation": 1.0}, steps=5, evaluate=False, status="FAILED"
        ),
    ]


def params(trial: Trial) -> dict[str, str]:
    """The flattened resolved config, as ExperimentConfig.flat_params() writes it (a subset of keys)."""
    rewards = (
        {"reward.saturation": "1.0"}
        if trial.weights == {"saturation": 1.0}
        else {
            f"reward.{term}.{key}": value
            for term, weight in trial.weights.items()
            for key, value in (("weight", str(weight)), ("objective", "maximize"))
        }
    )
    return {
        "name": trial.name,
        "model.pretrained": "tiny",
        "model.lora.rank": str(trial.rank),
        "sampling.steps": "10",
        "truncation": trial.truncation,
        "train.steps": str(trial.steps),
        "train.lr": str(trial.lr),
        "train.batch_size": "2",
        "train.eval_every": str(trial.eval_every),
        "prompts.eval_seeds": "2",
        "tracking.experiment": EXPERIMENT,
        **rewards,
    }


def term_value(trial: Trial, index: int, step: int) -> float:
    return 0.3 + 0.05 * index + trial.rate * step / 20 / (1 + index)


def diversity(trial: Trial, step: int) -> float:
    return 0.3 * (1 - min(0.9, trial.rate * step / 40))


def k_drawn(trial: Trial, rng: np.random.Generator) -> float:
    kind, *bounds = trial.truncation.split(":")
    return {
        "fixed": lambda: float(bounds[0]),
        "full": lambda: 10.0,
        "uniform": lambda: float(rng.integers(int(bounds[0]), int(bounds[1]) + 1)),
    }[kind]()


def eval_metrics(trial: Trial, step: int) -> dict[str, float]:
    terms = {term: term_value(trial, i, step) + 0.01 for i, term in enumerate(trial.weights)}
    metrics = {
        "eval/reward": sum(trial.weights[t] * v for t, v in terms.items()),
        "eval/diversity": diversity(trial, step),
        "eval/diversity_across_prompts": 0.5,
        "eval/vendi": 1 + 3 * diversity(trial, step) / 0.3,
        "eval/vendi_across_prompts": 4.0,
    }
    # held-out rewards fall as the trained one rises: over-optimization
    heldout = {f"eval/heldout/{name}": heldout_value(trial, i, step) for i, name in enumerate(trial.heldout)}
    return metrics | heldout | {f"eval/reward/{t}": v for t, v in terms.items()}


def heldout_value(trial: Trial, index: int, step: int) -> float:
    return 0.27 + 0.01 * index - 0.02 * trial.rate * step / 20


def train_metrics(trial: Trial, step: int, rng: np.random.Generator) -> dict[str, float]:
    terms = {t: term_value(trial, i, step) + rng.normal(0, 0.02) for i, t in enumerate(trial.weights)}
    reward = sum(trial.weights[t] * v for t, v in terms.items())
    metrics = {
        "train/reward": reward,
        "train/loss": -reward,
        "train/k": k_drawn(trial, rng),
        "train/grad_norm": 1.0,
        "train/lr": trial.lr,
        "train/skipped_steps": 0.0,
        "perf/step_seconds": 0.5,
        "perf/images_per_second": 8.0,
        "perf/peak_memory_mb": 900.0,
    }
    return metrics | {f"train/reward/{t}": v for t, v in terms.items()}


def grid_image(trial: Trial, step: int, rng: np.random.Generator):
    """2x2 tiles, as different from each other as the run's diversity at that step."""
    from PIL import Image

    base = rng.uniform(60, 200, size=3)
    tiles = [np.clip(base + rng.normal(0, 400 * diversity(trial, step), 3), 0, 255) for _ in range(4)]
    pixels = np.zeros((64, 64, 3), np.uint8)
    for i, color in enumerate(tiles):
        pixels[32 * (i // 2) : 32 * (i // 2 + 1), 32 * (i % 2) : 32 * (i % 2 + 1)] = color
    return Image.fromarray(pixels)


def log_trial(uri: str, trial: Trial, parent_id: str | None, experiment: str = EXPERIMENT) -> str:
    tags = {tracking.PARENT_TAG: parent_id} if parent_id else None
    run_id, _ = tracking.start_run(uri, experiment, trial.name, params(trial), "name: x\n", tags)
    logger, rng = tracking.RunLogger(uri, run_id), np.random.default_rng(len(trial.name))
    last = trial.stop_at or trial.steps
    for step in range(last + 1):
        metrics = train_metrics(trial, step, rng) if step else {}
        if trial.evaluate and (step % trial.eval_every == 0 or step == last):
            metrics |= eval_metrics(trial, step)
            trial.expected = eval_metrics(trial, step)
            if step in (0, last):
                logger.log_image(grid_image(trial, step, rng), key="eval/images", step=step)
        if metrics:
            logger.log_metrics(metrics, step)
    if trial.stop_at:
        logger.set_tags({"alignprop.stop_reason": STOP_REASON})
    tracking.end_run(uri, run_id, trial.status)
    return run_id


def log_sparse_runs(uri: str) -> None:
    """Runs a report must survive: one with nothing logged, one whose only eval has NaN diversity."""
    empty_id, _ = tracking.start_run(uri, SPARSE, "crashed-at-start", {}, "")
    tracking.end_run(uri, empty_id, "FAILED")
    run_id, _ = tracking.start_run(uri, SPARSE, "one-eval <b>", {"truncation": "fixed:2"}, "")
    tracking.RunLogger(uri, run_id).log_metrics({"eval/reward": 0.4, "eval/diversity": math.nan}, 0)
    tracking.end_run(uri, run_id, "KILLED")
    tracking.start_run(uri, SPARSE, "sweep-no-trials-yet", {"tune.num_samples": "2"}, "", SWEEP_TAGS)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """The MLflow store: uri and the trials as logged (with their expected final values)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    log_trial(uri, Trial("solo", "uniform:0:10", 1e-3, {"saturation": 1.0}), None, OLDER)
    log_sparse_runs(uri)
    time.sleep(0.01)  # creation times order the experiments: the sweep is the most recent with runs
    # an Optuna multi-objective sweep, as sweep/tracking.py logs one: its objectives as params
    objectives = {"tune.num_samples": "4", "tune.metric": "eval/reward,eval/vendi", "tune.mode": "max,max"}
    parent_id, _ = tracking.start_run(uri, EXPERIMENT, SWEEP, objectives, "sweep: x\n", SWEEP_TAGS)
    logged = trials()
    for trial in logged:
        log_trial(uri, trial, parent_id)
    tracking.end_run(uri, parent_id)
    time.sleep(0.01)
    tracking.ensure_experiment(uri, EMPTY)  # newest, but without runs: never the default
    return {"uri": uri, "trials": {t.name: t for t in logged}}


def test_load_runs_tables(store):
    from alignprop_ray.report import load_runs, summary_table, varying_params

    runs, history = load_runs(store["uri"], EXPERIMENT)
    by_name = runs.set_index("name")
    assert set(by_name.index) == set(store["trials"])  # the sweep parent is not a training run
    assert set(runs["sweep"]) == {SWEEP}
    for name, trial in store["trials"].items():
        row = by_name.loc[name]
        assert row["truncation"] == trial.truncation and row["lr"] == pytest.approx(trial.lr)
        assert row["status"] == trial.status
        assert row["last_step"] == (trial.stop_at or trial.steps)
        assert row["terms"] == sorted(trial.weights)
        for column, key in (("final_eval_reward", "eval/reward"), ("final_eval_diversity", "eval/diversity")):
            expected = trial.expected.get(key, math.nan)
            assert row[column] == pytest.approx(expected, nan_ok=True), (name, column)
    assert by_name.loc["full-collapse", "stop_reason"] == STOP_REASON
    assert by_name["stop_reason"].isna().sum() == 3
    assert by_name.loc["uniform-mix", "reward"] == "contrast=0.7 + saturation=0.3"
    assert by_name.loc["fixed1", "base_eval_reward"] == pytest.approx(
        eval_metrics(store["trials"]["fixed1"], 0)["eval/reward"]
    )
    assert set(varying_params(runs)) == {"model.lora.rank", "train.eval_every", "train.steps"}
    collapse, fixed1 = store["trials"]["full-collapse"], store["trials"]["fixed1"]
    assert by_name.loc["full-collapse", "heldout"] == ["hpsv2", "pickscore"]
    assert by_name.loc["uniform-mix", "heldout"] == []
    assert by_name.loc["full-collapse", "final_heldout/pickscore"] == pytest.approx(
        heldout_value(collapse, 1, 12)
    )
    assert by_name.loc["fixed1", "base_heldout/hpsv2"] == pytest.approx(heldout_value(fixed1, 0, 0))
    assert math.isnan(by_name.loc["fixed1", "final_heldout/pickscore"])  # not evaluated by that run
    assert by_name.loc["fixed1", "final_eval_vendi"] == pytest.approx(fixed1.expected["eval/vendi"])
    shown = summary_table(runs).set_index("run")
    columns = list(shown.columns)  # held-out rewards right after the trained one
    assert columns[columns.index("final eval/reward") + 1 :][:4] == [
        "base eval/heldout/hpsv2",
        "final eval/heldout/hpsv2",
        "base eval/heldout/pickscore",
        "final eval/heldout/pickscore",
    ]
    assert shown.loc["full-collapse", "final eval/heldout/hpsv2"] == pytest.approx(
        heldout_value(collapse, 0, 12)
    )
    assert "final eval/vendi" in columns

    k = history[(history["key"] == "train/k")].groupby("name")["step"].agg(["min", "max", "count"])
    assert k.loc["full-collapse"].tolist() == [1, 12, 12]
    assert set(history[history["name"] == "fixed10-failed"]["key"].str.split("/").str[0]) == {"train", "perf"}
    assert summary_table(runs)["run"].iloc[0] == "full-collapse"  # best final eval reward first


def test_each_sweep_picks_its_best_run_under_its_rule_and_marks_its_pareto_fronts(store):
    from alignprop_ray.report import load_runs
    from alignprop_ray.report.data import selection_lines
    from alignprop_ray.report.plots import front_panels, pareto_fronts, pareto_rows

    runs, history = load_runs(store["uri"], EXPERIMENT)
    marks = dict(zip(runs["name"], runs["selection"], strict=True))
    # uniform-mix has the highest final reward of the completed runs, with diversity 0.075 of 0.3 at step 0
    assert marks == {
        "fixed1": "best",
        "uniform-mix": "collapsed: eval/diversity 0.075 < 0.150",
        "full-collapse": "collapsed: eval/diversity 0.030 < 0.150",
        "fixed10-failed": "",  # never evaluated: no candidate
    }
    assert selection_lines(runs, history) == [
        f"sweep {SWEEP}: best trial: fixed1 (eval/reward 1.31): the highest eval/reward of the trials that keep "
        "eval/diversity >= 0.5 x first",
        "not uniform-mix (eval/reward 1.6, the plain maximum): collapsed: eval/diversity 0.075 < 0.150",
    ]
    panels = front_panels(runs)
    assert panels == [
        (["eval/reward", "eval/diversity"], ["max", "max"]),
        (["eval/reward", "eval/heldout/hpsv2"], ["max", "max"]),
        (["eval/reward", "eval/heldout/pickscore"], ["max", "max"]),
        (["eval/reward", "eval/vendi"], ["max", "max"]),  # the sweep's own objectives
    ]
    rows = pareto_rows(runs, history)
    assert pareto_fronts(rows, *panels[0]) == {"fixed1", "uniform-mix"}  # a trade-off: both on the front
    assert pareto_fronts(rows, *panels[1]) == {"fixed1"}  # full-collapse was stopped: never on a front
    assert pareto_fronts(rows, *panels[3]) == {"fixed1", "uniform-mix"}


def test_default_experiment_is_the_newest_with_runs(store, monkeypatch):
    from alignprop_ray.report import load_runs

    monkeypatch.setenv("ALIGNPROP_TRACKING_URI", store["uri"])
    runs, _ = load_runs()
    assert runs.attrs["experiment"] == EXPERIMENT
    runs, _ = load_runs(experiment=OLDER)
    assert runs["name"].tolist() == ["solo"] and runs["sweep"].isna().all()


@pytest.mark.slow
def test_report_cli_writes_plots_and_page(store, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "report"
    started = time.perf_counter()
    assert (
        main(["report", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"], "--out", str(out)]) == 0
    )
    print(f"report took {time.perf_counter() - started:.1f} s")
    stdout = capsys.readouterr().out
    page = (out / "index.html").read_text()
    for name in PLOT_FILES:
        with Image.open(out / name) as image:
            image.load()
            assert image.width > 400 and image.height > 200
        assert (out / name).stat().st_size > 10_000
        assert f"src='{name}'" in page
    for name in store["trials"]:
        assert name in page and name in stdout
    assert html.escape(STOP_REASON) in page and SWEEP in page
    grids = sorted(p.name for p in (out / "eval_grids").iterdir())
    assert len(grids) == 6  # base and last grid of the three runs that evaluated
    assert all(f"eval_grids/{g}" in page for g in grids)
    assert (out / "runs.csv").read_text().count("\n") == 1 + len(store["trials"])
    assert "final eval/heldout/pickscore" in page and "final eval/vendi" in page
    assert "not uniform-mix (eval/reward 1.6, the plain maximum): collapsed" in page
    assert "best trial: fixed1" in stdout


def test_report_skips_plots_without_data(store, tmp_path):
    from alignprop_ray.report import write_report

    written = write_report(store["uri"], OLDER, tmp_path)  # one run, one reward term
    names = {p.name for p in written}
    assert {"reward_vs_step.png", "reward_vs_diversity.png", "k_histogram.png", "index.html"} <= names
    assert "reward_terms.png" not in names and "reward_terms.png" not in (tmp_path / "index.html").read_text()
    assert "heldout_rewards.png" not in names  # its run evaluates no held-out reward


def test_report_tolerates_sparse_runs(store, tmp_path):
    from alignprop_ray.report import load_runs, write_report

    runs, _ = load_runs(store["uri"], SPARSE)
    assert sorted(runs["name"]) == ["crashed-at-start", "one-eval <b>"]  # not the childless sweep parent
    assert runs.set_index("name").loc["crashed-at-start", "truncation"] == "(unset)"
    written = write_report(store["uri"], SPARSE, tmp_path)
    assert [p.name for p in written] == ["reward_vs_step.png", "runs.csv", "index.html"]
    page = (tmp_path / "index.html").read_text()
    assert "crashed-at-start" in page and "one-eval &lt;b&gt;" in page and "one-eval <b>" not in page


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--experiment", "nope"], "no experiment 'nope' in sqlite:///"),
        (["--experiment", EMPTY], f"experiment '{EMPTY}' has no training runs"),
    ],
)
def test_report_bad_experiment(store, tmp_path, capsys, argv, message):
    code = main(["report", *argv, "--tracking-uri", store["uri"], "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    if "nope" in argv:
        assert all(name in err for name in (EXPERIMENT, OLDER, EMPTY, SPARSE))


@pytest.mark.parametrize(
    "store_kind, message",
    [("missing", "no MLflow store at"), ("garbage", "file is not a database"), ("server", "cannot read")],
)
def test_report_unreadable_store(tmp_path, capsys, store_kind, message):
    path = tmp_path / "store.db"
    if store_kind == "garbage":
        path.write_text("not sqlite\n")
    uri = "http://127.0.0.1:9" if store_kind == "server" else f"sqlite:///{path}"  # port 9: refused
    started = time.perf_counter()
    assert main(["report", "--tracking-uri", uri, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert time.perf_counter() - started < 60  # MLflow's own retries alone would take minutes
    assert path.exists() == (store_kind == "garbage")  # reading never creates a store


@pytest.mark.slow
def test_notebook_runs_end_to_end(store, tmp_path, monkeypatch):
    """Executes the notebook in a kernel of this interpreter (a kernelspec written for the test)."""
    import nbformat
    from ipykernel.kernelspec import write_kernel_spec
    from nbclient import NotebookClient

    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "alignprop-test")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("ALIGNPROP_TRACKING_URI", store["uri"])
    monkeypatch.setenv("ALIGNPROP_EXPERIMENT", EXPERIMENT)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, kernel_name="alignprop-test", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4
    text = "".join(str(o.get("data", {}).get("text/plain", "")) + o.get("text", "") for o in outputs)
    assert all(name in text for name in store["trials"])
