"""Sweeps: the sweep file and its validation, the stoppers, the summary, and (marked ray) real sweeps.

The Ray tests share the session's Ray instance: a collapse sweep runs in this process. The smoke sweep killed
mid-sweep and continued with `--resume` (its parent run, table, best adapter and refusal of changed settings)
is tests/test_reliability_sweep.py's: one killed sweep serves both.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from alignprop_ray import cli
from alignprop_ray.config import read_yaml
from alignprop_ray.errors import ConfigError
from alignprop_ray.selection import pareto_front
from alignprop_ray.sweep.config import is_sweep, load_sweep, parse_sweep
from alignprop_ray.sweep.space import Domain, apply_point, check_field
from alignprop_ray.sweep.stoppers import (
    STOP_REASON,
    CollapseRule,
    OveroptimizationRule,
    TrialStopper,
    nan_reason,
)
from alignprop_ray.sweep.summary import best_row, format_table
from tests.helpers import tiny_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted(
    p for p in (ROOT / "sweeps").glob("*.yaml") if is_sweep(read_yaml(p)) and "compare" not in read_yaml(p)
)  # the comparison files: test_compare.py

# A small valid sweep; each malformed case below breaks exactly one thing in it.
SWEEP = tiny_sweep({"train.lr": {"grid": [1e-3, 1e-2]}})


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def changed(dotted: str, value) -> dict:
    data = yaml.safe_load(yaml.safe_dump(SWEEP))
    *parents, last = dotted.split("/")  # "/" separates levels: space keys contain dots
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


# --- shipped files -------------------------------------------------------------------------------------


def test_the_shipped_sweeps_are_there():
    assert {"smoke.yaml", "truncation.yaml", "lr.yaml", "reward_mix.yaml"} <= {p.name for p in SWEEPS}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_validates(path, in_tmp, hub_reachable, capsys):
    sweep = load_sweep(path, env={})
    assert sweep.domains and sweep.reference is not None
    assert cli.main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"OK: {path} (sweep)"


def test_the_truncation_ablation_is_the_papers(in_tmp, hub_reachable):
    sweep = load_sweep(ROOT / "sweeps" / "truncation.yaml", env={})
    assert sweep.domains[0].values == ("fixed:1", "fixed:10", "uniform:0:50", "full")
    ref = sweep.reference
    assert (ref.train.lr, ref.model.lora.rank, ref.sampling.steps, ref.sampling.guidance_scale) == (
        1e-3,
        4,
        50,
        7.5,
    )
    assert sweep.trial_count() == 4


def test_reward_mix_is_multi_objective(in_tmp, hub_reachable):
    tune = load_sweep(ROOT / "sweeps" / "reward_mix.yaml", env={}).config.tune
    assert tune.algorithm == "optuna"
    assert tune.metrics == ["eval/reward/aesthetic", "eval/reward/hpsv2"]


# --- malformed sweeps: exit 2, one line each, nothing created -------------------------------------------

MALFORMED = [
    (
        "unknown field in the space",
        changed("space/train.lrr", {"choice": [1e-3]}),
        "space.train.lrr: unknown field; did you mean space.train.lr?",
    ),
    ("empty choice", changed("space/train.lr", {"choice": []}), "space.train.lr: choice is empty"),
    ("grid not a list", changed("space/train.lr", {"grid": "fast"}), "space.train.lr: grid must be a list"),
    (
        "grid with optuna",
        changed("tune/algorithm", "optuna"),
        "space.train.lr: grid is not supported by algorithm optuna",
    ),
    ("bad metric name", changed("tune/metric", "eval/rewrd"), "tune.metric: unknown metric 'eval/rewrd'"),
    (
        "unknown reward term metric",
        changed("tune/metric", "eval/reward/aesthetic"),
        "tune.metric: unknown metric 'eval/reward/aesthetic'",
    ),
    (
        "bad value for the base",
        changed("space/train.lr", {"grid": [1e-3, -1.0]}),
        "space.train.lr: value -1.0: train.lr: must be > 0",
    ),
    (
        "range upside down",
        changed("space/train.lr", {"loguniform": [1e-2, 1e-3]}),
        "space.train.lr: loguniform needs lo < hi",
    ),
    ("not a domain", changed("space/train.lr", 0.01), "space.train.lr: expected one of {choice: [...]}"),
    (
        "set by the sweep",
        changed("space/tracking.uri", {"grid": ["sqlite:///a.db"]}),
        "space.tracking.uri: set by the sweep",
    ),
    (
        "unknown tune key",
        changed("tune/algoritm", "grid"),
        "tune.algoritm: unknown field; did you mean tune.algorithm?",
    ),
    (
        "collapse without a threshold",
        changed("stop/collapse", {"metric": "eval/diversity"}),
        "stop.collapse: give min_absolute or min_relative_to_first",
    ),
    (
        "objectives need optuna",
        changed("tune/objectives", [{"metric": "eval/reward"}, {"metric": "eval/diversity"}]),
        "tune.objectives: multi-objective search needs algorithm optuna",
    ),
    ("bad base", changed("base/train", {"steps": 0}), "base.train.steps: must be >= 1"),
    (
        "constraint without a comparison",
        changed("tune/select", ["eval/diversity 0.5 x first"]),
        "tune.select.constraints.0: 'eval/diversity 0.5 x first' is not METRIC OP BOUND",
    ),
    (
        "constraint with a bad bound",
        changed("tune/select", {"constraints": ["eval/vendi >= 2", "eval/diversity >= half of first"]}),
        "tune.select.constraints.1: 'eval/diversity >= half of first': the bound 'half of first' is not",
    ),
    (
        "constraint on an unknown metric",
        changed("tune/select", ["eval/diversty >= 0.5 x first"]),
        "tune.select.constraints.0: unknown metric 'eval/diversty'",
    ),
    (
        "held-out reward the base does not evaluate",
        changed("stop/overoptimization", {"heldout": "contrast", "margin": 0.01}),
        "stop.overoptimization.heldout: no held-out reward 'contrast' in base eval.rewards (has: none)",
    ),
    (
        "overoptimization window of one",
        changed("stop/overoptimization", {"heldout": "contrast", "margin": 0.01, "window": 1}),
        "stop.overoptimization.window: must be >= 2",
    ),
]


@pytest.mark.parametrize("data, expected", [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_sweep_one_line(data, expected, in_tmp):
    with pytest.raises(ConfigError) as info:
        parse_sweep(data, in_tmp, env={})
    assert len(info.value.problems) == 1, info.value.problems
    assert info.value.problems[0].startswith(expected), info.value.problems


@pytest.mark.parametrize("command", ["validate", "sweep"])
@pytest.mark.parametrize("case", MALFORMED[:4], ids=[c[0] for c in MALFORMED[:4]])
def test_malformed_sweep_exits_2_without_a_run(case, command, in_tmp, capsys):
    _, data, expected = case
    path = in_tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main([command, str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert not (in_tmp / "mlflow.db").exists() and not (in_tmp / "runs").exists()


def test_every_problem_at_once(in_tmp):
    data = changed("space/train.lrr", {"choice": []})
    data["tune"] = {"algorithm": "optuna", "metric": "nope"}
    data["base"]["train"]["steps"] = 0
    with pytest.raises(ConfigError) as info:
        parse_sweep(data, in_tmp, env={})
    fields = sorted(p.split(":")[0] for p in info.value.problems)
    assert fields == ["base.train.steps", "space.train.lr", "space.train.lrr", "tune.metric"], (
        info.value.problems
    )


def test_sweep_subprocess_exit_2(in_tmp):
    path = in_tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(MALFORMED[0][1]))
    proc = subprocess.run(
        [sys.executable, "-m", "alignprop_ray.cli", "sweep", str(path)],
        capture_output=True,
        text=True,
        cwd=in_tmp,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_set_edits_sweep_and_base(in_tmp):
    sweep = parse_sweep(
        SWEEP,
        in_tmp,
        [
            "tune.num_samples=3",
            "train.steps=2",
            "train.eval_every=1",
            "base.train.checkpoint_every=1",
            "space.train.seed={grid: [0, 1]}",
        ],
        env={},
    )
    assert sweep.config.tune.num_samples == 3
    assert (sweep.reference.train.steps, sweep.reference.train.checkpoint_every) == (2, 1)
    assert [d.field for d in sweep.domains] == ["train.lr", "train.seed"]
    assert sweep.trial_count() == 3 * 2 * 2


# --- the space ------------------------------------------------------------------------------------------


def test_points_set_nested_fields_and_reward_options():
    base = {"train": {"lr": 1.0}, "reward": {"aesthetic": 1.0, "saturation": {"weight": 2.0}}}
    data, problems = apply_point(
        base,
        {
            "train.lr": 0.1,
            "reward.aesthetic.target": 10.0,
            "reward.saturation.weight": 0.5,
            "model.lora.rank": 8,
        },
    )
    assert not problems
    assert data["reward"] == {"aesthetic": {"weight": 1.0, "target": 10.0}, "saturation": {"weight": 0.5}}
    assert data["train"]["lr"] == 0.1 and data["model"]["lora"]["rank"] == 8
    assert base["reward"]["aesthetic"] == 1.0  # the base is not modified
    _, problems = apply_point({"truncation": "full"}, {"truncation.k": 3})
    assert problems and problems[0].startswith("space.truncation.k: truncation is 'full'")


def test_mapping_choices_survive_tune_encoding():
    domain = Domain("truncation", "choice", ({"kind": "fixed", "k": 1}, "full"))
    encoded = domain.tune_values()
    assert all(isinstance(v, str) for v in encoded)
    assert [domain.decode(v) for v in encoded] == [{"kind": "fixed", "k": 1}, "full"]
    assert Domain("train.seed", "randint", (0, 10)).candidates() == [0, 9]
    assert Domain("train.lr", "loguniform", (1e-4, 1e-2)).describe() == "loguniform(0.0001, 0.01)"


def test_field_checks():
    assert check_field("train.lr") is None
    assert check_field("reward.anything.goes") is None  # free-form: checked with the experiment
    assert check_field("train.lr.x").endswith("is a value, not a section")
    assert check_field("storage.path").startswith("space.storage.path: set by the sweep")


# --- stoppers -------------------------------------------------------------------------------------------


def test_collapse_rule():
    relative = CollapseRule(min_relative_to_first=0.5)
    assert relative.reason(0.06, first=0.14).startswith("collapse: eval/diversity 0.06 < 0.5 x first")
    assert relative.reason(0.08, first=0.14) is None
    assert relative.reason(float("nan"), first=0.14) is None  # the NaN rule's business
    absolute = CollapseRule(min_absolute=0.05)
    assert absolute.reason(0.04, first=None) == "collapse: eval/diversity 0.04 < 0.05"
    assert absolute.reason(0.06, first=None) is None


def test_nan_reason():
    assert nan_reason({"train/loss": float("nan"), "eval/reward": 1.0}, ["eval/reward", "train/loss"]) == (
        "nan: train/loss is nan"
    )
    assert nan_reason({"eval/reward": math.inf}, ["eval/reward"]) == "nan: eval/reward is inf"
    assert nan_reason({"eval/reward": 1.0}, ["eval/reward", "train/loss"]) is None


def test_stopper_compares_each_trial_with_its_own_first_evaluation():
    stopper = TrialStopper(CollapseRule(min_relative_to_first=0.5), ["train/loss"])
    assert not stopper("a", {"eval/diversity": 0.14, "train/loss": 0.1})
    assert not stopper("b", {"eval/diversity": 0.05, "train/loss": 0.1})  # b starts low: its own reference
    assert not stopper("a", {"eval/diversity": 0.08})
    result = {"eval/diversity": 0.06}
    assert stopper("a", result) and result[STOP_REASON].startswith("collapse:")
    nan = {"eval/diversity": 0.05, "train/loss": float("nan")}
    assert stopper("b", nan) and nan[STOP_REASON] == "nan: train/loss is nan"
    last = {"eval/diversity": 0.01, "step": 10, "total_steps": 10}
    assert not stopper("b", last) and last[STOP_REASON].startswith("collapse:")  # recorded, not cut short
    restored = TrialStopper(CollapseRule(min_relative_to_first=0.5))
    restored.set_state(stopper.get_state())  # what Tune does on Tuner.restore
    assert restored("a", {"eval/diversity": 0.06})


def eval_results(rewards, heldouts, eval_every=2, total=None):
    """Tune results as EvalReportCallback forwards them: one per step from step 0 on, each carrying the latest
    evaluation (eval/step says when it ran)."""
    results = []
    for i, (reward, heldout) in enumerate(zip(rewards, heldouts, strict=True)):
        for step in range(i * eval_every, i * eval_every + (eval_every if i else 1)):
            result = {"step": step, "eval/step": i * eval_every, "eval/reward": reward}
            results.append({**result, "eval/heldout/contrast": heldout, "total_steps": total or 100})
    return results


def run_stopper(stopper: TrialStopper, trial: str, results: list[dict]) -> dict | None:
    """Feed results until the stopper stops the trial; the result it stopped on, or None."""
    return next((result for result in results if stopper(trial, result)), None)


OVEROPTIMIZATION = OveroptimizationRule("eval/heldout/contrast", margin=0.02, window=3)
# Measured in-process on the tiny model, trained on -sharpness at lr 0.3 (flat images): eval/reward rises,
# the held-out contrast falls (evaluations at steps 0-3).
DIVERGING = ([-0.2285, -0.2172, -0.1667, -0.0588], [0.1000, 0.0968, 0.0806, 0.0354])


def test_overoptimization_stopper_fires_on_a_divergence():
    stopper = TrialStopper(None, overoptimization=OVEROPTIMIZATION)
    stopped = run_stopper(stopper, "t", eval_results(*DIVERGING))
    assert stopped is not None and stopped["step"] == 6  # the evaluation at step 6: the window 2-6
    assert stopped[STOP_REASON] == (
        "overoptimization: eval/heldout/contrast fell 0.0614 (> 0.02) while eval/reward rose 0.1584 over "
        "the evaluations at steps 2-6"
    )
    last = eval_results(*DIVERGING, eval_every=1, total=3)
    assert run_stopper(TrialStopper(None, overoptimization=OVEROPTIMIZATION), "t", last) is None
    assert last[-1][STOP_REASON].startswith("overoptimization:")  # at the last step: recorded, not stopped


def test_overoptimization_stopper_ignores_a_noisy_plateau_and_a_reward_that_does_not_rise():
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    plateau = [0.100, 0.085, 0.112, 0.088, 0.110, 0.090]  # +-0.015 of noise, no trend
    assert (
        run_stopper(TrialStopper(None, overoptimization=OVEROPTIMIZATION), "t", eval_results(rising, plateau))
        is None
    )
    # over 4 evaluations the line through the noise moves 0.0165, though its ends differ by 0.025
    wide = OveroptimizationRule("eval/heldout/contrast", margin=0.02, window=4)
    noisy = [0.12, 0.09, 0.11, 0.095]
    assert wide.reason([(i, r, h) for i, (r, h) in enumerate(zip(rising[:4], noisy, strict=True))]) is None
    falling_too = [0.5, 0.45, 0.4, 0.35]  # both fall: a worse model, not an over-optimized one
    assert (
        run_stopper(
            TrialStopper(None, overoptimization=OVEROPTIMIZATION),
            "t",
            eval_results(falling_too, DIVERGING[1]),
        )
        is None
    )


def test_overoptimization_state_survives_a_restore_and_a_repeated_evaluation():
    stopper = TrialStopper(None, overoptimization=OVEROPTIMIZATION)
    results = eval_results(*DIVERGING)
    assert run_stopper(stopper, "t", results[:5]) is None  # evaluations at steps 0, 2, 4 seen
    restored = TrialStopper(None, overoptimization=OVEROPTIMIZATION)
    restored.set_state(stopper.get_state())  # what Tune does on Tuner.restore
    # the trial restarted from its step-2 checkpoint: it evaluates step 4 again (same value), then step 6
    again = [r for r in results if r["step"] >= 3]
    stopped = run_stopper(restored, "t", again)
    assert stopped is not None and stopped["step"] == 6
    assert sorted(restored.evaluations["t"]) == [0, 2, 4, 6]


# --- summary --------------------------------------------------------------------------------------------


def test_best_and_pareto_ignore_unfinished_trials():
    rows = [
        {"trial": "a", "completed": True, "x": 1.0, "y": 1.0},
        {"trial": "b", "completed": True, "x": 2.0, "y": 0.5},
        {"trial": "c", "completed": True, "x": 0.5, "y": 0.5},  # dominated by a
        {"trial": "d", "completed": False, "x": 9.0, "y": 9.0},  # collapsed: excluded
        {"trial": "e", "completed": True, "x": None, "y": 3.0},
    ]
    assert best_row(rows, "x", "max")["trial"] == "b"
    assert best_row(rows, "x", "min")["trial"] == "c"
    assert [r["trial"] for r in pareto_front(rows, ["x", "y"], ["max", "max"])] == ["a", "b"]


def test_table_shows_only_varying_fields(in_tmp):
    sweep = parse_sweep(changed("space/train.seed", {"grid": [0]}), in_tmp, env={})
    rows = [
        {
            "trial": "t1",
            "train.lr": 0.001,
            "train.seed": 0,
            "eval/reward": 0.25,
            "eval/diversity": 0.1,
            "step": 4,
            "status": "completed",
        },
        {
            "trial": "t2",
            "train.lr": 0.01,
            "train.seed": 0,
            "eval/reward": None,
            "eval/diversity": 0.01,
            "step": 2,
            "status": "collapse: ...",
        },
    ]
    header, first, second = format_table(rows, sweep).splitlines()
    assert header.split() == ["trial", "train.lr", "eval/reward", "eval/diversity", "step", "status"]
    assert first.split()[:3] == ["t1", "0.001", "0.25"] and second.split()[2] == "-"
    rows[1].update(status="error", error="ValueError: boom")
    assert format_table(rows, sweep).splitlines()[-1] == "t2 failed: ValueError: boom"


def test_an_interrupted_sweep_says_where_each_unfinished_trial_stopped(in_tmp, monkeypatch):
    """Ctrl-C on `sweep`: one line with each unfinished trial's last logged step and the checkpoint it
    resumes from (Train's checkpoint record stands in for a real one here), then the command."""
    from alignprop_ray import tracking
    from alignprop_ray.sweep import console
    from alignprop_ray.sweep.summary import SweepOutcome

    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    run_ids = {}
    for trial, steps in (("t1", 4), ("t2", 3), ("t3", 1)):
        run_ids[trial], _ = tracking.start_run(uri, "e", f"s-{trial}", {}, "")
        for step in range(1, steps + 1):
            tracking.RunLogger(uri, run_ids[trial]).log_metrics({"train/loss": 1.0}, step)
    checkpoints = {"s-t2": 2}  # t3 stopped before its first checkpoint
    monkeypatch.setattr(
        "alignprop_ray.train.launch.last_checkpoint_step",
        lambda storage, name: checkpoints.get(name) if storage == "/x/s/train_runs" else "wrong folder",
    )
    rows = [
        {"trial": "t1", "status": "completed", "run_id": run_ids["t1"]},
        {"trial": "t2", "status": "running", "run_id": run_ids["t2"]},
        {"trial": "t3", "status": "running", "run_id": run_ids["t3"]},
        {"trial": "t4", "status": "pending", "run_id": None},
        {"trial": "t5", "status": "pending", "run_id": None},
    ]
    outcome = SweepOutcome("s", "parent", uri, "/x/s", rows, None)
    assert outcome.interrupted
    assert console.where_trials_stopped(outcome, SimpleNamespace(name="s")) == (
        "trial t2 stopped after step 3, resumes from its checkpoint of step 2; "
        "trial t3 stopped after step 1, resumes from its start (no checkpoint yet); 2 trials not started"
    )


def test_the_sweep_rule_is_tune_select_else_not_collapsed(in_tmp):
    def rule(data) -> str:
        return str(parse_sweep(data, in_tmp, env={}).selection_rule)

    assert rule(SWEEP) == "eval/reward max; eval/diversity >= 0.5 x first"
    collapse = changed("stop/collapse", {"metric": "eval/vendi", "min_absolute": 1.2})
    assert rule(collapse) == "eval/reward max; eval/vendi >= 1.2"  # the collapse stopper's thresholds
    assert rule(changed("tune/select", [])) == "eval/reward max"  # the plain maximum, asked for
    listed = changed("tune/select", {"metric": "eval/vendi", "constraints": ["eval/reward >= first"]})
    assert rule(listed) == "eval/vendi max; eval/reward >= first"


def test_table_marks_the_trials_that_break_the_rule(in_tmp):
    from alignprop_ray.sweep.summary import choose, fronts

    sweep = parse_sweep(SWEEP, in_tmp, env={})
    rows = [
        {"trial": "t1", "train.lr": 0.001, "eval/reward": 0.1, "eval/diversity": 0.27, "step": 4},
        {"trial": "t2", "train.lr": 0.01, "eval/reward": 0.4, "eval/diversity": 0.02, "step": 4},
    ]
    for row in rows:
        row.update(status="completed", completed=True)
    firsts = {"t1": {"eval/diversity": 0.284}, "t2": {"eval/diversity": 0.284}}
    best, selection = choose(rows, sweep.selection_rule, firsts)
    assert best["trial"] == "t1" and selection.plain_best.id == "t2"
    header, first, second = format_table(rows, sweep).splitlines()
    assert header.split()[-2:] == ["status", "selection"]
    assert first.rstrip().endswith("completed")
    assert second.endswith("completed  collapsed: eval/diversity 0.020 < 0.142")
    assert {label: [r["trial"] for r in front] for label, front in fronts(rows, sweep).items()} == {
        "eval/reward, eval/diversity": ["t1", "t2"]  # the Pareto front keeps the trade-off, collapse and all
    }


def test_every_sweep_field_is_documented():
    from pydantic import BaseModel

    from alignprop_ray.sweep.config import SweepConfig

    def models(annotation):  # the pydantic models inside an annotation (Optional, list[...], unions)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield annotation
        for arg in typing.get_args(annotation):
            yield from models(arg)

    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            for sub in models(field.annotation):
                walk(sub, f"{prefix}{name}.")

    walk(SweepConfig)


# --- the local MLflow server in front of SQLite ---------------------------------------------------------


@pytest.mark.slow
def test_local_mlflow_server_serves_the_sqlite_store(tmp_path):
    from mlflow import MlflowClient

    from alignprop_ray import tracking
    from alignprop_ray.sweep.mlflow_server import local_server

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(store, "x")
    with local_server(store, tmp_path) as uri:
        assert uri.startswith("http://127.0.0.1:")
        run = MlflowClient(uri).create_run(experiment)
        MlflowClient(uri).log_metric(run.info.run_id, "m", 1.0)
        pids = [int(pid) for pid in _server_pids(store)]
        assert pids
    assert MlflowClient(store).get_run(run.info.run_id).data.metrics == {"m": 1.0}
    assert not any(_alive(pid) for pid in pids)


def _server_pids(store: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"backend-store-uri {store}"], capture_output=True, text=True)
    return out.stdout.split()


def _alive(pid: int) -> bool:
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    return True


# --- real sweeps on Ray ---------------------------------------------------------------------------------

# A trial that collapses and one that does not: `sharpness: -1` rewards flat, featureless images. At
# lr 0.3 the tiny model's within-prompt diversity falls from 0.14 to ~0.03 within 3 steps (measured);
# at lr 1e-4 it stays at 0.14.
COLLAPSE = tiny_sweep(
    {"train.lr": {"grid": [1e-4, 0.3]}},
    name="collapse",
    base={
        "reward": {"sharpness": -1.0},
        "train": {"steps": 5, "batch_size": 2, "eval_every": 1, "checkpoint_every": 5, "seed": 0},
        "scaling": {"resources_per_worker": {"CPU": 1}},
        "eval": {"base_fidelity": {"space": "pixels"}},
        "tracking": {"experiment": "collapse"},
        "failure": {"max_failures": 0},
    },
    stop={"collapse": {"min_relative_to_first": 0.5}},
)


def mlflow_runs(uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id], max_results=1000)


def steps_of(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture
def collapse_store(request, tmp_path) -> str:
    """Where the collapse sweep logs: the clusters' store, PostgreSQL behind an MLflow server of 2 workers
    (tests/stores.py), where PostgreSQL is installed (.ci/run requires it); else SQLite, which the sweep
    serves itself (as most other sweeps here)."""
    from tests.stores import find_postgres_bin, postgres_required

    if find_postgres_bin() is None and not postgres_required():
        return f"sqlite:///{tmp_path / 'mlflow.db'}"
    return request.getfixturevalue("postgres_mlflow")[0]


@pytest.mark.ray
def test_collapse_stopper_stops_the_collapsing_trial_only(ray_session, collapse_store, tmp_path):
    """Two trials at once; the one whose held-out diversity halves is stopped and never picked. Also the
    store's claim (tests/test_tracking_stores.py): both trials, logging at the same time, log every step
    once."""
    from alignprop_ray.sweep.launch import run_sweep

    uri = collapse_store
    sweep = parse_sweep(
        COLLAPSE, tmp_path, [f"tracking.uri={uri}", f"storage.path={tmp_path / 'runs'}"], env={}
    )
    outcome = run_sweep(sweep)
    assert outcome.exit_code == 0, outcome.rows
    by_lr = {row["train.lr"]: row for row in outcome.rows}
    assert by_lr[0.3]["status"].startswith("collapse: eval/diversity"), by_lr
    assert by_lr[0.3]["step"] < 5
    assert by_lr[1e-4]["status"] == "completed" and by_lr[1e-4]["step"] == 5
    assert outcome.best["train.lr"] == 1e-4  # a collapsed trial is never the best
    client, runs = mlflow_runs(uri, "collapse")
    children = {r.data.tags["alignprop.trial_id"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(runs) == 3 and len(children) == 2
    collapsed = children[by_lr[0.3]["trial"]]
    assert collapsed.data.tags["alignprop.stop_reason"].startswith("collapse:")
    assert collapsed.info.status == "KILLED"
    healthy = children[by_lr[1e-4]["trial"]]
    assert "alignprop.stop_reason" not in healthy.data.tags and healthy.info.status == "FINISHED"
    # the selection rule (stop.collapse's threshold) marks the collapsed trial in the table and in MLflow
    bound = f"{0.5 * first_value(client, collapsed, 'eval/diversity'):.3f}"
    assert by_lr[0.3]["selection"].startswith("collapsed: eval/diversity ") and by_lr[0.3][
        "selection"
    ].endswith(f" < {bound}")
    assert collapsed.data.tags["alignprop.excluded"] == by_lr[0.3]["selection"]
    assert by_lr[1e-4]["selection"] is None and "alignprop.excluded" not in healthy.data.tags
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["alignprop.select_rule"] == "eval/reward max; eval/diversity >= 0.5 x first"
    assert parent.data.tags["alignprop.best_run_id"] == healthy.info.run_id
    assert parent.data.tags["alignprop.selection"].startswith(f"best trial: {by_lr[1e-4]['trial']} ")
    # eval.base_fidelity: 1 at step 0 (the base model), lower once training changed the images; the step-0
    # reference travels with the checkpoint
    for child in (collapsed, healthy):
        assert first_value(client, child, "eval/base_fidelity") == pytest.approx(1.0, abs=1e-6)
    assert client.get_run(collapsed.info.run_id).data.metrics["eval/base_fidelity"] < 0.95
    assert list((tmp_path / "runs" / "collapse").rglob("base_fidelity_reference.pt"))
    # the two trials logged at the same time, each step once: the healthy one steps 1-5 and evaluations 0-5,
    # the stopped one from the start up to where it stopped
    first, second = sorted(children.values(), key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time, "the two trials did not run at the same time"
    for child, last, past in ((healthy, 5, 0), (collapsed, by_lr[0.3]["step"], 1)):
        histories = {key: steps_of(client, child.info.run_id, key) for key in child.data.metrics}
        train = {k: v for k, v in histories.items() if k.startswith("train/")}
        evals = {k: v for k, v in histories.items() if k.startswith("eval/")}
        assert "train/loss" in train and "eval/reward" in evals, sorted(histories)
        # a stopped trial may have taken `past` steps beyond the report that stopped it
        for steps in train.values():
            assert steps == list(range(1, len(steps) + 1)) and last <= len(steps) <= last + past, train
        for steps in evals.values():
            assert steps == list(range(len(steps))) and last + 1 <= len(steps) <= last + 1 + past, evals
    assert parent.info.status == "FINISHED"


def first_value(client, run, key: str) -> float:
    return min(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step).value
