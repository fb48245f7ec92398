"""Paper fidelity (docs/fidelity.md): the default update is the official code's update, the paper presets
are the official configs, and both run on the tiny model with held-out rewards and the diversity metrics
reaching MLflow and the report.

The official code is github.com/mihirp1998/AlignProp: config/align_prop.py at commit a831a5f (cited as
align_prop.py:LINE) and main.py at commit 185d154 (main.py:LINE).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from alignprop_ray.config import load_experiment
from tests.helpers import TRAIN_PROMPTS, engine_defaults, tiny_run

ROOT = Path(__file__).resolve().parents[1]

# The official aesthetic run's optimizer (config/align_prop.py, `aesthetic` and `general`).
OFFICIAL_LR = 1e-3  # align_prop.py:115
OFFICIAL_BETAS = (0.9, 0.999)  # align_prop.py:61-63
OFFICIAL_WEIGHT_DECAY = 0.1  # align_prop.py:117
OFFICIAL_EPS = 1e-8  # align_prop.py:67
OFFICIAL_MAX_GRAD_NORM = 5.0  # align_prop.py:113
OFFICIAL_LOSS_COEFF = 0.01  # align_prop.py:114
AESTHETIC_TARGET = 10.0  # align_prop.py:70


# --- the update ------------------------------------------------------------------------------------------

# The official `grad_scale` (align_prop.py:71 sets 1). The tiny model's gradient is about 1e-4 of a real
# one; this scale moves it to where the clip acts: the gradient of 0.01 x loss measured 2.25, 1.00, 0.01 and
# 8.43 over the steps below, so the official clip at 5 both passes and cuts it (the test checks both).
GRAD_SCALE = 7e6
UPDATE_STEPS = 4
# Parameters agree to within 0.1% of one Adam step (lr): float32 (ours) against float64 (the reference).
UPDATE_ATOL = 1e-3 * OFFICIAL_LR


def official_gradients(learner, scorer, batches, ks) -> list[torch.Tensor]:
    """The gradient the official code accumulates for one optimizer step, at the learner's parameters.

    Per micro-batch (main.py:495-504, 520): images decoded from the chain whose last K steps carry
    gradient; loss = |r - target| x grad_scale (main.py:107-108), summed over the batch, divided by its size,
    times loss_coeff; `accelerator.backward` divides by the accumulation steps.
    """
    from alignprop_ray.engine.sampler import generate

    for p in learner.params:
        p.grad = None
    for batch, k in zip(batches, ks, strict=True):
        images = generate(
            learner.parts, batch.prompts, batch.seeds, learner.sampler, k=k, resolution=learner.resolution
        )
        rewards = scorer(images, batch.prompts)
        loss = (rewards - AESTHETIC_TARGET).abs() * GRAD_SCALE
        loss = loss.sum() / len(batch.prompts) * OFFICIAL_LOSS_COEFF
        (loss / len(batches)).backward()
    return [p.grad.detach().double().clone() for p in learner.params]


def adamw_step(params: list[torch.Tensor], optimizer, grads: list[torch.Tensor], max_norm: float) -> float:
    """main.py:520-524 after backward: clip_grad_norm_ (when gradients sync), optimizer.step(); the norm."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    optimizer.step()
    return norm


@pytest.mark.slow
def test_the_default_update_is_the_official_update(one_thread):
    """Our learner with the default config against main.py's update written out here, step by step on the
    same gradients: loss x 0.01, clip at 5, AdamW (lr 1e-3, betas, weight decay 0.1, eps 1e-8) in float64.
    A control applies the update this project made before train.loss_scale (the loss unscaled, clip at 5):
    it must move away from the official one, or the gradients never reached the clip and the test is void."""
    from alignprop_ray.engine.lora import attach_lora
    from alignprop_ray.engine.models import load_parts
    from alignprop_ray.engine.step import Learner, plan_step
    from alignprop_ray.engine.truncation import parse_truncation
    from alignprop_ray.rewards.mixture import build_reward

    defaults = engine_defaults()  # an experiment that sets nothing
    lora, sampler, optim = defaults.lora, defaults.sampler, defaults.optim
    assert (optim.lr, optim.betas, optim.weight_decay, optim.eps) == (
        OFFICIAL_LR,
        OFFICIAL_BETAS,
        OFFICIAL_WEIGHT_DECAY,
        OFFICIAL_EPS,
    )
    assert (optim.loss_scale, optim.max_grad_norm) == (OFFICIAL_LOSS_COEFF, OFFICIAL_MAX_GRAD_NORM)
    spec = {"aesthetic": {"arch": "tiny", "target": AESTHETIC_TARGET, "weight": GRAD_SCALE}}
    reward = build_reward(spec, device="cpu", dtype=torch.float32)
    parts = load_parts("tiny")
    params = attach_lora(parts.denoiser, lora)
    # a short chain at 32 px: the sampler does not enter the update rule
    learner = Learner(parts, params, reward, dataclasses.replace(sampler, steps=4), optim, 32)

    def reference() -> tuple[list[torch.Tensor], torch.optim.AdamW]:
        copy = [p.detach().double().clone().requires_grad_() for p in params]
        return copy, torch.optim.AdamW(
            copy, lr=OFFICIAL_LR, betas=OFFICIAL_BETAS, weight_decay=OFFICIAL_WEIGHT_DECAY, eps=OFFICIAL_EPS
        )

    (official, official_opt), (control, control_opt) = reference(), reference()
    norms, worst, control_gap = [], 0.0, 0.0
    for step in range(UPDATE_STEPS):
        batches, ks = plan_step(
            TRAIN_PROMPTS, parse_truncation("uniform:1:4"), 4, step=step, seed=0, batch_size=2, grad_accum=2
        )
        grads = official_gradients(learner, reward.rewards["aesthetic"], batches, ks)
        norms.append(adamw_step(official, official_opt, grads, OFFICIAL_MAX_GRAD_NORM))
        adamw_step(control, control_opt, [g / OFFICIAL_LOSS_COEFF for g in grads], OFFICIAL_MAX_GRAD_NORM)
        result = learner.train_step(batches, ks)
        assert result.updated and result.grad_norm == pytest.approx(norms[-1], rel=1e-4)
        assert result.loss == pytest.approx(-result.reward)  # train/loss: the unscaled objective
        worst = max(
            worst,
            *(float((p.double() - q).detach().abs().max()) for p, q in zip(params, official, strict=True)),
        )
        control_gap = max(
            control_gap,
            *(float((c - q).detach().abs().max()) for c, q in zip(control, official, strict=True)),
        )
    print(
        f"gradient norms of 0.01 x loss: {[f'{n:.2f}' for n in norms]}; largest parameter difference "
        f"{worst:.2e} (tolerance {UPDATE_ATOL:.0e}); the unscaled-loss control differs by {control_gap:.2e}"
    )
    assert min(norms) < OFFICIAL_MAX_GRAD_NORM < max(norms)  # both sides of the clip were taken
    assert worst <= UPDATE_ATOL
    assert control_gap > 10 * UPDATE_ATOL


# --- the paper presets -------------------------------------------------------------------------------

# (preset, dotted field) -> the official value, with where it is set. Read from the configs below.
OFFICIAL_PRESET_VALUES = {
    "sampling.steps": 50,  # align_prop.py:73
    "sampling.eta": 0.0,  # main.py:493: scheduler.step without eta
    "sampling.guidance_scale": 7.5,  # align_prop.py:72
    "train.lr": OFFICIAL_LR,  # align_prop.py:115 (aesthetic), :168 (hps)
    "train.weight_decay": OFFICIAL_WEIGHT_DECAY,  # :117, :169
    "train.adam_betas": OFFICIAL_BETAS,  # :61-63
    "train.adam_eps": OFFICIAL_EPS,  # :67
    "train.loss_scale": OFFICIAL_LOSS_COEFF,  # :114, :167
    "train.max_grad_norm": OFFICIAL_MAX_GRAD_NORM,  # :113, :166
    "train.seed": 42,  # :33
    "model.lora.rank": 4,  # main.py:256: LoRAAttnProcessor's default rank
    "model.lora.alpha": 4.0,  # no alpha there: update scale 1
    "model.dtype": "float16",  # align_prop.py:25: mixed_precision fp16
    "model.gradient_checkpointing": True,  # :49
    "method.truncation": "uniform:0:50",  # :122-123, :173-174: truncated_backprop_rand, minmax (0, 50)
}


def field(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value.describe() if dotted == "method.truncation" else value


@pytest.mark.parametrize("name", ["paper_aesthetic", "paper_hps"])
def test_paper_presets_are_the_official_configs(name, hub_reachable):
    cfg = load_experiment(ROOT / "sweeps" / f"{name}.yaml", env={})
    for dotted, official in OFFICIAL_PRESET_VALUES.items():
        got = field(cfg, dotted)
        assert (tuple(got) if isinstance(got, list | tuple) else got) == official, dotted
    # set_config_batch(total_batch_size=128, per_gpu_capacity=4) on 4 GPUs (align_prop.py:126, :175, :96-99)
    assert (cfg.scaling.num_workers, cfg.train.batch_size, cfg.train.grad_accum) == (4, 4, 8)
    assert cfg.images_per_step == 128
    # 256 samples per epoch / 128 per step = 2 optimizer steps per epoch; 7 epochs (:120), 200 (:158)
    assert cfg.train.steps == {"paper_aesthetic": 7, "paper_hps": 200}[name] * 2
    if name == "paper_aesthetic":  # |r - 10| x 1 (main.py:107-108, align_prop.py:70-71)
        term = cfg.reward["aesthetic"]
        assert (term["objective"], term["target"]) == ("target", AESTHETIC_TARGET)
    else:  # HPS v2.0 weights (main.py:58), maximized (loss 1 - score, main.py:80)
        assert cfg.reward["hpsv2"]["path"].endswith("/HPS_v2_compressed.pt")
        assert "weight" not in cfg.reward["hpsv2"] and "objective" not in cfg.reward["hpsv2"]
    assert cfg.eval.rewards and cfg.eval.diversity.space == "clip"


# Down to the offline tiny model on CPU; every other setting is the preset's (docs/fidelity.md).
def tiny_overrides(tmp: Path) -> list[str]:
    return tiny_run(
        tmp,
        "model.pretrained=tiny",
        "model.resolution=32",
        "model.dtype=float32",
        "scaling.use_gpu=false",
        "scaling.accelerator_type=null",
        "scaling.num_workers=2",
        "scaling.resources_per_worker={CPU: 1}",
        "sampling.steps=4",
        "truncation=uniform:0:4",
        "train.steps=2",
        "train.batch_size=1",
        "train.grad_accum=2",
        "prompts.train=tiny",
        "prompts.eval=tiny",
        "prompts.eval_seeds=2",
        "eval.diversity={space: clip, arch: tiny}",
        # compiling takes minutes per process on CPU; the presets' compile is checked by make gpu-check
        # (--smoke in tests/test_gpu_check.py), their activation budget here
        "model.compile=false",
    )


TINY_REWARDS = {
    "paper_aesthetic": [
        "reward={aesthetic: {arch: tiny, target: 10.0}}",
        "eval.rewards={hpsv2: {arch: tiny}, clip_score: {arch: tiny}}",
    ],
    "paper_hps": [
        "reward={hpsv2: {arch: tiny}}",
        "eval.rewards={aesthetic: {arch: tiny}, clip_score: {arch: tiny}}",
    ],
}


def test_paper_presets_validate_down_to_the_tiny_model_without_torch(tmp_path):
    import subprocess
    import sys

    runs = {
        name: [
            str(ROOT / "sweeps" / f"{name}.yaml"),
            *(a for o in tiny_overrides(tmp_path) + extra for a in ("--set", o)),
        ]
        for name, extra in TINY_REWARDS.items()
    }
    code = (
        "import sys; from alignprop_ray.cli import main; "
        f"codes = [main(['validate', *argv]) for argv in {list(runs.values())!r}]; "
        "print(codes, [m for m in ('torch', 'ray', 'mlflow') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[0, 0] []"


def test_paper_hps_preset_trains_and_evaluates_on_the_tiny_model(tmp_path, one_thread):
    """The HPS preset's settings, one optimizer step and one evaluation in this process (no Ray)."""
    from alignprop_ray.train.build import build_learner, plan_training_step
    from alignprop_ray.train.evaluate import evaluate

    cfg = load_experiment(
        ROOT / "sweeps" / "paper_hps.yaml", tiny_overrides(tmp_path) + TINY_REWARDS["paper_hps"]
    )
    assert (cfg.train.loss_scale, cfg.train.max_grad_norm, cfg.train.lr) == (0.01, 5.0, 1e-3)
    learner = build_learner(cfg, torch.device("cpu"))
    result = learner.train_step(*plan_training_step(cfg, ["a cat", "a dog"], 0))
    assert not result.nonfinite and math.isfinite(result.reward)
    metrics = evaluate(learner, cfg, ["a cat", "a dog"], 1, result, None)
    assert {
        "eval/heldout/aesthetic",
        "eval/heldout/clip_score",
        "eval/vendi",
        "eval/vendi_across_prompts",
    } <= set(metrics)
    assert 1.0 <= metrics["eval/vendi"] <= 2.0 and 1.0 <= metrics["eval/vendi_across_prompts"] <= 2.0


@pytest.mark.ray
def test_paper_aesthetic_preset_on_ray_logs_heldout_and_diversity_to_mlflow_and_report(ray_session, tmp_path):
    """The aesthetic preset down to the tiny model through `train` (Ray, 2 workers): held-out rewards and
    the Vendi scores at every evaluation in MLflow, in the eval tables, and in the report's table and plot."""
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    from alignprop_ray.report import load_runs, summary_table, write_report
    from alignprop_ray.train.launch import run_training

    overrides = tiny_overrides(tmp_path) + TINY_REWARDS["paper_aesthetic"]
    cfg = load_experiment(ROOT / "sweeps" / "paper_aesthetic.yaml", overrides)
    run = run_training(cfg, name="paper-aesthetic-tiny")
    client = MlflowClient(cfg.tracking.uri)
    history = lambda key: [m.step for m in client.get_metric_history(run.run_id, key)]  # noqa: E731
    for key in ("eval/heldout/hpsv2", "eval/heldout/clip_score", "eval/vendi", "eval/vendi_across_prompts"):
        assert sorted(history(key)) == [0, 1, 2], key  # eval_every 1, as the official vis_freq
    assert sorted(history("train/k0_skipped")) == [1, 2]
    params = client.get_run(run.run_id).data.params
    assert (params["train.loss_scale"], params["train.k0"], params["eval.diversity.space"]) == (
        "0.01",
        "skip",
        "clip",
    )
    tables = Path(client.download_artifacts(run.run_id, "eval_tables", str(tmp_path / "tables")))
    table = pq.read_table(tables).to_pandas()
    assert {"heldout/hpsv2", "heldout/clip_score", "reward/aesthetic", "seed"} <= set(table.columns)
    assert table[table["step"] == 0]["seed"].is_unique  # every eval image its own noise

    runs, _ = load_runs(cfg.tracking.uri, cfg.tracking.experiment)
    shown = summary_table(runs)
    last = lambda key: client.get_metric_history(run.run_id, key)[-1].value  # noqa: E731
    assert shown.loc[0, "final eval/heldout/hpsv2"] == pytest.approx(last("eval/heldout/hpsv2"))
    assert shown.loc[0, "final eval/vendi"] == pytest.approx(last("eval/vendi"))
    written = {p.name for p in write_report(cfg.tracking.uri, cfg.tracking.experiment, tmp_path / "report")}
    assert "heldout_rewards.png" in written
    page = (tmp_path / "report" / "index.html").read_text()
    assert "final eval/heldout/clip_score" in page and "heldout_rewards.png" in page


# --- diversity that compares across runs -------------------------------------------------------------


def test_vendi_score_is_the_effective_number_of_distinct_items():
    """Friedman & Dieng 2023: exp(entropy of the eigenvalues of K/n); checked on its closed forms and, for
    random features, against the same eigenvalues computed the other way round (the D x D matrix X^T X / n
    has the nonzero eigenvalues of X X^T / n), in numpy."""
    from alignprop_ray.rewards.diversity import cosine_similarity, vendi_score

    assert vendi_score(torch.ones(5, 5)) == pytest.approx(1.0)  # five copies of one item
    assert vendi_score(torch.eye(5)) == pytest.approx(5.0)  # five orthogonal items
    groups = torch.eye(3).repeat_interleave(torch.tensor([2, 2, 2]), dim=0)  # 3 pairs of identical items
    assert vendi_score(groups @ groups.T) == pytest.approx(3.0)
    features = torch.randn(12, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = features.numpy() / np.linalg.norm(features.numpy(), axis=1, keepdims=True)
    eig = np.clip(np.linalg.eigvalsh(x.T @ x / len(x)), 0, None)
    expected = float(np.exp(-np.sum(eig[eig > 0] * np.log(eig[eig > 0]))))
    assert vendi_score(cosine_similarity(torch.zeros(12, 3, 8, 8), features)) == pytest.approx(
        expected, rel=1e-9
    )
    assert 1 < expected < 5  # 12 items in 5 dimensions: at most 5 distinct directions


def test_vendi_within_and_across_prompts_on_a_prompts_by_seeds_grid():
    """3 prompts x 4 seeds. Within a prompt the 4 images are 2 distinct ones; across prompts, image j of each
    prompt is its own direction: vendi 2 (of 4 images per prompt), vendi_across_prompts 3 (of 3 prompts)."""
    from alignprop_ray.rewards.diversity import diversity

    basis = torch.eye(12)
    rows = [
        basis[2 * i + (j % 2)] for i in range(3) for j in range(4)
    ]  # prompt i, seed j: 2 looks per prompt
    features = torch.stack(rows)
    groups = [i for i in range(3) for _ in range(4)]
    metrics = diversity(torch.zeros(12, 3, 8, 8), groups, features, prefix="")
    assert metrics["vendi"] == pytest.approx(2.0) and metrics["vendi_across_prompts"] == pytest.approx(3.0)
    collapsed = diversity(torch.zeros(12, 3, 8, 8), groups, torch.ones(12, 4), prefix="")
    assert collapsed["vendi"] == pytest.approx(1.0) and collapsed["vendi_across_prompts"] == pytest.approx(
        1.0
    )


def test_eval_seeds_are_per_prompt_and_those_of_the_sample_command():
    from alignprop_ray.train.evaluate import EVAL_SEED_BASE, eval_pairs

    pairs = eval_pairs(["a cat", "a dog", "a cat"], 3)
    seeds = [s for _, s in pairs]
    assert len(set(seeds)) == len(seeds)  # no two eval images share their initial noise
    # `alignprop-ray sample --seed 10000 --n 3 --prompt ... (in order)`: image i of prompt j has seed + j*n + i
    assert seeds == [EVAL_SEED_BASE + j * 3 + i for j in range(3) for i in range(3)]


def test_diversity_does_not_depend_on_the_training_reward(tmp_path, one_thread):
    """Two experiments that differ only in their reward (one with a CLIP term, whose embeddings the
    diversity metrics used to borrow) report the same diversity of the same images."""
    from alignprop_ray.train.build import build_learner
    from alignprop_ray.train.evaluate import evaluate

    def metrics(reward: str) -> dict:
        overrides = [*tiny_overrides(tmp_path), f"reward={reward}", "eval.rewards={}", "prompts.eval_seeds=2"]
        cfg = load_experiment(ROOT / "sweeps" / "tiny.yaml", overrides)
        return evaluate(build_learner(cfg, torch.device("cpu")), cfg, ["a cat", "a dog"], 0, None, None)

    plain, clip = metrics("{saturation: 1.0}"), metrics("{clip_score: {arch: tiny, seed: 3}}")
    keys = ["eval/diversity", "eval/diversity_across_prompts", "eval/vendi", "eval/vendi_across_prompts"]
    assert [plain[k] for k in keys] == pytest.approx([clip[k] for k in keys], rel=1e-6)
