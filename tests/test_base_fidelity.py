"""eval.base_fidelity: each eval image against the base model's (step 0) image of the same prompt and seed,
in process on the tiny model (no Ray, no weights)."""

from __future__ import annotations

import functools

import pytest
import torch

from alignprop_ray.config import parse_experiment
from alignprop_ray.train import base_fidelity

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a cat", "a dog"]


def experiment(space: dict):
    base = {
        "model": {"pretrained": "tiny", "resolution": 32},
        "sampling": {"steps": 2},
        "truncation": "full",
        "reward": {"saturation": 1.0},
        "prompts": {"train": "tiny", "eval": "tiny", "eval_seeds": 2},
        "train": {"batch_size": 2},
        "scaling": {"num_workers": 1, "use_gpu": False},
        "eval": {"base_fidelity": space},
    }
    return parse_experiment(base, ".", [], env={})


def move_adapter(learner) -> None:
    """Give every LoRA B matrix nonzero values: the adapter now changes the denoiser's output."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in learner.parts.denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@pytest.mark.parametrize(
    "space", [{"space": "pixels"}, {"space": "clip", "arch": "tiny"}], ids=["pixels", "clip"]
)
def test_base_fidelity_is_one_at_step_0_and_falls_once_the_adapter_changes_the_images(space):
    from alignprop_ray.train.build import build_learner
    from alignprop_ray.train.evaluate import evaluate

    cfg = experiment(space)
    learner = build_learner(cfg, torch.device("cpu"))
    assert evaluate(learner, cfg, PROMPTS, 0, None, None)["eval/base_fidelity"] == pytest.approx(
        1.0, abs=1e-6
    )
    # LoRA B is still zero: later evaluations draw the base model's images again
    assert evaluate(learner, cfg, PROMPTS, 1, None, None)["eval/base_fidelity"] == pytest.approx(
        1.0, abs=1e-6
    )
    move_adapter(learner)
    moved = evaluate(learner, cfg, PROMPTS, 2, None, None)["eval/base_fidelity"]
    assert moved < 0.999


def test_a_resumed_run_compares_with_the_step_0_reference_its_checkpoint_keeps(tmp_path, capsys):
    from ray.train import Checkpoint

    from alignprop_ray.train.build import build_learner
    from alignprop_ray.train.checkpoint import Progress, _checkpoint_extras, restore, write_checkpoint
    from alignprop_ray.train.evaluate import evaluate

    cfg = experiment({"space": "pixels"})
    learner = build_learner(cfg, torch.device("cpu"))
    evaluate(learner, cfg, PROMPTS, 0, None, None)
    move_adapter(learner)
    moved = evaluate(learner, cfg, PROMPTS, 3, None, None)["eval/base_fidelity"]
    extras = functools.partial(_checkpoint_extras, logger=None)
    directory = write_checkpoint(learner, Progress(step=3, run_id="r"), tmp_path, extras)
    assert (directory / base_fidelity.REFERENCE_FILE).is_file()

    base_fidelity.forget()  # a new worker process: nothing in memory
    assert "eval/base_fidelity" not in evaluate(learner, cfg, PROMPTS, 3, None, None)
    assert "eval/base_fidelity is not logged: no step-0 reference" in capsys.readouterr().out
    assert restore(Checkpoint.from_directory(str(directory)), learner, None, "r", say=print).step == 3
    assert evaluate(learner, cfg, PROMPTS, 3, None, None)["eval/base_fidelity"] == moved

    (directory / base_fidelity.REFERENCE_FILE).write_bytes(b"garbled")
    restore(Checkpoint.from_directory(str(directory)), learner, None, "r", say=print)  # damaged: not used
    assert (
        f"damaged checkpoint skipped: {directory} ({base_fidelity.REFERENCE_FILE}:" in capsys.readouterr().out
    )
