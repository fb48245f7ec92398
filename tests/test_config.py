"""Experiment config: every shipped YAML loads, bad input is rejected one line per field, overrides and env."""

from __future__ import annotations

import copy
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

import alignprop_ray
from alignprop_ray import cli
from alignprop_ray.cli import cmd_validate
from alignprop_ray.config import (
    ExperimentConfig,
    apply_overrides,
    load_experiment,
    parse_experiment,
    read_yaml,
)
from alignprop_ray.config.experiment import tracking_uri_source
from alignprop_ray.engine.families.registry import family_row
from alignprop_ray.errors import ConfigError, UserError
from alignprop_ray.problems import section_model
from alignprop_ray.prompts import builtin_sets, load_prompts
from alignprop_ray.sweep.config import is_sweep

ROOT = Path(__file__).resolve().parents[1]
# Experiment files only: sweep files are validated in test_sweep.py, cluster files in test_clusters.py.
SHIPPED = sorted(p for p in (ROOT / "sweeps").glob("*.yaml") if not is_sweep(read_yaml(p)))

# A small valid experiment; each malformed case below breaks exactly one thing in it.
BASE = {
    "model": {"pretrained": "tiny", "resolution": 64},
    "sampling": {"steps": 10},
    "truncation": "uniform:0:10",
    "reward": {"saturation": 1.0},
    "prompts": {"train": "tiny", "eval": "tiny", "eval_seeds": 2},
    "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 2},
    "scaling": {"num_workers": 2, "use_gpu": False},
}


def with_change(dotted: str, value) -> dict:
    """BASE with one dotted key set (or removed, for value=DELETE)."""
    data = copy.deepcopy(BASE)
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return data


DELETE = object()


def problems_of(data: dict, base_dir: Path | None = None, overrides=(), env=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_experiment(data, base_dir, overrides, env={} if env is None else env)
    return info.value.problems


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in an empty cwd (relative outputs such as mlflow.db would land here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- shipped files -------------------------------------------------------------------------------------


def test_there_are_shipped_experiments():
    assert {"tiny.yaml", "sd15_aesthetic.yaml"} <= {p.name for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_experiment_loads(path, in_tmp, hub_reachable):
    cfg = load_experiment(path, env={})
    assert cfg.to_dict() == load_experiment(path, env={}).to_dict()
    yaml.safe_load(cfg.to_yaml())  # plain YAML-able


def test_base_is_valid(in_tmp):
    cfg = parse_experiment(BASE, env={})
    assert cfg.images_per_step == 2 * 2 * 1
    assert cfg.method.truncation.describe() == "uniform:0:10"


def test_defaults_follow_the_paper(in_tmp):
    cfg = parse_experiment({"reward": {"saturation": 1.0}}, env={})
    assert (cfg.train.lr, cfg.model.lora.rank, cfg.model.lora.alpha) == (1e-3, 4, 4.0)
    assert (cfg.sampling.steps, cfg.sampling.guidance_scale, cfg.sampling.eta) == (50, 7.5, 0.0)
    assert cfg.method.truncation.describe() == "uniform:0:50"  # default resolved against sampling.steps
    assert cfg.model.lora.target_modules is None  # the family's own: SD's attention projections
    assert family_row("sd").lora_targets == ("to_q", "to_k", "to_v", "to_out.0")
    assert cfg.tracking.uri == f"sqlite:///{in_tmp / 'mlflow.db'}"
    assert cfg.storage.path == str(in_tmp / "runs")


def test_the_update_defaults_are_the_paper_codes(in_tmp):
    """config/align_prop.py (mihirp1998/AlignProp a831a5f) `aesthetic`/`hps`: loss_coeff 0.01, clip 5.0,
    AdamW 1e-3, weight decay 0.1, eps 1e-8; the rest of the table is docs/fidelity.md (tests/test_fidelity.py)."""
    train = parse_experiment({"reward": {"saturation": 1.0}}, env={}).train
    assert (train.loss_scale, train.max_grad_norm) == (0.01, 5.0)
    assert (train.lr, train.weight_decay, train.adam_betas, train.adam_eps) == (1e-3, 0.1, (0.9, 0.999), 1e-8)
    assert parse_experiment({"reward": {"saturation": 1.0}}, env={}).method.k0 == "skip"


def test_heldout_rewards_and_the_diversity_space_are_eval_settings(in_tmp):
    cfg = parse_experiment(
        with_change(
            "eval",
            {
                "rewards": {
                    "jpeg_compressibility": {},  # not differentiable: fine for a held-out reward
                    "hpsv2": {"arch": "tiny"},
                    "clip_score": {"arch": "tiny"},
                    "clip_score.seed": 3,  # a dotted key, as a sweep sets it: a setting, not a weight
                },
                "diversity": {"space": "clip", "arch": "tiny"},
            },
        ),
        env={},
    )
    assert set(cfg.eval.rewards) == {"jpeg_compressibility", "hpsv2", "clip_score", "clip_score.seed"}
    assert parse_experiment(BASE, env={}).eval.diversity.space == "pixels"  # the default needs no weights
    params = cfg.flat_params()
    assert params["eval.diversity.space"] == "clip" and params["eval.rewards.hpsv2.arch"] == "tiny"


def test_k0_redraw_needs_a_distribution_that_draws_k_above_zero(in_tmp):
    data = with_change("train.k0", "redraw")
    assert parse_experiment(data, env={}).method.k0 == "redraw"
    data["truncation"] = "fixed:0"
    assert problems_of(data) == [
        "train.k0: fixed:0 draws K >= 1 with probability 0: redrawing K=0 would not end; use method.k0: skip "
        "or a distribution with K >= 1"
    ]


# --- AlignProp's truncation and k0 live under `method:`; their older keys stay -----------------------------


def test_the_older_keys_and_the_method_section_are_one_experiment(in_tmp, hub_reachable):
    older = with_change("train.k0", "redraw")  # and BASE's top-level truncation: uniform:0:10
    moved = with_change("truncation", DELETE)
    moved["method"] = {"name": "alignprop", "truncation": "uniform:0:10", "k0": "redraw"}
    cfg = parse_experiment(older, env={})
    assert cfg.to_dict() == parse_experiment(moved, env={}).to_dict()
    assert cfg.to_dict()["method"] == {"name": "alignprop", "truncation": "uniform:0:10", "k0": "redraw"}
    params = cfg.flat_params()  # the MLflow names stay, so runs logged before the move resume
    assert (params["truncation"], params["train.k0"]) == ("uniform:0:10", "redraw")
    assert not {"method.truncation", "method.k0"} & set(params)
    # --set either spelling over a file with either: the one set last counts
    assert parse_experiment(moved, overrides=["truncation=fixed:1"], env={}).method.truncation.k == 1
    assert parse_experiment(older, overrides=["method.truncation=fixed:2"], env={}).method.truncation.k == 2
    assert problems_of({**moved, "truncation": "fixed:3"}) == [
        "truncation: also set as method.truncation; keep one"
    ]
    # a problem is named as the user wrote the key
    assert problems_of(older, overrides=["truncation=fixed:11"])[0].startswith("truncation: K > T")
    assert problems_of(moved, overrides=["method.truncation=fixed:11"])[0].startswith(
        "method.truncation: K > T"
    )
    shipped = load_experiment(ROOT / "sweeps" / "paper_aesthetic.yaml", env={})  # top-level truncation, k0
    assert (shipped.method.truncation.describe(), shipped.method.k0) == ("uniform:0:50", "skip")


def test_a_run_logged_before_the_settings_moved_resumes(tmp_path):
    """Resume compares the run's logged params with the config's (train/launch.py): a run logged when
    `truncation` and `train.k0` were top-level keys resumes, and a changed truncation is still refused."""
    from mlflow import MlflowClient

    from alignprop_ray.train.launch import _check_same_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("before")).info.run_id
    before = {  # what 5598063 logged for BASE (ExperimentConfig.flat_params then)
        "method.name": "alignprop",
        "truncation": "uniform:0:10",
        "train.k0": "skip",
        "sampling.steps": "10",
        "train.lr": "0.001",
    }
    for key, value in before.items():
        client.log_param(run_id, key, value)
    data = {**BASE, "tracking": {"uri": uri}, "storage": {"path": str(tmp_path / "runs")}}
    _check_same_config(parse_experiment(data, env={}), run_id, "before")
    with pytest.raises(UserError, match=r"exists with truncation=uniform:0:10 \(now fixed:3\)"):
        _check_same_config(parse_experiment({**data, "truncation": "fixed:3"}, env={}), run_id, "before")


def test_every_field_is_documented():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            sub = section_model(field.annotation)
            if sub is not None:
                walk(sub, f"{prefix}{name}.")

    walk(ExperimentConfig)


# --- malformed configs: one line each, starting with the dotted field ---------------------------------

MALFORMED = [
    ("unknown key", with_change("train.lrr", 0.1), "train.lrr: unknown field; did you mean train.lr?"),
    ("unknown section", with_change("trian", {}), "trian: unknown field"),
    ("wrong type", with_change("train.steps", "ten"), "train.steps: input should be a valid integer"),
    ("bool for a number", with_change("train.batch_size", True), "train.batch_size: must be a number"),
    ("negative lr", with_change("train.lr", -0.001), "train.lr: must be > 0 (got -0.001)"),
    ("K > T", with_change("truncation", "fixed:11"), "truncation: K > T"),
    ("bad truncation", with_change("truncation", "triangle:3"), "truncation: unknown truncation"),
    ("empty reward", with_change("reward", {}), "reward: must name at least one reward term"),
    (
        "reward not a mapping",
        with_change("reward", "saturation"),
        "reward: input should be a valid dictionary",
    ),
    ("missing reward", with_change("reward", DELETE), "reward: required"),
    ("missing prompt file", with_change("prompts.eval", "nope.txt"), "prompts.eval: 'nope.txt' is neither"),
    (
        "missing model path",
        with_change("model.pretrained", "./no-such-model"),
        "model.pretrained: model directory",
    ),
    ("not a hub id", with_change("model.pretrained", "my model"), "model.pretrained: 'my model' is not"),
    ("num_workers 0", with_change("scaling.num_workers", 0), "scaling.num_workers: must be >= 1 (got 0)"),
    (
        "file store uri",
        with_change("tracking.uri", "mlruns"),
        "tracking.uri: 'mlruns' is an MLflow file store",
    ),
    (
        "file: uri",
        with_change("tracking.uri", "file:///tmp/mlruns"),
        "tracking.uri: 'file:///tmp/mlruns' is an",
    ),
    ("uri scheme", with_change("tracking.uri", "ftp://host/x"), "tracking.uri: unsupported scheme 'ftp'"),
    ("storage scheme", with_change("storage.path", "ftp://host/x"), "storage.path: unsupported scheme 'ftp'"),
    (
        "resolution",
        with_change("model.resolution", 100),
        "model.resolution: must be a multiple of 8 (got 100)",
    ),
    ("dtype", with_change("model.dtype", "fp8"), "model.dtype: must be one of 'float32', 'float16' or"),
    ("fp16 on CPU", with_change("model.dtype", "float16"), "model.dtype: float16 needs scaling.use_gpu"),
    (
        "GPU without use_gpu",
        with_change("scaling.resources_per_worker", {"GPU": 1}),
        "scaling.resources_per_worker:",
    ),
    (
        "accelerator without GPU",
        with_change("scaling.accelerator_type", "L40S"),
        "scaling.accelerator_type: L40S is a GPU type but scaling.use_gpu is false",
    ),
    ("eval_seeds 1", with_change("prompts.eval_seeds", 1), "prompts.eval_seeds: must be >= 2 (got 1)"),
    ("eval interval", with_change("train.eval_every", 0), "train.eval_every: must be >= 1 (got 0)"),
    ("lora rank", with_change("model.lora.rank", 0), "model.lora.rank: must be >= 1 (got 0)"),
    (
        "no targets",
        with_change("model.lora.target_modules", []),
        "model.lora.target_modules: list should have",
    ),
    ("eta", with_change("sampling.eta", 1.5), "sampling.eta: must be <= 1 (got 1.5)"),
    ("run name", with_change("name", "my run"), "name: string should match pattern"),
    ("loss scale", with_change("train.loss_scale", 0), "train.loss_scale: must be > 0 (got 0)"),
    ("adam eps", with_change("train.adam_eps", -1e-8), "train.adam_eps: must be > 0"),
    ("k0 policy", with_change("train.k0", "retry"), "train.k0: must be one of 'skip' or 'redraw'"),
    (
        "v2 index beyond T",
        with_change("truncation", "gaussian_index:42:5"),
        "truncation: gaussian_index:42:5 with T=10 steps: the detach index lands in 1..9 with probability",
    ),
    (
        "held-out training term",
        with_change("eval.rewards", {"saturation": {}}),
        "eval.rewards.saturation: is a training term",
    ),
    ("held-out weight", with_change("eval.rewards", {"contrast": 0.5}), "eval.rewards.contrast: a held-out"),
    (
        "held-out target",
        with_change("eval.rewards", {"contrast": {"target": 1.0}}),
        "eval.rewards.contrast.target: a held-out",
    ),
    ("held-out unknown", with_change("eval.rewards", {"nope": {}}), "eval.rewards.nope: unknown reward"),
    (
        "held-out setting",
        with_change("eval.rewards", {"hpsv2": {"arch": "tiny", "bogus": 1}}),
        "eval.rewards.hpsv2.bogus: unknown field",
    ),
    ("eval key", with_change("eval.reward", {}), "eval.reward: unknown field; did you mean eval.rewards?"),
    ("diversity space", with_change("eval.diversity.space", "clap"), "eval.diversity.space: must be one of"),
    (
        "diversity path in pixels",
        with_change("eval.diversity.path", "clip.safetensors"),
        "eval.diversity.path: only used with space: clip",
    ),
    ("diversity clip weights", with_change("eval.diversity.space", "clip"), "eval.diversity.path: required"),
]


@pytest.mark.parametrize("data, expected", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_config_is_rejected_with_one_line(data, expected, in_tmp):
    problems = problems_of(data)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems[0]
    assert "\n" not in problems[0]


def test_empty_prompt_file_is_rejected(in_tmp):
    (in_tmp / "empty.txt").write_text("# only a comment\n\n   \n")
    problems = problems_of(with_change("prompts.train", "empty.txt"))
    assert problems == [
        f"prompts.train: prompt file {in_tmp / 'empty.txt'} has no prompts "
        "(blank lines and # comments are ignored)"
    ]


def test_model_dir_without_model_index_is_rejected(in_tmp):
    (in_tmp / "org" / "model").mkdir(parents=True)  # exists locally, so a path, not a hub id
    problems = problems_of(with_change("model.pretrained", "org/model"))
    assert problems == [
        f"model.pretrained: {in_tmp / 'org' / 'model'} is not a diffusers pipeline directory "
        "(no model_index.json)"
    ]


def test_all_problems_are_reported_at_once(in_tmp):
    data = with_change("train.lr", -1.0)
    data["scaling"]["num_workers"] = 0
    data["tracking"] = {"uri": "mlruns"}
    data["sampling"]["steps"] = 5  # K > T with the base truncation uniform:0:10
    data["bogus"] = 1
    fields = [p.split(":")[0] for p in problems_of(data)]
    assert sorted(fields) == sorted(
        ["bogus", "train.lr", "scaling.num_workers", "tracking.uri", "truncation"]
    )


def test_unknown_reward_is_rejected_when_the_reward_library_exists(in_tmp, capsys):
    problems = problems_of(with_change("reward", {"no_such_reward": 1.0}))
    assert len(problems) == 1 and problems[0].startswith("reward.no_such_reward: "), problems
    path = write_yaml(in_tmp / "bad.yaml", with_change("reward", {"no_such_reward": 1.0}))
    assert cli.main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.startswith("alignprop-ray validate: error: reward.no_such_reward: ")


def test_reward_problems_come_from_the_reward_library(in_tmp, monkeypatch):
    seen = []

    def validate_reward_spec(spec, gradient_method=True):
        seen.append(spec)
        return ["reward.nope: unknown reward (valid: saturation)", "weights sum to zero"]

    fake = types.ModuleType("alignprop_ray.rewards")
    fake.validate_reward_spec = validate_reward_spec
    monkeypatch.setitem(sys.modules, "alignprop_ray.rewards", fake)
    problems = problems_of(with_change("reward", {"nope": 1.0}))
    assert seen == [{"nope": 1.0}]
    assert problems == ["reward.nope: unknown reward (valid: saturation)", "reward: weights sum to zero"]


# --- the CLI -------------------------------------------------------------------------------------------


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_validate_ok(in_tmp, capsys):
    path = write_yaml(in_tmp / "exp.yaml", BASE)
    assert cli.main(["validate", str(path)]) == 0
    assert capsys.readouterr().out == f"OK: {path} (experiment)\n"


@pytest.mark.parametrize(
    "data, expected", [c[1:] for c in MALFORMED[:12]], ids=[c[0] for c in MALFORMED[:12]]
)
def test_cli_validate_rejects_malformed(data, expected, in_tmp, capsys):
    path = write_yaml(in_tmp / "bad.yaml", data)
    assert cli.main(["validate", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"alignprop-ray validate: error: {expected}"), lines
    assert not (in_tmp / "mlflow.db").exists()


def test_cli_subprocess_exit_2_without_traceback(in_tmp):
    path = write_yaml(in_tmp / "bad.yaml", with_change("train.lr", -1e-3))
    run = subprocess.run(
        [sys.executable, "-m", "alignprop_ray.cli", "validate", str(path), "--set", "scaling.num_workers=0"],
        capture_output=True,
        text=True,
        cwd=in_tmp,
        timeout=60,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.splitlines() == [
        "alignprop-ray validate: error: train.lr: must be > 0 (got -0.001)",
        "alignprop-ray validate: error: scaling.num_workers: must be >= 1 (got 0)",
    ]
    assert list(in_tmp.iterdir()) == [path]  # no mlflow.db, no runs/


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model: [unclosed", "invalid YAML at line 1"),
        ("- a list\n", "the top level must be a mapping"),
        ("train: {lr: 1}\ntrain: {lr: 2}\n", "duplicate key 'train'"),
        ("a: &x {lr: 1}\nb: {<<: *x, lr: 2}\nb: 3\n", "duplicate key 'b'"),
    ],
)
def test_cli_bad_yaml_is_one_line(text, expected, in_tmp, capsys):
    path = in_tmp / "bad.yaml"
    path.write_text(text)
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_cli_missing_file(in_tmp, capsys):
    assert cli.main(["validate", "nope.yaml"]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err


def test_validate_reads_a_sweep_file_as_a_sweep(in_tmp, capsys):
    path = write_yaml(in_tmp / "sweep.yaml", {"base": BASE, "space": {"train.lr": {"grid": [1e-3, 1e-2]}}})
    assert cmd_validate(types.SimpleNamespace(config=str(path), overrides=["tune.num_samples=1"])) == 0
    assert capsys.readouterr().out == f"OK: {path} (sweep)\n"


# --- overrides and environment -------------------------------------------------------------------------


def test_set_overrides_parse_yaml_values(in_tmp):
    cfg = parse_experiment(
        BASE,
        overrides=[
            "train.lr=3e-4",
            "truncation=fixed:3",
            "reward.saturation=2.0",
            "model.lora.target_modules=[to_q, to_v]",
            "sampling.negative_prompt=blurry, ugly",
            "model.resolution=",
            "train.max_grad_norm=null",
        ],
        env={},
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.method.truncation.describe() == "fixed:3"
    assert cfg.reward == {"saturation": 2.0}
    assert cfg.model.lora.target_modules == ["to_q", "to_v"]
    assert cfg.sampling.negative_prompt == "blurry, ugly"
    assert cfg.model.resolution is None and cfg.train.max_grad_norm is None


def test_set_adds_a_reward_term_and_a_mapping_truncation(in_tmp):
    cfg = parse_experiment(
        BASE, overrides=["reward.contrast=0.5", "truncation={kind: normal, mean: 5, std: 2}"], env={}
    )
    assert cfg.reward == {"saturation": 1.0, "contrast": 0.5}
    assert cfg.flat_params()["truncation"] == "normal:5:2"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1", "train.lrr: unknown field (in --set train.lrr=1); did you mean train.lr?"),
        ("nosuch.x=1", "nosuch: unknown field (in --set nosuch.x=1)"),
        ("train.lr.x=1", "train.lr: is a value, not a section (in --set train.lr.x=1)"),
        ("train.lr", "--set train.lr: expected KEY=VALUE"),
        ("truncation.kind=full", "truncation: holds 'uniform:0:10', not a mapping"),
    ],
)
def test_bad_set_is_an_error_naming_it(override, expected, in_tmp):
    problems = problems_of(BASE, overrides=[override])
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_apply_overrides_is_pure_and_schema_optional():
    data = {"tune": {"num_samples": 2}}
    assert apply_overrides(data, ["tune.num_samples=4", "space.lr=[1, 2]"], schema=None) == {
        "tune": {"num_samples": 4},
        "space": {"lr": [1, 2]},
    }
    assert data == {"tune": {"num_samples": 2}}
    with pytest.raises(ConfigError, match="^tune: unknown field"):
        apply_overrides(data, ["tune.num_samples=4"])
    assert apply_overrides({}, ["train.lr=0.1"]) == {"train": {"lr": 0.1}}


def test_tracking_uri_precedence_set_file_ours_mlflows_default(in_tmp):
    ours, mlflows = (
        {"ALIGNPROP_TRACKING_URI": "http://ours:5000"},
        {"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
    )
    from_yaml = with_change("tracking", {"uri": "http://yaml:5000"})

    def uri(data, env, overrides=()):
        path = write_yaml(in_tmp / "exp.yaml", data)
        return parse_experiment(data, overrides=overrides, env=env).tracking.uri, tracking_uri_source(
            path, overrides, env
        )

    assert uri(BASE, {}) == (f"sqlite:///{in_tmp / 'mlflow.db'}", "the default")
    assert uri(BASE, mlflows) == ("http://mlflow:5000", "MLFLOW_TRACKING_URI")
    assert uri(BASE, {**mlflows, **ours}) == ("http://ours:5000", "ALIGNPROP_TRACKING_URI")
    assert uri(from_yaml, {**mlflows, **ours}) == ("http://yaml:5000", "the config file")
    assert uri(from_yaml, ours, ["tracking.uri=https://set"]) == ("https://set", "--set")


def test_storage_precedence_set_over_env_over_yaml_over_default(in_tmp):
    env = {"ALIGNPROP_STORAGE_PATH": "s3://bucket/env"}
    assert parse_experiment(BASE, env=env).storage.path == "s3://bucket/env"
    assert parse_experiment(BASE, env={"ALIGNPROP_STORAGE_PATH": "out"}).storage.path == str(in_tmp / "out")


def test_env_value_is_validated(in_tmp):
    problems = problems_of(BASE, env={"ALIGNPROP_TRACKING_URI": "./mlruns"})
    assert len(problems) == 1 and problems[0].startswith("tracking.uri: './mlruns' is an MLflow file store")


# --- paths ---------------------------------------------------------------------------------------------


def test_prompt_files_resolve_against_the_yaml_dir_then_cwd(in_tmp):
    exp_dir = in_tmp / "exp"
    exp_dir.mkdir()
    (exp_dir / "train.txt").write_text("# mine\na fox\n\na hen\n")
    (in_tmp / "eval.txt").write_text("a cow\n")
    path = write_yaml(exp_dir / "e.yaml", {**BASE, "prompts": {"train": "train.txt", "eval": "eval.txt"}})
    cfg = load_experiment(path, env={})
    assert cfg.prompts.train == str(exp_dir / "train.txt")
    assert cfg.prompts.eval == str(in_tmp / "eval.txt")
    assert load_prompts(cfg.prompts.train) == ["a fox", "a hen"]


def test_model_directory_and_hub_id(in_tmp):
    (in_tmp / "sd").mkdir()
    (in_tmp / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert parse_experiment(with_change("model.pretrained", "./sd"), env={}).model.pretrained == str(
        in_tmp / "sd"
    )
    hub = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert parse_experiment(with_change("model.pretrained", hub), env={}).model.pretrained == hub


def test_resolved_config_round_trips_without_the_files(in_tmp):
    (in_tmp / "p.txt").write_text("a cat\n")
    cfg = parse_experiment(with_change("prompts.train", "p.txt"), env={})
    (in_tmp / "p.txt").unlink()  # as on a remote worker
    again = parse_experiment(cfg.to_dict(), env={}, check_files=False)
    assert again == cfg
    assert ExperimentConfig.model_validate(cfg.to_dict()) == cfg


def test_flat_params_are_dotted_strings(in_tmp):
    params = parse_experiment(BASE, env={}).flat_params()
    assert all(isinstance(v, str) for v in params.values())
    assert params["train.lr"] == "0.001" and params["model.lora.rank"] == "4"
    assert params["truncation"] == "uniform:0:10" and params["reward.saturation"] == "1.0"
    assert params["model.lora.target_modules"] == "null"  # the family's default (LORA_TARGETS)


def test_yaml_reads_exponent_floats(in_tmp):
    path = in_tmp / "e.yaml"
    path.write_text(yaml.safe_dump(BASE) + "\n")
    path.write_text(path.read_text().replace("steps: 4", "steps: 4\n  lr: 1e-3\n  weight_decay: 1E-2"))
    cfg = load_experiment(path, env={})
    assert (cfg.train.lr, cfg.train.weight_decay) == (1e-3, 1e-2)


# --- prompt sets ---------------------------------------------------------------------------------------


def test_builtin_prompt_sets():
    assert {"animals", "eval_animals", "tiny"} <= set(builtin_sets())
    animals, held_out = load_prompts("animals"), load_prompts("eval_animals")
    assert len(animals) == len(set(animals)) == 45
    assert 10 <= len(held_out) == len(set(held_out)) and not set(animals) & set(held_out)
    assert len(load_prompts("tiny")) == 4


def test_prompt_file_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(UserError, match="has no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match="missing.txt: no such prompt file"):
        load_prompts(str(tmp_path / "missing.txt"))


# --- speed ---------------------------------------------------------------------------------------------


def test_config_does_not_import_heavy_frameworks():
    code = (
        "import sys; import alignprop_ray.config as c; "
        "heavy = [m for m in ('torch', 'ray', 'mlflow') if m in sys.modules]; "
        "c.load_experiment('sweeps/tiny.yaml', env={}); "
        "late = [m for m in ('ray', 'mlflow') if m in sys.modules]; "
        "print(heavy, late)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[] []"


def test_help_describes_the_tool_and_its_first_steps(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "Fine-tune text-to-image diffusion models" in out and "module" not in out.split("\n\n")[1]
    assert "first steps:" in out and "alignprop-ray demo" in out
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"alignprop-ray {alignprop_ray.__version__}"


def test_report_uses_mlflows_own_variable_after_ours(monkeypatch):
    from alignprop_ray.report.data import resolve_uri

    monkeypatch.delenv("ALIGNPROP_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_uri(None) == "http://mlflow:5000"
    monkeypatch.setenv("ALIGNPROP_TRACKING_URI", "http://ours:5000")
    assert resolve_uri(None) == "http://ours:5000" and resolve_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_a_sweep_may_run_fewer_steps_than_its_intervals():
    from alignprop_ray.sweep.config import load_sweep

    sweep = load_sweep(ROOT / "sweeps" / "smoke.yaml", ["base.train.steps=2"])
    assert sweep.reference.train.steps == 2 < sweep.reference.train.eval_every


def test_validate_imports_no_torch():
    files = [str(ROOT / "sweeps" / name) for name in ("tiny.yaml", "smoke.yaml")]
    code = (
        "import sys; from alignprop_ray.cli import main; "
        f"codes = [main(['validate', f]) for f in {files!r}]; "
        "print(codes, [m for m in ('torch', 'ray', 'mlflow') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "[0, 0] []"


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"train.warmup_steps": 2}, "train.warmup_steps: only used with lr_schedule linear_warmup or cosine"),
        (
            {"train.lr_schedule": "cosine", "train.warmup_steps": 4},
            "train.warmup_steps: 4 is not below train.steps (4)",
        ),
        ({"train.lr_schedule": "step"}, "train.lr_schedule: must be one of"),
    ],
)
def test_lr_schedule_settings_are_checked(changes, expected, in_tmp):
    problems = problems_of(BASE, overrides=[f"{key}={value}" for key, value in changes.items()])
    assert len(problems) == 1 and problems[0].startswith(expected), problems
