"""The comparison protocol (`alignprop-ray compare`, sweep/protocol.py and sweep/compare.py) and the spread the
report shows beside each of its figures (report/spread.py, report/compare.py).

Unit tests: the spread and band math, the pick (the sweep's constrained selection, not the plain maximum), the
rounds a comparison file becomes, the shipped comparison files. Marked ray: one protocol run end to end on the
tiny model (2 methods, 2 lr scales, 2 seeds), interrupted after its first round and continued, shared by every
assertion about it.
"""

from __future__ import annotations

import contextlib
import io
import math
import statistics
from pathlib import Path

import pytest
import yaml

from alignprop_ray import cli
from alignprop_ray.config import read_yaml
from alignprop_ray.report.spread import INTERVAL, RANGE, band, spread, t_975
from alignprop_ray.selection import SelectionRule, default_constraints, select
from alignprop_ray.sweep.protocol import is_comparison, load_comparison, parse_comparison

ROOT = Path(__file__).resolve().parents[1]
COMPARISONS = sorted(p for p in (ROOT / "sweeps").glob("*.yaml") if is_comparison(read_yaml(p)))

TINY_COMPARISON = {
    "name": "tiny-compare",
    "base": {
        "model": {"pretrained": "tiny", "resolution": 32},
        "sampling": {"steps": 4},
        "reward": {"saturation": 1.0},
        "prompts": {"train": "tiny", "eval": "tiny", "eval_seeds": 2},
        # a time budget the 4 steps end first: the rounds, not equal seconds, are under test here
        "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 4, "max_wall_seconds": 600},
        "scaling": {"num_workers": 1, "use_gpu": False},
        "tracking": {"experiment": "tiny-compare"},
    },
    # lr scale 300 x AlignProp's 1e-3 collapses the tiny model within a few steps (test_sweep's collapse sweep)
    "compare": {"methods": ["alignprop", {"name": "draft", "k": 1}], "lr_scales": [1, 300], "seeds": [0, 1]},
    "tune": {"max_concurrent_trials": 2},  # the two scales of a method at once: 2 CPUs, 1 worker each
}


# --- the spread -----------------------------------------------------------------------------------------


def test_the_spread_is_the_range_below_five_seeds_and_the_95_percent_interval_from_five():
    three = spread([0.31, None, 0.35, math.nan, 0.29])  # None and NaN are no value
    assert (three.n, three.kind, three.low, three.high) == (3, RANGE, 0.29, 0.35)
    assert three.mean == pytest.approx(0.95 / 3)
    assert three.format(".2f") == "0.32 [0.29, 0.35]"
    five = spread([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764 * statistics.stdev([1, 2, 3, 4, 5]) / math.sqrt(5)  # t(0.975, 4) by hand: 1.9632
    assert five.kind == INTERVAL and five.mean == 3.0
    assert (five.low, five.high) == (pytest.approx(3 - half), pytest.approx(3 + half))
    assert spread([]).format() == "-" and spread([0.5]).format() == "0.500"


def test_t_quantiles_are_students():
    stats = pytest.importorskip("scipy.stats")
    for df in [*range(1, 40), 50, 100, 1000]:
        assert t_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4), df


def test_the_band_runs_through_every_curves_points_up_to_the_first_curve_to_stop():
    a = ([0.0, 10.0, 20.0, 30.0], [0.0, 1.0, 2.0, 3.0])  # y = x / 10
    b = ([0.0, 15.0, 25.0], [0.0, 3.0, 5.0])  # y = x / 5, stops first
    found = band([a, b])
    assert found["x"].tolist() == [0.0, 10.0, 15.0, 20.0, 25.0]
    at_15 = found[found["x"] == 15.0].iloc[0]  # a between its points: 1.5; b at its own: 3
    assert (at_15["low"], at_15["high"], at_15["mean"], at_15["n"]) == (1.5, 3.0, 2.25, 2)
    assert set(found["kind"]) == {RANGE}
    assert band([]).empty


def test_the_time_to_a_target_is_the_first_evaluation_at_or_above_it():
    import pandas as pd

    from alignprop_ray.report.compare import first_reaching

    rows = [("a", "perf/wall_seconds", step, 10.0 * step) for step in range(1, 7)]
    rows += [("a", "eval/reward", step, r) for step, r in [(0, 0.1), (2, 0.25), (4, 0.2), (6, 0.4)]]
    history = pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])
    assert first_reaching(history, "a", "perf/wall_seconds", 0.25) == 20.0  # step 2, not the dip after it
    assert first_reaching(history, "a", "perf/wall_seconds", 0.1) == 0.0  # the base model: no cost yet
    assert math.isnan(first_reaching(history, "a", "perf/wall_seconds", 0.5))


# --- the pick and the rounds --------------------------------------------------------------------------------


def test_the_pick_is_the_sweeps_selection_not_the_highest_reward():
    """A scale whose trial collapsed (diversity below half its first value) is not picked, however high its
    reward: the pick is `selection.select` under the sweep's rule, here the default."""
    from alignprop_ray.sweep.compare import pick_scale
    from alignprop_ray.sweep.summary import SweepOutcome, choose

    finals = {0.5: (0.10, 0.20), 1.0: (0.25, 0.15), 2.0: (0.40, 0.05)}  # scale: (reward, diversity)
    rows = [
        {"trial": f"t{i}", "train.lr_scale": s, "eval/reward": r, "eval/diversity": d, "completed": True}
        for i, (s, (r, d)) in enumerate(finals.items())
    ]
    rule = SelectionRule("eval/reward", "max", default_constraints())
    firsts = {row["trial"]: {"eval/diversity": 0.2} for row in rows}
    best, selection = choose(rows, rule, firsts)
    pick = pick_scale("alignprop", SweepOutcome("s", "p", "u", "x", rows, best, selection=selection))
    assert pick.scale == 1.0 and not pick.fallback
    assert "not t2" in pick.why[-1] and "collapsed: eval/diversity 0.050 < 0.100" in pick.why[-1]
    # every scale collapsed: the one that misses the rule least, said so
    rows[1]["eval/diversity"] = 0.08
    rows[0]["eval/diversity"] = 0.02
    best, selection = choose(rows, rule, firsts)
    pick = pick_scale("alignprop", SweepOutcome("s", "p", "u", "x", rows, best, selection=selection))
    assert pick.scale == 1.0 and pick.fallback


def test_a_comparison_is_one_sweep_per_method_and_round(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(TINY_COMPARISON))
    data["compare"]["methods"][1] = {"method": {"name": "draft", "k": 1}, "set": {"train.grad_accum": 2}}
    data["compare"]["set"] = {"sampling.eta": 0.5}
    data["compare"]["seeds"] = [7, 8, 9]
    comparison = parse_comparison(data, tmp_path, [f"storage.path={tmp_path}"], env={})
    assert comparison.labels == ["alignprop", "draft-K1"]
    select = comparison.selection_sweep(1)
    space = {d.field: list(d.values) for d in select.domains}
    assert select.name == "tiny-compare-select-draft-K1"
    assert space == {
        "method": [{"name": "draft", "k": 1}],
        "train.lr_scale": [1.0, 300.0],
        "train.seed": [7],
        "sampling.eta": [0.5],
        "train.grad_accum": [2],
    }
    seeds = comparison.seeds_sweep(1, 300.0)
    space = {d.field: list(d.values) for d in seeds.domains}
    assert seeds.name == "tiny-compare-seeds-draft-K1"
    assert (space["train.lr_scale"], space["train.seed"]) == (
        [300.0],
        [8, 9],
    )  # seed 7: the selection trial's
    # the other method's rounds do not take draft's own setting; both take the shared one
    other = {d.field: list(d.values) for d in comparison.seeds_sweep(0, 1.0).domains}
    assert "train.grad_accum" not in other and other["sampling.eta"] == [0.5]
    # each round is a grid run once, whatever the file's tune section says of its objective
    assert (select.config.tune.algorithm, select.config.tune.num_samples) == ("grid", 1)
    assert select.config.tune.max_concurrent_trials == 2


def test_the_shipped_comparisons_validate(hub_reachable, tmp_path, capsys):
    assert {p.name for p in COMPARISONS} == {"methods.yaml", "methods_sd15.yaml", "methods_flow.yaml"}
    loaded = {}
    for path in COMPARISONS:
        overrides = []
        if path.name == "methods_flow.yaml" and not (ROOT / "models" / "toy-shapes-sd3").is_dir():
            from alignprop_ray.engine.models import save_tiny_model

            tiny_sd3 = save_tiny_model(tmp_path / "sd3", family="sd3")  # until the toy sd3 model is committed
            overrides = [f"base.model.pretrained={tiny_sd3}"]
        comparison = loaded[path.name] = load_comparison(path, overrides, env={})
        assert comparison.scales == [0.5, 1.0, 2.0] and len(comparison.seeds) >= 3
        budgets = {comparison.selection_sweep(i).reference.train.max_wall_seconds for i in range(3)}
        assert len(budgets) == 1 and None not in budgets, path.name
    assert cli.main(["validate", str(ROOT / "sweeps" / "methods.yaml")]) == 0
    assert capsys.readouterr().out.strip() == f"OK: {ROOT / 'sweeps' / 'methods.yaml'} (comparison)"
    methods = loaded["methods.yaml"]
    assert methods.labels == ["alignprop", "draft-K1", "draft-LV2", "refl", "ddpo"]
    assert methods.selection_sweep(0).reference.train.max_wall_seconds == 30  # docs/methods.md says so
    gpu = loaded["methods_sd15.yaml"]
    ddpo = gpu.selection_sweep(gpu.labels.index("ddpo")).reference
    # DDPO's reference images per update (ddpo-pytorch config/dgx.py: 64) and 4 updates per round
    images = ddpo.scaling.num_workers * ddpo.train.batch_size * ddpo.train.grad_accum
    assert (images, ddpo.method.updates_per_round) == (64, 4)
    assert loaded["methods_flow.yaml"].labels == ["flow_grpo", "alignprop", "draft-K1"]


# --- the protocol end to end (Ray) --------------------------------------------------------------------------


def _main(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def protocol_run(ray_session, tmp_path_factory):
    """The tiny comparison: stopped (Ctrl-C) once its first round has finished, continued, then run a third
    time when everything has finished; then its report. About 4 minutes on the 2-core box: 4 sweeps of Ray
    Train trials inside Tune, each trial starting 5 actors (about 45 s on the loaded box), for 1 s of training."""
    import mlflow

    from alignprop_ray.sweep import compare

    tmp = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    data = yaml.safe_load(yaml.safe_dump(TINY_COMPARISON))
    data["base"]["tracking"]["uri"] = uri
    data["base"]["storage"] = {"path": str(tmp / "runs")}
    path = tmp / "compare.yaml"
    path.write_text(yaml.safe_dump(data))

    real, rounds = compare.run_round, []

    def interrupted_after_one(sweep, say):
        rounds.append(sweep.name)
        if len(rounds) == 2:
            raise KeyboardInterrupt
        return real(sweep, say)

    compare.run_round = interrupted_after_one
    try:
        first = _main(["compare", str(path)])
    finally:
        compare.run_round = real
    second = _main(["compare", str(path)])
    runs_after_second = len(mlflow.MlflowClient(uri).search_runs([_experiment_id(uri)]))
    third = _main(["compare", str(path)])
    report = tmp / "report"
    fourth = _main(
        [
            "report",
            "--tracking-uri",
            uri,
            "--experiment",
            "tiny-compare",
            "--out",
            str(report),
            "--target",
            "0.2",
        ]
    )
    return {
        "uri": uri,
        "outputs": [first, second, third, fourth],
        "runs_after_second": runs_after_second,
        "report": report,
    }


def _experiment_id(uri: str) -> str:
    import mlflow

    return mlflow.MlflowClient(uri).get_experiment_by_name("tiny-compare").experiment_id


def _runs(uri: str) -> list:
    import mlflow

    return mlflow.MlflowClient(uri).search_runs([_experiment_id(uri)], max_results=1000)


@pytest.mark.ray
def test_the_selection_round_picks_a_scale_and_the_seeds_round_runs_only_at_it(protocol_run):
    from alignprop_ray.report.data import load_runs, trial_results

    uri = protocol_run["uri"]
    runs, history = load_runs(uri, "tiny-compare")
    results = trial_results(runs, history)
    rule = SelectionRule("eval/reward", "max", default_constraints())
    parents = {r.data.tags["alignprop.name"]: r for r in _runs(uri) if "alignprop.kind" in r.data.tags}
    for label in ("alignprop", "draft-K1"):
        mine = runs[runs["compare_method"] == label]
        selection = mine[mine["compare_round"] == "select"]
        assert sorted(selection["params.train.lr_scale"].astype(float)) == [1.0, 300.0]
        assert set(selection["params.train.seed"]) == {"0"}
        # the pick, recomputed from MLflow with the selection rule: the scale of the best kept trial
        chosen = select([results[r] for r in selection["run_id"]], rule).best
        picked = float(selection[selection["name"] == chosen.id]["params.train.lr_scale"].iloc[0])
        assert (
            parents[f"tiny-compare-select-{label}"].data.tags["alignprop.compare.lr_scale"] == f"{picked:g}"
        )
        seeds_round = mine[mine["compare_round"] == "seeds"]
        assert len(seeds_round) == 1 and seeds_round["params.train.seed"].tolist() == ["1"]
        assert seeds_round["params.train.lr_scale"].astype(float).tolist() == [picked]  # only at the pick
        final = mine[mine["compare_final"]]
        assert sorted(final["params.train.seed"]) == ["0", "1"]
        assert set(final["params.train.lr_scale"].astype(float)) == {picked}
        assert (final["status"] == "FINISHED").all()
    assert len(runs) == 2 * (2 + 1)  # no trial ran twice


@pytest.mark.ray
def test_a_rerun_continues_where_the_comparison_stopped_and_redoes_no_finished_round(protocol_run):
    (first, first_out), (second, second_out), (third, third_out), _ = protocol_run["outputs"]
    assert first == 130
    assert "finished earlier, not run again" not in first_out
    # the second run reads the finished first round back and runs the other three
    assert second == 0, second_out
    assert second_out.count("finished earlier, not run again") == 1
    assert "# sweep tiny-compare-select-alignprop: finished earlier" in second_out
    # the third finds everything done: no trial, no run added
    assert third == 0 and third_out.count("finished earlier, not run again") == 4
    assert len(_runs(protocol_run["uri"])) == protocol_run["runs_after_second"]
    assert "alignprop: lr_scale " in third_out and "draft-K1: lr_scale " in third_out


@pytest.mark.ray
def test_the_report_draws_each_methods_seeds_as_a_band_and_tables_every_figure_with_its_spread(protocol_run):
    code, out = protocol_run["outputs"][3]
    report = protocol_run["report"]
    assert code == 0
    assert (report / "reward_vs_time.png").is_file() and (report / "reward_vs_images.png").is_file()
    table = (report / "comparison.md").read_text()
    assert table in out  # the command prints it too
    methods_table = table.split("The selection round")[0]
    rows = {
        line.split(" | ")[0].strip("| "): line for line in methods_table.splitlines() if line.startswith("| ")
    }
    header = methods_table.splitlines()[2].split(" | ")
    figures = header[header.index("base eval/reward") : header.index("reached 0.2")]
    assert {"final eval/reward", "eval/reward gain", "training seconds", "images generated"} <= set(figures)
    for label in ("alignprop", "draft-K1"):
        cells = dict(zip(header, rows[label].split(" | "), strict=True))
        assert cells["seeds"] == "0, 1" and cells["spread"] == RANGE  # the spread of 2 seeds: their range
        assert all(cells[f].count("[") == 1 for f in figures), rows[label]  # each: mean [min, max]
        # --target: the base model already scores above 0.2 on the tiny model: every run reached it at 0 s
        assert cells["reached 0.2"] == "2/2" and cells["seconds to 0.2"].startswith("0.0 [")
    assert "The selection round" in table and "| yes |" in table
    page = (report / "index.html").read_text()
    assert "Comparison: each method at its picked lr scale" in page
